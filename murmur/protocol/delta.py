"""Signed, chunked, streamed deltas with bounded receiver memory.

A delta travels as ``DeltaStart``, ``DeltaChunk``…, ``DeltaEnd``. The payload
is the codec's encoding of a flat float32 vector; its BLAKE3-256 is computed
incrementally chunk by chunk on both sides, and the Ed25519 signature over

    b"murmur-delta-v1" || content_hash || u64be(round) || sender.raw || recipient.raw

goes in ``DeltaEnd``, so hashing overlaps with sending and the sender never
holds the whole encoded message set in memory.

The receiver (:class:`DeltaAssembler`) checks every bound in ``DeltaStart``
*before* allocating (size limit, codec/shape/nbytes consistency, per-peer and
total concurrency), then preallocates exactly ``nbytes`` and writes chunks at
their offset (a chunk that came as a split frame's sealed tail is opened
straight there: see :mod:`murmur.protocol.sealed`). Each chunk's values are checked finite as it lands (FP32, while
the chunk is in cache: :class:`~murmur.protocol.codecs.LandingDecoder`); only
after hash, signature and replay checks does it decode, and the FP32 decode is
a zero-copy view of the assembly buffer.

Binding: the signature covers the payload, round, sender and recipient, as
ARCHITECTURE.md specifies. ``codec``, ``shape`` and ``meta`` are protected by
the authenticated (AEAD) connection, not by the signature.
"""

from __future__ import annotations

import hmac
import math
import mmap
import secrets
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import blake3
import numpy as np

from murmur.errors import DecodeError, LimitExceeded, PeerFault, ReplayError, SignatureError
from murmur.protocol import codecs
from murmur.protocol.codecs import CodecParams, DeltaCodec, LandingDecoder
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.layout import TransferLayout
from murmur.protocol.sealed import SealedTail
from murmur.protocol.messages import (
    MAX_CHUNK_BYTES,
    DeltaChunk,
    DeltaEnd,
    DeltaStart,
    Encoded,
    encode_parts,
)

__all__ = [
    "DELTA_DOMAIN",
    "DEFAULT_CHUNK_BYTES",
    "AssemblerLimits",
    "CompletedDelta",
    "DeltaAssembler",
    "VerifiedDelta",
    "DeltaSender",
    "PreparedDelta",
    "ReplayGuard",
    "SenderMismatch",
    "Misaddressed",
    "StaleRound",
    "signing_input",
    "transfer_bytes",
]

DELTA_DOMAIN = b"murmur-delta-v1"
# A chunk is one frame. Sender and receiver overlap only between frames: the
# receiver cannot start before the first frame is hashed and sealed, and the
# sender idles while the last one is opened, hashed and copied, so that head
# and tail grow with the chunk. 1 MiB chunks cost a 10 MiB delta ~3 ms of it
# (bench: 0.50 of raw TCP against 0.67 with 256 KiB, same run); per-frame
# Python overhead only shows below that. 256 KiB also fits L2 on both sides.
DEFAULT_CHUNK_BYTES = 256 * 1024
HASH_DIGEST_SIZE = 32
DELTA_DTYPE = "float32"  # what every codec decodes to
# Below this a bytearray likely comes from a warm heap (see
# transport.tune_allocator): 0.07 ms/MiB against 0.5 for a fresh prefaulted
# mapping. Above it glibc maps every buffer (its mmap threshold ceiling).
PREFAULT_MIN_BYTES = 32 * 1024 * 1024
_U64 = struct.Struct(">Q")

TransferKey = tuple[PeerId, int]


class SenderMismatch(SignatureError):
    """``DeltaStart.sender`` is not the authenticated peer on the connection."""


class Misaddressed(ReplayError):
    """The delta is addressed to another node (a redirected replay)."""


class StaleRound(ReplayError):
    """The delta's round is below the replay guard's floor."""


def _hasher() -> Any:
    # BLAKE3, not BLAKE2b: at ~2-3 GiB/s on one core it keeps the content hash
    # off the critical path of a 50 MiB transfer (BLAKE2b's ~0.5 GiB/s was
    # slower than the encrypted socket itself).
    return blake3.blake3()


