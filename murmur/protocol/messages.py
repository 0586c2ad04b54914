"""Application messages: one frozen dataclass per kind, one schema each.

Wire envelope: msgpack array ``[WIRE_VERSION, kind, body]`` where ``body`` is a
map from field name to value. A kind may declare one :class:`TailSpec` field
(a delta chunk's payload): it travels as raw bytes right after the envelope,
to the end of the message, so neither side runs megabytes through msgpack
(which copies a ``bin`` on both packing and unpacking) and the decoded field
is a view of the received message. A message class declares its schema *once*, in
its annotations: every field is ``Annotated[<python type>, <Spec>]`` and the
:class:`MessageRegistry` decorator reads those specs when the class is
registered. Encoding and decoding are generic walks over the specs, so adding
a kind is one dataclass and never a hand-written parser.

Every kind travels on the stream of one libp2p protocol id
(:class:`MurmurProtocol`, :data:`KIND_PROTOCOLS`): kinds whose order matters
to each other share one (``Hello``, ``Link``, ``LearnerInfo`` and
``Goodbye``; a delta transfer's start, chunks and end, and model requests), and
a message that arrives on another protocol's stream is a
:class:`SchemaError`. :func:`protocol_of_envelope` reads the kind of an
encoded message without decoding it (a sender routing ``encode_parts``).

Decoding treats the bytes as hostile: wrong version, unknown kind, missing or
extra fields, wrong types, out-of-range ints, over-long strings/bytes/lists,
non-finite floats, malformed peer ids or arrays all raise a
:class:`~murmur.errors.DecodeError` subclass, and nothing else escapes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, get_type_hints

import numpy as np

from murmur.errors import DecodeError
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.identity import PeerId
from murmur.protocol.sealed import SealedTail
from murmur.protocol.serializer import ALLOWED_DTYPES, UnpackLimits, pack, unpack, unpack_head

__all__ = [
    "WIRE_VERSION",
    "MessageKind",
    "Message",
    "MessageRegistry",
    "REGISTRY",
    "encode",
    "encode_parts",
    "Encoded",
    "decode",
    "TailSpec",
    "UnknownKind",
    "WrongVersion",
    "SchemaError",
    "Hello",
    "Goodbye",
    "PeerExchangeRequest",
    "PeerExchangeResponse",
    "ShuffleRequest",
    "ShuffleResponse",
    "Gossip",
    "DeltaStart",
    "DeltaChunk",
    "DeltaEnd",
    "ModelRequest",
    "HistoryRecord",
    "KeyShare",
    "RoundCommit",
    "Link",
    "LearnerInfo",
    "NO_MORE_ROUNDS",
    "MurmurProtocol",
    "KIND_PROTOCOLS",
    "protocol_of",
    "protocol_of_envelope",
]

WIRE_VERSION = 2  # 2: DeltaChunk.data moved out of the map into the message tail

# --------------------------------------------------------------------------- bounds (named once)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # == TransportLimits.max_frame
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - 4096  # delta chunk payload, leaves room for the envelope
MAX_ADDR_LEN = 256
MAX_ADDRS_PER_PEER = 8
MAX_PEERS_PER_MESSAGE = 64
MAX_AGENT_LEN = 128
MAX_REASON_LEN = 256
MAX_TOPIC_LEN = 128
MAX_MSG_ID_LEN = 64
MAX_GOSSIP_PAYLOAD = 1024 * 1024
MAX_META_ITEMS = 32
MAX_META_KEY_LEN = 64
MAX_META_VALUE_LEN = 1024
MAX_SHAPE_DIMS = 8
MAX_DIM = 1 << 40
MAX_COMMIT_PEERS = 256
# A tailed kind's envelope holds only small fields (ids, counters); this
# bounds what msgpack sees of a message with a tail.
MAX_TAILED_HEAD = 256
Encoded = tuple[bytes] | tuple[bytes, memoryview]  # a message as envelope [, tail]
_FIXARRAY_3 = 0x93  # how every envelope starts; then the version and kind as positive fixints
_POSITIVE_FIXINT_MAX = 0x7F
SKETCH_ELEMENTS = MAX_META_VALUE_LEN // 4
"""Entries of a model's sketch (float32): what a history record carries
instead of the model (learning/sketch.py); it travels as one meta value of
the round message it describes."""
MAX_DEGREE = 1 << 16
PEER_ID_LEN = 38  # identity multihash of an Ed25519 protobuf key
SIGNATURE_LEN = 64
HASH_LEN = 32
X25519_KEY_LEN = 32
U8_MAX = (1 << 8) - 1
U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

MESSAGE_LIMITS = UnpackLimits(
    max_buffer_size=MAX_MESSAGE_BYTES,
    max_bin_len=MAX_MESSAGE_BYTES,
    max_ext_len=MAX_MESSAGE_BYTES,
    max_str_len=64 * 1024,
    max_array_len=4096,
    max_map_len=64,
    max_objects=8192,  # the largest message, a full shuffle, is ~900
)

# --------------------------------------------------------------------------- errors


class UnknownKind(DecodeError):
    """The envelope names a message kind this node does not know."""


class WrongVersion(DecodeError):
    """The envelope's wire version is not ours."""


