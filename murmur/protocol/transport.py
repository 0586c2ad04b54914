"""Encrypted, mutually authenticated TCP connections between murmur nodes.

One :class:`asyncio.BufferedProtocol` per TCP connection runs the libp2p-noise
XX handshake (:mod:`murmur.protocol.noise`) and then the AEAD frame codec
(:mod:`murmur.protocol.framing`). The event loop (uvloop in the daemon)
receives straight into the frame buffers, so a 4 MiB frame costs one socket
copy and one decryption, no reassembly.

Everything a stranger can make us spend is bounded:

* connect / handshake / idle timeouts (a slowloris peer is cut by the first
  that applies; idle means "no complete frame", so dribbling bytes does not
  count as activity);
* inbound slots overall and per /24 (IPv4) or /48 (IPv6), counted from TCP
  accept, i.e. half-open handshakes count too. A full node does not refuse a
  newcomer: it evicts the inbound connection worth least
  (:mod:`murmur.protocol.admission`: never one the node marked useful, from
  the most crowded subnet, half-open before authenticated, oldest first), so
  an attacker cannot squat the slots;
* receive memory, per peer and per node (:mod:`murmur.protocol.budget`):
  messages waiting for ``recv()`` and large-frame buffers are charged to the
  peer's budget, which draws from the transport's pool; over either bound,
  reading pauses, so TCP flow control pushes back on the sender and nothing
  is dropped. Large-frame buffers are paid for before their body is read and
  committed by the kernel only as bytes arrive (:mod:`murmur.protocol.framing`);
  when the pool runs dry, the inbound connection worth least that holds pool
  bytes is evicted;
* per-peer receive rate (token bucket), pausing reading the same way;
* send memory: ``send()`` waits while the socket's write buffer holds more
  than one frame (:func:`send_high_water`), and takes an optional deadline;
  control frames (pongs, pings) are written only while that buffer is nearly
  empty (:data:`CONTROL_WRITE_MARK`), else one pong is owed, so a peer that
  pings and never reads cannot grow it; and a peer that leaves what we sent
  unread for ``drain_timeout_s`` is cut (:class:`~murmur.errors.WriteStalled`);
* the log: warnings a stranger can cause (failed handshakes, refused and
  evicted connections) are rate-limited per subnet and in all, and the rest
  summarised once per interval (:mod:`murmur.ratelog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import itertools
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from murmur.errors import (
    FrameError,
    HandshakeError,
    MurmurError,
    PeerFault,
    SendTimeout,
    TimeoutFault,
    WriteStalled,
)
from murmur.protocol.admission import Slot, choose_victim
from murmur.protocol.budget import BytePool, PeerBudget, least_peer_limit
from murmur.protocol.framing import (
    FRAME_LENGTH,
    FRAME_OVERHEAD,
    HANDSHAKE_LENGTH,
    HANDSHAKE_SCRATCH_BYTES,
    MAX_HANDSHAKE_MESSAGE,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    LengthPrefixedReader,
    PlaintextScratch,
)
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import Libp2pNoiseHandshake, NoiseCipher, default_ciphers
from murmur.protocol.subnets import SubnetKey, subnet_of
from murmur.ratelog import LogBudget, RateLimitedLog
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

RATE_BURST_S = 0.1  # token-bucket depth, in seconds of the allowed rate
MAX_PING_PAYLOAD = 64
CLOSE_WAIT_S = 1.0  # how long close() waits for the socket to finish flushing
# Control frames (pong, ping) are written only while the socket's write
# buffer holds less than this: a peer that sends pings and never reads gets
# at most this much of pongs queued, then one owed pong, not one per ping.
CONTROL_WRITE_MARK = 64 * 1024


class ConnectionClosed(MurmurError):
    """The connection is closed (by us, by the peer, or after a fault).

    Not a :class:`PeerFault`: a peer hanging up is normal. When a fault caused
    the close, ``recv()`` raises that fault once and this afterwards.
    """


@dataclass(frozen=True)
class TransportLimits:
    """Every transport bound, named once; all overridable from config."""

    max_frame: int = 4 * 1024 * 1024  # plaintext bytes per frame (one message)
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0  # no frame at all (pings count) -> close
    ping_interval_s: float = 15.0
    drain_timeout_s: float = 20.0  # nothing we sent was read for this long -> WriteStalled, close
    max_inbound: int = 256  # inbound slots; a newcomer evicts the one worth least (admission.py)
    max_inbound_per_subnet: int = 16  # /24 IPv4, /48 IPv6
    useful_ttl_s: float = 600.0  # how long SecureConnection.mark_useful protects an inbound slot
    max_peer_rate_bytes_s: float = 512 * 1024 * 1024
    max_peer_buffered_bytes: int = 64 * 1024 * 1024  # receive memory per peer (budget.py)
    peer_reserve_bytes: int = 256 * 1024  # of which its own, not drawn from the node's pool
    max_buffered_bytes: int = 256 * 1024 * 1024  # the node's pool: all peers beyond their reserves
    warning_interval_s: float = 10.0  # warnings strangers cause (handshakes, refusals, evictions):
    warnings_per_interval: int = 10  # this many per interval pass, in all,
    warnings_per_subnet: int = 3  # and this many per /24 or /48; one summary line counts the rest
    # Noise ciphers, most preferred first: offered in this order when dialling,
    # the set allowed when accepting. AESGCM leads where AES is in hardware.
    ciphers: tuple[NoiseCipher, ...] = field(default_factory=default_ciphers)

    def __post_init__(self) -> None:
        if not self.ciphers or len(set(self.ciphers)) != len(self.ciphers):
            raise ValueError("ciphers must name at least one cipher, each once")
        if min(self.max_frame, self.max_peer_buffered_bytes, self.max_peer_rate_bytes_s, self.max_buffered_bytes,
               self.drain_timeout_s, self.warning_interval_s) <= 0:
            raise ValueError("transport sizes, rates and timeouts must be positive")
        if min(self.peer_reserve_bytes, self.useful_ttl_s, self.warnings_per_interval, self.warnings_per_subnet) < 0:
            raise ValueError("peer_reserve_bytes, useful_ttl_s and the warning counts must be >= 0")
        if self.ping_interval_s >= self.idle_timeout_s:
            raise ValueError("ping_interval_s must be shorter than idle_timeout_s, or live peers time out")
        if self.max_peer_buffered_bytes < least_peer_limit(self.max_frame):
            raise ValueError(f"max_peer_buffered_bytes must be >= {least_peer_limit(self.max_frame)} "
                             "(two largest frames), or a large frame could wait forever")
        if self.peer_reserve_bytes > self.max_peer_buffered_bytes:
            raise ValueError("peer_reserve_bytes must be <= max_peer_buffered_bytes")


def send_high_water(limits: TransportLimits) -> int:
    """Write-buffer level above which ``send()`` waits: one largest frame.

    Not ``max_peer_buffered_bytes`` itself. uvloop only flushes its user-space
    buffer when the loop runs, and ``send()`` does not yield while the buffer
    is under the mark, so a sender looping over a 50 MiB delta under a 64 MiB
    mark encoded and encrypted *every* frame before the first one left, and
    the receiver idled meanwhile: transfer time was sender time + receiver
    time instead of the larger of the two. Waiting once one frame is queued
    keeps the socket busy while the next frame is encoded (the kernel's send
    and receive buffers hold the rest), and bounds queued memory per
    connection by one frame instead of 64 MiB.
    """
    return min(limits.max_peer_buffered_bytes, FRAME_LENGTH.size + limits.max_frame + FRAME_OVERHEAD)


# glibc mallopt parameters (malloc.h) and the ceiling glibc's own heuristic
# raises the mmap threshold to (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep frame-sized buffers on a warm heap instead of mapping one per frame.

    Every DATA frame still makes a few fresh frame-sized objects that are not
    ours to pool: the ``bytes`` that ``recv()`` returns, the message codec's
    copy of a chunk on both sides. glibc's heuristic raises its mmap
    threshold as it sees such buffers freed, but keeps the trim threshold at
    twice that, so with a few 1 MiB objects alive per frame it returned the
    heap top to the kernel and re-faulted it every frame: a page fault per
    4 KiB (measured on the 2-core bench box: 10 MiB deltas at 2.4/3.0 ms per
    MiB of sender/receiver CPU, 1.8/2.2 with this). This fixes the mmap
    threshold at the ceiling that heuristic would reach (32 MiB) and the
    trim threshold at twice it, so the steady state is what glibc converges
    to minus the trim churn; larger buffers are still mapped and unmapped.

    Process-wide, so it is the entry point's call (daemon, bench), made once
    at start-up, not something the transport does behind its back. Returns
    whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(GLIBC_MMAP_THRESHOLD_MAX))
        and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * GLIBC_MMAP_THRESHOLD_MAX))
    )


class TokenBucket:
    """Byte budget refilled at ``rate`` up to ``burst``; may go into debt.

    Debt is how backpressure works here: the bytes already arrived (we never
    drop authenticated data), and reading pauses until the debt is repaid.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def consume(self, nbytes: int) -> float:
        """Take ``nbytes``; return seconds to wait before reading more (0 if none)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class _ReadPause(enum.Enum):
    RATE = "rate"  # the token bucket is in debt
    MEMORY = "memory"  # the peer's budget (or the node's pool) is spent


class SecureConnection:
    """An authenticated, encrypted connection to ``peer_id``.

    ``send`` and ``recv`` carry whole messages (one frame each). Ping, pong and
    close frames are handled here and never reach ``recv``. ``bytes_sent`` /
    ``bytes_received`` count DATA payload bytes.
    """

    def __init__(
        self,
        tr: asyncio.Transport,
        encoder: FrameEncoder,
        decoder: FrameDecoder,
        budget: PeerBudget,
        peer_id: PeerId,
        remote: tuple[str, int],
        outbound: bool,
        limits: TransportLimits,
        conn_no: int,
        cipher: NoiseCipher = NoiseCipher.CHACHAPOLY,
        on_starved: Callable[[SecureConnection], None] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.cipher = cipher  # negotiated in the handshake
        self.remote = remote
        self.outbound = outbound
        self.bytes_sent = 0
        self.bytes_received = 0
        self.name = f"conn-{conn_no}"
        self.useful_at: float | None = None  # last mark_useful (monotonic seconds)
        self._tr = tr
        self._encoder = encoder
        self._decoder = decoder
        self.budget = budget
        self._on_starved = on_starved
        self._limits = limits
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._fault: PeerFault | None = None
        self._loop = asyncio.get_running_loop()
        self._lost = self._loop.create_future()
        self._paused: set[_ReadPause] = set()
        self._resume_timer: asyncio.TimerHandle | None = None
        self._bucket = TokenBucket(
            limits.max_peer_rate_bytes_s,
            max(limits.max_peer_rate_bytes_s * RATE_BURST_S, limits.max_frame + FRAME_OVERHEAD),
        )
        now = time.monotonic()
        self._last_rx = now
        self._last_ping = now
        self._pong_owed: bytes | None = None  # the latest ping's payload, while pongs cannot be written
        self._written = 0  # bytes handed to the socket transport, ever
        self._drained = 0  # of which had left its buffer at the last check
        self._drained_at = now  # when that last grew (or the buffer was empty)
        self._large_frames_seen = 0  # decoder.large_frames at the last tick
        self._frames_sent_seen = 0  # encoder.frames at the last tick
        self._tasks = TaskManager(f"{self.name} {peer_id.short()}")
        tick = min(limits.ping_interval_s, limits.idle_timeout_s / 4, limits.drain_timeout_s / 4)
        self._tasks.periodic("keepalive", tick, self._keepalive, delay_s=tick)

    # --- public API -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered_bytes(self) -> int:
        """Memory held for this peer now: its receive budget and our unsent bytes."""
        return self.budget.used + (0 if self._closed else self._tr.get_write_buffer_size())

    def mark_useful(self) -> None:
        """The node says this peer just delivered something of value (a
        verified delta, an answer it asked for). For ``useful_ttl_s`` the
        connection's inbound slot is protected from eviction; pings and
        other frames the transport handles never count."""
        self.useful_at = time.monotonic()

    async def send(self, *parts: bytes | bytearray | memoryview, deadline: float | None = None) -> None:
        """Send one message, ``parts`` concatenated (<= ``max_frame`` bytes, else
        ``ValueError``): ``send(*encode_parts(msg))`` frames a chunk's envelope
        and payload without joining them first.

        Waits while the socket's write buffer is over :func:`send_high_water`;
        with a ``deadline`` (``time.monotonic()`` seconds) at most until then,
        raising :class:`~murmur.errors.SendTimeout` with nothing sent and the
        connection left open. A message is written whole or not at all, so
        cancelling a waiting ``send`` is safe too.
        """
        while not self._writable.is_set() and not self._closed:
            if deadline is None:
                await self._writable.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(
                    f"{self.peer_id.short()} left {self._tr.get_write_buffer_size()} bytes unread past the deadline"
                )
            with contextlib.suppress(TimeoutError):  # the loop's timer may fire a little early: check again
                await asyncio.wait_for(self._writable.wait(), remaining)
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer_id.short()} is closed") from self._fault
        frame = self._encoder.encode(FrameType.DATA, *parts)
        self._write(frame)
        if not self._tr.get_write_buffer_size():  # all of it is in the kernel already
            self._encoder.recycle(frame)
        self.bytes_sent += len(frame) - FRAME_LENGTH.size - FRAME_OVERHEAD

    async def recv(self) -> bytes:
        """Next message. Raises the fault that closed the connection once, then ConnectionClosed."""
        while not self._queue:
            if self._closed:
                fault = self.take_fault()
                if fault is not None:
                    raise fault
                raise ConnectionClosed(f"connection to {self.peer_id.short()} is closed")
            self._readable.clear()
            await self._readable.wait()
        payload = self._queue.popleft()
        self._queued_bytes -= len(payload)
        self.budget.release(len(payload))
        self._try_resume()
        return payload

    def take_fault(self) -> PeerFault | None:
        """The fault that closed the connection, once (``recv()`` raises it
        too): whoever owns the connection reports it even when it stopped
        reading first, e.g. when a bad frame came with the handshake's last
        message, before the first ``recv()``."""
        fault, self._fault = self._fault, None
        return fault

    async def close(self) -> None:
        """Say goodbye (CLOSE frame), flush, and stop the connection's tasks."""
        self._shutdown(None, say_goodbye=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_WAIT_S)
        except TimeoutError:
            self._tr.abort()
        await self._tasks.shutdown()

    def __repr__(self) -> str:
        direction = "out" if self.outbound else "in"
        return f"<SecureConnection {self.name} {direction} {self.peer_id.short()} {self.remote[0]}:{self.remote[1]}>"

    # --- called by the protocol and the transport -----------------------------------

    def _on_frames(self, frames: list[Frame]) -> None:
        """Frames from one read (possibly none: a partial frame or a large
        one waiting for budget). Also decides whether to keep reading."""
        if self._closed:
            return
        if frames:
            self._last_rx = time.monotonic()
        wire_bytes = 0
        for frame in frames:
            wire_bytes += len(frame.payload) + FRAME_OVERHEAD
            if frame.type is FrameType.DATA:
                self._queue.append(frame.payload)
                self._queued_bytes += len(frame.payload)
                self.budget.charge(len(frame.payload))
                self.bytes_received += len(frame.payload)
            elif frame.type is FrameType.PING:
                if len(frame.payload) > MAX_PING_PAYLOAD:
                    self._fail(FrameError(f"ping payload of {len(frame.payload)} bytes"))
                    return
                self._pong_owed = frame.payload
                self._pay_pong()
            elif frame.type is FrameType.CLOSE:
                log.debug("peer closed", extra=self._log_fields(event="peer_close"))
                self._shutdown(None, say_goodbye=False)
                break
            # PONG: liveness only, already recorded in _last_rx
        if self._queue:
            self._readable.set()
        if self._closed:
            return
        self._check_memory()
        if wire_bytes:
            delay = self._bucket.consume(wire_bytes)
            if delay > 0 and _ReadPause.RATE not in self._paused:
                self._pause(_ReadPause.RATE)
                self._resume_timer = asyncio.get_running_loop().call_later(delay, self._resume, _ReadPause.RATE)

    def _fail(self, fault: PeerFault) -> None:
        log.warning(
            "connection fault", extra=self._log_fields(event="fault", fault=type(fault).__name__, detail=str(fault))
        )
        self._shutdown(fault, say_goodbye=False)

    def _drop(self) -> None:
        """Close at once, no fault and no goodbye (evicted for a newcomer or for memory)."""
        self._shutdown(None, say_goodbye=False)
        self._tr.abort()

    def _on_eof(self) -> None:
        self._shutdown(None, say_goodbye=False)

    def _on_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        self._shutdown(None, say_goodbye=False)

    def _set_writable(self, writable: bool) -> None:
        if writable:
            self._writable.set()
            self._pay_pong()
        else:
            self._writable.clear()

    # --- internals --------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        self._tr.write(data)
        self._written += len(data)

    def _write_control(self, ftype: FrameType, payload: bytes = b"") -> bool:
        """Write a control frame unless the peer is behind on reading (see CONTROL_WRITE_MARK)."""
        if self._closed or self._tr.get_write_buffer_size() >= CONTROL_WRITE_MARK:
            return False
        self._write(self._encoder.encode(ftype, payload))
        return True

    def _pay_pong(self) -> None:
        if self._pong_owed is not None and self._write_control(FrameType.PONG, self._pong_owed):
            self._pong_owed = None

    def _check_memory(self) -> None:
        """Pause reading while the budget is spent or a large frame waits for it."""
        if self._closed or not (self._decoder.blocked or self.budget.over):
            return
        if self.budget.pool.over:
            # Our own kept buffer first: small messages may then go on
            # flowing within the reserve while the pool is short.
            self._decoder.release_spare()
            self._encoder.release_spare()
            if not (self._decoder.blocked or self.budget.over):
                return
        self._pause(_ReadPause.MEMORY)
        if self.budget.pool.over or self._decoder.blocked:
            self.budget.wait(self._resume_soon)
            if self._on_starved is not None:
                self._on_starved(self)

    def _resume_soon(self) -> None:
        """The pool got bytes back. Try on the next loop iteration, not from
        inside the release: waking one connection may evict another, whose
        release wakes the next, and so on, which must not nest."""
        self._loop.call_soon(self._try_resume)

    def _try_resume(self) -> None:
        """Resume reading once the budget has room again (after ``recv()``, or
        when the pool got bytes back)."""
        if self._closed or _ReadPause.MEMORY not in self._paused:
            return
        if self._decoder.blocked:
            try:
                frames = self._decoder.poll()  # the waiting frame may fit now; the bytes are here already
            except PeerFault as fault:
                self._fail(fault)
                return
            self._paused.discard(_ReadPause.MEMORY)  # re-decided below, from scratch
            self._on_frames(frames)
            if self._decoder.error is not None:
                self._fail(self._decoder.error)
                return
            if _ReadPause.MEMORY in self._paused or self._closed:
                return  # _on_frames paused again (and waits) or closed
            self._paused.add(_ReadPause.MEMORY)
        if self._queued_bytes > self.budget.limit // 2 or self.budget.over:
            if self.budget.pool.over:
                self.budget.wait(self._resume_soon)
            return  # else recv() calls again as the queue drains
        self._last_rx = time.monotonic()  # we were not reading: the idle clock restarts
        self._resume(_ReadPause.MEMORY)

    def _shutdown(self, fault: PeerFault | None, say_goodbye: bool) -> None:
        """Synchronous core of every close path (safe from callbacks and from our own tasks)."""
        if self._closed:
            return
        self._closed = True
        self._fault = fault
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self._tasks.cancel("keepalive")
        if fault is not None:
            self._tr.abort()
        else:
            if say_goodbye and not self._tr.is_closing():
                self._write(self._encoder.encode(FrameType.CLOSE))
            self._tr.close()
        self._decoder.close()
        self._encoder.release_spare()
        self.budget.close()  # what waits in the queue is the application's to take now
        self._readable.set()
        self._writable.set()

    def _pause(self, reason: _ReadPause) -> None:
        if not self._paused:
            self._tr.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: _ReadPause) -> None:
        if reason is _ReadPause.RATE:
            self._resume_timer = None
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and not self._closed:
            self._tr.resume_reading()

    async def _keepalive(self) -> None:
        now = time.monotonic()
        limits = self._limits
        if _ReadPause.MEMORY not in self._paused and now - self._last_rx >= limits.idle_timeout_s:
            self._fail(TimeoutFault(f"no frame for {now - self._last_rx:.1f}s"))
            return
        unsent = self._tr.get_write_buffer_size()
        drained = self._written - unsent
        if not unsent or drained > self._drained:
            self._drained, self._drained_at = drained, now
        elif now - self._drained_at >= limits.drain_timeout_s:
            self._fail(WriteStalled(f"{unsent} bytes unread by the peer for {now - self._drained_at:.1f}s"))
            return
        self._pay_pong()
        if now - self._last_ping >= limits.ping_interval_s and self._write_control(
            FrameType.PING, now.hex().encode()[:MAX_PING_PAYLOAD]
        ):
            self._last_ping = now
        self._release_idle_spares()

    def _release_idle_spares(self) -> None:
        """Frame-sized buffers kept for a stream go back once it paused for a
        tick (or at once while the node's pool has peers waiting for it)."""
        pressed = self.budget.pool.waiting > 0
        if pressed or self._decoder.large_frames == self._large_frames_seen:
            self._decoder.release_spare()
        if pressed or self._encoder.frames == self._frames_sent_seen:
            self._encoder.release_spare()
        self._large_frames_seen = self._decoder.large_frames
        self._frames_sent_seen = self._encoder.frames

    def _log_fields(self, **fields: object) -> dict[str, object]:
        return {"conn": self.name, "peer": str(self.peer_id), "remote": f"{self.remote[0]}:{self.remote[1]}", **fields}


