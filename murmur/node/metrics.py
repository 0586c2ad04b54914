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
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client.metrics_core import Metric

from murmur.protocol.reachability import Reachability

__all__ = ["NodeMetrics", "Direction", "Split", "PROMETHEUS_CONTENT_TYPE", "PHASE_SUFFIX"]

NAMESPACE = "murmur"
#: Round durations from a few ms (a testnet's tiny model) to minutes (a large
#: model under a long deadline).
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PHASE_SUFFIX = "_s"  # metrics rows name a round's phases train_s, commit_s, ...
CREATED_SUFFIX = "_created"


CONNECTION_TYPES = ("direct", "punched", "relayed")  # how a peer is connected (status connection_types)

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
        self.perplexity = Gauge(
            "perplexity", "Per-token perplexity of a language model (exp of the test loss)", ["split"],
            namespace=NAMESPACE, registry=r,
        )
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
        self.round_seconds = Histogram(
            "round_seconds", "Wall time of a learning round, all phases", namespace=NAMESPACE, registry=r,
            buckets=ROUND_BUCKETS,
        )
        self.phase_seconds = Histogram(
            "round_phase_seconds", "Wall time of each phase of a learning round (train, commit, send, wait, "
            "aggregate, eval)", ["phase"], namespace=NAMESPACE, registry=r, buckets=ROUND_BUCKETS,
        )
        self.last_phases: dict[str, float] = {}  # the last round's, for /status
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

    def set_eval(self, split: Split, *, loss: float | None, accuracy: float | None,
                 perplexity: float | None = None) -> None:
        """Export what was measured; a value that was not (None, NaN: training
        measures no accuracy; perplexity only for a language model) is left
        out, never exported as NaN."""
        for gauge, value in ((self.loss, loss), (self.accuracy, accuracy), (self.perplexity, perplexity)):
            if value is not None and math.isfinite(value):
                gauge.labels(split=split.value).set(value)

    def observe_round(self, phases: Mapping[str, float]) -> None:
        """One finished round's phase times (``{"train_s": 0.05, ...}``, the metrics row's)."""
        seconds = {name.removesuffix(PHASE_SUFFIX): float(v) for name, v in phases.items()
                   if name.endswith(PHASE_SUFFIX) and math.isfinite(v) and v >= 0}
        for phase, value in seconds.items():
            self.phase_seconds.labels(phase=phase).observe(value)
        self.round_seconds.observe(sum(seconds.values()))
        self.last_phases = seconds

    def resume(self, row: Mapping[str, object] | None, epsilon_spent: float | None = None) -> None:
        """After a restart, what the last metrics row recorded (round, test
        accuracy and loss, ε), until the first round back replaces it.
        ``epsilon_spent``: the privacy ledger's, which wins over the row's:
        the ledger is written before a round's message leaves, the row after
        the round, so a node killed in between (most of a round) exported a
        round's ε less, and for good if no round came back."""
        if epsilon_spent is not None:
            self.epsilon_spent.set(epsilon_spent)
        if row is None:
            return
        if isinstance(row.get("round"), int):
            self.round.set(int(row["round"]) + 1)  # the round the node resumes at
        loss, accuracy, epsilon = row.get("loss"), row.get("accuracy"), row.get("epsilon")
        perplexity = row.get("perplexity")
        self.set_eval(Split.TEST, loss=loss if isinstance(loss, (int, float)) else None,
                      accuracy=accuracy if isinstance(accuracy, (int, float)) else None,
                      perplexity=perplexity if isinstance(perplexity, (int, float)) else None)
        if epsilon_spent is None and isinstance(epsilon, (int, float)) and math.isfinite(epsilon):
            self.epsilon_spent.set(epsilon)

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

    def bind_relay(self, reservations: Callable[[], int], circuits: Callable[[], int],
                   counters: Mapping[str, int], names: Iterable[str]) -> None:
        """Export a relay service's live reservations and circuits and its
        running totals (``counters[name]``, read at every scrape), for a node
        that relays (``[relay] service``); absent otherwise."""
        r = self.registry
        Gauge("relay_reservations", "Reservations the relay service holds now", namespace=NAMESPACE,
              registry=r).set_function(lambda: float(reservations()))
        Gauge("relay_circuits", "Circuits the relay service carries now", namespace=NAMESPACE,
              registry=r).set_function(lambda: float(circuits()))
        totals = Gauge("relay_events", "Relay service totals since start: reservations_total, circuits_total, "
                       "bytes_relayed, refused_<status>, cut_<limit> (status relay)", ["event"],
                       namespace=NAMESPACE, registry=r)
        for name in names:
            totals.labels(event=name).set_function(lambda n=name: float(counters.get(n, 0)))

    def bind_dcutr(self, counters: Mapping[str, int], names: Iterable[str]) -> None:
        """Export the hole puncher's running totals (``counters[name]``, read at every scrape)."""
        totals = Gauge("dcutr_events", "DCUtR totals since start: attempts (punch rounds), successes, failures "
                       "(upgrades that ended with a punched connection or without one), unilateral, refused, retries "
                       "(status dcutr)", ["event"], namespace=NAMESPACE, registry=self.registry)
        for name in names:
            totals.labels(event=name).set_function(lambda n=name: float(counters.get(n, 0)))

    def bind_connections(self, types: Callable[[], Mapping[str, int]], reservations: Callable[[], int]) -> None:
        """Export the murmur sessions by connection type (``direct``, ``punched``,
        ``relayed``) and the relay reservations this node holds as a client (AutoRelay)."""
        r = self.registry
        by_type = Gauge("connections", "Murmur sessions now, by connection type (direct, punched, relayed)", ["type"],
                        namespace=NAMESPACE, registry=r)
        for kind in CONNECTION_TYPES:
            by_type.labels(type=kind).set_function(lambda k=kind: float(types().get(k, 0)))
        Gauge("relay_client_reservations", "Relay reservations this node holds (to be reached behind NAT)",
              namespace=NAMESPACE, registry=r).set_function(lambda: float(reservations()))

    # -- reading back
    def value(self, name: str, **labels: str) -> float | None:
        """Current value of a sample (full name, e.g. ``murmur_bytes_total``)."""
        return self.registry.get_sample_value(name, labels)

    def exposition(self) -> bytes:
        """Prometheus text format of this node's registry, without the
        ``*_created`` samples prometheus_client adds to every counter and
        histogram (a second series per series that says when the process
        started; scrapers have ``process_start_time_seconds`` for that)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry view whose metrics carry no ``*_created`` sample (per node,
    not the library's process-wide ``disable_created_metrics()``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():  # fresh Metric objects on every collect
            metric.samples = [s for s in metric.samples if not s.name.endswith(CREATED_SUFFIX)]
            yield metric