class SchemaError(DecodeError):
    """A body field is missing, extra, of the wrong type or out of bounds."""


# --------------------------------------------------------------------------- field specs


class Spec(ABC):
    """How one field travels: ``dump`` turns the Python value into msgpack-able
    data (raising ValueError/TypeError for local bugs), ``load`` validates
    untrusted wire data and returns the Python value (raising SchemaError)."""

    @abstractmethod
    def dump(self, value: Any) -> Any: ...

    @abstractmethod
    def load(self, raw: Any, where: str) -> Any: ...


def _fail(where: str, what: str) -> SchemaError:
    return SchemaError(f"{where}: {what}")


@dataclass(frozen=True)
class IntSpec(Spec):
    lo: int
    hi: int

    def dump(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise ValueError(f"int in [{self.lo}, {self.hi}] expected, got {value!r}")
        return int(value)

    def load(self, raw: Any, where: str) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _fail(where, f"expected int, got {type(raw).__name__}")
        if not self.lo <= raw <= self.hi:
            raise _fail(where, f"{raw} outside [{self.lo}, {self.hi}]")
        return raw


@dataclass(frozen=True)
class FloatSpec(Spec):
    """Finite float in [lo, hi]; ints are not accepted in its place."""

    lo: float
    hi: float

    def dump(self, value: Any) -> Any:
        value = float(value)
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise ValueError(f"finite float in [{self.lo}, {self.hi}] expected, got {value!r}")
        return value

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, float):
            raise _fail(where, f"expected float, got {type(raw).__name__}")
        if not (math.isfinite(raw) and self.lo <= raw <= self.hi):
            raise _fail(where, f"{raw} not a finite float in [{self.lo}, {self.hi}]")
        return raw


@dataclass(frozen=True)
class StrSpec(Spec):
    max_len: int
    choices: frozenset[str] | None = None

    def dump(self, value: Any) -> Any:
        self._check(value, "field", ValueError)
        return value

    def load(self, raw: Any, where: str) -> Any:
        self._check(raw, where, SchemaError)
        return raw

    def _check(self, value: Any, where: str, error: type[Exception]) -> None:
        if not isinstance(value, str):
            raise error(f"{where}: expected str, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise error(f"{where}: string of {len(value)} chars > {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise error(f"{where}: {value!r} not one of {sorted(self.choices)}")


@dataclass(frozen=True)
class BytesSpec(Spec):
    """A bin field. ``dump`` passes memoryviews through untouched so large
    payloads are copied exactly once, by msgpack, into the message."""

    min_len: int
    max_len: int

    def dump(self, value: Any) -> Any:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"bytes expected, got {type(value).__name__}")
        size = memoryview(value).nbytes
        if not self.min_len <= size <= self.max_len:
            raise ValueError(f"{size} bytes outside [{self.min_len}, {self.max_len}]")
        return value

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, bytes):
            raise _fail(where, f"expected bytes, got {type(raw).__name__}")
        if not self.min_len <= len(raw) <= self.max_len:
            raise _fail(where, f"{len(raw)} bytes outside [{self.min_len}, {self.max_len}]")
        return raw


