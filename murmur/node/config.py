"""Typed node configuration: nested frozen dataclasses loaded from TOML.

Why generic: every option is declared exactly once, as a dataclass field with a
type and a default. Parsing and type checking are driven by those field types,
range checks by the small :data:`CONSTRAINTS` table, so adding an option is one
line here plus its documented line in ``default_node.toml`` (a test keeps the
two in sync). Every mistake in a config file becomes one :class:`ConfigError`
line of the form ``<file>:<line>: <dotted.key>: <problem>``, which is what an
operator needs to fix it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from murmur.errors import ConfigError, OptionError
from murmur.learning.options import MAX_SEED, check_device
from murmur.learning.privacy.schemes import NoiseObjective, PrivacyLevel, PrivacyScheme
from murmur.protocol.budget import least_peer_limit
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, DialAddr, Multiaddr

if TYPE_CHECKING:
    from murmur.protocol.identity import PeerId

DEFAULT_DATA_DIR = Path.home() / ".murmur"
DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4731"
DEFAULT_CONFIG_RESOURCE = "default_node.toml"
OVERRIDE_SOURCE = "<command line>"
#: ``learning.node_index = "auto"``: the node picks its data share from its peer id.
AUTO = "auto"
#: Data shares a network splits its training data into unless told otherwise:
#: with automatic indices, nodes draw one of these from their peer ids.
DEFAULT_NUM_NODES = 10
_AUTO_INDEX_DOMAIN = b"murmur-data-index-v1"


# --------------------------------------------------------------------------- enums


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LearningMode(enum.StrEnum):
    DSGD = "dsgd"  # synchronous rounds with deadline/quorum
    GOSSIP = "gossip"  # asynchronous gossip learning


class Partition(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


class Attack(enum.StrEnum):
    NONE = "none"
    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"


class Cipher(enum.StrEnum):
    """A Noise cipher by its config name (``protocol.noise.NoiseCipher``)."""

    AESGCM = "aesgcm"
    CHACHAPOLY = "chachapoly"

    def wire(self) -> Any:
        """The protocol's ``NoiseCipher`` of the same name."""
        from murmur.protocol.noise import NoiseCipher

        return NoiseCipher[self.name]