def signing_input(content_hash: bytes, round: int, sender: PeerId, recipient: PeerId) -> bytes:
    """The exact bytes the sender signs (domain-separated, fixed layout)."""
    return b"".join([DELTA_DOMAIN, content_hash, _U64.pack(round), sender.raw, recipient.raw])


# --------------------------------------------------------------------------- sender


@dataclass(frozen=True)
class PreparedDelta:
    """A delta encoded and hashed once, for :class:`DeltaSender` to sign per
    recipient. A node sends the same round message to every neighbour, so
    the codec (with its finiteness check) and BLAKE3 run once a round, not
    once a neighbour.

    With FP32 ``payload`` is a view of the array: do not modify the array
    while senders built on it are still iterating."""

    payload: memoryview
    codec: DeltaCodec
    shape: tuple[int, ...]
    content_hash: bytes

    @classmethod
    def prepare(cls, array: np.ndarray, codec: DeltaCodec = DeltaCodec.FP32) -> PreparedDelta:
        payload, params = codecs.encode(array, codec)
        return cls.of_payload(payload, params.codec, tuple(array.shape))

    @classmethod
    def of_payload(cls, payload: memoryview, codec: DeltaCodec, shape: tuple[int, ...]) -> PreparedDelta:
        """A payload already encoded (a compressed round message, whose bytes
        the sender's round engine produced and advanced its public model by):
        hashed here, sent as is. ``shape`` is the decoded shape."""
        hasher = _hasher()
        hasher.update(payload)
        return cls(memoryview(payload).cast("B"), DeltaCodec(codec), tuple(shape), hasher.digest())


class DeltaSender:
    """Iterable of encoded messages for one delta: Start, Chunk…, End, each
    as :func:`~murmur.protocol.messages.encode_parts` gives it (send one with
    ``conn.send(*parts)``; a chunk's parts are its envelope and a view of the
    payload).

    The codec runs at construction (so a NaN or an fp16 overflow raises
    ``ValueError`` before anything is sent); iteration slices the payload
    through memoryviews, hashes each slice, and signs at the end.
    ``content_hash`` is set once the iteration has finished. With FP32 the
    chunks are views of ``array`` itself (no codec copy): do not modify it
    until the iteration is done. Given a :class:`PreparedDelta` instead of an
    array, it neither encodes nor hashes (``codec`` is the prepared one's).
    """

    def __init__(
        self,
        identity: Identity,
        recipient: PeerId,
        round: int,
        array: np.ndarray | PreparedDelta,
        codec: DeltaCodec = DeltaCodec.FP32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        meta: Mapping[str, Any] | None = None,
        transfer_id: int | None = None,
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}]")
        self._prepared_hash: bytes | None = None
        if isinstance(array, PreparedDelta):
            payload, codec, shape = array.payload, array.codec, array.shape
            self._prepared_hash = array.content_hash
        else:
            payload, params = codecs.encode(array, codec)
            codec, shape = params.codec, tuple(array.shape)
        self._identity = identity
        self._payload = payload
        self._chunk_bytes = chunk_bytes
        self.recipient = recipient
        self.round = round
        self.codec = codec
        self.transfer_id = secrets.randbits(64) if transfer_id is None else transfer_id
        self.nbytes = payload.nbytes
        self.content_hash: bytes | None = None
        self._start = DeltaStart(
            transfer_id=self.transfer_id,
            round=round,
            sender=identity.peer_id,
            recipient=recipient,
            codec=codec,
            dtype=DELTA_DTYPE,
            shape=shape,
            nbytes=self.nbytes,
            meta=dict(meta or {}),
        )

    def __iter__(self) -> Iterator[Encoded]:
        yield encode_parts(self._start)
        hasher = _hasher() if self._prepared_hash is None else None
        payload, step, tid = self._payload, self._chunk_bytes, self.transfer_id
        for seq, offset in enumerate(range(0, self.nbytes, step)):
            piece = payload[offset : offset + step]
            if hasher is not None:
                hasher.update(piece)
            yield encode_parts(DeltaChunk(transfer_id=tid, seq=seq, data=piece))
        digest = hasher.digest() if hasher is not None else self._prepared_hash
        assert digest is not None
        signature = self._identity.sign(signing_input(digest, self.round, self._identity.peer_id, self.recipient))
        self.content_hash = digest
        yield encode_parts(DeltaEnd(transfer_id=tid, content_hash=digest, signature=signature))


