"""The names of the built-in aggregators, importable without torch.

The aggregator registry (``aggregators/base.py``) is filled by importing every
aggregator module, which imports torch; a node that does not learn still
checks the aggregator its config names, and must not pay ~1 s and a few
hundred MB for torch to do so. A test keeps this set equal to the registry's.
"""

from __future__ import annotations

from murmur.errors import ConfigError

AGGREGATORS = frozenset({
    "mean", "sybilwall", "foolsgold", "krum", "multi-krum", "median", "trimmed_mean", "clipped_gossip",
    "centered_clipping",
})


def check_aggregator_name(name: str) -> None:
    """ConfigError, worded as the registry's, unless ``name`` is a built-in aggregator."""
    if name not in AGGREGATORS:
        raise ConfigError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
