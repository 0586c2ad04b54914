"""Aggregators: combine the own delta with neighbours' deltas (see docs/ARCHITECTURE.md).

Importing the package registers every built-in aggregator, so
``get_aggregator(name, **options)`` works for all names after any import from here.
"""

from murmur.learning.aggregators import (  # noqa: F401  (imported for registration)
    clipped_gossip,
    foolsgold,
    krum,
    mean,
    median,
    sybilwall,
    trimmed_mean,
)
from murmur.learning.aggregators.base import (
    SELF,
    AggregationResult,
    Aggregator,
    PeerUpdate,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)
from murmur.learning.aggregators.sybilwall import HistoryRecordData

__all__ = [
    "SELF",
    "AggregationResult",
    "Aggregator",
    "HistoryRecordData",
    "PeerUpdate",
    "available_aggregators",
    "get_aggregator",
    "register_aggregator",
]