def transfer_bytes(
    nbytes: int,
    shape: tuple[int, ...],
    meta: Mapping[str, Any],
    codec: DeltaCodec = DeltaCodec.FP32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """The message bytes a :class:`DeltaSender` of an ``nbytes`` payload puts
    on one connection: DeltaStart, every chunk's envelope and tail, DeltaEnd
    (what the transport counts as sent; framing adds its length prefix and
    AEAD tag per message). Encoded for real with two fixed identities; ids
    and round take their widest msgpack form, so this is exact to a few bytes."""
    sender, recipient = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    prepared = PreparedDelta(memoryview(bytes(nbytes)), DeltaCodec(codec), tuple(shape), bytes(HASH_DIGEST_SIZE))
    messages = DeltaSender(sender, recipient.peer_id, 1 << 40, prepared, chunk_bytes=chunk_bytes, meta=meta,
                           transfer_id=(1 << 64) - 1)
    return sum(memoryview(part).nbytes for parts in messages for part in parts)


# --------------------------------------------------------------------------- replay guard


class ReplayGuard:
    """Remembers accepted ``(sender, round, content_hash)`` in a bounded FIFO
    window and refuses to accept one twice; also refuses rounds below a
    monotonically raised floor (so the window only needs to cover the rounds
    still in play, not all history)."""

    def __init__(self, window: int = 65536, round_floor: int = 0) -> None:
        if window < 1:
            raise ValueError("window must be positive")
        self._window = window
        self._floor = round_floor
        self._seen: OrderedDict[tuple[PeerId, int, bytes], None] = OrderedDict()

    @property
    def round_floor(self) -> int:
        return self._floor

    def raise_floor(self, round: int) -> None:
        """Reject rounds below ``round`` from now on; forget entries below it."""
        if round <= self._floor:
            return
        self._floor = round
        for key in [k for k in self._seen if k[1] < round]:
            del self._seen[key]

    def check_round(self, round: int) -> None:
        if round < self._floor:
            raise StaleRound(f"round {round} below floor {self._floor}")

    def check(self, sender: PeerId, round: int, content_hash: bytes) -> None:
        self.check_round(round)
        self.check_unseen(sender, round, content_hash)

    def check_unseen(self, sender: PeerId, round: int, content_hash: bytes) -> None:
        """:meth:`check` without the round floor (which may have risen since)."""
        if (sender, round, content_hash) in self._seen:
            raise ReplayError(f"delta for round {round} from {sender.short()} already accepted")

    def remember(self, sender: PeerId, round: int, content_hash: bytes) -> None:
        self._seen[(sender, round, content_hash)] = None
        while len(self._seen) > self._window:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


# --------------------------------------------------------------------------- assembler


def landing_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A zeroed, writable buffer of exactly ``nbytes`` for one assembled delta.

    Large ones are anonymous mappings populated by the kernel in one call
    (``MAP_POPULATE``) instead of a ``bytearray``, which glibc maps too at
    that size, zero-fills in user space and then takes one page fault per
    4 KiB when the chunks land: 0.94 against 0.67 ms/MiB measured for 10 MiB
    on the 2-core VM. The FP32 result stays a zero-copy view (the mapping
    lives as long as the array does). Where ``MAP_POPULATE`` does not exist,
    a bytearray. :class:`LandingPool` avoids even that for repeated sizes.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < PREFAULT_MIN_BYTES or not populate:
        return bytearray(nbytes)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)


Landing = bytearray | mmap.mmap