@dataclass(frozen=True)
class TailSpec(BytesSpec):
    """Raw bytes after the envelope, to the end of the message (at most one
    per kind). ``load`` gets and returns a read-only view of the received
    message, never a copy: it lives as long as the message does; or, for a
    message that came split, its :class:`~murmur.protocol.sealed.SealedTail`,
    which the handler opens where the bytes belong."""

    def dump(self, value: Any) -> Any:
        return memoryview(super().dump(value)).cast("B")

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, memoryview | SealedTail):
            raise _fail(where, f"expected a message tail, got {type(raw).__name__}")
        if not self.min_len <= raw.nbytes <= self.max_len:
            raise _fail(where, f"{raw.nbytes} bytes outside [{self.min_len}, {self.max_len}]")
        return raw


@dataclass(frozen=True)
class PeerSpec(Spec):
    """A :class:`PeerId`, carried as its 38 raw multihash bytes."""

    def dump(self, value: Any) -> Any:
        if not isinstance(value, PeerId):
            raise TypeError(f"PeerId expected, got {type(value).__name__}")
        return value.raw

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, bytes) or len(raw) != PEER_ID_LEN:
            raise _fail(where, f"peer id must be {PEER_ID_LEN} bytes")
        try:
            return PeerId.from_bytes(raw)
        except ValueError as exc:
            raise _fail(where, f"malformed peer id: {exc}") from exc


@dataclass(frozen=True)
class EnumSpec(Spec):
    enum: type[IntEnum]

    def dump(self, value: Any) -> Any:
        return int(self.enum(value))

    def load(self, raw: Any, where: str) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _fail(where, f"expected int, got {type(raw).__name__}")
        try:
            return self.enum(raw)
        except ValueError as exc:
            raise _fail(where, f"{raw} is not a {self.enum.__name__}") from exc


@dataclass(frozen=True)
class ListSpec(Spec):
    """A homogeneous list, at most ``max_items`` long; decodes to a tuple."""

    item: Spec
    max_items: int
    min_items: int = 0

    def dump(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"list expected, got {type(value).__name__}")
        if not self.min_items <= len(value) <= self.max_items:
            raise ValueError(f"{len(value)} items outside [{self.min_items}, {self.max_items}]")
        return [self.item.dump(v) for v in value]

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, tuple):
            raise _fail(where, f"expected list, got {type(raw).__name__}")
        if not self.min_items <= len(raw) <= self.max_items:
            raise _fail(where, f"{len(raw)} items outside [{self.min_items}, {self.max_items}]")
        return tuple(self.item.load(v, f"{where}[{i}]") for i, v in enumerate(raw))


@dataclass(frozen=True)
class TupleSpec(Spec):
    """A fixed-length heterogeneous record, e.g. (peer, addrs, age)."""

    items: tuple[Spec, ...]

    def dump(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise ValueError(f"{len(self.items)}-tuple expected, got {value!r}")
        return [spec.dump(v) for spec, v in zip(self.items, value)]

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, tuple) or len(raw) != len(self.items):
            raise _fail(where, f"expected a {len(self.items)}-element list")
        return tuple(spec.load(v, f"{where}[{i}]") for i, (spec, v) in enumerate(zip(self.items, raw)))


@dataclass(frozen=True)
class NdarraySpec(Spec):
    """A numpy array via the serializer's ext type; dtype and size bounded
    here on top of the serializer's generic checks."""

    dtypes: frozenset[str]
    max_elements: int
    max_ndim: int = 1

    def dump(self, value: Any) -> Any:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"ndarray expected, got {type(value).__name__}")
        self._check(value, "field", ValueError)
        return value

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, np.ndarray):
            raise _fail(where, f"expected ndarray, got {type(raw).__name__}")
        self._check(raw, where, SchemaError)
        return raw

    def _check(self, value: np.ndarray, where: str, error: type[Exception]) -> None:
        if value.dtype.name not in self.dtypes:
            raise error(f"{where}: dtype {value.dtype} not in {sorted(self.dtypes)}")
        if value.ndim > self.max_ndim or value.size > self.max_elements:
            raise error(f"{where}: shape {value.shape} exceeds {self.max_ndim} dims / {self.max_elements}")
        if value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
            raise error(f"{where}: non-finite values")


