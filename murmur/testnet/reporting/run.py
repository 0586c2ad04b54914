"""What a report is made from, and the series every plot derives from it.

A run is each node's ``metrics.jsonl`` rows (ARCHITECTURE.md), its last
status, the scenario and the applied events. Everything here is a pure
function of those: the plots and the CSV files behind them are written from
the same series, so the numbers in a CSV are the ones drawn.

The quality metric is not assumed to be accuracy: a row may name its own
(``"metric": "perplexity"`` with the value under ``"perplexity"``); whether
higher is better comes from :data:`HIGHER_IS_BETTER` or the row's
``metric_higher_is_better``. Byte counters are per process: a restarted node
counts from 0 again, so :func:`cumulative_bytes` adds each incarnation's
count to what the earlier ones reached instead of drawing it falling.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from murmur.testnet.scenario import DOWN_ACTIONS, Action, Role, Scenario
from murmur.units import natural_sorted

Row = Mapping[str, Any]

DEFAULT_METRIC = "accuracy"
#: Whether a larger value of a known metric is better (the row may say otherwise).
HIGHER_IS_BETTER: Mapping[str, bool] = {"accuracy": True, "perplexity": False, "loss": False}
#: A round's phases, as the metrics row names them, in the order they run.
PHASES = ("train_s", "commit_s", "send_s", "wait_s", "aggregate_s", "eval_s")
PHASE_LABELS: Mapping[str, str] = {"train_s": "train", "commit_s": "privacy commit", "send_s": "send",
                                   "wait_s": "wait", "aggregate_s": "aggregate", "eval_s": "evaluate"}
SELF_WEIGHT_KEY = "self"
#: How a node reaches a peer (its status's ``connection_types``): dialled, hole-punched (DCUtR) or through a relay.
CONNECTION_TYPES = ("direct", "punched", "relayed")


@dataclass(frozen=True)
class Metric:
    """The run's quality metric: its name (a key of the metrics rows) and direction."""

    name: str = DEFAULT_METRIC
    higher_is_better: bool = True

    def value(self, row: Row) -> float | None:
        v = row.get(self.name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    @property
    def bounded(self) -> bool:
        """Accuracy-like (0..1): plots fix the axis to that range."""
        return self.name == DEFAULT_METRIC


def run_metric(rows_by_node: Mapping[str, Sequence[Row]]) -> Metric:
    """The metric the rows report: the ``metric`` field of the first row
    that has one, else accuracy."""
    for rows in rows_by_node.values():
        for row in rows:
            name = row.get("metric")
            if isinstance(name, str) and name:
                higher = row.get("metric_higher_is_better")
                return Metric(name, higher if isinstance(higher, bool) else HIGHER_IS_BETTER.get(name, True))
    return Metric()


@dataclass(frozen=True)
class RunData:
    """Everything a panel may read. ``rows`` is in natural node order
    (node2 before node10); ``t0`` is the first row's unix time."""

    scenario: Scenario
    rows: Mapping[str, Sequence[Row]]
    roles: Mapping[str, Role]
    status: Mapping[str, Mapping[str, Any] | None]
    peer_ids: Mapping[str, str]  # node name -> peer id
    events: Sequence[Mapping[str, Any]]
    metric: Metric
    t0: float

    @property
    def names(self) -> list[str]:
        return list(self.rows)

    @property
    def honest(self) -> dict[str, Sequence[Row]]:
        return {n: r for n, r in self.rows.items() if self.roles.get(n, Role.HONEST) is Role.HONEST}

    @property
    def down_at_end(self) -> set[str]:
        """Nodes the churn took down (crash, stop) and did not bring back."""
        return down_at_end(self.events)

    @property
    def attackers(self) -> list[str]:
        return [n for n in self.rows if self.roles.get(n) is Role.ATTACKER]

    @property
    def names_by_peer(self) -> dict[str, str]:
        return {peer: name for name, peer in self.peer_ids.items()}

    @property
    def sybil_peers(self) -> set[str]:
        return {self.peer_ids[n] for n in self.attackers if n in self.peer_ids}

    @property
    def epsilon_budget(self) -> float | None:
        privacy = self.scenario.privacy
        return privacy.epsilon if privacy.enabled else None


#: Churn actions that bring named nodes (back) up.
UP_ACTIONS = frozenset({Action.RESTART, Action.JOIN})


def down_at_end(events: Sequence[Mapping[str, Any]]) -> set[str]:
    """The nodes whose last applied churn event naming them took them down
    (crash, stop), in the order the events were applied; skipped ones count for nothing."""
    down: set[str] = set()
    for ev in events:
        if ev.get("skipped"):
            continue
        try:
            action = Action(ev.get("action"))
        except ValueError:
            continue
        names = [n for n in ev.get("nodes") or () if isinstance(n, str)]
        if action in DOWN_ACTIONS:
            down.update(names)
        elif action in UP_ACTIONS:
            down.difference_update(names)
    return down


def roles(scenario: Scenario, node_status: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Role]:
    """Node name -> role. The scenario is authoritative; a node's own
    ``learning.role`` fills in names the scenario does not know."""
    from_status = {
        name: Role((status.get("learning") or {}).get("role", Role.HONEST.value))
        for name, status in node_status.items() if status
    }
    return from_status | {s.name: s.role for s in scenario.node_specs()}


def make_run(scenario: Scenario, node_metrics: Mapping[str, Sequence[Row]],
             node_status: Mapping[str, Mapping[str, Any] | None], events: Sequence[Mapping[str, Any]],
             peer_ids: Mapping[str, str] | None = None) -> RunData:
    rows = {name: list(node_metrics[name]) for name in natural_sorted(node_metrics)}
    ids = {n: str(s["peer_id"]) for n, s in node_status.items() if s and s.get("peer_id")} | dict(peer_ids or {})
    starts = [float(r[0]["ts"]) for r in rows.values() if r and isinstance(r[0].get("ts"), (int, float))]
    return RunData(scenario=scenario, rows=rows, roles=roles(scenario, node_status), status=dict(node_status),
                   peer_ids=ids, events=list(events), metric=run_metric(rows), t0=min(starts, default=0.0))


# ------------------------------------------------------------------ series


def finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def by_round(rows_by_node: Mapping[str, Sequence[Row]],
             value: Callable[[Row], float | None]) -> dict[int, list[float]]:
    """Round -> the nodes' values of ``value(row)`` in that round (finite only)."""
    buckets: dict[int, list[float]] = {}
    for rows in rows_by_node.values():
        for row in rows:
            v = value(row)
            if v is not None and math.isfinite(v) and isinstance(row.get("round"), int):
                buckets.setdefault(int(row["round"]), []).append(v)
    return dict(sorted(buckets.items()))


def mean_by_round(rows_by_node: Mapping[str, Sequence[Row]],
                  value: Callable[[Row], float | None]) -> tuple[list[int], list[float]]:
    buckets = by_round(rows_by_node, value)
    return list(buckets), [statistics.fmean(v) for v in buckets.values()]


def with_gaps(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Break a per-round line where rounds are missing (a node was down)."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        if out and x - out[-1][0] > 1:
            out.append((out[-1][0] + 1, math.nan))
        out.append((x, y))
    return out


@dataclass(frozen=True)
class Traffic:
    """One metrics row's byte counters, corrected for restarts."""

    round: int
    t: float  # seconds since the run's first row
    bytes_in: float  # cumulative over every incarnation of the node
    bytes_out: float
    in_rate: float | None  # bytes/s since the row before; None at a start or restart
    out_rate: float | None
    restarted: bool  # the counters fell: this row is the first of a new process


def cumulative_bytes(rows: Sequence[Row], t0: float) -> list[Traffic]:
    """Each row's transport bytes as totals over the node's whole life.

    A counter smaller than the one before means the process restarted and
    counts from 0: its count is added to what the node had reached. The rate
    of such a row is unknown (the new process's start is not recorded)."""
    out: list[Traffic] = []
    base_in = base_out = 0.0
    last: Row | None = None
    for row in rows:
        raw_in, raw_out, ts = row.get("bytes_in"), row.get("bytes_out"), row.get("ts")
        if not isinstance(raw_in, (int, float)) or not isinstance(raw_out, (int, float)) or not isinstance(ts, (int, float)):
            continue
        restarted = last is not None and (raw_in < last["bytes_in"] or raw_out < last["bytes_out"])
        if restarted and last is not None:
            base_in += last["bytes_in"]
            base_out += last["bytes_out"]
        in_rate = out_rate = None
        if last is not None and not restarted and ts > last["ts"]:
            dt = ts - last["ts"]
            in_rate, out_rate = (raw_in - last["bytes_in"]) / dt, (raw_out - last["bytes_out"]) / dt
        out.append(Traffic(int(row.get("round", -1)), ts - t0, base_in + raw_in, base_out + raw_out,
                           in_rate, out_rate, restarted))
        last = row
    return out


@dataclass(frozen=True)
class MeanPoint:
    """The network's mean in one round: what a run is compared by. ``t`` is
    when the nodes finished the round, in seconds since the run's first row:
    their median, so that one late node does not pull the curve back in time."""

    round: int
    t: float
    bytes_sent: float  # mean bytes sent per node by then (restarts handled)
    value: float  # mean metric


def network_mean(rows_by_node: Mapping[str, Sequence[Row]], metric: Metric, t0: float) -> list[MeanPoint]:
    """The nodes' mean metric per round, against the mean time and bytes.

    The bytes carry each node's count forward through rounds it has no row
    for (it was down, or a catch-up skipped them): what the nodes had sent by
    then, so the curve never runs backwards when a node rejoins."""
    sent: dict[str, dict[int, float]] = {
        name: {t.round: t.bytes_out for t in cumulative_bytes(rows, t0)} for name, rows in rows_by_node.items()}
    times = by_round(rows_by_node, lambda r: float(r["ts"]) - t0 if isinstance(r.get("ts"), (int, float)) else None)
    so_far = dict.fromkeys(rows_by_node, 0.0)
    out = []
    for rnd, values in by_round(rows_by_node, metric.value).items():
        for name in so_far:
            so_far[name] = sent[name].get(rnd, so_far[name])
        out.append(MeanPoint(rnd, statistics.median(times.get(rnd) or [math.nan]), statistics.fmean(so_far.values()),
                             statistics.fmean(values)))
    return out


def phase_times(row: Row) -> dict[str, float]:
    """The row's phase seconds (0 for a phase the round did not run)."""
    return {p: float(row[p]) if isinstance(row.get(p), (int, float)) else 0.0 for p in PHASES}


def weight_split(row: Row, sybils: set[str]) -> tuple[float, float]:
    """(weight on Sybil peers, weight on honest peers) in one aggregation; own weight excluded."""
    weights = row.get("weights") or {}
    to_sybil = sum(float(w) for p, w in weights.items() if p in sybils)
    to_honest = sum(float(w) for p, w in weights.items() if p not in sybils and p != SELF_WEIGHT_KEY)
    return to_sybil, to_honest


# ------------------------------------------------------------------ events


def describe_event(event: Mapping[str, Any]) -> str:
    """``crash node3``, ``partition node0 node1 | rest``, ``latency 50 ms (skipped)``."""
    action = str(event.get("action", "?"))
    nodes = " ".join(str(n) for n in event.get("nodes") or [])
    text = action
    if action == Action.PARTITION.value:
        text = f"partition {nodes} | rest"
    elif nodes:
        text = f"{action} {nodes}"
    elif event.get("process"):
        text = f"{action} {event['process']}" + (f" (code {event.get('code')})" if "code" in event else "")
    if event.get("ms") is not None:
        text += f" {event['ms']:g} ms"
    if event.get("percent") is not None:
        text += f" {event['percent']:g} %"
    if event.get("skipped"):
        text += " (skipped)"
    return text


@dataclass(frozen=True)
class PlacedEvent:
    """An event where it goes on a round axis (``round``) and a time axis (``t``)."""

    round: int | None
    t: float | None  # seconds since the run's first metrics row
    label: str
    record: Mapping[str, Any]


def place_events(events: Sequence[Mapping[str, Any]], t0: float) -> list[PlacedEvent]:
    out = []
    for event in events:
        rnd = event.get("round")
        ts = event.get("ts")
        out.append(PlacedEvent(rnd if isinstance(rnd, int) else None,
                               ts - t0 if isinstance(ts, (int, float)) and t0 else None,
                               describe_event(event), event))
    return out


@dataclass(frozen=True)
class Partition:
    """One partition of the run: its two sides (node names) and when it held."""

    sides: tuple[tuple[str, ...], tuple[str, ...]]
    from_round: int | None
    to_round: int | None  # the heal's round; None: never healed


def partitions(events: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[Partition]:
    """The run's partitions in order; a new partition replaces the one before
    (as the controller applies them), a heal ends it."""
    out: list[Partition] = []
    open_sides: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    since: int | None = None
    for event in events:
        action = event.get("action")
        if action not in (Action.PARTITION.value, Action.HEAL.value):
            continue
        rnd = event.get("round") if isinstance(event.get("round"), int) else None
        if open_sides is not None:
            out.append(Partition(open_sides, since, rnd))
            open_sides = None
        if action == Action.PARTITION.value:
            named = set(event.get("nodes") or [])
            inside = tuple(n for n in names if n in named)
            open_sides, since = (inside, tuple(n for n in names if n not in named)), rnd
    if open_sides is not None:
        out.append(Partition(open_sides, since, None))
    return out


def plain(obj: Any) -> Any:
    """Dataclasses, enums and mappings -> JSON-ready values."""
    import enum
    from pathlib import Path

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
