"""Prometheus metrics of one node, in the node's own registry.

Why a registry per node: a testnet runs many nodes in one process; with the
global default registry their counters would collide (or double count). Every
metric is therefore created against :attr:`NodeMetrics.registry` and exported
by the node's own ``/metrics`` endpoint.

Label cardinality is kept bounded: message kinds and fault types are fixed
enums, and per-peer aggregation weights are replaced wholesale each round
(labels of peers no longer aggregated are removed), so a churning network
cannot grow the exposition without limit.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE

from murmur.protocol.reachability import Reachability

__all__ = ["NodeMetrics", "Direction", "Split", "PROMETHEUS_CONTENT_TYPE"]

NAMESPACE = "murmur"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"


class Split(enum.StrEnum):
    TRAIN = "train"
    TEST = "test"


def _label(kind: str | enum.Enum) -> str:
    """Message kinds arrive as the protocol's IntEnum; export their names."""
    return kind.name.lower() if isinstance(kind, enum.Enum) else str(kind)


class NodeMetrics:
    """All metrics of one node."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.bytes = Counter("bytes", "Transport bytes (after encryption)", ["direction"], namespace=NAMESPACE, registry=r)
        self.messages = Counter("messages", "Protocol messages by kind", ["direction", "kind"], namespace=NAMESPACE, registry=r)
        self.peers_connected = Gauge("peers_connected", "Authenticated connections open now", namespace=NAMESPACE, registry=r)
        self.round = Gauge("round", "Current learning round", namespace=NAMESPACE, registry=r)
        self.loss = Gauge("loss", "Model loss (train: last local steps; test: held-out set)", ["split"], namespace=NAMESPACE, registry=r)
        self.accuracy = Gauge("accuracy", "Model accuracy", ["split"], namespace=NAMESPACE, registry=r)
        self.aggregation_weight = Gauge(
            "aggregation_weight", "Weight given to each peer (and 'self') in the last aggregation", ["peer"],
            namespace=NAMESPACE, registry=r,
        )
        self.rounds_stalled = Gauge(
            "rounds_stalled", "Consecutive rounds with neighbours that used none of their messages", namespace=NAMESPACE, registry=r
        )
        self.learning_stalled = Gauge(
            "learning_stalled", "1 while the node learns alone although neighbours are connected", namespace=NAMESPACE, registry=r
        )
        self.epsilon_spent = Gauge("privacy_epsilon_spent", "Differential privacy epsilon spent so far", namespace=NAMESPACE, registry=r)
        self.faults = Counter("peer_faults", "Peer faults by type (PeerFault subclass)", ["type"], namespace=NAMESPACE, registry=r)
        # The node binds these two to its health (set_function); /healthz answers 503 while healthy is 0.
        self.healthy = Gauge(
            "healthy", "1 while no supervised task of the node has crashed or keeps failing, else 0",
            namespace=NAMESPACE, registry=r,
        )
        self.failed_tasks = Gauge(
            "failed_tasks", "Supervised tasks of the node that crashed or keep failing (status health.failed_tasks)",
            namespace=NAMESPACE, registry=r,
        )
        self.reachability = Gauge(
            "reachability", "1 for the node's reachability now (status reachability.state), 0 for the others",
            ["state"], namespace=NAMESPACE, registry=r,
        )
        self.healthy.set(1)
        self._weight_peers: set[str] = set()
        for direction in Direction:  # export zeros from the start, not only after the first byte
            self.bytes.labels(direction=direction.value)

    # -- recording helpers (one line each at the call sites)
    def add_bytes(self, direction: Direction, n: int) -> None:
        if n:
            self.bytes.labels(direction=direction.value).inc(n)

    def message(self, direction: Direction, kind: str | enum.Enum, n: int = 1) -> None:
        self.messages.labels(direction=direction.value, kind=_label(kind)).inc(n)

    def fault(self, fault: BaseException | type[BaseException]) -> None:
        cls = fault if isinstance(fault, type) else type(fault)
        self.faults.labels(type=cls.__name__).inc()

    def set_eval(self, split: Split, *, loss: float, accuracy: float) -> None:
        self.loss.labels(split=split.value).set(loss)
        self.accuracy.labels(split=split.value).set(accuracy)

    def set_aggregation_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the per-peer weights with those of the latest aggregation."""
        for gone in self._weight_peers - weights.keys():
            self.aggregation_weight.remove(gone)
        for peer, weight in weights.items():
            self.aggregation_weight.labels(peer=peer).set(weight)
        self._weight_peers = set(weights)

    def bind_reachability(self, current: Callable[[], Reachability]) -> None:
        """Export ``current()`` (read at every scrape) as one 1 among the states."""
        for state in Reachability:
            self.reachability.labels(state=state.value).set_function(lambda s=state: float(current() is s))

    # -- reading back
    def value(self, name: str, **labels: str) -> float | None:
        """Current value of a sample (full name, e.g. ``murmur_bytes_total``)."""
        return self.registry.get_sample_value(name, labels)

    def exposition(self) -> bytes:
        """Prometheus text format of this node's registry."""
        return generate_latest(self.registry)