# (python type, spec) for meta values; bool is checked first since it is an int.
_META_SCALARS: tuple[tuple[type, Spec], ...] = (
    (int, IntSpec(I64_MIN, I64_MAX)),
    (float, FloatSpec(-math.inf, math.inf)),
    (str, StrSpec(MAX_META_VALUE_LEN)),
    (bytes, BytesSpec(0, MAX_META_VALUE_LEN)),
)


@dataclass(frozen=True)
class MetaSpec(Spec):
    """Free-form metadata: a small str-keyed map of scalars (bool, int64,
    finite float, short str/bytes). Decodes to a read-only mapping."""

    max_items: int = MAX_META_ITEMS
    key: StrSpec = StrSpec(MAX_META_KEY_LEN)

    def dump(self, value: Any) -> Any:
        if not isinstance(value, Mapping) or len(value) > self.max_items:
            raise ValueError(f"mapping of at most {self.max_items} items expected")
        return {self.key.dump(k): self._scalar(v, k, ValueError) for k, v in value.items()}

    def load(self, raw: Any, where: str) -> Any:
        if not isinstance(raw, dict):
            raise _fail(where, f"expected map, got {type(raw).__name__}")
        if len(raw) > self.max_items:
            raise _fail(where, f"{len(raw)} items > {self.max_items}")
        out = {}
        for k, v in raw.items():
            self.key.load(k, f"{where} key")
            out[k] = self._scalar(v, f"{where}[{k!r}]", SchemaError)
        return MappingProxyType(out)

    @staticmethod
    def _scalar(value: Any, where: str, error: type[Exception]) -> Any:
        if isinstance(value, bool):
            return value
        for py_type, spec in _META_SCALARS:
            if isinstance(value, py_type):
                try:
                    return spec.load(value, where)
                except SchemaError as exc:
                    raise error(str(exc)) from None
        raise error(f"{where}: unsupported meta value type {type(value).__name__}")


# Reusable annotated field types ------------------------------------------------

U8 = Annotated[int, IntSpec(0, U8_MAX)]
U16 = Annotated[int, IntSpec(0, U16_MAX)]
U32 = Annotated[int, IntSpec(0, U32_MAX)]
U64 = Annotated[int, IntSpec(0, U64_MAX)]
Peer = Annotated[PeerId, PeerSpec()]
Signature = Annotated[bytes, BytesSpec(SIGNATURE_LEN, SIGNATURE_LEN)]
_ADDR = StrSpec(MAX_ADDR_LEN)
_ADDRS = ListSpec(_ADDR, MAX_ADDRS_PER_PEER)
Addrs = Annotated[tuple[str, ...], _ADDRS]
PeerAddrs = tuple[PeerId, tuple[str, ...]]
ShuffleEntry = tuple[PeerId, tuple[str, ...], int]
_SHUFFLE_ENTRIES = ListSpec(TupleSpec((PeerSpec(), _ADDRS, IntSpec(0, U32_MAX))), MAX_PEERS_PER_MESSAGE)

# --------------------------------------------------------------------------- registry


class MessageKind(IntEnum):
    """Wire ids of the message kinds. Never renumber, only append."""

    HELLO = 1
    GOODBYE = 2
    PEER_EXCHANGE_REQUEST = 3
    PEER_EXCHANGE_RESPONSE = 4
    SHUFFLE_REQUEST = 5
    SHUFFLE_RESPONSE = 6
    GOSSIP = 7
    DELTA_START = 8
    DELTA_CHUNK = 9
    DELTA_END = 10
    MODEL_REQUEST = 11
    HISTORY_RECORD = 12
    KEY_SHARE = 13
    ROUND_COMMIT = 14
    LINK = 15
    LEARNER_INFO = 16


class MurmurProtocol(StrEnum):
    """murmur's libp2p protocol ids: each its own stream on a connection."""

    HELLO = "/murmur/hello/1.0.0"  # Hello, Link, LearnerInfo, Goodbye: in the order sent
    PEER_EXCHANGE = "/murmur/pex/1.0.0"
    SHUFFLE = "/murmur/shuffle/1.0.0"
    GOSSIP = "/murmur/gossip/1.0.0"
    DELTA = "/murmur/delta/1.0.0"  # signed delta transfers (round messages, models) and model requests
    KEY_SHARE = "/murmur/keyshare/1.0.0"
    ROUND_COMMIT = "/murmur/commit/1.0.0"
    HISTORY = "/murmur/history/1.0.0"


