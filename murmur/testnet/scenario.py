"""Testnet scenarios: what network to start and what to do to it.

A scenario is a TOML file parsed into nested frozen dataclasses. Parsing is
driven by the field types (one generic converter, range checks declared next to
each field as ``metadata={"check": ...}``), so adding an option is one line.
Every mistake becomes one :class:`ConfigError` line naming the file, the line
and the dotted field, e.g.::

    scenario.toml:14: churn[2].action: unknown action 'crashh' (expected one of crash, stop, ...)

tomllib reports no positions, so :func:`find_line` recovers line numbers by
scanning the text, counting ``[[array]]`` headers to resolve ``churn[2]``.

Node numbering: honest nodes are ``0 .. nodes-1`` (``node0`` ...); the Sybil
identities of attacker ``a`` follow in order (``sybil{a}-{s}``). Churn events
address nodes by these global indices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.resources
import math
import random
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError, OptionError
from murmur.learning.options import MAX_SEED
from murmur.learning.tactics import AttackPlan, Tactic, with_strength
from murmur.node.config import (
    Check,
    Codec,
    InvalidValue,
    MaskName,
    NetworkSection,
    OuterName,
    Partition,
    PrivacyLevel,
    PrivacyScheme,
    RoundingName,
    SparsifierName,
    at_least,
    between,
    device_name,
    finite_positive,
    non_empty,
)
from murmur.testnet import internet

DEFAULT_SCENARIO_RESOURCE = "default_scenario.toml"
LOOPBACK = "127.0.0.1"
#: learning.rounds for runs bounded by wall-clock seconds: the controller stops
#: the nodes at T; the nodes themselves must not stop earlier.
UNBOUNDED_ROUNDS = 1_000_000
#: torch threads per node: a testnet packs many nodes onto few cores.
NODE_TORCH_THREADS = 1
#: Every node's listen port on the emulated internet: each host has an address of its own.
NETWORK_PORT = 4731
# The emulated internet's links answer a SYN in well under a millisecond: a dial
# that has none after this went to a NATed peer's router, which drops it, and the
# dialler moves on to the peer's relay circuit (the default waits 5 s).
NETWORK_CONNECT_TIMEOUT_S = 1.0
RELAY_CHECK_INTERVAL_S = 1.0  # a node behind NAT (re)reserves on its relays this often: soon after they are up
#: Cyclon shuffles every 2 s (default 10 s): a testnet run lasts minutes, and
#: restarts, joins and healed partitions must be mixed in within a few rounds.
SHUFFLE_INTERVAL_S = 2.0
#: Bytes per second in one Mbit/s (link rates are given in Mbit/s, as ISPs sell them).
MBIT_BYTES_S = 1e6 / 8


# --------------------------------------------------------------------- enums


class Action(enum.StrEnum):
    """What a churn event does. The controller dispatches on this enum."""

    CRASH = "crash"  # SIGKILL: no goodbye, no checkpoint flush
    STOP = "stop"  # SIGTERM: graceful shutdown
    RESTART = "restart"  # start a crashed/stopped node again (same data_dir, same identity)
    PARTITION = "partition"  # split: `nodes` on one side, everybody else on the other
    HEAL = "heal"  # undo every partition
    LATENCY = "latency"  # add `ms` one-way delay on `nodes` (all when empty)
    LOSS = "loss"  # drop `percent` % of packets each way on `nodes` (all when empty; 0: none again)
    JOIN = "join"  # start a late node for the first time


class Reference(enum.StrEnum):
    """Whose round an ``at_round`` churn event counts (see :class:`RoundOf`)."""

    FRONT = "front"  # the fastest live honest node
    MEDIAN = "median"  # the round more than half of the live honest nodes have reached
    SLOWEST = "slowest"  # the slowest live honest node
    NODE = "node"  # one named honest node (``node3``)


@dataclass(frozen=True)
class RoundOf:
    """A churn event's ``round_of``: ``"front"``, ``"median"``, ``"slowest"``
    or an honest node's name (``"node3"``). Parsed once from the scenario, so
    the controller dispatches on :class:`Reference`, never on the string."""

    reference: Reference
    node: int | None = None  # with Reference.NODE: the honest node's index

    @classmethod
    def from_toml(cls, value: Any) -> RoundOf:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        named = re.fullmatch(r"node(\d+)", value)
        if named:
            return cls(Reference.NODE, int(named.group(1)))
        if value != Reference.NODE.value:
            with contextlib.suppress(ValueError):
                return cls(Reference(value))
        choices = ", ".join(r.value for r in Reference if r is not Reference.NODE)
        raise ValueError(f"unknown round_of {value!r} (expected one of {choices}, or an honest node's name: node0, node1, ...)")

    def __str__(self) -> str:
        return f"node{self.node}" if self.reference is Reference.NODE else self.reference.value


#: What "at round 8" means when an event does not say whose round: the round
#: more than half of the live honest nodes have reached. Not the front, which
#: one node racing ahead (alone, or just after adopting a model) would move,
#: nor the slowest, which one node restarting or catching up would hold back.
DEFAULT_ROUND_OF = RoundOf(Reference.MEDIAN)


class AttackKind(enum.StrEnum):
    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"


class Role(enum.StrEnum):
    HONEST = "honest"
    ATTACKER = "attacker"
    RELAY = "relay"  # a public relay of the emulated internet ([network] relays): relays, learns nothing


class Backend(enum.StrEnum):
    """Where a run's worker processes go (``[cluster] backend``)."""

    LOCAL = "local"  # this machine, forked from the fork server (the default)
    RAY = "ray"  # the hosts of a Ray cluster (murmur.testnet.raycluster; needs murmur[ray])


class Placement(enum.StrEnum):
    """How a Ray run spreads its worker processes over the cluster's hosts
    (a Ray placement group strategy, one bundle per worker process)."""

    SPREAD = "spread"  # over as many hosts as possible, best effort
    STRICT_SPREAD = "strict_spread"  # one worker process per host, or the run does not start
    PACK = "pack"  # on as few hosts as possible


#: Actions that address specific nodes and need at least one.
NODE_ACTIONS = frozenset({Action.CRASH, Action.STOP, Action.RESTART, Action.PARTITION, Action.JOIN})
#: Actions that bring a node down (a later RESTART must follow one of them).
DOWN_ACTIONS = frozenset({Action.CRASH, Action.STOP})


# -------------------------------------------------------------------- checks


def _optional(check: Check) -> Check:
    """The node config's ``check`` (:mod:`murmur.node.config`), for a field
    that may be left out (None)."""

    def run(v: Any) -> None:
        if v is not None:
            check(v)

    return run