class _SecureProtocol(asyncio.BufferedProtocol):
    """One TCP connection: handshake, then frames handed to its SecureConnection."""

    def __init__(self, owner: Transport, outbound: bool, conn_no: int, expected: PeerId | None = None) -> None:
        self._owner = owner
        self.outbound = outbound
        self.conn_no = conn_no
        self.opened_at = time.monotonic()
        self._limits = owner.limits
        self._hs = Libp2pNoiseHandshake(
            owner.identity, initiator=outbound, expected=expected, ciphers=self._limits.ciphers
        )
        self._hs_reader = LengthPrefixedReader(HANDSHAKE_LENGTH, MAX_HANDSHAKE_MESSAGE, 1, HANDSHAKE_SCRATCH_BYTES)
        self._decoder: FrameDecoder | None = None
        self.conn: SecureConnection | None = None
        self.handshake_done: asyncio.Future[SecureConnection] = asyncio.get_running_loop().create_future()
        self.tr: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("?", 0)
        self.subnet: SubnetKey | None = None

    def slot(self) -> Slot:
        """This (inbound) connection as the admission policy sees it."""
        conn = self.conn
        return Slot(self.conn_no, self.subnet, self.opened_at, authenticated=conn is not None,
                    useful_at=conn.useful_at if conn is not None else None)

    # --- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport subclass
        peername = transport.get_extra_info("peername")
        if not peername:
            # Reset before we got to it (accepted from the backlog after an
            # RST): nobody to talk to, nothing to blame, nothing to log.
            log.debug("connection gone before accept", extra={"event": "reset_before_accept"})
            transport.abort()
            return
        self.remote = (str(peername[0]), int(peername[1]))
        transport.set_write_buffer_limits(high=send_high_water(self._limits))
        if not self._owner._admit(self):
            transport.abort()
            return
        try:
            self._write_handshake(self._hs.start())
        except PeerFault as exc:
            self.fail(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._decoder is not None:
            return self._decoder.get_buffer(sizehint)
        return self._hs_reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._decoder is not None:
                frames = self._decoder.buffer_updated(nbytes)
                assert self.conn is not None
                self.conn._on_frames(frames)  # good frames before a bad one still count
                if self._decoder.error is not None:
                    raise self._decoder.error
            else:
                self._hs_reader.buffer_updated(nbytes)
                self._advance_handshake()
        except PeerFault as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        try:
            if self._decoder is not None:
                self._decoder.at_eof()
                assert self.conn is not None
                self.conn._on_eof()
            else:
                self._hs_reader.at_eof()
                raise HandshakeError("peer closed the connection during the handshake")
        except PeerFault as exc:
            self.fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._forget(self)
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionClosed(f"connection lost during handshake: {exc}"))
            self.handshake_done.exception()  # retrieved: the waiter may already have timed out
        if self.conn is not None:
            self.conn._on_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_writable(False)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_writable(True)

    # --- handshake -----------------------------------------------------------------

    def _write_handshake(self, message: bytes | None) -> None:
        if message is not None:
            assert self.tr is not None
            self.tr.write(HANDSHAKE_LENGTH.pack(len(message)) + message)

    def _advance_handshake(self) -> None:
        while not self._hs.complete:
            body = self._hs_reader.next_body()
            if body is None:
                return
            self._write_handshake(self._hs.receive(bytes(body)))
        self._open_session()

    def _open_session(self) -> None:
        assert self.tr is not None and self._hs.remote_peer is not None
        send, receive = self._hs.split()
        owner = self._owner
        plaintext = owner.plaintext_scratch
        budget = owner.pool.budget(self._limits.max_peer_buffered_bytes, self._limits.peer_reserve_bytes)
        self._decoder = FrameDecoder(receive, self._limits.max_frame, plaintext=plaintext, budget=budget)
        self.conn = SecureConnection(
            self.tr,
            FrameEncoder(send, self._limits.max_frame, plaintext),
            self._decoder,
            budget,
            self._hs.remote_peer,
            self.remote,
            self.outbound,
            self._limits,
            self.conn_no,
            send.cipher,
            on_starved=owner._shed_memory,
        )
        if not self.handshake_done.done():
            self.handshake_done.set_result(self.conn)
        # Frames that came with the handshake's last message are the peer's
        # first authenticated bytes: they count (and are judged) like any other.
        tail = self._hs_reader.take_pending()
        if tail:
            self.conn._on_frames(self._decoder.feed(tail))
            if self._decoder.error is not None:
                raise self._decoder.error

    # --- failure ------------------------------------------------------------------

    def fail(self, fault: PeerFault) -> None:
        """Record ``fault`` and drop the connection (no goodbye to a misbehaving peer)."""
        if self.conn is not None:
            self.conn._fail(fault)
            return
        self._owner.warn(
            self.remote[0],
            "handshake failed",
            event="handshake_failed",
            conn=f"conn-{self.conn_no}",
            remote=f"{self.remote[0]}:{self.remote[1]}",
            outbound=self.outbound,
            fault=type(fault).__name__,
            detail=str(fault),
        )
        self._abort_handshake(fault)

    def _abort_handshake(self, exc: Exception) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
            self.handshake_done.exception()
        if self.tr is not None:
            self.tr.abort()

    def evict(self) -> None:
        """Give the slot up for somebody else: not a fault, nobody is blamed."""
        if self.conn is not None:
            self.conn._drop()
        else:
            self._abort_handshake(ConnectionClosed("evicted during the handshake"))