KIND_PROTOCOLS: Mapping[MessageKind, MurmurProtocol] = MappingProxyType({
    MessageKind.HELLO: MurmurProtocol.HELLO,
    MessageKind.LINK: MurmurProtocol.HELLO,
    MessageKind.LEARNER_INFO: MurmurProtocol.HELLO,
    MessageKind.GOODBYE: MurmurProtocol.HELLO,
    MessageKind.PEER_EXCHANGE_REQUEST: MurmurProtocol.PEER_EXCHANGE,
    MessageKind.PEER_EXCHANGE_RESPONSE: MurmurProtocol.PEER_EXCHANGE,
    MessageKind.SHUFFLE_REQUEST: MurmurProtocol.SHUFFLE,
    MessageKind.SHUFFLE_RESPONSE: MurmurProtocol.SHUFFLE,
    MessageKind.GOSSIP: MurmurProtocol.GOSSIP,
    MessageKind.DELTA_START: MurmurProtocol.DELTA,
    MessageKind.DELTA_CHUNK: MurmurProtocol.DELTA,
    MessageKind.DELTA_END: MurmurProtocol.DELTA,
    MessageKind.MODEL_REQUEST: MurmurProtocol.DELTA,
    MessageKind.KEY_SHARE: MurmurProtocol.KEY_SHARE,
    MessageKind.ROUND_COMMIT: MurmurProtocol.ROUND_COMMIT,
    MessageKind.HISTORY_RECORD: MurmurProtocol.HISTORY,
})
"""The protocol each kind travels on; every kind has one (checked at import)."""


@dataclass(frozen=True)
class _Schema:
    cls: type
    specs: Mapping[str, Spec]
    tail: str | None  # the TailSpec field, if any
    body: Mapping[str, Spec]  # the fields inside the envelope's map: all but the tail