def _at_least(lo: float) -> Check:
    return _optional(at_least(lo))


def _in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    return _optional(between(lo, hi, lo_open=lo_open, hi_open=hi_open))


_finite_positive = _optional(finite_positive)


def _checked(default: Any, check: Check) -> Any:
    """A dataclass field with a range check run at parse time."""
    return field(default=default, metadata={"check": check})


def _string_values(v: Any) -> None:
    bad = [k for k, x in v.items() if not isinstance(x, str)]
    if bad:
        raise InvalidValue(f"values must be strings, {bad[0]!r} is not")


def _empty_map() -> Mapping[str, Any]:
    return types.MappingProxyType({})


# ------------------------------------------------------------------ sections


@dataclass(frozen=True)
class Topology:
    degree: int = _checked(3, _at_least(1))  # neighbours per honest node
    # every node swaps its longest-held neighbour every this many shuffles
    # (network.neighbour_rotation_shuffles; 0: never): the sides of a healed partition link again
    rotation_shuffles: int = _checked(0, _at_least(0))


@dataclass(frozen=True)
class Duration:
    """Exactly one of ``rounds`` (R) or ``seconds`` (T) bounds the run."""

    rounds: int | None = _checked(None, _at_least(1))
    seconds: float | None = _checked(None, _finite_positive)
    round_deadline_s: float = _checked(3.0, _finite_positive)
    quorum: float = _checked(1.0, _in_range(0.0, 1.0, lo_open=True))
    # after `rounds`, rounds that only mix public models (learning.mixing_rounds): free noise cancellation
    mixing_rounds: int = _checked(0, _at_least(0))

    @property
    def last_round(self) -> int | None:
        """The round count at which every honest node is done (None: bounded by seconds)."""
        return None if self.rounds is None else self.rounds + self.mixing_rounds


@dataclass(frozen=True)
class TrainerSpec:
    spec: str = _checked("digits-mlp", non_empty)  # built-in name, module:Class or entry point
    local_steps: int = _checked(10, _at_least(1))
    device: str = _checked("cpu", device_name)
    options: Mapping[str, Any] = field(default_factory=_empty_map)


@dataclass(frozen=True)
class PartitionSpec:
    kind: Partition = Partition.IID
    alpha: float = _checked(0.5, _finite_positive)
    shards: int = _checked(2, _at_least(1))


@dataclass(frozen=True)
class AggregatorSpec:
    name: str = _checked("sybilwall", non_empty)  # the node's default: NodeConfig.learning.aggregator
    options: Mapping[str, Any] = field(default_factory=_empty_map)


@dataclass(frozen=True)
class PrivacySpec:
    enabled: bool = False
    scheme: PrivacyScheme = PrivacyScheme.DECOR
    epsilon: float = _checked(10.0, _finite_positive)
    delta: float = _checked(1e-5, _in_range(0.0, 1.0, lo_open=True, hi_open=True))
    clip: float = _checked(1.0, _finite_positive)
    rounds: int | None = _checked(None, _at_least(1))  # accounting horizon; default: duration.rounds
    level: PrivacyLevel = PrivacyLevel.USER  # "example": DP-SGD guarantee (needs the trainer's dp_clip)
    colluders: int = _checked(0, _at_least(0))  # ε holds against this many nodes pooling their seeds