class LandingPool:
    """Reuses a landing buffer once nothing outside the pool refers to it.

    A node receives deltas of the same few sizes every round, and fresh
    multi-MiB memory costs the kernel a cleared page per 4 KiB (0.5-0.7
    ms/MiB, a third of the receiver's budget) where reusing warm memory
    costs nothing. A buffer is free when its only references are the pool's
    own: every export (a memoryview, the zero-copy array of a CompletedDelta,
    any view of either) holds a reference to the buffer object itself, so
    the reference count says it exactly (CPython semantics). A reused buffer
    still holds an earlier delta's bytes; the assembler overwrites all of it
    before anything is decoded (a transfer completes only when every byte
    arrived). Tracked memory is at most ``max_bytes``: past that, free
    buffers are dropped first, and a new buffer that still does not fit is
    handed out untracked.
    """

    _OWN_REFS = 3  # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffers: list[Landing] = []
        self._bytes = 0
        self.reused = 0

    def take(self, nbytes: int) -> memoryview:
        for buf in self._buffers:
            if len(buf) == nbytes and sys.getrefcount(buf) <= self._OWN_REFS:
                self.reused += 1
                return memoryview(buf)
        fresh = landing_buffer(nbytes)
        if self._bytes + nbytes > self.max_bytes:
            self._drop_free()
        if self._bytes + nbytes <= self.max_bytes:
            self._buffers.append(fresh)
            self._bytes += nbytes
        return memoryview(fresh)

    def _drop_free(self) -> None:
        kept = [buf for buf in self._buffers if sys.getrefcount(buf) > self._OWN_REFS]
        self._buffers = kept
        self._bytes = sum(len(buf) for buf in kept)

    @property
    def tracked_bytes(self) -> int:
        return self._bytes


MIN_TOTAL_BUFFERED_BYTES = 64 * 1024 * 1024
"""Floor of a layout-sized in-flight budget: small models still get room for many peers."""


@dataclass(frozen=True)
class AssemblerLimits:
    """Receiver-side bounds. Transfers in flight hold at most
    ``max_total_buffered_bytes``; idle landing buffers kept for reuse at most
    ``landing_pool_bytes`` more. A node sizes them from its
    :class:`~murmur.protocol.layout.TransferLayout` (:meth:`for_layout`),
    never by hand."""

    max_delta_bytes: int = 256 * 1024 * 1024
    max_concurrent_per_peer: int = 2
    max_total_buffered_bytes: int = 1024 * 1024 * 1024
    transfer_timeout_s: float = 60.0  # no message for a transfer this long -> expire()
    replay_window: int = 65536
    landing_pool_bytes: int = 256 * 1024 * 1024  # landing buffers kept for reuse (LandingPool)

    @classmethod
    def for_layout(cls, layout: TransferLayout, peers: int, **overrides: Any) -> AssemblerLimits:
        """Bounds for a node whose transfers follow ``layout``, receiving from
        up to ``peers`` peers at once: one transfer up to the largest payload
        an honest peer can send (any kind, any codec), each peer
        ``max_concurrent_per_peer`` of them in flight."""
        base = cls(**overrides)
        largest = layout.max_payload_bytes()
        total = max(peers * base.max_concurrent_per_peer * largest, MIN_TOTAL_BUFFERED_BYTES)
        return replace(base, max_delta_bytes=largest, max_total_buffered_bytes=total)


@dataclass(frozen=True)
class CompletedDelta:
    sender: PeerId
    round: int
    array: np.ndarray  # float32, shaped as announced; FP32: a view of the assembly buffer
    meta: Mapping[str, Any]
    content_hash: bytes
    codec: DeltaCodec
    transfer_id: int