class MessageRegistry:
    """Kind → (class, field specs). Filled by the ``@REGISTRY.register``
    decorator while this module is imported, then frozen: a kind registered
    twice, a class without ``KIND`` or a field without a Spec fails at import."""

    def __init__(self) -> None:
        self._schemas: dict[MessageKind, _Schema] = {}
        self._frozen = False

    def register(self, cls: type) -> type:
        if self._frozen:
            raise RuntimeError("message registry is frozen")
        kind = MessageKind(cls.KIND)
        if kind in self._schemas:
            raise TypeError(f"{kind!r} registered twice")
        hints = get_type_hints(cls, include_extras=True)
        specs: dict[str, Spec] = {}
        for f in fields(cls):
            found = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Spec)]
            if len(found) != 1:
                raise TypeError(f"{cls.__name__}.{f.name} needs exactly one Spec in Annotated[...]")
            specs[f.name] = found[0]
        tails = [name for name, spec in specs.items() if isinstance(spec, TailSpec)]
        if len(tails) > 1:
            raise TypeError(f"{cls.__name__} has {len(tails)} TailSpec fields; at most one")
        if tails and kind > _POSITIVE_FIXINT_MAX:
            raise TypeError(f"{cls.__name__}: a tailed kind must be a msgpack fixint (<= {_POSITIVE_FIXINT_MAX})")
        tail = tails[0] if tails else None
        body = MappingProxyType({name: spec for name, spec in specs.items() if name != tail})
        self._schemas[kind] = _Schema(cls, MappingProxyType(specs), tail, body)
        return cls

    def freeze(self) -> None:
        missing = [kind.name for kind in self._schemas if kind not in KIND_PROTOCOLS]
        if missing:
            raise TypeError(f"message kinds without a protocol in KIND_PROTOCOLS: {missing}")
        self._frozen = True

    def schema(self, kind: MessageKind) -> Mapping[str, Spec]:
        return self._schemas[kind].specs

    def kinds(self) -> tuple[MessageKind, ...]:
        return tuple(self._schemas)

    def message_class(self, kind: MessageKind) -> type:
        return self._schemas[kind].cls

    def encode_parts(self, msg: Message) -> Encoded:
        """The message as the envelope and, for a tailed kind, the tail (a view
        of the caller's buffer): the transport gathers them into one frame."""
        schema = self._schemas[msg.KIND]
        body = {name: spec.dump(getattr(msg, name)) for name, spec in schema.body.items()}
        head = pack((WIRE_VERSION, int(msg.KIND), body))
        if schema.tail is None:
            return (head,)
        return head, schema.specs[schema.tail].dump(getattr(msg, schema.tail))

    def encode(self, msg: Message) -> bytes:
        return b"".join(self.encode_parts(msg))

    def _tailed(self, buf: bytes | bytearray | memoryview) -> bool:
        """Whether ``buf`` claims a tailed kind (only a hint for which parser
        runs: what that parser finds is validated like everything else)."""
        if len(buf) < 3 or buf[0] != _FIXARRAY_3 or buf[1] != WIRE_VERSION:
            return False
        schema = self._schemas.get(buf[2])  # type: ignore[call-overload]
        return schema is not None and schema.tail is not None

    def decode(self, buf: bytes | bytearray | memoryview, tail: SealedTail | None = None) -> Message:
        # A kind without a tail goes through unpack, which refuses trailing bytes.
        tailed = self._tailed(buf)
        if tail is not None and not tailed:
            raise SchemaError("a split message of a kind that has no tail")
        if tailed and tail is None:
            envelope, head_len = unpack_head(buf, MAX_TAILED_HEAD, MESSAGE_LIMITS)
        else:  # a split message's head is its envelope, nothing behind it
            envelope, head_len = unpack(buf, MESSAGE_LIMITS), len(buf)
        if not isinstance(envelope, tuple) or len(envelope) != 3:
            raise SchemaError("envelope must be [version, kind, body]")
        version, kind, body = envelope
        if isinstance(version, bool) or not isinstance(version, int) or version != WIRE_VERSION:
            raise WrongVersion(f"wire version {version!r}, expected {WIRE_VERSION}")
        if isinstance(kind, bool) or not isinstance(kind, int) or kind not in self._schemas:
            raise UnknownKind(f"unknown message kind {kind!r}")
        schema = self._schemas[MessageKind(kind)]
        if not isinstance(body, dict):
            raise SchemaError("body must be a map")
        specs = schema.body
        if body.keys() != specs.keys():
            missing = sorted(specs.keys() - body.keys())
            extra = sorted(map(repr, body.keys() - specs.keys()))
            raise SchemaError(f"{schema.cls.__name__}: missing {missing}, unexpected {extra}")
        name = schema.cls.__name__
        values = {field: spec.load(body[field], f"{name}.{field}") for field, spec in specs.items()}
        if schema.tail is not None:
            raw = memoryview(buf).cast("B")[head_len:].toreadonly() if tail is None else tail
            values[schema.tail] = schema.specs[schema.tail].load(raw, f"{name}.{schema.tail}")
        return schema.cls(**values)


REGISTRY = MessageRegistry()
message = REGISTRY.register

# --------------------------------------------------------------------------- kinds


@message
@dataclass(frozen=True)
class Hello:
    """First message on every connection, both directions."""

    KIND: ClassVar[MessageKind] = MessageKind.HELLO
    listen_addrs: Addrs
    agent: Annotated[str, StrSpec(MAX_AGENT_LEN)]
    round: U64
    degree: Annotated[int, IntSpec(0, MAX_DEGREE)]


@message
@dataclass(frozen=True)
class Goodbye:
    KIND: ClassVar[MessageKind] = MessageKind.GOODBYE
    reason: Annotated[str, StrSpec(MAX_REASON_LEN)]


@message
@dataclass(frozen=True)
class PeerExchangeRequest:
    KIND: ClassVar[MessageKind] = MessageKind.PEER_EXCHANGE_REQUEST
    max_peers: Annotated[int, IntSpec(1, MAX_PEERS_PER_MESSAGE)]


@message
@dataclass(frozen=True)
class PeerExchangeResponse:
    KIND: ClassVar[MessageKind] = MessageKind.PEER_EXCHANGE_RESPONSE
    peers: Annotated[tuple[PeerAddrs, ...], ListSpec(TupleSpec((PeerSpec(), _ADDRS)), MAX_PEERS_PER_MESSAGE)]