class Codec(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"

    def wire(self) -> Any:
        """The protocol's ``DeltaCodec`` of the same name."""
        from murmur.protocol.codecs import DeltaCodec

        return DeltaCodec[self.name]


class SparsifierName(enum.StrEnum):
    """``compression.sparsifier``: which coordinates a round message carries."""

    NONE = "none"
    TOPK = "topk"  # the largest in magnitude (the sender's choice: indices on the wire)
    RANDK = "randk"  # drawn from a seed every node knows (no index bytes)

    def wire(self) -> Any:
        """The protocol's ``Sparsifier`` of the same name."""
        from murmur.protocol.sparse import Sparsifier

        return Sparsifier(self.value)


class MaskName(enum.StrEnum):
    """``compression.mask``: whose seed a random-k mask is drawn from."""

    SENDER = "sender"  # network seed, round and sender: neighbours send different coordinates
    NETWORK = "network"  # network seed and round: every node the same (what pairwise privacy noise needs)

    def wire(self) -> Any:
        from murmur.protocol.sparse import MaskScope

        return MaskScope(self.value)


class RoundingName(enum.StrEnum):
    """``compression.rounding`` of the integer codecs (int8, int4, int2)."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"  # unbiased

    def wire(self) -> Any:
        from murmur.protocol.codecs import Rounding

        return Rounding[self.name]


class OuterName(enum.StrEnum):
    """``outer.optimizer``: what turns a round's move into the step taken."""

    NONE = "none"  # the round's move itself (plain D-SGD)
    NESTEROV = "nesterov"  # SGD with Nesterov momentum (DiLoCo)
    MOMENTUM = "momentum"  # SGD with heavy-ball momentum


# ------------------------------------------------------------------------ sections


def _frozen_map() -> Mapping[str, Any]:
    return types.MappingProxyType({})


@dataclass(frozen=True)
class NodeSection:
    data_dir: Path = DEFAULT_DATA_DIR
    listen: tuple[Multiaddr, ...] = (Multiaddr.parse(DEFAULT_LISTEN),)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT
    keep_serving_after_crash: bool = False  # see Node.serve_until: a crashed task stops the node (exit 1)


@dataclass(frozen=True)
class NetworkSection:
    bootstrap: tuple[DialAddr, ...] = ()  # /ip4|ip6|dns|dns4|dns6/…/tcp/…[/p2p/…], or a relay circuit (kept)
    mdns: bool = False
    neighbours: int = 6
    view_size: int = 20
    shuffle_length: int = 8
    shuffle_interval_s: float = 10.0
    subnet_bucket_size: int = 2
    neighbour_rotation_shuffles: int = 0  # swap the longest-held neighbour every this many shuffles (0: never)
    allow_loopback: bool = False
    hole_punching: bool = True  # DCUtR: upgrade a relayed connection to a direct one (protocol/libp2p/dcutr.py)

    def sampler_config(self) -> Any:
        """The equivalent ``protocol.sampling.SamplerConfig`` (imported late)."""
        from murmur.protocol.sampling import SamplerConfig

        return SamplerConfig(
            view_size=self.view_size,
            shuffle_length=self.shuffle_length,
            neighbours=self.neighbours,
            max_per_subnet=self.subnet_bucket_size,
            neighbour_rotation_rounds=self.neighbour_rotation_shuffles,
            allow_loopback_flood=self.allow_loopback,
        )


@dataclass(frozen=True)
class TransportSection:
    """Same field names and defaults as ``protocol.transport.TransportLimits``."""

    max_frame: int = 4 * 1024 * 1024
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    ping_interval_s: float = 15.0
    drain_timeout_s: float = 20.0
    max_inbound: int = 256
    max_inbound_per_subnet: int = 16
    useful_ttl_s: float = 600.0
    max_peer_rate_bytes_s: float = 512 * 1024 * 1024
    max_peer_buffered_bytes: int = 64 * 1024 * 1024
    peer_reserve_bytes: int = 256 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024
    warning_interval_s: float = 10.0
    warnings_per_interval: int = 10
    warnings_per_subnet: int = 3
    ciphers: tuple[Cipher, ...] = ()  # empty: the machine's default order (AES-GCM first where AES is in hardware)
    fast_path: bool = True  # offer/accept murmur's fast path ahead of /noise + /yamux/1.0.0
    negotiate_timeout_s: float = 10.0
    identify_timeout_s: float = 10.0
    max_negotiation_attempts: int = 16
    max_streams: int = 256
    max_refused_streams: int = 256
    max_open_burst: int = 128
    open_refill_s: float = 1 / 64

    def limits(self) -> Any:
        """The equivalent ``TransportLimits`` (imported late: config must load
        without pulling in the transport stack)."""
        from murmur.protocol.transport import TransportLimits

        fields = dataclasses.asdict(self)
        ciphers = fields.pop("ciphers")
        if ciphers:
            fields["ciphers"] = tuple(Cipher(c).wire() for c in ciphers)
        return TransportLimits(**fields)


@dataclass(frozen=True)
class RelaySection:
    """Circuit relay v2 service (``protocol.libp2p.relay.RelayConfig``, same names and defaults)."""

    service: bool = False  # serve /libp2p/circuit/relay/0.2.0/hop for other peers
    reservation_ttl_s: int = 3600
    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    max_circuits: int = 256
    max_circuits_per_peer: int = 16
    max_circuits_per_pair: int = 4  # of one destination's, per source peer
    max_circuits_per_ip_pair: int | Literal["auto"] = AUTO  # of one destination's, per source IP; auto: half of per_peer
    circuit_duration_s: int = 120
    circuit_data_bytes: int = 128 * 1024
    message_timeout_s: float = 10.0
    stall_timeout_s: float = 10.0
    # The learning class: circuits between two members get these larger (still bounded) limits.
    learning_peers: tuple[str, ...] = ()  # members: peer ids (12D3KooW…), the operator's network
    learning_greeted: bool = False  # members too: peers that greeted this node (murmur Hello) directly
    learning_max_reservations: int = 128
    learning_max_circuits: int = 256
    learning_circuit_duration_s: int = 3600
    learning_circuit_data_bytes: int = 1 << 30
    # The client side (AutoRelay): relays this node reserves a slot on and advertises circuits through.
    use: tuple[DialAddr, ...] = ()  # static relays, /ip4|ip6|dns…/tcp/…/p2p/<relay>
    auto: bool = True  # with no static relays: reserve on connected peers that relay, while private
    max_relays: int = 2  # reservations held at once by the automatic choice
    check_interval_s: float = 5.0  # how often reservations are checked and renewed

    def relay_config(self) -> Any:
        """The equivalent ``RelayConfig`` (imported late, like ``TransportSection.limits``)."""
        from murmur.protocol.identity import PeerId
        from murmur.protocol.libp2p.relay import RelayConfig

        fields = dataclasses.asdict(self)
        for client_side in ("service", "use", "auto", "max_relays", "check_interval_s"):
            del fields[client_side]
        fields["learning_peers"] = frozenset(PeerId.from_string(p) for p in self.learning_peers)
        if self.max_circuits_per_ip_pair == AUTO:
            fields["max_circuits_per_ip_pair"] = None  # RelayConfig derives it from max_circuits_per_peer
        return RelayConfig(**fields)


@dataclass(frozen=True)
class AutoNATSection:
    """AutoNAT v2 (``protocol.libp2p.autonat.AutoNATConfig``, same names and
    defaults), and how often the node asks peers to dial it back."""

    server: bool = True  # dial back peers that ask (rate-limited, amplification-priced)
    allow_private: bool = False  # dial back, and ask about, private/loopback addresses: a LAN or a test network
    max_concurrent: int = 4
    per_peer_interval_s: float = 10.0
    request_timeout_s: float = 20.0
    dial_timeout_s: float = 5.0
    dial_data_bytes: int = 40_000
    max_pay_bytes: int = 100_000
    pay_timeout_s: float = 5.0
    max_paying: int = 16
    client: bool = True  # ask peers to dial our addresses back
    check_interval_s: float = 60.0
    servers_per_check: int = 4

    def autonat_config(self) -> Any:
        """The equivalent ``AutoNATConfig`` (imported late, like ``TransportSection.limits``)."""
        from murmur.protocol.libp2p.autonat import AutoNATConfig

        fields = dataclasses.asdict(self)
        for node_side in ("client", "check_interval_s", "servers_per_check"):
            del fields[node_side]
        return AutoNATConfig(**fields)


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    port: int = 0


def auto_node_index(peer: PeerId, num_nodes: int) -> int:
    """The data share of ``peer`` when ``learning.node_index = "auto"``.

    A hash of the peer id, so it is the same after every restart (the identity
    is persistent) and needs no coordination between the people starting
    nodes. Two nodes may draw the same share, as when sampling data at random;
    a fixed, collision-free partition takes explicit indices.
    """
    digest = hashlib.blake2b(_AUTO_INDEX_DOMAIN + peer.raw, digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_nodes


UNTIL_STOPPED = 0
"""``learning.rounds`` of a node that trains until it is stopped."""


@dataclass(frozen=True)
class LearningSection:
    enabled: bool = True
    trainer: str = "digits-mlp"
    trainer_options: Mapping[str, Any] = field(default_factory=_frozen_map)
    device: str = "auto"
    seed: int = 0
    node_index: int | Literal["auto"] = AUTO
    num_nodes: int = DEFAULT_NUM_NODES
    partition: Partition = Partition.IID
    alpha: float = 0.5
    shards: int = 2
    attack: Attack = Attack.NONE
    eval_attack: Attack = Attack.NONE
    threads: int = 0
    rounds: int = 100
    mixing_rounds: int = 0
    local_steps: int = 0
    round_deadline_s: float = 30.0
    # Seconds a node starting at round 0 waits for its network.neighbours
    # learning neighbours (at most num_nodes - 1) before its first round: a node that trains alone
    # meanwhile gets ahead of the others (a link made later still joins).
    start_wait_s: float = 2.0
    quorum: float = 1.0
    aggregator: str = "sybilwall"
    aggregator_options: Mapping[str, Any] = field(default_factory=_frozen_map)
    mode: LearningMode = LearningMode.DSGD
    codec: Codec = Codec.FP32
    # A checkpoint after a round once this many rounds or seconds passed since
    # the last one (whichever first; 0 turns that trigger off), and always at shutdown.
    checkpoint_every_rounds: int = 10
    checkpoint_every_s: float = 60.0

    @property
    def until_stopped(self) -> bool:
        """``rounds = 0``: train until the node is stopped (or, with privacy
        on, until its budget is spent), with no mixing-only rounds after."""
        return self.rounds == UNTIL_STOPPED

    def runs_round(self, round_: int) -> bool:
        """Whether the node runs round ``round_`` at all (training or mixing)."""
        return self.until_stopped or round_ < self.rounds + self.mixing_rounds

    def trains_in(self, round_: int) -> bool:
        """Whether round ``round_`` trains (else it only mixes, see ``mixing_rounds``)."""
        return self.until_stopped or round_ < self.rounds

    @property
    def device_or_none(self) -> str | None:
        """``TrainerContext.device``: None lets the trainer pick cuda > mps > cpu."""
        return None if self.device == "auto" else self.device

    @property
    def local_steps_or_none(self) -> int | None:
        """``RoundConfig.local_steps``: None (0 in the file) is the trainer's default."""
        return self.local_steps or None

    def for_peer(self, peer: PeerId) -> LearningSection:
        """These options with an ``"auto"`` node_index resolved for ``peer``
        (see :func:`auto_node_index`); an explicit index is kept."""
        if self.node_index != AUTO:
            return self
        return dataclasses.replace(self, node_index=auto_node_index(peer, self.num_nodes))

    def trainer_context(self) -> Any:
        """The ``TrainerContext`` these options describe (imported late: torch)."""
        from murmur.learning.trainers.base import TrainerContext

        if not isinstance(self.node_index, int):
            raise ValueError('node_index "auto" names no data share yet: resolve it with for_peer() first')
        return TrainerContext(
            node_index=self.node_index,
            num_nodes=self.num_nodes,
            seed=self.seed,
            partition=self.partition.value,
            alpha=self.alpha,
            shards=self.shards,
            device=self.device_or_none,
            options=self.trainer_options,
            attack=None if self.attack is Attack.NONE else self.attack.value,
            secret_batches=True,  # a node's DP-SGD batches: nobody can predict them
        )


@dataclass(frozen=True)
class PrivacySection:
    enabled: bool = False
    scheme: PrivacyScheme = PrivacyScheme.DECOR
    level: PrivacyLevel = PrivacyLevel.USER
    epsilon: float = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    rounds: int = 0  # 0: learning.rounds (see NodeConfig.privacy_rounds)
    budget: float = 0.0
    assumed_degree: int = 0
    objective: NoiseObjective = NoiseObjective.AUTO
    colluders: int = 0  # the ε holds against this many nodes pooling their pairwise seeds (0: outsiders only)

    @property
    def effective_budget(self) -> float:
        """The ε at which the node stops contributing; 0 in the file means ``epsilon``."""
        return self.budget or self.epsilon


OPEN_ENDED_PRIVACY_ROUNDS = 1000
"""The noise's horizon for a node that trains until stopped (``learning.rounds
= 0``) and names none (``privacy.rounds = 0``): it stops sending deltas once
these rounds spent the budget."""


@dataclass(frozen=True)
class CompressionSection:
    """How round messages are compressed (error feedback keeps what was not
    sent for later rounds). Part of the network's wire agreement, like
    ``learning.codec``, which sets the precision of the values sent."""

    sparsifier: SparsifierName = SparsifierName.NONE
    ratio: float = 0.01
    mask: MaskName = MaskName.SENDER
    rounding: RoundingName = RoundingName.NEAREST
    consensus_step: float = 1.0

    @property
    def compresses(self) -> bool:
        return self.sparsifier is not SparsifierName.NONE


@dataclass(frozen=True)
class OuterSection:
    """The outer optimizer of local-steps training (DiLoCo)."""

    optimizer: OuterName = OuterName.NONE
    lr: float = 0.7
    momentum: float = 0.9


@dataclass(frozen=True)
class LinkSection:
    """Emulated link rates: the node paces what it sends and reads through
    token buckets of its own (0: unlimited). An emulation on top of TCP
    (no queueing delay or loss of a real link), for measuring time to
    accuracy on slow links on one machine."""

    upload_bytes_s: float = 0.0
    download_bytes_s: float = 0.0

    @property
    def limited(self) -> bool:
        return self.upload_bytes_s > 0 or self.download_bytes_s > 0


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    transport: TransportSection = field(default_factory=TransportSection)
    relay: RelaySection = field(default_factory=RelaySection)
    autonat: AutoNATSection = field(default_factory=AutoNATSection)
    api: ApiSection = field(default_factory=ApiSection)
    learning: LearningSection = field(default_factory=LearningSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    outer: OuterSection = field(default_factory=OuterSection)
    link: LinkSection = field(default_factory=LinkSection)

    @property
    def privacy_rounds(self) -> int:
        """The rounds T the privacy noise is calibrated for: ``privacy.rounds``,
        else the rounds the node trains (``learning.rounds``), else
        OPEN_ENDED_PRIVACY_ROUNDS. Why not a fixed 1000 for everyone: the noise
        grows with T, and a node that trains 100 rounds paid for 1000 (about
        three times the noise a round, the same epsilon at the end)."""
        if self.privacy.rounds:
            return self.privacy.rounds
        return self.learning.rounds or OPEN_ENDED_PRIVACY_ROUNDS


# --------------------------------------------------------------------- constraints


class InvalidValue(Exception):
    """A value failed a check; the message is the problem, the key is added
    later. The testnet's scenario checks raise it too (they are these checks)."""


Check = Callable[[Any], None]


def at_least(lo: float) -> Check:
    def check(v: Any) -> None:
        if not v >= lo:  # not "v < lo": TOML's nan compares false both ways
            raise InvalidValue(f"must be >= {lo}, got {v}")

    return check


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> None:
        if not ((v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):  # nan fails both
            raise InvalidValue(f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}")

    return check


def positive(v: Any) -> None:
    if not v > 0:
        raise InvalidValue(f"must be > 0, got {v}")


def finite_positive(v: Any) -> None:
    if not (v > 0 and math.isfinite(v)):
        raise InvalidValue(f"must be a finite number > 0, got {v}")


def finite_non_negative(v: Any) -> None:
    if not (v >= 0 and math.isfinite(v)):
        raise InvalidValue(f"must be a finite number >= 0, got {v}")


def non_empty(v: Any) -> None:
    if not v:
        raise InvalidValue("must not be empty")


def device_name(v: Any) -> None:
    try:
        check_device(v)
    except ConfigError as exc:
        raise InvalidValue(str(exc)) from None


def index_or_auto(v: Any) -> None:
    if v != AUTO:
        at_least(0)(v)


def count_or_auto(v: Any) -> None:
    if v != AUTO:
        at_least(1)(v)


def peer_ids(v: Any) -> None:
    from murmur.protocol.identity import PeerId

    for text in v:
        try:
            PeerId.from_string(text)
        except ValueError:
            raise InvalidValue(f"{text!r} is not an Ed25519 peer id (12D3KooW…)") from None


def relay_addrs(v: Any) -> None:
    """A relay to reserve on is dialled directly and must be named (its /p2p/<id>)."""
    for addr in v:
        if addr.is_circuit or addr.peer_id is None:
            raise InvalidValue(f"{addr} must be a relay's direct address ending in /p2p/<relay id>")


def loopback_ip(v: Any) -> None:
    """The status API is unauthenticated: it may only listen on loopback."""
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        raise InvalidValue(f"must be an IP address, got {v!r}") from None
    if not ip.is_loopback:
        raise InvalidValue(f"must be a loopback address (the API has no authentication), got {v}")


#: Per-field range checks, by dotted key. Types are checked from the dataclass
#: annotations; only what a type cannot express lives here.
CONSTRAINTS: Mapping[str, Check] = types.MappingProxyType(
    {
        "node.listen": non_empty,
        "network.neighbours": at_least(1),
        "network.view_size": at_least(1),
        "network.shuffle_length": at_least(1),
        "network.shuffle_interval_s": finite_positive,
        "network.subnet_bucket_size": at_least(1),
        "network.neighbour_rotation_shuffles": at_least(0),
        "transport.max_frame": between(1024, 1 << 30),
        "transport.connect_timeout_s": finite_positive,
        "transport.handshake_timeout_s": finite_positive,
        "transport.idle_timeout_s": finite_positive,
        "transport.ping_interval_s": finite_positive,
        "transport.drain_timeout_s": finite_positive,
        "transport.max_inbound": at_least(1),
        "transport.max_inbound_per_subnet": at_least(1),
        "transport.useful_ttl_s": at_least(0.0),
        "transport.max_peer_rate_bytes_s": positive,
        "transport.max_peer_buffered_bytes": at_least(1024),
        "transport.peer_reserve_bytes": at_least(0),
        "transport.max_buffered_bytes": at_least(1024),
        "transport.warning_interval_s": finite_positive,
        "transport.warnings_per_interval": at_least(0),
        "transport.warnings_per_subnet": at_least(0),
        "transport.negotiate_timeout_s": finite_positive,
        "transport.identify_timeout_s": finite_positive,
        "transport.max_negotiation_attempts": between(1, 1024),
        "transport.max_streams": between(8, 65536),
        "transport.max_refused_streams": at_least(1),
        "transport.max_open_burst": between(1, 65536),
        "transport.open_refill_s": finite_positive,
        "relay.reservation_ttl_s": at_least(1),
        "relay.max_reservations": at_least(0),
        "relay.max_reservations_per_ip": at_least(0),
        "relay.max_circuits": at_least(0),
        "relay.max_circuits_per_peer": at_least(0),
        "relay.max_circuits_per_pair": at_least(1),
        "relay.max_circuits_per_ip_pair": count_or_auto,
        "relay.circuit_duration_s": between(1, 2**32 - 1),
        "relay.circuit_data_bytes": between(1, 2**63 - 1),
        "relay.message_timeout_s": finite_positive,
        "relay.stall_timeout_s": finite_positive,
        "relay.learning_peers": peer_ids,
        "relay.learning_max_reservations": at_least(0),
        "relay.learning_max_circuits": at_least(0),
        "relay.learning_circuit_duration_s": between(1, 2**32 - 1),
        "relay.learning_circuit_data_bytes": between(1, 2**63 - 1),
        "relay.use": relay_addrs,
        "relay.max_relays": between(0, MAX_CIRCUIT_ADDRS),
        "relay.check_interval_s": finite_positive,
        "autonat.max_concurrent": between(1, 64),
        "autonat.per_peer_interval_s": at_least(0),
        "autonat.request_timeout_s": finite_positive,
        "autonat.dial_timeout_s": finite_positive,
        "autonat.dial_data_bytes": between(0, 1_000_000),
        "autonat.max_pay_bytes": between(0, 1_000_000),
        "autonat.pay_timeout_s": finite_positive,
        "autonat.max_paying": between(1, 1024),
        "autonat.check_interval_s": finite_positive,
        "autonat.servers_per_check": between(1, 16),
        "api.host": loopback_ip,
        "api.port": between(0, 65535),
        "learning.trainer": non_empty,
        "learning.device": device_name,
        "learning.seed": between(0, MAX_SEED),
        "learning.threads": at_least(0),
        "learning.node_index": index_or_auto,
        "learning.num_nodes": at_least(1),
        "learning.alpha": finite_positive,
        "learning.shards": at_least(1),
        "learning.rounds": at_least(0),
        "learning.local_steps": at_least(0),
        "learning.round_deadline_s": finite_positive,
        "learning.start_wait_s": finite_non_negative,
        "learning.mixing_rounds": at_least(0),
        "learning.quorum": between(0.0, 1.0, lo_open=True),
        "learning.aggregator": non_empty,
        "privacy.epsilon": finite_positive,
        "privacy.delta": between(0.0, 1.0, lo_open=True, hi_open=True),  # 1 promises nothing; calibration needs < 1
        "privacy.clip": finite_positive,
        "privacy.rounds": at_least(0),
        "privacy.budget": at_least(0.0),
        "privacy.assumed_degree": at_least(0),
        "privacy.colluders": at_least(0),
        "learning.checkpoint_every_rounds": at_least(0),
        "learning.checkpoint_every_s": finite_non_negative,
        "compression.ratio": between(0.0, 1.0, lo_open=True),
        "compression.consensus_step": between(0.0, 1.0, lo_open=True),
        "outer.lr": finite_positive,
        "outer.momentum": between(0.0, 0.999),
        "link.upload_bytes_s": at_least(0.0),
        "link.download_bytes_s": at_least(0.0),
    }
)


def _cross_checks(cfg: NodeConfig) -> list[tuple[str, str]]:
    """Rules that relate two fields: (dotted key blamed, problem)."""
    problems = []
    if cfg.network.neighbours > cfg.network.view_size:
        problems.append(("network.neighbours", f"must be <= network.view_size ({cfg.network.view_size})"))
    if cfg.network.shuffle_length > cfg.network.view_size:
        problems.append(("network.shuffle_length", f"must be <= network.view_size ({cfg.network.view_size})"))
    if cfg.transport.ping_interval_s >= cfg.transport.idle_timeout_s:
        problems.append(
            ("transport.ping_interval_s", "must be < transport.idle_timeout_s, or idle healthy connections get closed")
        )
    if cfg.learning.enabled and cfg.privacy.enabled and cfg.learning.mode is LearningMode.GOSSIP:
        problems.append(("privacy.enabled", 'needs learning.mode = "dsgd": gossip learning sends whole models, '
                                            "which pairwise noise on deltas does not protect"))
    if cfg.learning.until_stopped and cfg.learning.mixing_rounds:
        problems.append(("learning.mixing_rounds", "needs learning.rounds > 0: mixing rounds follow the training "
                                                   "rounds, and learning.rounds = 0 trains until stopped"))
    if cfg.transport.max_inbound_per_subnet > cfg.transport.max_inbound:
        problems.append(("transport.max_inbound_per_subnet", "must be <= transport.max_inbound"))
    least_buffered = least_peer_limit(cfg.transport.max_frame)
    if cfg.transport.max_peer_buffered_bytes < least_buffered:
        problems.append(("transport.max_peer_buffered_bytes",
                         f"must be >= {least_buffered} (two frames of transport.max_frame)"))
    if cfg.transport.peer_reserve_bytes > cfg.transport.max_peer_buffered_bytes:
        problems.append(("transport.peer_reserve_bytes", "must be <= transport.max_peer_buffered_bytes"))
    if isinstance(cfg.learning.node_index, int) and cfg.learning.node_index >= cfg.learning.num_nodes:
        problems.append(("learning.node_index", f"must be < learning.num_nodes ({cfg.learning.num_nodes})"))
    problems.extend(compression_problems(cfg))
    return problems


PAIRWISE_SCHEMES = frozenset({PrivacyScheme.DECOR, PrivacyScheme.CORN})


def compression_problems(cfg: NodeConfig) -> list[tuple[str, str]]:
    """Which compression settings fit the rest of the config, privacy above
    all (what is sound is in ARCHITECTURE.md, "Compression and privacy").

    Sound: any value codec (it rounds what the privacy stage already
    noised: post-processing), and random-k, whose coordinates are drawn
    before the data is looked at, so the stage clips and noises exactly the
    values sent. Refused: top-k, whose choice of coordinates depends on the
    clean update and so tells which coordinates moved; and a per-sender
    random-k mask with pairwise noise, whose two terms of an edge would land
    on different coordinates and never cancel."""
    problems: list[tuple[str, str]] = []
    comp = cfg.compression
    if cfg.learning.mode is LearningMode.GOSSIP and comp.compresses:
        problems.append(("compression.sparsifier", 'needs learning.mode = "dsgd": gossip learning sends whole '
                                                   "models, not increments with an error-feedback residual"))
    if not (cfg.learning.enabled and cfg.privacy.enabled):
        return problems
    if comp.sparsifier is SparsifierName.TOPK:
        problems.append(("compression.sparsifier", 'topk is refused with privacy on: it picks coordinates by the '
                                                   "clean update's values, so which coordinates it sends reveals which "
                                                   'ones moved; use "randk" (a mask drawn before the data)'))
    elif (comp.sparsifier is SparsifierName.RANDK and comp.mask is MaskName.SENDER
          and cfg.privacy.scheme in PAIRWISE_SCHEMES):
        problems.append(("compression.mask", f'must be "network" with privacy.scheme = "{cfg.privacy.scheme.value}": '
                                             "pairwise noise cancels only on coordinates both ends of an edge send, "
                                             "and per-sender masks differ"))
    return problems


#: compression.consensus_step past this many times a random-k ratio gets a
#: warning: CHOCO-SGD's step must be of the order of the ratio (README).
RANDK_STEP_PER_RATIO = 10.0
#: topk sends a 4-byte index with each value: from this ratio on it sends at
#: least as many bytes as no sparsifier at all (8 per coordinate at fp32).
TOPK_USELESS_RATIO = 0.5


def compression_advice(cfg: NodeConfig) -> list[str]:
    """Compression settings that run but defeat themselves, measured (a
    WARNING at start; not errors: a user may mean them). int2 with the
    default consensus step learned for two rounds, then fell to chance
    (digits, 100k parameters: 0.90 at round 2, 0.06-0.11 by round 10); top-k
    at ratio 1 sent twice fp32's bytes."""
    if not cfg.learning.enabled:
        return []
    comp, advice = cfg.compression, []
    if cfg.learning.codec is Codec.INT2 and comp.consensus_step == 1.0:
        advice.append('learning.codec = "int2" with compression.consensus_step = 1 learns for a few rounds, then '
                      "falls to chance: set compression.consensus_step below 1")
    if comp.sparsifier is SparsifierName.RANDK and comp.consensus_step > RANDK_STEP_PER_RATIO * comp.ratio:
        advice.append(f"randk at ratio {comp.ratio:g} with compression.consensus_step = {comp.consensus_step:g} "
                      "learns for a while, then diverges: set the step to about the ratio")
    if comp.sparsifier is SparsifierName.TOPK and comp.ratio >= TOPK_USELESS_RATIO:
        advice.append(f"topk at ratio {comp.ratio:g} sends a 4-byte index with every value: at least as many bytes "
                      'as sparsifier = "none"; use a smaller ratio, or none')
    return advice


# ------------------------------------------------------------ generic conversion


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(tp))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", Path: "a path",
            Multiaddr: "a multiaddr string", DialAddr: "a multiaddr string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str, base_dir: Path) -> Any:
    """Convert one TOML value to field type ``tp``; raise ``InvalidValue`` on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # the first arm that takes the value
        for arm in typing.get_args(tp):
            try:
                return _convert(arm, value, key, base_dir)
            except InvalidValue:
                continue
        raise InvalidValue(f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise InvalidValue(f"must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp) and tp not in (Multiaddr, DialAddr):
        if not isinstance(value, dict):
            raise InvalidValue(f"must be a table, got {type(value).__name__}")
        return _build(tp, value, key, base_dir)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise InvalidValue(f"must be a list, got {type(value).__name__}")
        return tuple(_convert_keyed(item_tp, v, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise InvalidValue(f"must be a table, got {type(value).__name__}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidValue(f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue(f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidValue(f"must be a number, got {value!r}")
        if math.isnan(value):
            raise InvalidValue("must be a number, got nan")
        return float(value)
    if not isinstance(value, str):
        raise InvalidValue(f"must be {_type_name(tp)}, got {value!r}")
    if tp is str:
        return value
    if tp is Path:
        if not value.strip():  # Path("") is the current directory: the key and state would land there
            raise InvalidValue("must not be empty")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()
    if tp is Multiaddr or tp is DialAddr:
        try:
            return tp.parse(value)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise InvalidValue(f"must be {_type_name(tp)}, got {value!r}") from None
    raise TypeError(f"config field {key} has unsupported type {tp!r}")  # programming error


class _KeyedError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _convert_keyed(tp: Any, value: Any, key: str, base_dir: Path) -> Any:
    try:
        result = _convert(tp, value, key, base_dir)
        check = CONSTRAINTS.get(key)
        if check is not None:
            check(result)
        return result
    except InvalidValue as exc:
        raise _KeyedError(key, str(exc)) from None


#: Options that were renamed: a config written for the old name gets the new one in its error.
RENAMED: Mapping[str, str] = types.MappingProxyType({
    "relay.unlimited_peers": "relay.learning_peers (its circuits have the learning class's limits, not none)",
})


def _build(cls: type, table: Mapping[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in table:
        if name not in names:
            where = f"{prefix}.{name}" if prefix else name
            if where in RENAMED:
                raise _KeyedError(where, f"renamed: use {RENAMED[where]}")
            raise _KeyedError(where, f"unknown option (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert_keyed(hints[name], value, key, base_dir)
    return cls(**kwargs)


# ----------------------------------------------------------------------- loading


def config_keys(cls: type = NodeConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema, in declaration order."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]) and hints[f.name] not in (Multiaddr, DialAddr):
            keys.extend(config_keys(hints[f.name], key))
        else:
            keys.append(key)
    return keys


def is_list_key(dotted: str) -> bool:
    """Whether option ``dotted`` (``node.listen``) holds a list; False for unknown keys."""
    tp: Any = NodeConfig
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(tp) and tp is not Multiaddr):
            return False
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return False
    return typing.get_origin(tp) is tuple


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``: the value is read as a TOML value when it
    parses as one (numbers, booleans, lists), otherwise as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{OVERRIDE_SOURCE}: --set expects KEY=VALUE, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw.strip()


def collect_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set`` arguments as dotted-key overrides, later ones winning.

    A list option takes one item per ``--set`` (``--set
    node.listen=/ip4/0.0.0.0/tcp/4731`` twice listens on both; a bare
    multiaddr is no TOML value, and "must be a list, got str" helped nobody)
    or a whole TOML list (``--set 'node.listen=["/ip4/...", "/ip6/..."]'``),
    which replaces what came before."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        if is_list_key(key) and not isinstance(value, list):
            previous = out.get(key)
            out[key] = [*(previous if isinstance(previous, list) else ()), value]
        else:
            out[key] = value
    return out


def _apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    table = raw
    for part in parts[:-1]:
        nxt = table.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise _KeyedError(dotted, f"{part} is not a table")
        table = nxt
    table[parts[-1]] = value


def find_key_line(text: str, dotted: str) -> int | None:
    """Best-effort line number (1-based) of ``dotted`` in TOML source ``text``.

    tomllib does not report positions of values, so we scan the text: track
    the current ``[table]`` header and match ``key =`` lines (including dotted
    and quoted keys). Good enough to point an operator at the right line.
    """
    target = re.sub(r"\[\d+\]", "", dotted)  # list element -> the list's key
    table = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if header:
            table = _norm_key(header.group(1))
            if table == target:
                return lineno
            continue
        if "=" in stripped:
            key = _norm_key(stripped.split("=", 1)[0])
            full = f"{table}.{key}" if table else key
            if full == target or target.startswith(full + "."):
                return lineno
    return None


def _norm_key(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


@dataclass(frozen=True)
class ConfigSource:
    """Where a loaded config's values came from: what turns a problem found
    later (an unknown trainer, a port in use) into a line naming the file,
    line and key to edit, or the command-line override to change."""

    path: str | None = None  # the config file; None: built-in defaults
    text: str = ""  # the file's text, to find a key's line
    overridden: frozenset[str] = frozenset()  # dotted keys set by flags or --set

    def locate(self, key: str, problem: str) -> ConfigError:
        """One ``ConfigError`` line for ``problem`` with ``key``."""
        if any(o == key or o.startswith(key + ".") or key.startswith(o + ".") for o in self.overridden):
            return ConfigError(f"{OVERRIDE_SOURCE}: {key}: {problem}")
        if self.path is None:  # no file: the command line, or else a built-in default, is to blame
            return ConfigError(f"{OVERRIDE_SOURCE}: {key}: {problem}" if self.overridden else f"{key}: {problem}")
        line = find_key_line(self.text, key) if self.text else None
        return ConfigError(f"{self.path}:{line}: {key}: {problem}" if line else f"{self.path}: {key}: {problem}")

    def located(self, error: OptionError) -> ConfigError:
        return self.locate(error.key, error.problem)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Load ``path`` (None: built-in defaults) and apply ``overrides``
    (dotted key -> value, e.g. from CLI flags). Raises :class:`ConfigError`
    with one line naming the file, line and dotted key."""
    return load_config_with_source(path, overrides)[0]


def load_config_with_source(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[NodeConfig, ConfigSource]:
    """:func:`load_config`, and where each value came from (see :class:`ConfigSource`)."""
    raw: dict[str, Any] = {}
    text = ""
    source = OVERRIDE_SOURCE
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not UTF-8 text") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        # relative paths in a file are relative to the file, not to wherever the daemon was started
        base_dir = Path(path).resolve().parent
        try:
            from_file = _build(NodeConfig, raw, "", base_dir)
        except _KeyedError as exc:
            raise ConfigError(_locate(source, text, exc)) from None
    else:
        from_file = NodeConfig()
    where = ConfigSource(None if path is None else str(path), text, frozenset(overrides or ()))
    if not overrides:
        return _checked(from_file, where), where
    # overrides are checked through the same converter, against the file's values merged in
    try:
        merged = _to_raw(from_file)
        for key, value in overrides.items():
            _apply_override(merged, key, value)
        cfg = _build(NodeConfig, merged, "", Path.cwd())
    except _KeyedError as exc:  # the file alone was valid, so an override is to blame
        raise ConfigError(f"{OVERRIDE_SOURCE}: {exc}") from None
    return _checked(cfg, where), where


def _checked(cfg: NodeConfig, where: ConfigSource) -> NodeConfig:
    for key, problem in _cross_checks(cfg):
        raise where.locate(key, problem)
    return cfg


def _locate(source: str, text: str, exc: _KeyedError) -> str:
    line = find_key_line(text, exc.key) if text else None
    return f"{source}:{line}: {exc}" if line else f"{source}: {exc}"


def _to_raw(obj: Any) -> Any:
    """Back to TOML-like plain values (the inverse of :func:`_convert`)."""
    if isinstance(obj, (Path, Multiaddr, DialAddr)):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_raw(v) for v in obj]
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def config_to_dict(cfg: NodeConfig) -> dict[str, Any]:
    """JSON-serialisable view of a config (for logs and the status API)."""
    return _to_raw(cfg)


def default_config_text() -> str:
    """The documented example config shipped with the package."""
    return Path(__file__).with_name(DEFAULT_CONFIG_RESOURCE).read_text(encoding="utf-8")