@dataclass(frozen=True)
class CompressionSpec:
    """Every node's ``[compression]`` (the network must agree on it)."""

    sparsifier: SparsifierName = SparsifierName.NONE
    ratio: float = _checked(0.01, _in_range(0.0, 1.0, lo_open=True))
    mask: MaskName = MaskName.SENDER
    rounding: RoundingName = RoundingName.NEAREST
    consensus_step: float = _checked(1.0, _in_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class OuterSpec:
    """Every node's ``[outer]`` optimizer (DiLoCo with many local steps)."""

    optimizer: OuterName = OuterName.NONE
    lr: float = _checked(0.7, _finite_positive)
    momentum: float = _checked(0.9, _in_range(0.0, 0.999))


@dataclass(frozen=True)
class LinkOverride:
    """Other link rates for some nodes (a slow uplink, say)."""

    nodes: tuple[int, ...] = ()
    upload_mbit: float = _checked(0.0, _at_least(0.0))
    download_mbit: float = _checked(0.0, _at_least(0.0))


@dataclass(frozen=True)
class LinkSpec:
    """Per-node link rates in Mbit/s (0: unlimited), emulated by each node's
    own token buckets (``[link]``): nodes share one loopback interface here,
    so this paces messages rather than shaping packets (no queueing delay or
    loss). The report says so wherever it shows them."""

    upload_mbit: float = _checked(0.0, _at_least(0.0))
    download_mbit: float = _checked(0.0, _at_least(0.0))
    overrides: tuple[LinkOverride, ...] = ()

    @property
    def limited(self) -> bool:
        return self.upload_mbit > 0 or self.download_mbit > 0 or bool(self.overrides)

    def for_node(self, index: int) -> tuple[float, float]:
        """(upload, download) in Mbit/s of node ``index``: the last override naming it wins."""
        up, down = self.upload_mbit, self.download_mbit
        for override in self.overrides:
            if index in override.nodes:
                up, down = override.upload_mbit, override.download_mbit
        return up, down


@dataclass(frozen=True)
class AttackerSpec:
    """One attacker controlling ``sybils`` identities, each with
    ``edges_per_sybil`` attack edges to honest nodes."""

    kind: AttackKind = AttackKind.LABEL_FLIP
    sybils: int = _checked(1, _at_least(1))
    edges_per_sybil: int = _checked(1, _at_least(1))
    # What each identity sends (murmur.learning.adversary); the strengths
    # default to the tactic's tuned ones (AttackPlan.tuned).
    tactic: Tactic = Tactic.IDENTICAL
    boost: float | None = _checked(None, _finite_positive)  # the attacker's offset from the honest mean, scaled
    diversify: float | None = _checked(None, _at_least(0.0))  # each identity's fixed offset, in honest spreads
    fresh: float | None = _checked(None, _at_least(0.0))  # each identity's fresh offset every round, in honest spreads
    sleep_rounds: int | None = _checked(None, _at_least(0))  # sleeper: clean rounds before the attack

    def plan(self) -> AttackPlan:
        """The tactic at its tuned strength, with the strengths this attacker sets."""
        changes = {name: value for name in STRENGTHS if (value := getattr(self, name)) is not None}
        return with_strength(AttackPlan.tuned(self.tactic), **changes)


#: An attacker's strength settings (AttackerSpec fields that override AttackPlan.tuned).
STRENGTHS = ("boost", "diversify", "fresh", "sleep_rounds")


@dataclass(frozen=True)
class ChurnEvent:
    action: Action
    at_round: int | None = _checked(None, _at_least(0))
    at_s: float | None = _checked(None, _at_least(0.0))
    round_of: RoundOf | None = None  # whose round at_round counts; None: DEFAULT_ROUND_OF
    nodes: tuple[int, ...] = ()
    ms: float | None = _checked(None, _at_least(0.0))  # latency
    percent: float | None = _checked(None, _in_range(0.0, 100.0))  # loss (0: none again)

    @property
    def reference(self) -> RoundOf:
        """Whose round this event counts (for an ``at_s`` event: the round its record reports)."""
        return self.round_of or DEFAULT_ROUND_OF


@dataclass(frozen=True)
class ClusterSpec:
    """``[cluster]``: where the worker processes run. ``address`` is a Ray
    cluster's (``host:port`` of its head, or ``auto``); none: a local Ray
    instance the run starts and stops. ``cpus_per_node`` and
    ``gpus_per_node`` are what each murmur node asks of Ray (a worker process
    of K nodes asks K times that); a node given a GPU trains on it. ``labels``
    (Ray node labels, ``ray start --labels k=v``): only hosts that carry all of
    them take the run's worker processes."""

    backend: Backend = Backend.LOCAL
    address: str | None = None
    placement: Placement = Placement.SPREAD
    cpus_per_node: float = _checked(0.25, _finite_positive)
    gpus_per_node: float = _checked(0.0, _in_range(0.0, 1.0))
    labels: Mapping[str, Any] = field(default_factory=_empty_map, metadata={"check": _string_values})


@dataclass(frozen=True)
class RouterSpec:
    """A home router: ``nodes`` on its private LAN, behind its NAT."""

    nodes: tuple[int, ...] = ()
    nat: internet.NatKind = internet.NatKind.EIM
    unsolicited: internet.Unsolicited = internet.Unsolicited.DROP


@dataclass(frozen=True)
class HostLinkSpec:
    """Link rates (Mbit/s) of ``nodes``' hosts on the emulated internet (tc
    tbf), over the section's defaults."""

    nodes: tuple[int, ...] = ()
    up_mbit: float | None = _checked(None, _finite_positive)
    down_mbit: float | None = _checked(None, _finite_positive)


@dataclass(frozen=True)
class NetworkSpec:
    """``[network]``: the nodes on an emulated internet (``murmur.testnet.internet``)
    instead of all on loopback. Each honest node is a host of its own, the
    Sybils of one attacker share one; hosts behind no router are public.

    Relays (circuit relay v2): ``relays`` public hosts of their own that only
    relay (nodes ``relay0``.., indices after the Sybils), and, with
    ``public_relay``, every public honest node too. Each relay carries the
    honest nodes' traffic in its learning class (``[relay] learning_peers``:
    the run knows every honest id; Sybils are strangers there); each node
    behind a router bootstraps to and reserves on up to two of them."""

    up_mbit: float | None = _checked(None, _finite_positive)  # every host's link unless a [[network.links]] says
    down_mbit: float | None = _checked(None, _finite_positive)
    relays: int = _checked(0, _at_least(0))
    public_relay: bool = True
    routers: tuple[RouterSpec, ...] = ()
    links: tuple[HostLinkSpec, ...] = ()


MAX_NODES = 4096
"""Honest nodes of one testnet: each needs a port of one block of free ones
(ports.PORT_RANGE), and 20000 failed there with a traceback."""
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _run_name(v: Any) -> None:
    """The name starts the run directory's: a path in it put the report
    outside reports/testnet (name = "x/../../../escaped")."""
    if not _RUN_NAME.fullmatch(v):
        raise InvalidValue(f"must be 1-64 letters, digits, '.', '_' or '-' (not first), got {v!r}")


@dataclass(frozen=True)
class Scenario:
    name: str = _checked("scenario", _run_name)
    nodes: int = _checked(8, _in_range(1, MAX_NODES))  # honest nodes
    nodes_per_process: int = _checked(1, _at_least(1))
    seed: int = _checked(0, _in_range(0, MAX_SEED))
    codec: Codec = Codec.FP32
    topology: Topology = field(default_factory=Topology)
    duration: Duration = field(default_factory=lambda: Duration(rounds=30))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    aggregator: AggregatorSpec = field(default_factory=AggregatorSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    outer: OuterSpec = field(default_factory=OuterSpec)
    links: LinkSpec = field(default_factory=LinkSpec)
    # Testnets kill nodes: a checkpoint every round keeps what a kill -9 loses
    # to one round (a node's own default is every 10 rounds or 60 s).
    checkpoint_every_rounds: int = _checked(1, _at_least(0))
    attackers: tuple[AttackerSpec, ...] = ()
    churn: tuple[ChurnEvent, ...] = ()
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    network: NetworkSpec | None = None  # None: every node on 127.0.0.1

    @property
    def total_nodes(self) -> int:
        return self.nodes + sum(a.sybils for a in self.attackers) + self.relay_nodes

    @property
    def relay_nodes(self) -> int:
        """Dedicated relay nodes (``[network] relays``)."""
        return self.network.relays if self.network is not None else 0

    def node_specs(self) -> list[NodeSpec]:
        """Every node of the run, honest first, then Sybils attacker by attacker."""
        late = {i for ev in self.churn if ev.action is Action.JOIN for i in ev.nodes}
        specs = [NodeSpec(i, f"node{i}", Role.HONEST, None, None, i, i in late) for i in range(self.nodes)]
        for a, attacker in enumerate(self.attackers):
            for s in range(attacker.sybils):
                index = len(specs)
                # all Sybils of one attacker share one data partition: they send the same model
                specs.append(NodeSpec(index, f"sybil{a}-{s}", Role.ATTACKER, attacker.kind, a,
                                      self.nodes + a, index in late))
        for r in range(self.relay_nodes):
            index = len(specs)
            specs.append(NodeSpec(index, f"relay{r}", Role.RELAY, None, None, 0, index in late))
        return specs


@dataclass(frozen=True)
class NodeSpec:
    index: int  # global index used by churn events
    name: str
    role: Role
    attack: AttackKind | None
    attacker: int | None  # which attacker owns this Sybil
    data_index: int  # partition index (learning.node_index)
    late: bool  # started by a JOIN event, not at t=0


# ------------------------------------------------------------ line locating

_HEADER = re.compile(r"\[(\[)?\s*([^\]]+?)\s*\]\]?")


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def find_line(text: str, path: tuple[str | int, ...]) -> int | None:
    """1-based line of the TOML key at ``path`` (e.g. ``("churn", 2, "action")``).

    Tracks ``[table]`` and ``[[array]]`` headers (counting array elements) and
    matches ``key =`` lines. When the exact key is absent (a missing field, or a
    value inside an inline table) the line of the longest matching prefix is
    returned, which is where the operator must look.
    """
    counts: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    best: tuple[int, int] | None = None  # (matched length, line)

    def consider(candidate: tuple[str | int, ...], lineno: int) -> int | None:
        nonlocal best
        if candidate == path:
            return lineno
        if path[: len(candidate)] == candidate and (best is None or len(candidate) > best[0]):
            best = (len(candidate), lineno)
        return None

    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        header = _HEADER.fullmatch(stripped) if stripped.startswith("[") else None
        if header:
            keys: tuple[str | int, ...] = _split_key(header.group(2))
            if header.group(1):  # [[array]]: element index = how many we saw so far
                index = counts.get(keys, 0)
                counts[keys] = index + 1
                keys = (*keys, index)
            table = keys
            if (hit := consider(table, lineno)) is not None:
                return hit
            continue
        if "=" in stripped:
            if (hit := consider((*table, *_split_key(stripped.split("=", 1)[0])), lineno)) is not None:
                return hit
    return best[1] if best else None


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _FieldError(Exception):
    def __init__(self, path: tuple[str | int, ...], problem: str) -> None:
        super().__init__(f"{_dotted(path)}: {problem}")
        self.path = path


# ---------------------------------------------------------- generic parsing


def _describe_enum(tp: type[enum.Enum]) -> str:
    return ", ".join(str(m.value) for m in tp)


def _convert(tp: Any, value: Any, path: tuple[str | int, ...]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null, so a value is an X
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner, value, path)
    parse = getattr(tp, "from_toml", None)
    if parse is not None:  # a value type with its own syntax (RoundOf)
        try:
            return parse(value)
        except ValueError as exc:
            raise _FieldError(path, str(exc)) from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _FieldError(path, f"must be a table, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise _FieldError(path, f"must be a list, got {type(value).__name__}")
        return tuple(_convert(item_tp, v, (*path, i)) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise _FieldError(path, f"must be a table, got {type(value).__name__}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _FieldError(path, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _FieldError(path, f"must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            name = next((p for p in reversed(path) if isinstance(p, str)), "value")
            raise _FieldError(path, f"unknown {name} {value!r} (expected one of {_describe_enum(tp)})") from None
    raise TypeError(f"scenario field {_dotted(path)} has unsupported type {tp!r}")  # programming error


def _build(cls: type, table: Mapping[str, Any], path: tuple[str | int, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in table:
        if name not in fields:
            raise _FieldError((*path, name), f"unknown field (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _FieldError((*path, name), "is required")
            continue
        value = _convert(hints[name], table[name], (*path, name))
        check = f.metadata.get("check")
        if check is not None:
            try:
                check(value)
            except InvalidValue as exc:
                raise _FieldError((*path, name), str(exc)) from None
        kwargs[name] = value
    return cls(**kwargs)


# -------------------------------------------------------------- cross checks


def _cross_checks(sc: Scenario) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """Rules relating several fields: yields (path blamed, problem)."""
    d = sc.duration
    if (d.rounds is None) == (d.seconds is None):
        yield ("duration",), "give exactly one of rounds (R) or seconds (T)"
    if d.mixing_rounds and d.rounds is None:
        yield ("duration", "mixing_rounds"), "needs duration.rounds (mixing follows the training rounds)"
    if sc.privacy.enabled and sc.privacy.rounds is None and d.rounds is None:
        yield ("privacy", "rounds"), "required when the duration is given in seconds (accounting horizon)"
    if sc.topology.degree >= sc.nodes:
        yield ("topology", "degree"), f"must be < nodes ({sc.nodes})"
    for a, attacker in enumerate(sc.attackers):
        if attacker.edges_per_sybil > sc.nodes:
            yield ("attackers", a, "edges_per_sybil"), f"must be <= nodes ({sc.nodes})"
    total = sc.total_nodes
    for o, override in enumerate(sc.links.overrides):
        for i in override.nodes:
            if not 0 <= i < total:
                yield ("links", "overrides", o, "nodes"), f"node index {i} out of range (0..{total - 1})"
    down: set[int] = set()
    joined: set[int] = set()
    latest: dict[RoundOf | None, tuple[float, int]] = {}  # per trigger (None: at_s): the latest so far, and where
    for e, ev in enumerate(sc.churn):
        if (ev.at_round is None) == (ev.at_s is None):
            yield ("churn", e), "give exactly one of at_round or at_s"
        # Events fire in file order: one listed after a later one of the same
        # trigger waits for it (nat.toml's latency at round 5, listed after a
        # loss step at 15, fired at 15).
        trigger, at = (ev.reference, ev.at_round) if ev.at_round is not None else (None, ev.at_s)
        if at is not None:
            before = latest.get(trigger)
            if before is not None and at < before[0]:
                what = "at_round" if trigger is not None else "at_s"
                yield ("churn", e, what), (f"{at:g} comes after churn[{before[1]}] at {before[0]:g}: events fire in "
                                           f"file order, so this one would wait for that one; list them in order")
            else:
                latest[trigger] = (at, e)
        if d.rounds is not None and ev.at_round is not None and ev.at_round >= d.rounds:
            yield ("churn", e, "at_round"), f"must be < duration.rounds ({d.rounds})"
        if d.seconds is not None and ev.at_s is not None and ev.at_s >= d.seconds:
            yield ("churn", e, "at_s"), f"must be < duration.seconds ({d.seconds})"
        if ev.round_of is not None and ev.at_round is None:
            yield ("churn", e, "round_of"), "only applies to at_round"
        if ev.round_of is not None and ev.round_of.node is not None and not 0 <= ev.round_of.node < sc.nodes:
            yield ("churn", e, "round_of"), f"names no honest node (node0..node{sc.nodes - 1})"
        for i in ev.nodes:
            if not 0 <= i < total:
                yield ("churn", e, "nodes"), f"node index {i} out of range (0..{total - 1})"
        if len(set(ev.nodes)) != len(ev.nodes):
            yield ("churn", e, "nodes"), "lists a node twice"
        if ev.action in NODE_ACTIONS and not ev.nodes:
            yield ("churn", e, "nodes"), f"{ev.action} needs at least one node"
        if ev.action is Action.HEAL and ev.nodes:
            yield ("churn", e, "nodes"), "heal takes no nodes (it removes every partition)"
        if ev.action is Action.PARTITION and len(set(ev.nodes)) >= total:
            yield ("churn", e, "nodes"), "a partition needs nodes on both sides"
        if ev.action is Action.LATENCY and ev.ms is None:
            yield ("churn", e, "ms"), "is required for latency"
        if ev.action is Action.LOSS and ev.percent is None:
            yield ("churn", e, "percent"), "is required for loss"
        if ev.ms is not None and ev.action is not Action.LATENCY:
            yield ("churn", e, "ms"), f"only applies to latency, not {ev.action}"
        if ev.percent is not None and ev.action is not Action.LOSS:
            yield ("churn", e, "percent"), f"only applies to loss, not {ev.action}"
        # events are applied in file order: a restart must follow a crash/stop of that node
        if ev.action in DOWN_ACTIONS:
            down.update(ev.nodes)
        elif ev.action is Action.RESTART:
            for i in ev.nodes:
                if i not in down:
                    yield ("churn", e, "nodes"), f"restart of node {i}, which no earlier event crashed or stopped"
            down.difference_update(ev.nodes)
        elif ev.action is Action.JOIN:
            for i in ev.nodes:
                if i in joined:
                    yield ("churn", e, "nodes"), f"node {i} joins twice"
            joined.update(ev.nodes)
    yield from _round_counter_checks(sc)
    if sc.network is not None:
        yield from _network_checks(sc, sc.network)


def _round_counter_checks(sc: Scenario) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """An ``at_round`` event counts the rounds of the live honest nodes (of
    one, with ``round_of = "nodeK"``); events fire in file order. Where the
    events before it leave no such node up (every honest node joins late, or
    all were crashed), it can never fire, nor can any event after it: the run
    sat for the stall bound (60 s) and ended 'stalled' (exit 1)."""
    late = {i for ev in sc.churn if ev.action is Action.JOIN for i in ev.nodes}
    up = {i for i in range(sc.nodes) if i not in late}
    for e, ev in enumerate(sc.churn):
        if ev.at_round is not None:
            named = ev.reference.node
            if named is not None and named not in up:
                yield ("churn", e, "round_of"), (f"node{named} is not up when this event is due (the events "
                                                 "before it leave it down or not yet joined): it would never fire")
            elif named is None and not up:
                yield ("churn", e, "at_round"), ("no honest node is up to count rounds when this event is due "
                                                 "(the events before it leave every one down or not yet joined): "
                                                 "it would never fire; give it at_s instead")
        honest = {i for i in ev.nodes if 0 <= i < sc.nodes}
        if ev.action in DOWN_ACTIONS:
            up -= honest
        elif ev.action in (Action.RESTART, Action.JOIN):
            up |= honest


def _network_checks(sc: Scenario, net: NetworkSpec) -> Iterable[tuple[tuple[str | int, ...], str]]:
    total = sc.total_nodes
    placed: dict[int, int] = {}
    for table, entries in (("routers", net.routers), ("links", net.links)):
        seen: dict[int, int] = {}
        for e, entry in enumerate(entries):
            where = ("network", table, e, "nodes")
            if not entry.nodes:
                yield where, "must name at least one node"
            for i in entry.nodes:
                if not 0 <= i < total:
                    yield where, f"node index {i} out of range (0..{total - 1})"
                elif i in seen:
                    yield where, f"node {i} is already in network.{table}[{seen[i]}]"
                seen[i] = e
            if table == "links" and entry.up_mbit is None and entry.down_mbit is None:  # type: ignore[attr-defined]
                yield ("network", table, e), "give up_mbit, down_mbit or both"
        if table == "routers":
            placed = seen
        for a in range(len(sc.attackers)):
            sybils = [s.index for s in sc.node_specs() if s.attacker == a]
            if len({seen.get(i) for i in sybils}) > 1:
                first = min(seen[i] for i in sybils if i in seen)
                yield ("network", table, first, "nodes"), (
                    f"the Sybils of attacker {a} (nodes {', '.join(map(str, sybils))}) share one host: "
                    f"list all of them in one entry, or none")
    for r, router in enumerate(net.routers):
        for i in router.nodes:
            if 0 <= i < total and specs_role(sc, i) is Role.RELAY:
                yield ("network", "routers", r, "nodes"), f"node {i} is a relay: relays are public, leave it out"
    if relay_indices(sc):
        return  # every node dials the public relays, and reaches every other through them
    # without relays: every node must reach an honest node, and the honest nodes each other
    specs = sc.node_specs()
    group = list(range(total))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(total):
        for j in range(sc.nodes):
            if i != j and can_dial(placed, i, j):
                group[find(i)] = find(j)
    for s in specs:  # an attacker's identities share its host
        if s.attacker is not None:
            group[find(s.index)] = find(next(t.index for t in specs if t.attacker == s.attacker))
    islands: dict[int, list[int]] = {}
    for s in specs:
        islands.setdefault(find(s.index), []).append(s.index)
    honest_islands = [g for g in islands.values() if any(i < sc.nodes for i in g)]
    if len(honest_islands) > 1 or len(islands) > len(honest_islands):
        listed = "; ".join(", ".join(map(str, g)) for g in islands.values())
        yield ("network",), (f"nodes that cannot dial each other without a relay: {listed} (no public node "
                             f"between them: leave a node out of every router to make it public, or add relays)")


def specs_role(sc: Scenario, index: int) -> Role:
    return sc.node_specs()[index].role


def relay_indices(sc: Scenario) -> list[int]:
    """The nodes that relay on the emulated internet: the dedicated relays,
    then (``public_relay``) the public honest nodes."""
    net = sc.network
    if net is None:
        return []
    behind = routers_of(net)
    specs = sc.node_specs()
    dedicated = [s.index for s in specs if s.role is Role.RELAY]
    public = [s.index for s in specs if s.role is Role.HONEST and s.index not in behind] if net.public_relay else []
    return dedicated + public


def relays_for(sc: Scenario, index: int) -> list[int]:
    """The relays node ``index`` (behind a router) reserves on: at most as many
    as a peer entry carries circuits, dedicated relays first, the public honest
    ones taken in turn (so their load spreads)."""
    from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS

    relays = relay_indices(sc)
    dedicated = [i for i in relays if specs_role(sc, i) is Role.RELAY]
    public = [i for i in relays if i not in dedicated]
    if public:
        turn = index % len(public)
        public = public[turn:] + public[:turn]
    return (dedicated + public)[:MAX_CIRCUIT_ADDRS]


def can_dial(router_of: Mapping[int, int], src: int, dst: int) -> bool:
    """Whether node ``src`` can open a connection to node ``dst`` (indices),
    ``router_of`` placing nodes behind routers: ``dst`` is public, or on the
    same LAN: directly, without a relay (nor hole punching)."""
    behind = router_of.get(dst)
    return behind is None or behind == router_of.get(src)


# ------------------------------------------------------------------- loading


def _locate(text: str, source: str, path: tuple[str | int, ...], message: str) -> ConfigError:
    line = find_line(text, path)
    return ConfigError(f"{source}:{line}: {message}" if line else f"{source}: {message}")


def parse_scenario(text: str, source: str = "scenario.toml") -> Scenario:
    """Parse scenario TOML ``text``; errors name ``source``, line and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    try:
        scenario = _build(Scenario, raw, ())
    except _FieldError as exc:
        raise _locate(text, source, exc.path, str(exc)) from None
    for path, problem in _cross_checks(scenario):
        raise _locate(text, source, path, f"{_dotted(path)}: {problem}")
    return scenario


def default_scenario_text() -> str:
    return importlib.resources.files(__package__).joinpath(DEFAULT_SCENARIO_RESOURCE).read_text(encoding="utf-8")


def read_scenario(path: str | Path | None = None) -> tuple[str, str]:
    """A scenario's text and the name its errors go by; ``None``: the embedded default."""
    if path is None:
        return default_scenario_text(), DEFAULT_SCENARIO_RESOURCE
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load a scenario file; ``None`` loads the embedded default scenario."""
    return parse_scenario(*read_scenario(path))


def load_runnable_scenario(path: str | Path | None = None) -> Scenario:
    """:func:`load_scenario`, then :func:`check_scenario`: what ``murmur
    testnet run`` does before it starts any process, so that a typo in a
    trainer's name is one line naming the scenario's line, not a run of
    nodes that never start."""
    text, source = read_scenario(path)
    scenario = parse_scenario(text, source)
    try:
        check_scenario(scenario)
    except OptionError as exc:
        field_path = SCENARIO_FIELDS.get(exc.key, ())
        raise _locate(text, source, field_path, f"{_dotted(field_path) or exc.key}: {exc.problem}") from None
    return scenario


# --------------------------------------------------------- per-node configs


def honest_bootstrap(scenario: Scenario) -> list[list[int]]:
    """For each honest node, which honest nodes it dials first.

    A ring (so the honest graph is connected from the start) plus
    ``degree - 2`` extra random peers drawn deterministically from the seed;
    the peer sampler refines the neighbourhood from there.
    """
    n, rng = scenario.nodes, random.Random(scenario.seed)
    out = []
    for i in range(n):
        chosen = {(i + 1) % n, (i - 1) % n} - {i}
        others = [j for j in range(n) if j != i and j not in chosen]
        chosen.update(rng.sample(others, min(len(others), max(0, scenario.topology.degree - 2))))
        out.append(sorted(chosen))
    return out


def sybil_targets(scenario: Scenario) -> dict[int, list[int]]:
    """Global Sybil index -> the honest nodes it attacks (its attack edges)."""
    rng = random.Random(scenario.seed + 1)
    targets = {}
    for spec in scenario.node_specs():
        if spec.attacker is not None:
            edges = scenario.attackers[spec.attacker].edges_per_sybil
            targets[spec.index] = sorted(rng.sample(range(scenario.nodes), edges))
    return targets


def provision_identities(scenario: Scenario, workdir: Path) -> dict[str, str]:
    """Create (or load) every node's identity in its data_dir; name -> peer id.

    Done by the controller before any node starts, so bootstrap addresses can
    carry ``/p2p/<peer id>`` (dials are authenticated) and the dashboard can map
    peer ids to names. A node restarted later loads the same key.
    """
    from murmur.protocol.identity import Identity

    return {s.name: str(Identity.load_or_create(workdir / s.name).peer_id) for s in scenario.node_specs()}


@dataclass(frozen=True)
class NodePlace:
    """Where one node runs when it is not on this machine's loopback (a
    cluster run): its host's address, its port there, its data dir on that
    host, and the trainer device the cluster gave it (None: the scenario's)."""

    host: str
    port: int
    data_dir: Path
    device: str | None = None


def node_configs(scenario: Scenario, workdir: str | Path, base_port: int = 0,
                 plan: internet.Plan | None = None, *,
                 places: Mapping[int, NodePlace] | None = None) -> list[dict[str, Any]]:
    """One TOML-ready dict per node (see :func:`dump_toml`), in global index order.

    On loopback node ``i`` listens on ``base_port + i``; on the emulated
    internet (``plan``, of :func:`network_topology`) on its host's address,
    port :data:`NETWORK_PORT` (an attacker's identities, sharing a host, on
    the ports after it), and dials only the nodes it can reach
    (:func:`network_dials`).

    This is the one place where scenario fields map to ``murmur.node.config``
    sections (``node``, ``network``, ``transport``, ``api``, ``learning``,
    ``privacy``); keep it aligned with that module. Identities are created
    in ``workdir``. With ``places`` (a cluster run: node index ->
    :class:`NodePlace`, every node) each node listens on its host's own
    address and keeps its data dir there. The API stays on loopback always:
    the controller reaches it on the node's own host (in its namespace, or
    relayed by murmur.testnet.raycluster).
    """
    workdir = Path(workdir)
    specs = scenario.node_specs()
    peer_ids = provision_identities(scenario, workdir)
    total = len(specs)
    first_on_host: dict[str, int] = {}
    for spec in specs:
        first_on_host.setdefault(host_name(spec), spec.index)

    def listen(i: int) -> str:
        if places is not None:
            return f"/ip4/{places[i].host}/tcp/{places[i].port}"
        if plan is None:
            return f"/ip4/{LOOPBACK}/tcp/{base_port + i}"
        host = host_name(specs[i])
        return f"/ip4/{plan.hosts[host].address}/tcp/{NETWORK_PORT + i - first_on_host[host]}"

    def data_dir(i: int) -> Path:
        return places[i].data_dir if places is not None else workdir / specs[i].name

    def device(i: int) -> dict[str, str]:
        place = places[i] if places is not None else None
        return {"device": place.device} if place is not None and place.device is not None else {}

    def addr(i: int) -> str:
        return f"{listen(i)}/p2p/{peer_ids[specs[i].name]}"

    if plan is None:
        boot, targets = honest_bootstrap(scenario), sybil_targets(scenario)
        dials = {s.index: targets[s.index] if s.role is Role.ATTACKER else boot[s.index] if s.role is Role.HONEST
                 else [] for s in specs}
    else:
        dials = network_dials(scenario)
    relays = set(relay_indices(scenario)) if plan is not None else set()
    behind = routers_of(scenario.network) if scenario.network is not None else {}
    members = sorted(peer_ids[s.name] for s in specs if s.role is Role.HONEST)
    configs = []
    for s in specs:
        neighbours = (scenario.attackers[s.attacker].edges_per_sybil if s.attacker is not None
                      else scenario.topology.degree)
        view_size = max(total, neighbours)
        configs.append({
            "node": {"data_dir": str(data_dir(s.index)), "listen": [listen(s.index)],
                     "log_level": "info", "log_format": "json"},
            "network": {
                "bootstrap": [addr(j) for j in dials[s.index]], "mdns": False, "neighbours": neighbours,
                # a shuffle cannot send more of the view than there is (networks under 8 nodes)
                "view_size": view_size, "shuffle_length": min(NetworkSection.shuffle_length, view_size),
                "allow_loopback": plan is None,
                # every node shares 127.0.0.0/24 (on the emulated internet: the nodes behind
                # one router share its address): subnet limits would cap the view at a few peers
                "subnet_bucket_size": total, "shuffle_interval_s": SHUFFLE_INTERVAL_S,
                "neighbour_rotation_shuffles": scenario.topology.rotation_shuffles,
            },
            "transport": {"max_inbound_per_subnet": max(16, total)}
            | ({"connect_timeout_s": NETWORK_CONNECT_TIMEOUT_S} if plan is not None else {}),
            "api": {"host": LOOPBACK, "port": 0},  # on the emulated internet and a Ray host: the host's own loopback
            "learning": learning_table(scenario, s) | device(s.index),
            "privacy": privacy_table(scenario),
            "compression": compression_table(scenario),
            "outer": outer_table(scenario),
            "link": link_table(scenario, s.index),
        })
        if s.role is Role.RELAY:
            configs[-1]["learning"]["enabled"] = False
        if s.index in relays:  # the honest nodes' rounds in its learning class; Sybils are strangers
            configs[-1]["relay"] = {"service": True, "learning_peers": members}
        elif s.index in behind and relays:
            used = relays_for(scenario, s.index)
            configs[-1]["relay"] = {"use": [addr(r) for r in used], "check_interval_s": RELAY_CHECK_INTERVAL_S}
            # a relay-only node is in the view (its shuffles introduce the nodes behind NAT)
            # and the sampler may pick it as a neighbour, but it learns nothing: a slot more
            configs[-1]["network"]["neighbours"] += sum(1 for r in used if specs[r].role is Role.RELAY)
    return configs


def privacy_table(scenario: Scenario) -> dict[str, Any]:
    priv = scenario.privacy
    return {
        "enabled": priv.enabled, "scheme": priv.scheme.value, "epsilon": priv.epsilon,
        "delta": priv.delta, "clip": priv.clip, "rounds": priv.rounds or scenario.duration.rounds or UNBOUNDED_ROUNDS,
        "level": priv.level.value, "colluders": priv.colluders,
    }


def compression_table(scenario: Scenario) -> dict[str, Any]:
    c = scenario.compression
    return {"sparsifier": c.sparsifier.value, "ratio": c.ratio, "mask": c.mask.value, "rounding": c.rounding.value,
            "consensus_step": c.consensus_step}


def outer_table(scenario: Scenario) -> dict[str, Any]:
    o = scenario.outer
    return {"optimizer": o.optimizer.value, "lr": o.lr, "momentum": o.momentum}


def link_table(scenario: Scenario, index: int) -> dict[str, Any]:
    up, down = scenario.links.for_node(index)
    return {"upload_bytes_s": up * MBIT_BYTES_S, "download_bytes_s": down * MBIT_BYTES_S}


def learning_table(scenario: Scenario, spec: NodeSpec) -> dict[str, Any]:
    """The ``[learning]`` section of node ``spec``'s config."""
    return {
        "enabled": True, "threads": NODE_TORCH_THREADS,
        # honest nodes measure the success rate of the (first) attack in the scenario
        "eval_attack": scenario.attackers[0].kind.value if scenario.attackers else "none",
        "trainer": scenario.trainer.spec, "trainer_options": dict(scenario.trainer.options),
        "device": scenario.trainer.device, "seed": scenario.seed,
        "node_index": spec.data_index, "num_nodes": scenario.nodes + len(scenario.attackers),
        "partition": scenario.partition.kind.value, "alpha": scenario.partition.alpha,
        "shards": scenario.partition.shards,
        "attack": spec.attack.value if spec.attack is not None else "none",
        "rounds": scenario.duration.rounds or UNBOUNDED_ROUNDS, "mixing_rounds": scenario.duration.mixing_rounds,
        "local_steps": scenario.trainer.local_steps,
        "round_deadline_s": scenario.duration.round_deadline_s, "quorum": scenario.duration.quorum,
        "aggregator": scenario.aggregator.name, "aggregator_options": dict(scenario.aggregator.options),
        "codec": scenario.codec.value,
        "checkpoint_every_rounds": scenario.checkpoint_every_rounds, "checkpoint_every_s": 0.0,
    }


#: Where the node options a scenario sets come from: a node-config check's
#: complaint about the key is reported at the scenario field's line.
SCENARIO_FIELDS: Mapping[str, tuple[str | int, ...]] = types.MappingProxyType({
    "learning.trainer": ("trainer", "spec"),
    "learning.trainer_options": ("trainer", "options"),
    "learning.device": ("trainer", "device"),
    "learning.attack": ("attackers", 0, "kind"),
    "learning.eval_attack": ("attackers", 0, "kind"),
    "learning.aggregator": ("aggregator", "name"),
    "learning.aggregator_options": ("aggregator", "options"),
    "privacy.level": ("privacy", "level"),
    "compression.sparsifier": ("compression", "sparsifier"),
    "compression.mask": ("compression", "mask"),
    "network": ("network",),
})


def check_scenario(scenario: Scenario) -> None:
    """What the machine decides about a scenario's nodes (trainer, its options
    and attacks, device, aggregator and its options, whether ``[network]``
    can run), checked on one honest
    node and one Sybil as :mod:`murmur.node.preflight` checks a node: raises
    :class:`OptionError` keyed by the node option (see :data:`SCENARIO_FIELDS`)."""
    from murmur.node.config import load_config
    from murmur.node.preflight import check_learner

    specs = scenario.node_specs()
    for spec in [specs[0], *(s for s in specs if s.role is Role.ATTACKER)][:2]:
        table = learning_table(scenario, spec)
        keys = {f"learning.{key}": value for key, value in table.items()}
        keys.update({f"privacy.{key}": value for key, value in privacy_table(scenario).items()})
        keys.update({f"compression.{key}": value for key, value in compression_table(scenario).items()})
        try:
            config = load_config(None, keys)
        except ConfigError as exc:  # a cross-field rule (compression x privacy): name the scenario's field
            key = next((k for k in SCENARIO_FIELDS if f" {k}: " in f" {exc}"), None)
            if key is None:
                raise
            raise OptionError(key, str(exc).split(f"{key}: ", 1)[1]) from None
        check_learner(config)
    if scenario.network is not None:
        check_network(latency=bool(latency_hosts(scenario)))


def check_network(capabilities: internet.Capabilities | None = None, *, latency: bool = False) -> None:
    """Refuse ``[network]`` where the emulated internet cannot run (not root,
    no nftables, ...; ``capabilities``: this machine's, probed when None):
    never a silent fallback to loopback. With ``latency`` steps, refuse it
    where their delay line cannot run as well: they would not be applied."""
    caps = capabilities or internet.probe()
    if caps.internet is not None:
        raise OptionError("network", f"the emulated internet cannot run here: {caps.internet} "
                                     "(run as root, or remove [network] to run every node on loopback)")
    if latency and caps.delay is not None:
        raise OptionError("network", f"latency steps need the emulated internet's delay line, which cannot run "
                                     f"here: {caps.delay}")


# ------------------------------------------------------------ emulated internet


def host_name(spec: NodeSpec) -> str:
    """The emulated host a node runs on: its own, or its attacker's (one
    process holds all of an attacker's identities)."""
    return spec.name if spec.attacker is None else f"attacker{spec.attacker}"


def router_name(index: int) -> str:
    return f"router{index}"


def routers_of(network: NetworkSpec) -> dict[int, int]:
    """Node index -> index of the router it is behind (public nodes absent)."""
    return {i: r for r, router in enumerate(network.routers) for i in router.nodes}


def latency_hosts(scenario: Scenario) -> set[str]:
    """The hosts a latency step names (every host when one names no nodes):
    decided before the run, since only these get a delay line in their
    cable, and the others keep a plain one."""
    steps = [ev for ev in scenario.churn if ev.action is Action.LATENCY]
    named = {i for ev in steps for i in ev.nodes}
    every = any(not ev.nodes for ev in steps)
    return {host_name(s) for s in scenario.node_specs() if every or s.index in named}


def network_topology(scenario: Scenario) -> internet.Topology:
    """The emulated internet of a scenario with ``[network]``: a host per
    honest node and per attacker, with a delay line where latency steps
    need one (:func:`latency_hosts`)."""
    net = scenario.network
    assert net is not None
    router_of = routers_of(net)
    delayed = latency_hosts(scenario)
    link_of = {i: link for link in net.links for i in link.nodes}
    hosts: dict[str, internet.Host] = {}
    for spec in scenario.node_specs():
        name = host_name(spec)
        if name in hosts:
            continue
        link = link_of.get(spec.index)
        up = link.up_mbit if link is not None and link.up_mbit is not None else net.up_mbit
        down = link.down_mbit if link is not None and link.down_mbit is not None else net.down_mbit
        router = router_of.get(spec.index)
        hosts[name] = internet.Host(name, router=None if router is None else router_name(router),
                                    rate=internet.LinkRate(up, down), delay_line=name in delayed)
    routers = tuple(internet.Router(router_name(r), nat=router.nat, unsolicited=router.unsolicited)
                    for r, router in enumerate(net.routers))
    return internet.Topology(tuple(hosts.values()), routers)


def network_dials(scenario: Scenario) -> dict[int, list[int]]:
    """Whom each node dials first on the emulated internet: of its loopback
    bootstrap (or attack edges) those it can reach, topped up to as many as
    it wanted with the other honest nodes it can reach, nearest after it in
    index order first (a node behind NAT whose ring neighbours are behind
    other NATs still starts with a full set of peers it can reach); a node
    behind a router dials its relays too (:func:`relays_for`), and meets the
    nodes behind other routers through them."""
    assert scenario.network is not None
    router_of = routers_of(scenario.network)
    boot, targets = honest_bootstrap(scenario), sybil_targets(scenario)
    out = {}
    for spec in scenario.node_specs():
        i = spec.index
        if spec.role is Role.RELAY:
            out[i] = []  # everyone dials it
            continue
        wanted = targets[i] if spec.attacker is not None else boot[i]
        chosen = [j for j in wanted if can_dial(router_of, i, j)]
        others = sorted((j for j in range(scenario.nodes) if j != i and j not in chosen and can_dial(router_of, i, j)),
                        key=lambda j: (j - i) % scenario.nodes)
        out[i] = chosen + others[:max(0, len(wanted) - len(chosen))]
        if i in router_of:  # and its relays, to reserve on and to meet the nodes behind other routers
            out[i] += [r for r in relays_for(scenario, i) if r not in out[i]]
    return out


def process_groups(scenario: Scenario, nodes_per_process: int | None = None) -> list[list[int]]:
    """Node indices grouped into worker processes of ``nodes_per_process``
    (default: the scenario's).

    On the emulated internet every honest node has a host, so a process, of
    its own. A node named by a crash/stop/restart/join event gets a process of its own:
    kill -9 takes down a whole process, and the event must hit only its nodes.
    The Sybils of one attacker share one process (one poisoned learner behind
    all its identities, see murmur.testnet.sybil); churn on a Sybil hits them all.
    """
    if scenario.network is not None:  # a process lives in one host's namespace: one node each
        nodes_per_process = 1
    churned = {i for ev in scenario.churn if ev.action in NODE_ACTIONS - {Action.PARTITION} for i in ev.nodes}
    honest = [s.index for s in scenario.node_specs() if s.attacker is None]
    solo = [[i] for i in honest if i in churned]
    rest = [i for i in honest if i not in churned]
    k = nodes_per_process or scenario.nodes_per_process
    attackers: dict[int, list[int]] = {}
    for s in scenario.node_specs():
        if s.attacker is not None:
            attackers.setdefault(s.attacker, []).append(s.index)
    return sorted(solo + [rest[i:i + k] for i in range(0, len(rest), k)] + list(attackers.values()))


# ----------------------------------------------------------------- TOML out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def dump_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Write a two-level dict (section -> key -> scalar/list/inline table) as TOML."""
    parts = []
    for section, body in sections.items():
        parts.append(f"[{_toml_key(section)}]")
        parts.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items())
        parts.append("")
    return "\n".join(parts)