@message
@dataclass(frozen=True)
class ShuffleRequest:
    """Cyclon shuffle: entries are (peer, addrs, age)."""

    KIND: ClassVar[MessageKind] = MessageKind.SHUFFLE_REQUEST
    entries: Annotated[tuple[ShuffleEntry, ...], _SHUFFLE_ENTRIES]


@message
@dataclass(frozen=True)
class ShuffleResponse:
    KIND: ClassVar[MessageKind] = MessageKind.SHUFFLE_RESPONSE
    entries: Annotated[tuple[ShuffleEntry, ...], _SHUFFLE_ENTRIES]


@message
@dataclass(frozen=True)
class Gossip:
    KIND: ClassVar[MessageKind] = MessageKind.GOSSIP
    msg_id: Annotated[bytes, BytesSpec(1, MAX_MSG_ID_LEN)]
    origin: Peer
    ttl: U8
    topic: Annotated[str, StrSpec(MAX_TOPIC_LEN)]
    payload: Annotated[bytes, BytesSpec(0, MAX_GOSSIP_PAYLOAD)]


@message
@dataclass(frozen=True)
class DeltaStart:
    """Opens a streamed delta (or model, ``meta={"kind": "model"}``).
    ``dtype``/``shape`` describe the decoded array; ``nbytes`` the encoded
    payload, which the receiver checks against the codec before allocating."""

    KIND: ClassVar[MessageKind] = MessageKind.DELTA_START
    transfer_id: U64
    round: U64
    sender: Peer
    recipient: Peer
    codec: Annotated[DeltaCodec, EnumSpec(DeltaCodec)]
    dtype: Annotated[str, StrSpec(16, frozenset(ALLOWED_DTYPES))]
    shape: Annotated[tuple[int, ...], ListSpec(IntSpec(0, MAX_DIM), MAX_SHAPE_DIMS)]
    nbytes: U64
    meta: Annotated[Mapping[str, Any], MetaSpec()]


@message
@dataclass(frozen=True)
class DeltaChunk:
    KIND: ClassVar[MessageKind] = MessageKind.DELTA_CHUNK
    transfer_id: U64
    seq: U32
    data: Annotated[bytes | memoryview | SealedTail, TailSpec(1, MAX_CHUNK_BYTES)]  # sealed: see TailSpec


@message
@dataclass(frozen=True)
class DeltaEnd:
    KIND: ClassVar[MessageKind] = MessageKind.DELTA_END
    transfer_id: U64
    content_hash: Annotated[bytes, BytesSpec(HASH_LEN, HASH_LEN)]
    signature: Signature


@message
@dataclass(frozen=True)
class ModelRequest:
    KIND: ClassVar[MessageKind] = MessageKind.MODEL_REQUEST
    round: U64


@message
@dataclass(frozen=True)
class HistoryRecord:
    """SybilWall history gossip: ``subject``'s public model as of its message
    ``round``, told by a neighbour that observes it (``observer``) or relays
    the observer's record (``distance`` is the sender's hop count; 1 when the
    sender is the observer). The model itself does not travel: ``digest`` is
    BLAKE3 of it and ``sketch`` its sketch (distances between models survive
    it; learning/sketch.py), a few hundred bytes whatever the model's size.
    ``subject_sig`` is the subject's own signed statement of both (it signs
    them with every round message), so no one can put another model in its
    mouth; ``observer_sig`` is the observer's signature over the same (what a
    relay cannot forge, so a relayed record is never taken for a first-hand
    one). An observer signs only after checking the statement against its
    bit-exact replica (digest exactly, sketch to rounding)."""

    KIND: ClassVar[MessageKind] = MessageKind.HISTORY_RECORD
    subject: Peer
    observer: Peer
    round: U64
    distance: U16
    digest: Annotated[bytes, BytesSpec(HASH_LEN, HASH_LEN)]
    sketch: Annotated[np.ndarray, NdarraySpec(frozenset({"float32"}), SKETCH_ELEMENTS)]
    subject_sig: Signature
    observer_sig: Signature


@message
@dataclass(frozen=True)
class KeyShare:
    """X25519 public key for pairwise privacy seeds, signed by the identity key."""

    KIND: ClassVar[MessageKind] = MessageKind.KEY_SHARE
    x25519_pub: Annotated[bytes, BytesSpec(X25519_KEY_LEN, X25519_KEY_LEN)]
    signature: Signature