@dataclass(frozen=True)
class VerifiedDelta:
    """A complete transfer whose bytes, hash, signature, addressing and
    freshness are checked, but whose payload is not decoded yet
    (:meth:`DeltaAssembler.feed_verified`).

    Why: decoding a compressed round payload is the one costly step of a
    receive (a random-k mask at 10 M parameters and ratio 0.5 took ~1 s, an
    int4 model's dequantisation tens of ms), and inside the sans-IO
    assembler it ran on the daemon's event loop, which then served nothing
    (keepalives, other peers' streams, the status API). The driver decides
    where :meth:`decode` runs; it touches nothing but this object, so any
    thread may run it. ``costly`` is False only for what :meth:`decode`
    returns without work (an FP32 payload already checked as it landed)."""

    sender: PeerId
    start: DeltaStart
    content_hash: bytes
    payload: memoryview  # the assembly buffer: held (and its landing slot taken) until decoded
    decoder: LandingDecoder | None
    layout: TransferLayout | None
    solicited: bool = False  # answers a request of ours: not subject to the replay guard

    @property
    def costly(self) -> bool:
        return self.decoder is None or not self.decoder.ready

    def decode(self) -> CompletedDelta:
        """The decoded delta; raises :class:`~murmur.errors.DecodeError` (a peer fault)."""
        start = self.start
        if self.decoder is not None:  # dense: checked as it landed
            array = self.decoder.decode().reshape(start.shape)
        else:  # a sparse round format (the layout's)
            assert self.layout is not None
            array = self.layout.decode(self.layout.kind_of(start.meta), self.payload, start.codec,
                                       start.round, self.sender.raw)
        return CompletedDelta(
            sender=self.sender,
            round=start.round,
            array=array,
            meta=start.meta,
            content_hash=self.content_hash,
            codec=start.codec,
            transfer_id=start.transfer_id,
        )


@dataclass
class _Transfer:
    start: DeltaStart
    buffer: memoryview  # over a LandingPool buffer; the decoded array keeps it (and so its slot) taken
    decoder: LandingDecoder | None  # checks the values of each chunk as it lands (None: a sparse round format)
    last_activity: float
    hasher: Any = field(default_factory=_hasher)
    received: int = 0
    next_seq: int = 0
    solicited: bool = False  # answers a request of ours: not subject to the replay guard


DeltaMessage = DeltaStart | DeltaChunk | DeltaEnd
Solicited = Callable[[DeltaStart], bool]


REFUSED_MEMORY = 256
"""Refused transfers remembered, to drop what follows their start quietly."""


def _unsolicited(start: DeltaStart) -> bool:
    return False