class Transport:
    """Listens and dials; hands every authenticated connection to ``on_connection``.

    ``on_connection(conn)`` runs once per connection (inbound and outbound) as
    its own named task and owns the ``recv()`` loop; the connection stays
    open when it returns. ``dial`` raises ``OSError`` when the TCP connect
    fails, :class:`TimeoutFault`, :class:`HandshakeError` or
    :class:`IdentityMismatch`.
    """

    def __init__(
        self,
        identity: Identity,
        on_connection: Callable[[SecureConnection], Awaitable[None]],
        limits: TransportLimits = TransportLimits(),
    ) -> None:
        self.identity = identity
        self.limits = limits
        self._on_connection = on_connection
        self._tasks = TaskManager(f"transport {identity.peer_id.short()}")
        self._servers: list[asyncio.AbstractServer] = []
        self._protocols: set[_SecureProtocol] = set()
        self._inbound_total = 0
        self._inbound_by_subnet: Counter[SubnetKey] = Counter()
        self._conn_numbers = itertools.count(1)
        self._closing = False
        # Plaintext staging for every connection's frames (see PlaintextScratch):
        # one largest frame per transport instead of one per connection.
        self.plaintext_scratch = PlaintextScratch(limits.max_frame)
        self.pool = BytePool(limits.max_buffered_bytes)  # every peer's receive budget draws from it
        self.evictions: Counter[str] = Counter()  # why inbound connections were evicted, by reason
        self._warnings = RateLimitedLog("transport warnings", log, LogBudget(
            per_key=limits.warnings_per_subnet, total=limits.warnings_per_interval, window_s=limits.warning_interval_s,
        ))

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connections(self) -> list[SecureConnection]:
        return [p.conn for p in self._protocols if p.conn is not None and not p.conn.closed]

    @property
    def inbound(self) -> int:
        """Inbound TCP connections held now, half-open ones included."""
        return self._inbound_total

    def warn(self, host: str, msg: str, *, event: str, **fields: object) -> None:
        """A WARNING that ``host``, maybe a stranger, can cause: rate-limited
        per subnet and in all; the rest are counted in one summary line."""
        try:
            key: object = subnet_of(host)
        except ValueError:
            key = host
        self._warnings.warning(log, key, msg, extra={"event": event, **fields})

    async def listen(self, host: str, port: int) -> list[Multiaddr]:
        """Start accepting on ``host:port`` (0 = any free port); returns the bound addresses."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _SecureProtocol(self, outbound=False, conn_no=next(self._conn_numbers)),
            host,
            port,
            reuse_address=True,
        )
        self._servers.append(server)
        if "warning-summaries" not in self._tasks:  # a flood that stopped is summarised too
            self._tasks.periodic("warning-summaries", self.limits.warning_interval_s, self._flush_warnings,
                                 delay_s=self.limits.warning_interval_s)
        addrs = []
        for sock in server.sockets:
            bound_host, bound_port = sock.getsockname()[:2]
            addrs.append(Multiaddr(bound_host, bound_port, self.identity.peer_id))
        log.info("listening", extra={"event": "listen", "addrs": [str(a) for a in addrs]})
        return addrs

    async def dial(self, addr: Multiaddr) -> SecureConnection:
        """Connect, handshake, and prove ``addr.peer_id`` if set (else :class:`IdentityMismatch`)."""
        if self._closing:
            raise ConnectionClosed("transport is closed")
        loop = asyncio.get_running_loop()
        conn_no = next(self._conn_numbers)
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _SecureProtocol(self, outbound=True, conn_no=conn_no, expected=addr.peer_id),
                    addr.host,
                    addr.port,
                ),
                self.limits.connect_timeout_s,
            )
        except TimeoutError:
            raise TimeoutFault(f"connect to {addr} timed out after {self.limits.connect_timeout_s}s") from None
        conn = await self._await_handshake(proto)
        self._start_session(conn)
        return conn

    async def close(self) -> None:
        """Stop listening, close every connection, cancel every task."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = [p.conn for p in self._protocols if p.conn is not None]
        for proto in list(self._protocols):
            if proto.conn is None and proto.tr is not None:
                proto.tr.abort()
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
        await self._tasks.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._warnings.close()

    async def abort(self, timeout_s: float = 2.0) -> None:
        """Die like ``kill -9`` would: stop listening and dialling, reset every
        TCP connection (authenticated or half-open) with no CLOSE frame, and
        wait (bounded) until the sockets are gone. For fault injection in
        tests and testnets; a daemon shuts down with :meth:`close`."""
        self._closing = True
        for server in self._servers:
            server.close()
        for proto in list(self._protocols):
            if proto.tr is not None:
                proto.tr.abort()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._protocols and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # connection_lost() runs on the next loop iterations

    # --- internals --------------------------------------------------------------

    async def _flush_warnings(self) -> None:
        self._warnings.flush()

    async def _await_handshake(self, proto: _SecureProtocol) -> SecureConnection:
        try:
            return await asyncio.wait_for(asyncio.shield(proto.handshake_done), self.limits.handshake_timeout_s)
        except TimeoutError:
            fault = TimeoutFault(f"handshake not finished within {self.limits.handshake_timeout_s}s")
            proto.fail(fault)
            raise fault from None

    def _admit(self, proto: _SecureProtocol) -> bool:
        """Track every live TCP connection; give an inbound one a slot, evicting
        the one worth least when all are taken (see admission.py)."""
        if self._closing:
            return False
        if not proto.outbound:
            try:
                subnet = subnet_of(proto.remote[0])
            except ValueError:  # not an IP peer (cannot happen on a TCP listener); nothing to count it under
                log.debug("inbound connection without an IP address", extra={"remote": proto.remote[0]})
                return False
            reason = None
            if self._inbound_by_subnet[subnet] >= self.limits.max_inbound_per_subnet:
                reason = "max_inbound_per_subnet"
            elif self._inbound_total >= self.limits.max_inbound and not self._evict_for(subnet):
                reason = "max_inbound"
            if reason is not None:
                self.warn(proto.remote[0], "inbound connection refused", event="inbound_refused",
                          remote=f"{proto.remote[0]}:{proto.remote[1]}", subnet=str(subnet), limit=reason)
                return False
            proto.subnet = subnet
            self._inbound_total += 1
            self._inbound_by_subnet[subnet] += 1
            self._tasks.spawn(f"accept-{proto.conn_no}", lambda: self._accept(proto))
        self._protocols.add(proto)
        return True

    def _inbound_protocols(self) -> list[_SecureProtocol]:
        return [p for p in self._protocols if p.subnet is not None]

    def _evict_for(self, subnet: SubnetKey) -> bool:
        """Free one inbound slot for a newcomer from ``subnet``; False if every
        connection is protected."""
        protos = {p.conn_no: p for p in self._inbound_protocols()}
        victim = choose_victim((p.slot() for p in protos.values()), time.monotonic(), self.limits.useful_ttl_s)
        if victim is None:
            return False
        self._evict(protos[victim.key], "admission", newcomer_subnet=str(subnet))
        return True

    def _shed_memory(self, starved: SecureConnection) -> None:
        """``starved`` waits for the node's pool: evict the inbound connection
        worth least among the others that hold pool bytes (never a useful one)."""
        if self._closing:
            return
        protos = {
            p.conn_no: p for p in self._inbound_protocols()
            if p.conn is not None and p.conn is not starved and not p.conn.closed and p.conn.budget.pooled > 0
        }
        victim = choose_victim((p.slot() for p in protos.values()), time.monotonic(), self.limits.useful_ttl_s)
        if victim is not None:
            self._evict(protos[victim.key], "memory", pool_used=self.pool.used)

    def _evict(self, proto: _SecureProtocol, reason: str, **fields: object) -> None:
        self.evictions[reason] += 1
        conn = proto.conn
        self.warn(
            proto.remote[0], "inbound connection evicted", event="inbound_evicted", reason=reason,
            conn=f"conn-{proto.conn_no}", remote=f"{proto.remote[0]}:{proto.remote[1]}", subnet=str(proto.subnet),
            peer=str(conn.peer_id) if conn is not None else None, **fields,
        )
        self._forget(proto)  # the slot is free now, not when the socket is gone
        proto.evict()

    def _forget(self, proto: _SecureProtocol) -> None:
        if proto not in self._protocols:
            return
        self._protocols.discard(proto)
        if proto.subnet is not None:
            self._inbound_total -= 1
            self._inbound_by_subnet[proto.subnet] -= 1
            if not self._inbound_by_subnet[proto.subnet]:
                del self._inbound_by_subnet[proto.subnet]

    async def _accept(self, proto: _SecureProtocol) -> None:
        try:
            conn = await self._await_handshake(proto)
        except (PeerFault, ConnectionClosed):
            return  # already logged and dropped by the protocol
        self._start_session(conn)

    def _start_session(self, conn: SecureConnection) -> None:
        log.info(
            "connection open",
            extra={"event": "connected", "conn": conn.name, "peer": str(conn.peer_id),
                   "remote": f"{conn.remote[0]}:{conn.remote[1]}", "outbound": conn.outbound,
                   "cipher": conn.cipher.name},
        )
        self._tasks.spawn(f"on_connection-{conn.name}", lambda: self._on_connection(conn))