@message
@dataclass(frozen=True)
class RoundCommit:
    KIND: ClassVar[MessageKind] = MessageKind.ROUND_COMMIT
    round: U64
    peers: Annotated[tuple[PeerId, ...], ListSpec(PeerSpec(), MAX_COMMIT_PEERS)]
    signature: Signature


@message
@dataclass(frozen=True)
class Link:
    """``active=1``: the sender now counts the receiver as a learning
    neighbour; ``0``: no longer. D-SGD edges must be symmetric (Metropolis–
    Hastings weights, pairwise noise), while Cyclon neighbour choice is not, so
    each side announces its choice and both treat the union as the edge set.
    ``degree`` keeps the receiver's view of the sender's degree current."""

    KIND: ClassVar[MessageKind] = MessageKind.LINK
    active: Annotated[int, IntSpec(0, 1)]
    degree: Annotated[int, IntSpec(0, MAX_DEGREE)]


NO_MORE_ROUNDS = U64_MAX
"""``LearnerInfo.next_round`` of a node that sends no more round messages."""
MAX_MODEL_DESCRIPTION = 256


@message
@dataclass(frozen=True)
class LearnerInfo:
    """What a learning node tells each peer about its learning, on every
    connection (after ``Hello``), again whenever either side links the
    other, and once its rounds are over.

    ``fingerprint`` is a hash of the model and wire format (trainer,
    parameter shapes, codec); peers whose fingerprints differ never learn
    together, and ``model`` (readable) lets each side say why in one line.
    ``next_round`` is the first round whose message the sender will send
    the receiver from now on (``NO_MORE_ROUNDS`` when it sends none): a
    neighbour linked after the sender opened its round, or one whose rounds
    are over, is then never waited for. ``initial`` is a hash of the model
    the sender's rounds started from: a receiver replays a neighbour's round
    0 from its own start only where the two are equal, and fetches the
    neighbour's model otherwise (another ``learning.seed``, another torch)."""

    KIND: ClassVar[MessageKind] = MessageKind.LEARNER_INFO
    fingerprint: Annotated[bytes, BytesSpec(HASH_LEN, HASH_LEN)]
    model: Annotated[str, StrSpec(MAX_MODEL_DESCRIPTION)]
    next_round: U64
    initial: Annotated[bytes, BytesSpec(HASH_LEN, HASH_LEN)]


REGISTRY.freeze()

Message = (
    Hello
    | Goodbye
    | PeerExchangeRequest
    | PeerExchangeResponse
    | ShuffleRequest
    | ShuffleResponse
    | Gossip
    | DeltaStart
    | DeltaChunk
    | DeltaEnd
    | ModelRequest
    | HistoryRecord
    | KeyShare
    | RoundCommit
    | Link
)


def encode(msg: Message) -> bytes:
    """Serialize one message (envelope included) into one buffer."""
    return REGISTRY.encode(msg)


def encode_parts(msg: Message) -> Encoded:
    """Serialize one message as envelope and tail, for a gathering send
    (``Stream.send_message(*parts)``): a chunk's payload is not copied."""
    return REGISTRY.encode_parts(msg)


def decode(buf: bytes | bytearray | memoryview, tail: SealedTail | None = None) -> Message:
    """Parse one message (given a ``tail``: the head of a split one, as
    ``Stream.recv_parts`` gives it); raises a :class:`DecodeError` subclass
    for anything invalid."""
    return REGISTRY.decode(buf, tail)


def protocol_of(cls: type[Message]) -> MurmurProtocol:
    """The protocol id a message class travels on."""
    return KIND_PROTOCOLS[cls.KIND]


def protocol_of_envelope(head: bytes | bytearray | memoryview) -> MurmurProtocol:
    """The protocol id of an encoded message (the first part ``encode_parts``
    gave): read from the envelope's kind, which msgpack writes as a positive
    fixint right after the array header and the version. ``ValueError`` for
    bytes that are not an envelope of ours (a local bug)."""
    if len(head) < 3 or head[0] != _FIXARRAY_3 or head[1] != WIRE_VERSION or head[2] > _POSITIVE_FIXINT_MAX:
        raise ValueError("not an encoded message envelope")
    return KIND_PROTOCOLS[MessageKind(head[2])]