class DeltaAssembler:
    """Reassembles deltas addressed to ``own_peer_id`` from any number of
    peers. Sans-IO: the connection loop calls :meth:`feed` with the
    authenticated peer id and each decoded delta message, and :meth:`expire`
    periodically. Any :class:`PeerFault` raised for a transfer also drops it,
    so a misbehaving transfer never keeps its buffer.

    ``solicited`` tells, from its ``DeltaStart``, whether a transfer answers
    a request of ours (a model we asked the sender for). Such a transfer is
    fresh because we asked for it, not because its (round, content) is new:
    a peer whose model has not moved answers two requests with the same
    bytes, and the model of a peer behind us is below our round floor. So it
    skips the replay guard (neither checked nor remembered); hash, signature,
    sender and recipient are checked as for any delta. Whoever passes
    ``solicited`` must also refuse answers it did not ask for.

    With a ``layout`` (what a node's own model implies for each transfer
    kind), every ``DeltaStart`` must announce exactly its kind's shape, and a
    refusal names the expected and the announced shape or size."""

    def __init__(
        self,
        own_peer_id: PeerId,
        limits: AssemblerLimits = AssemblerLimits(),
        replay_guard: ReplayGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        solicited: Solicited = _unsolicited,
        layout: TransferLayout | None = None,
    ) -> None:
        self.own_peer_id = own_peer_id
        self._solicited = solicited
        self.layout = layout
        self.limits = limits
        self.replay_guard = replay_guard if replay_guard is not None else ReplayGuard(limits.replay_window)
        self._clock = clock
        self._transfers: dict[TransferKey, _Transfer] = {}
        # Transfers whose start was refused: their chunks and end are dropped
        # quietly. Before, each was "no transfer in progress" (a DecodeError
        # that drops the connection), so an honest neighbour whose start met
        # a full budget was penalised, dropped and in the end banned.
        self._refused: OrderedDict[TransferKey, None] = OrderedDict()
        self.refused_for_room = 0  # starts refused because the node-wide budget was full (no one's fault)
        self._buffered = 0
        self._landing = LandingPool(limits.landing_pool_bytes)
        self._handlers: Mapping[type, Callable[[PeerId, Any], VerifiedDelta | None]] = MappingProxyType(
            {DeltaStart: self._on_start, DeltaChunk: self._on_chunk, DeltaEnd: self._on_end}
        )

    # -- public ----------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def active(self, sender: PeerId | None = None) -> int:
        return sum(1 for peer, _ in self._transfers if sender is None or peer == sender)

    def buffer_view(self, sender: PeerId, transfer_id: int) -> memoryview:
        """Read-only view of a transfer's assembly buffer (diagnostics, benches:
        lets a caller prove the FP32 result aliases it instead of copying)."""
        return self._transfer(sender, transfer_id).buffer.toreadonly()

    def feed(self, sender: PeerId, msg: DeltaMessage) -> CompletedDelta | None:
        """Process one message from the authenticated ``sender``; returns the
        completed delta on a valid ``DeltaEnd``, else None. Raises PeerFault.
        Decodes in the caller's thread: a driver on an event loop wants
        :meth:`feed_verified`."""
        verified = self.feed_verified(sender, msg)
        if verified is None:
            return None
        done = verified.decode()
        self.accept(verified)
        return done

    def feed_verified(self, sender: PeerId, msg: DeltaMessage) -> VerifiedDelta | None:
        """:meth:`feed` up to the decode: on a valid ``DeltaEnd``, the checked
        transfer, else None. Raises PeerFault. Once it decoded, the caller
        calls :meth:`accept` (on this thread)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise TypeError(f"not a delta message: {type(msg).__name__}")
        key = (sender, msg.transfer_id)
        if isinstance(msg, DeltaStart):
            self._refused.pop(key, None)  # the id starts afresh
        elif key in self._refused:
            if isinstance(msg, DeltaEnd):
                del self._refused[key]
            return None
        try:
            return handler(sender, msg)
        except PeerFault:
            if isinstance(msg, DeltaStart):  # a bad Start never got a slot; what follows it is dropped
                self.refuse(sender, msg.transfer_id)
            else:
                self.abandon(sender, msg.transfer_id)
            raise

    def accept(self, verified: VerifiedDelta) -> None:
        """``verified`` decoded: the replay guard remembers it (a payload that
        did not decode is not remembered). Raises :class:`ReplayError` when the
        same signed bytes were accepted while it decoded (another stream of
        the same peer)."""
        if verified.solicited:
            return
        start = verified.start
        self.replay_guard.check_unseen(verified.sender, start.round, verified.content_hash)
        self.replay_guard.remember(verified.sender, start.round, verified.content_hash)

    def refuse(self, sender: PeerId, transfer_id: int) -> None:
        """Drop the chunks and end of a transfer whose start was not taken
        (kept for the last :data:`REFUSED_MEMORY` such transfers)."""
        self._refused[(sender, transfer_id)] = None
        self._refused.move_to_end((sender, transfer_id))
        while len(self._refused) > REFUSED_MEMORY:
            self._refused.popitem(last=False)

    def abandon(self, sender: PeerId, transfer_id: int) -> bool:
        """Drop a transfer and free its buffer (abort, timeout, disconnect)."""
        transfer = self._transfers.pop((sender, transfer_id), None)
        if transfer is None:
            return False
        self._buffered -= len(transfer.buffer)
        return True

    def abandon_peer(self, sender: PeerId) -> int:
        """Drop every transfer from ``sender`` (its connection closed)."""
        keys = [key for key in self._transfers if key[0] == sender]
        for peer, tid in keys:
            self.abandon(peer, tid)
        return len(keys)

    def expire(self) -> list[TransferKey]:
        """Abandon transfers idle longer than ``transfer_timeout_s``."""
        deadline = self._clock() - self.limits.transfer_timeout_s
        stale = [key for key, t in self._transfers.items() if t.last_activity < deadline]
        for peer, tid in stale:
            self.abandon(peer, tid)
        return stale

    # -- handlers --------------------------------------------------------------

    def _on_start(self, sender: PeerId, msg: DeltaStart) -> None:
        if msg.sender != sender:
            raise SenderMismatch(f"DeltaStart claims sender {msg.sender.short()} on {sender.short()}'s connection")
        if msg.recipient != self.own_peer_id:
            raise Misaddressed(f"delta addressed to {msg.recipient.short()}, not to us")
        solicited = self._solicited(msg)
        if not solicited:
            self.replay_guard.check_round(msg.round)
        limits = self.limits
        if self.layout is not None:  # names the kind and the shape it expected
            kind = self.layout.check_incoming(msg.meta, msg.shape, msg.nbytes, limits.max_delta_bytes)
            expected = self.layout.payload_bytes(kind, msg.codec)  # a compressed round payload has its format's size
        else:
            expected = codecs.encoded_nbytes(msg.codec, math.prod(msg.shape))
        if msg.nbytes > limits.max_delta_bytes:
            raise LimitExceeded(f"delta of {msg.nbytes} bytes, limit {limits.max_delta_bytes} (shape {msg.shape})")
        if msg.dtype != DELTA_DTYPE:
            raise DecodeError(f"delta dtype must be {DELTA_DTYPE}, got {msg.dtype}")
        if msg.nbytes != expected:
            raise DecodeError(f"{msg.codec.name} of shape {msg.shape} is {expected} bytes, not {msg.nbytes}")
        key = (sender, msg.transfer_id)
        if key in self._transfers:
            raise DecodeError(f"transfer {msg.transfer_id} already in progress")
        if self.active(sender) >= limits.max_concurrent_per_peer:
            raise LimitExceeded(f"{sender.short()} has {limits.max_concurrent_per_peer} transfers in flight")
        if self._buffered + msg.nbytes > limits.max_total_buffered_bytes:
            # Within its own allowance the sender is at no fault: the message is
            # lost for this round, nobody is penalised.
            self.refuse(sender, msg.transfer_id)
            self.refused_for_room += 1
            return None
        buffer = self._landing.take(msg.nbytes)
        # A dense payload is checked as it lands; a sparse round format's
        # (indices, packed values) only as a whole, by the layout.
        sparse = self.layout is not None and self.layout.sparse(self.layout.kind_of(msg.meta))
        decoder = None if sparse else LandingDecoder(CodecParams(msg.codec, math.prod(msg.shape)), buffer)
        self._transfers[key] = _Transfer(
            start=msg, buffer=buffer, decoder=decoder, last_activity=self._clock(), solicited=solicited
        )
        self._buffered += msg.nbytes
        return None

    def _transfer(self, sender: PeerId, transfer_id: int) -> _Transfer:
        transfer = self._transfers.get((sender, transfer_id))
        if transfer is None:
            raise DecodeError(f"no transfer {transfer_id} in progress from {sender.short()}")
        return transfer

    def _on_chunk(self, sender: PeerId, msg: DeltaChunk) -> None:
        transfer = self._transfer(sender, msg.transfer_id)
        if msg.seq != transfer.next_seq:
            raise DecodeError(f"chunk {msg.seq} out of order (expected {transfer.next_seq})")
        data = msg.data
        end = transfer.received + len(data)
        if end > len(transfer.buffer):
            raise DecodeError(f"chunk overruns the announced {len(transfer.buffer)} bytes")
        landed = transfer.buffer[transfer.received : end]
        if isinstance(data, SealedTail):
            data.open_into(landed)  # the AEAD writes it in place: no copy (see murmur.protocol.sealed)
        else:
            landed[:] = data
        transfer.hasher.update(landed)
        if transfer.decoder is not None:
            transfer.decoder.landed(end)  # while the chunk is in cache; a NaN ends the transfer here
        transfer.received = end
        transfer.next_seq += 1
        transfer.last_activity = self._clock()
        return None

    def _on_end(self, sender: PeerId, msg: DeltaEnd) -> VerifiedDelta:
        transfer = self._transfer(sender, msg.transfer_id)
        self.abandon(sender, msg.transfer_id)  # whatever happens next, the slot is done
        start = transfer.start
        if transfer.received != start.nbytes:
            raise DecodeError(f"transfer ended after {transfer.received} of {start.nbytes} bytes")
        digest = transfer.hasher.digest()
        if not hmac.compare_digest(digest, msg.content_hash):
            raise SignatureError("content hash does not match the received bytes")
        sender.verify(msg.signature, signing_input(digest, start.round, sender, self.own_peer_id))
        if not transfer.solicited:
            self.replay_guard.check(sender, start.round, digest)
        return VerifiedDelta(sender, start, digest, transfer.buffer, transfer.decoder, self.layout, transfer.solicited)
