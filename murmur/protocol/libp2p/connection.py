"""One upgraded libp2p connection: a proved peer and its streams, over either muxer.

:mod:`murmur.protocol.libp2p.wire` upgrades the TCP connection (security and
muxer, each chosen by multistream-select) and hands over one of:

* :class:`FastConnection`: ``/murmur/noise-fast/2.0.0`` + ``/murmur/mux/2.0.0``,
  murmur's fast path: one AEAD record per stream frame, a stream frame per
  message (:mod:`murmur.protocol.murmux`), receive memory bounded by pausing
  the socket when the peer's budget is spent;
* :class:`YamuxConnection`: ``/noise`` + ``/yamux/1.0.0``, what every libp2p
  peer speaks: receive memory bounded by the yamux windows, which are paid
  from the same budget.

Both give the host and the application the same things: ``peer_id`` (proved by
the handshake), :meth:`Libp2pConnection.open_stream` (a stream speaking the
first protocol id the peer accepts), inbound streams served by the host's
handlers, :meth:`~Libp2pConnection.close`, and the protections every
connection has (idle timeout, keepalive pings, the drain watch that cuts a
peer leaving our bytes unread, a receive-rate token bucket, ``mark_useful``).

A :class:`Stream` is read and written as bytes (``read``/``write``, what
identify, ping and libp2p protocols use) or as messages (``send_message``/
``recv_message``, what murmur's protocols use): on the fast path one message
is one frame, on yamux a uvarint length prefix and the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from murmur.errors import (
    ConnectionClosed,
    FrameError,
    FrameTooLarge,
    MuxerError,
    NegotiationError,
    PeerFault,
    SendTimeout,
    TimeoutFault,
    WriteStalled,
)
from murmur.protocol import multistream, murmux, uvarint, yamux
from murmur.protocol.budget import PeerBudget
from murmur.protocol.framing import (
    FRAME_LENGTH,
    FRAME_OVERHEAD,
    SPLIT_MIN_TAIL,
    SPLIT_OVERHEAD,
    FrameDecoder,
    FrameEncoder,
    FrameType,
)
from murmur.protocol.identify import IdentifyInfo
from murmur.protocol.identity import PeerId
from murmur.protocol.noise_channel import NoiseChannel
from murmur.protocol.sealed import SealedTail, Split
from murmur.protocol.transport import RATE_BURST_S, TokenBucket, TransportLimits
from murmur.tasks import TaskManager

if TYPE_CHECKING:
    from murmur.protocol.libp2p.host import Libp2pHost

log = logging.getLogger(__name__)

CONTROL_WRITE_MARK = 64 * 1024
"""Pongs and pings are written only while the socket's write buffer holds
less than this: a peer that pings and never reads gets one owed pong, not one
per ping."""
CLOSE_WAIT_S = 1.0  # how long close() waits for the socket to flush
READ_CHUNK = 256 * 1024
MAX_PING_PAYLOAD = 64
MAX_VARINT_BYTES = 9


class StreamResetError(yamux.StreamError):
    """The stream was reset (by the peer, by us, or with its connection)."""


class _ReadPause(enum.Enum):
    RATE = "rate"  # the token bucket is in debt
    MEMORY = "memory"  # the peer's budget (or the node's pool) is spent


# --- streams ------------------------------------------------------------------------


class Stream:
    """One stream of a :class:`Libp2pConnection`, with its negotiated ``protocol``."""

    def __init__(self, conn: Libp2pConnection, stream_id: int, outbound: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.outbound = outbound
        self.protocol: str | None = None
        self._pushback: bytes | memoryview = b""  # what came behind the multistream echo, or the rest of a read
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()  # the muxer has room for this stream again
        self._reset = False
        self._reset_here = False  # reset by this end (reset()), not by the peer or its connection's end
        self._closed_write = False
        self._discarding = False  # closed for reading: what arrives is dropped

    @property
    def peer_id(self) -> PeerId:
        return self.conn.peer_id

    @property
    def is_reset(self) -> bool:
        return self._reset

    @property
    def reset_by_peer(self) -> bool:
        """Reset from the other side (the peer, or its connection ending), not by :meth:`reset` here."""
        return self._reset and not self._reset_here

    # --- bytes -------------------------------------------------------------------

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Up to ``max_bytes``; ``b""`` once the peer closed its side and all was read.
        Raises :class:`StreamResetError` if the stream was reset."""
        # What is left of a piece waits as a view of it: a message read as a
        # length prefix byte by byte, then its body (yamux), sliced bytes
        # copied the rest of the piece once per read.
        while True:
            if self._pushback:
                rest = memoryview(self._pushback)
                data, self._pushback = rest[:max_bytes], rest[max_bytes:]
                return bytes(data)
            if self._reset:
                raise StreamResetError(f"stream {self.id} was reset")
            data = self._take()
            if data:
                if len(data) > max_bytes:
                    piece = memoryview(data)
                    data, self._pushback = piece[:max_bytes], piece[max_bytes:]
                return bytes(data)  # a byte stream's reader gets bytes (a no-op for bytes)
            if data is not None:
                continue  # an empty frame: nothing for a byte stream (b"" means EOF here)
            if self._at_eof():
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await self.read(n - got)
            if not data:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_all(self, limit: int) -> bytes:
        """Everything until the peer's FIN; more than ``limit`` bytes resets the
        stream and raises ``ValueError``."""
        parts: list[bytes] = []
        got = 0
        while data := await self.read():
            got += len(data)
            if got > limit:
                self.reset()
                raise ValueError(f"stream sent more than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for room (window, socket) as needed."""
        raise NotImplementedError

    # --- messages -------------------------------------------------------------------

    async def send_message(self, *parts: bytes | bytearray | memoryview, deadline: float | None = None) -> None:
        """One message, ``parts`` concatenated (at most ``max_frame`` bytes).

        With a ``deadline`` (``time.monotonic()`` seconds): if the connection
        has no room for it by then, :class:`~murmur.errors.SendTimeout` and
        nothing of it was sent; the connection stays open."""
        raise NotImplementedError

    async def recv_message(self) -> bytes | memoryview | None:
        """The next message, ``None`` once the peer closed its side. A message
        over ``max_frame`` bytes is a :class:`~murmur.errors.FrameTooLarge`.

        On the fast path a message is a read-only view of its frame's own
        buffer (no copy between the AEAD and the application; see
        :class:`~murmur.protocol.framing.Frame`), valid as long as it is held."""
        raise NotImplementedError

    async def recv_parts(self) -> tuple[bytes | memoryview, SealedTail | None] | None:
        """:meth:`recv_message` for a reader that has a place of its own for a
        large tail: the message as its head and, where it came split, its
        tail still sealed (:class:`~murmur.protocol.sealed.SealedTail`), for
        the reader to open straight where it belongs. ``None`` at the end."""
        message = await self.recv_message()
        return None if message is None else (message, None)

    # --- ends ----------------------------------------------------------------------

    async def close_write(self) -> None:
        """Half-close (FIN): the peer reads EOF; we may still read."""
        if self._closed_write or self._reset:
            return
        self._closed_write = True
        if not self.conn.closed:
            self.conn._close_write(self.id)

    async def close(self) -> None:
        await self.close_write()

    def close_read(self) -> None:
        """We read nothing more: what arrives for the stream is dropped at once
        (a handler that is done, a stream we only send on), so it can never
        hold the connection's receive memory."""
        self._pushback = b""
        self._discarding = True
        if not self.conn.closed:
            self.conn._close_read(self.id)

    def reset(self) -> None:
        """Abort both directions (RST); pending and future reads and writes fail."""
        if self._reset:
            return
        self._reset_here = True
        self._on_reset()
        if not self.conn.closed:
            self.conn._reset_stream(self.id)

    def _on_reset(self) -> None:
        self._reset = True
        self._readable.set()
        self._writable.set()

    def _check_writable(self) -> None:
        if self._reset:
            raise StreamResetError(f"stream {self.id} was reset")
        if self._closed_write:
            raise yamux.StreamError(f"stream {self.id} is closed for writing")
        if self.conn.closed:
            raise StreamResetError(f"stream {self.id}: connection closed")

    # --- muxer-specific -------------------------------------------------------------

    def _take(self) -> bytes | memoryview | None:
        """The next piece the muxer holds for this stream, or ``None``."""
        raise NotImplementedError

    def _at_eof(self) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.protocol} {self.conn.peer_id.short()}>"


class MuxStream(Stream):
    """A ``/murmur/mux/2.0.0`` stream: each write is one frame, each message one frame."""

    conn: FastConnection

    def _take(self) -> memoryview | None:
        message = self.conn._read_stream(self.id)
        return message.join() if isinstance(message, Split) else message

    def _at_eof(self) -> bool:
        return self.conn._session.at_eof(self.id)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        limit = self.conn.limits.max_frame
        for start in range(0, view.nbytes, limit):
            self._check_writable()
            await self.conn._send_frame(self.id, (view[start : start + limit],), None)

    async def send_message(self, *parts: bytes | bytearray | memoryview, deadline: float | None = None) -> None:
        """A last part of ``SPLIT_MIN_TAIL`` bytes or more (a delta chunk's
        payload) goes as a split frame's tail, sealed from where it lies."""
        self._check_writable()
        tail = None
        if len(parts) > 1 and memoryview(parts[-1]).nbytes >= SPLIT_MIN_TAIL:
            parts, tail = parts[:-1], parts[-1]
        await self.conn._send_frame(self.id, parts, deadline, tail)

    async def recv_message(self) -> bytes | memoryview | None:
        message = await self._next_message()
        return message.join() if isinstance(message, Split) else message

    async def recv_parts(self) -> tuple[bytes | memoryview, SealedTail | None] | None:
        message = await self._next_message()
        if isinstance(message, Split):
            return message.head, message.tail
        return None if message is None else (message, None)

    async def _next_message(self) -> bytes | memoryview | Split | None:
        """The next message as the muxer queued it (a split one unopened)."""
        if self._pushback:  # what followed a negotiation in the same frame
            data, self._pushback = self._pushback, b""
            return data
        while True:
            if self._reset:
                raise StreamResetError(f"stream {self.id} was reset")
            message = self.conn._read_stream(self.id)
            if message is not None:
                return message
            if self._at_eof():
                return None
            self._readable.clear()
            await self._readable.wait()


class YamuxStream(Stream):
    """A ``/yamux/1.0.0`` stream: a byte stream with a window; messages are uvarint-prefixed."""

    conn: YamuxConnection

    def _take(self) -> bytes | memoryview | None:
        # Up to READ_CHUNK whatever the reader asked: what it leaves waits in
        # the stream's pushback (a view), and the session's buffer drains as it
        # always did (its window grows only for a stream read as fast as it arrives).
        session = self.conn._session
        data = session.read(self.id, READ_CHUNK)
        if not data:
            return None
        self.conn.bytes_received += len(data)
        self.conn._flush()  # a window update may be due
        return data

    def _at_eof(self) -> bool:
        return self.conn._session.at_eof(self.id)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while True:
            self._check_writable()
            await self.conn._writable.wait()
            if self._reset or self.conn.closed:
                continue
            self._writable.clear()
            sent = self.conn._session.send(self.id, view)
            if sent:
                self.conn._flush()
                view = view[sent:]
                self.conn.bytes_sent += sent
            if not view:
                return
            if not sent:
                await self._writable.wait()

    async def send_message(self, *parts: bytes | bytearray | memoryview, deadline: float | None = None) -> None:
        size = sum(memoryview(part).nbytes for part in parts)
        if size > self.conn.limits.max_frame:
            raise ValueError(f"message of {size} bytes exceeds max_frame {self.conn.limits.max_frame}")
        self._check_writable()
        await self.conn._wait_writable(deadline)
        # Begun, a message is finished whatever the deadline: a stream cut
        # inside one would be unreadable. Cancelled midway, the stream is reset.
        prefix = uvarint.encode(size)
        message = bytearray(len(prefix) + size)  # gathered once, not joined and then prefixed
        message[: len(prefix)] = prefix
        offset = len(prefix)
        for part in parts:
            view = memoryview(part).cast("B")
            message[offset : offset + view.nbytes] = view
            offset += view.nbytes
        try:
            await self.write(message)
        except asyncio.CancelledError:
            self.reset()
            raise

    async def recv_message(self) -> bytes | None:
        prefix = bytearray()
        while True:
            got = uvarint.decode_partial(prefix, 0, FrameError)
            if got is not None:
                break
            if len(prefix) >= MAX_VARINT_BYTES:
                raise FrameError("message length prefix too long")
            byte = await self.read(1)
            if not byte:
                if prefix:
                    raise FrameError("stream ended inside a message length")
                return None
            prefix += byte
        length, _ = got
        if length > self.conn.limits.max_frame:
            raise FrameTooLarge(f"message of {length} bytes exceeds {self.conn.limits.max_frame}")
        try:
            return await self.readexactly(length)
        except asyncio.IncompleteReadError:
            raise FrameError("stream ended inside a message") from None


# --- connections --------------------------------------------------------------------


class Libp2pConnection:
    """An upgraded connection: ``peer_id`` proved by the handshake, streams by protocol id."""

    security: str = ""
    muxer: str = ""

    def __init__(self, host: Libp2pHost, wire: _WireLike, outbound: bool, conn_no: int, budget: PeerBudget,
                 peer_id: PeerId, remote: tuple[str, int], local: tuple[str, int]) -> None:
        self.host = host
        self.limits: TransportLimits = host.config.limits
        self.outbound = outbound
        self.conn_no = conn_no
        self.name = f"conn-{conn_no}"
        self.budget = budget
        self.peer_id = peer_id
        self.remote = remote
        self.local = local
        self.identify: IdentifyInfo | None = None  # what the peer told us about itself
        self.identified = asyncio.Event()
        self.fault: PeerFault | None = None  # what closed it, if a fault did
        self.closed = False
        self.useful_at: float | None = None  # last mark_useful (monotonic seconds)
        self.relay: PeerId | None = None  # the circuit relay this connection runs through (None: direct)
        self.punched = False  # a direct connection a DCUtR hole punch made (murmur/protocol/libp2p/dcutr.py)
        self.bytes_sent = 0  # stream payload bytes
        self.bytes_received = 0
        self.tasks = TaskManager(f"{self.name} {peer_id.short()}")
        self._wire = wire
        self._tr = wire.tr
        self._streams: dict[int, Stream] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed_event = asyncio.Event()
        self._paused: set[_ReadPause] = set()
        self._resume_timer: asyncio.TimerHandle | None = None
        limits = self.limits
        self._bucket = TokenBucket(limits.max_peer_rate_bytes_s,
                                   max(limits.max_peer_rate_bytes_s * RATE_BURST_S, limits.max_frame + FRAME_OVERHEAD))
        now = time.monotonic()
        self.last_rx = now
        self._last_ping = now
        self._written = 0  # bytes handed to the socket, ever
        self._drained = 0  # of which had left its buffer at the last check
        self._drained_at = now
        tick = min(limits.ping_interval_s, limits.idle_timeout_s / 4, limits.drain_timeout_s / 4)
        self.tasks.periodic("keepalive", tick, self._keepalive, delay_s=tick)

    # --- public --------------------------------------------------------------------

    def mark_useful(self) -> None:
        """The node says this peer just delivered something of value: for
        ``useful_ttl_s`` its inbound slot is protected from eviction. Pings
        and whatever the connection handles itself never count."""
        self.useful_at = time.monotonic()

    @property
    def buffered_bytes(self) -> int:
        """Memory held for this peer now: its receive budget and our unsent bytes."""
        return self.budget.used + (0 if self.closed else self._tr.get_write_buffer_size())

    @property
    def has_write_room(self) -> bool:
        """A send now would not wait for room: the socket's write buffer is
        under its high-water mark (:func:`~murmur.protocol.transport.send_high_water`)."""
        return self._writable.is_set() and not self.closed

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def open_stream(self, protocols: Sequence[str] | str, timeout_s: float | None = None) -> Stream:
        """A new stream speaking the first of ``protocols`` the peer accepts.

        Raises :class:`~murmur.errors.NoCommonProtocol` (stream reset) when it
        accepts none, :class:`~murmur.errors.TimeoutFault` when negotiation
        does not finish in time, :class:`~murmur.errors.ConnectionClosed` when
        no stream can be opened."""
        if isinstance(protocols, str):
            protocols = [protocols]
        if self.closed:
            raise ConnectionClosed(f"{self.name} is closed")
        stream = self._new_outbound_stream()
        dialer = multistream.Dialer(protocols)
        try:
            async with asyncio.timeout(timeout_s if timeout_s is not None else self.limits.negotiate_timeout_s):
                await stream.write(dialer.start())
                while not dialer.done:
                    data = await stream.read(multistream.MAX_MESSAGE)
                    if not data:
                        raise NegotiationError(f"stream {stream.id} closed during negotiation")
                    reply = dialer.feed(data)
                    if reply:
                        await stream.write(reply)
        except TimeoutError:
            stream.reset()
            raise TimeoutFault(f"negotiating {list(protocols)} timed out") from None
        except BaseException:
            stream.reset()
            raise
        stream.protocol = dialer.selected
        stream._pushback = dialer.leftover
        return stream

    async def close(self) -> None:
        """Say goodbye (the muxer's), flush, close the socket, stop the tasks."""
        if not self.closed:
            self._goodbye()
        self._shutdown(None)
        self._tr.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._wire.lost), CLOSE_WAIT_S)
        if not self._wire.lost.done():
            self._tr.abort()
        await self.tasks.shutdown()

    def __repr__(self) -> str:
        direction = "out" if self.outbound else "in"
        return f"<{type(self).__name__} {self.name} {direction} {self.peer_id.short()} {self.remote[0]}:{self.remote[1]}>"

    # --- inbound streams -------------------------------------------------------------

    async def _serve_stream(self, stream: Stream) -> None:
        """Inbound: negotiate the protocol with the host's handlers, then run the handler."""
        host = self.host
        listener = multistream.Listener(host.handles, self.limits.max_negotiation_attempts, listing=host.protocols)
        try:
            async with asyncio.timeout(self.limits.negotiate_timeout_s):
                await stream.write(listener.start())
                while not listener.done:
                    data = await stream.read(multistream.MAX_MESSAGE)
                    if not data:
                        stream.reset()
                        return
                    reply = listener.feed(data)
                    if reply:
                        await stream.write(reply)
        except TimeoutError:
            stream.reset()
            host._report(self, TimeoutFault(f"stream {stream.id} negotiation timed out"))
            return
        except PeerFault as fault:
            stream.reset()
            self._fault_on_stream(fault)
            return
        except ConnectionClosed:
            return
        stream.protocol = listener.selected
        stream._pushback = listener.leftover
        self._accepted(stream.id)
        handler = host.handler_for(stream.protocol)  # type: ignore[arg-type]
        if handler is None:  # unregistered since: nothing to run
            stream.reset()
            return
        try:
            await handler(stream)
        except (ConnectionClosed, asyncio.IncompleteReadError):
            stream.reset()
        except PeerFault as fault:
            stream.reset()
            self._fault_on_stream(fault)
        except Exception:
            log.exception("stream handler failed", extra={"event": "handler_failed", "protocol": stream.protocol,
                                                          "conn": self.name})
            stream.reset()
        else:
            stream.close_read()  # the handler is done reading: whatever else comes is dropped

    def _fault_on_stream(self, fault: PeerFault) -> None:
        """A fault a stream's negotiation or handler met: the peer is reported,
        and dropped if the fault says so."""
        if fault.drop:
            self._fail(fault)
        else:
            self.host._report(self, fault)

    async def _run_stream(self, stream: Stream) -> None:
        try:
            await self._serve_stream(stream)
        finally:
            if not self._is_live(stream.id):
                self._streams.pop(stream.id, None)

    def _on_events(self, events: list[yamux.Event]) -> None:
        for event in events:
            if isinstance(event, yamux.DataReceived | yamux.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    if stream._discarding:
                        self._discard(stream)
                    stream._readable.set()
            elif isinstance(event, yamux.WindowOpened):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._writable.set()
            elif isinstance(event, yamux.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_reset()
            elif isinstance(event, yamux.StreamOpened):
                stream = self._streams[event.stream_id] = self._make_stream(event.stream_id, outbound=False)
                if not self.closed:
                    self.tasks.spawn(f"stream-{event.stream_id}", lambda s=stream: self._run_stream(s))
            elif isinstance(event, yamux.PongReceived):
                self._on_pong(event.opaque)
            elif isinstance(event, yamux.Refused):
                self.host._report(self, event.fault)
            elif isinstance(event, yamux.GoAwayReceived):
                log.debug("peer goes away", extra={"event": "go_away", "conn": self.name, "code": event.code})
        self._forget_finished()

    def _forget_finished(self) -> None:
        if len(self._streams) <= self._live_streams():
            return
        for sid in [sid for sid in self._streams if not self._is_live(sid)]:
            stream = self._streams[sid]
            if not stream._pushback and (stream._reset or stream._closed_write):
                del self._streams[sid]

    # --- failure and close --------------------------------------------------------------

    def _fail(self, fault: PeerFault) -> None:
        """Report ``fault`` and drop the connection (no goodbye to a misbehaving peer)."""
        if self.closed:
            return
        self.host._report(self, fault)
        self._flush_on_fail()
        self._shutdown(fault)

    def _drop(self) -> None:
        """Close at once, no fault and no goodbye (evicted for a newcomer or for memory)."""
        self._shutdown(None)
        self._tr.abort()

    def _shutdown(self, fault: PeerFault | None) -> None:
        """Synchronous core of every close path (safe from callbacks and from our own tasks)."""
        if self.closed:
            return
        self.closed = True
        self.fault = fault
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self.tasks.cancel("keepalive")
        for stream in self._streams.values():
            if not self._at_clean_eof(stream.id):
                stream._on_reset()
            stream._readable.set()
        self._close_muxer()
        self.budget.close()  # what waits in the streams is gone with them
        self._writable.set()
        self.identified.set()
        self._closed_event.set()
        if fault is not None:
            self._abort_on_fault()
        self.host._forget(self)

    def _on_eof(self) -> None:
        self._shutdown(None)

    def _on_lost(self) -> None:
        self._shutdown(None)

    def _set_writable(self, writable: bool) -> None:
        if writable:
            self._writable.set()
            self._pay_pong()
        else:
            self._writable.clear()

    # --- sending ----------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        if not self._tr.is_closing():
            self._tr.write(data)
            self._written += len(data)

    async def _wait_writable(self, deadline: float | None) -> None:
        """Wait while the socket's write buffer is over the high-water mark;
        past ``deadline``, :class:`~murmur.errors.SendTimeout` (nothing sent)."""
        while not self._writable.is_set() and not self.closed:
            if deadline is None:
                await self._writable.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SendTimeout(
                    f"{self.peer_id.short()} left {self._tr.get_write_buffer_size()} bytes unread past the deadline")
            with contextlib.suppress(TimeoutError):  # the loop's timer may fire a little early: check again
                await asyncio.wait_for(self._writable.wait(), remaining)
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer_id.short()} is closed")

    # --- reading pauses -------------------------------------------------------------------

    def _count_received(self, nbytes: int) -> None:
        """Wire bytes that arrived after the upgrade: the rate limit's business."""
        if self.closed or not nbytes:
            return
        delay = self._bucket.consume(nbytes)
        if delay > 0 and _ReadPause.RATE not in self._paused:
            self._pause(_ReadPause.RATE)
            self._resume_timer = asyncio.get_running_loop().call_later(delay, self._resume, _ReadPause.RATE)

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
        if not self._paused and not self.closed:
            self._tr.resume_reading()

    # --- keepalive ----------------------------------------------------------------------

    async def _keepalive(self) -> None:
        now = time.monotonic()
        limits = self.limits
        if _ReadPause.MEMORY not in self._paused and now - self.last_rx >= limits.idle_timeout_s:
            self._fail(TimeoutFault(f"nothing received for {now - self.last_rx:.1f}s"))
            return
        unsent = self._tr.get_write_buffer_size()
        drained = self._written - unsent
        if not unsent or drained > self._drained:
            self._drained, self._drained_at = drained, now
        elif now - self._drained_at >= limits.drain_timeout_s:
            self._fail(WriteStalled(f"{unsent} bytes unread by the peer for {now - self._drained_at:.1f}s"))
            return
        self._pay_pong()
        if now - self._last_ping >= limits.ping_interval_s and self._send_ping(now):
            self._last_ping = now
        self._idle_tick()

    # --- muxer-specific hooks ------------------------------------------------------------

    # Each muxer's connection sets these: its stream class and its sans-IO
    # session (murmux.MuxSession, yamux.YamuxSession: the same stream-table calls).
    _stream_class: type[MuxStream | YamuxStream]
    _session: murmux.MuxSession | yamux.YamuxSession

    def _new_outbound_stream(self) -> Stream:
        stream_id = self._session.open_stream()
        stream = self._streams[stream_id] = self._stream_class(self, stream_id, outbound=True)
        self._flush()
        return stream

    def _make_stream(self, stream_id: int, outbound: bool) -> Stream:
        return self._stream_class(self, stream_id, outbound)

    def _is_live(self, stream_id: int) -> bool:
        return self._session.is_live(stream_id)

    def _live_streams(self) -> int:
        return self._session.streams

    def _at_clean_eof(self, stream_id: int) -> bool:
        return self._session.is_live(stream_id) and self._session.at_eof(stream_id)

    def _accepted(self, stream_id: int) -> None:
        """An inbound stream's protocol was agreed."""

    def _close_write(self, stream_id: int) -> None:
        raise NotImplementedError

    def _close_read(self, stream_id: int) -> None:
        raise NotImplementedError

    def _discard(self, stream: Stream) -> None:
        """Drop what arrived for a stream closed for reading (a muxer that keeps it)."""

    def _reset_stream(self, stream_id: int) -> None:
        raise NotImplementedError

    def _goodbye(self) -> None:
        raise NotImplementedError

    def _flush_on_fail(self) -> None:
        """Write what the muxer owes a peer it drops (yamux: the GoAway)."""

    def _abort_on_fault(self) -> None:
        self._tr.abort()

    def _close_muxer(self) -> None:
        raise NotImplementedError

    def _send_ping(self, now: float) -> bool:
        raise NotImplementedError

    def _pay_pong(self) -> None:
        """Write a pong the peer is owed, if the socket has room."""

    def _on_pong(self, opaque: int) -> None:
        """A yamux pong (the fast path's pongs are liveness only)."""

    def _idle_tick(self) -> None:
        """Once per keepalive tick: give back memory an idle stream kept."""


class _WireLike:
    """What a connection needs of the TCP protocol that upgraded it (see wire.py)."""

    tr: asyncio.Transport
    lost: asyncio.Future[None]


class FastConnection(Libp2pConnection):
    """``/murmur/noise-fast/2.0.0`` + ``/murmur/mux/2.0.0``: AEAD records, one per stream frame."""

    # 2.0.0 (both ids): split frames. A node of the 1.0.0 release answers na to
    # this security id, and the two fall back to /noise + /yamux/1.0.0 instead
    # of failing at the muxer.
    security = "/murmur/noise-fast/2.0.0"
    muxer = murmux.PROTOCOL_ID
    _stream_class = MuxStream

    def __init__(self, host: Libp2pHost, wire: _WireLike, outbound: bool, conn_no: int, budget: PeerBudget,
                 peer_id: PeerId, remote: tuple[str, int], local: tuple[str, int], encoder: FrameEncoder,
                 decoder: FrameDecoder, cipher: object) -> None:
        super().__init__(host, wire, outbound, conn_no, budget, peer_id, remote, local)
        self.cipher = cipher  # the NoiseCipher the handshake negotiated
        self._encoder = encoder
        self._decoder = decoder
        self._session = murmux.MuxSession(outbound, budget, self.limits.yamux())
        decoder.on_tail_fault = self._fail  # a split frame's tail fails where its reader opens it
        self._buffered = 0  # what waiting stream messages hold of the budget (payloads and queue slots)
        self._pong_owed: memoryview | None = None
        self._large_frames_seen = 0
        self._frames_sent_seen = 0

    # --- sending ----------------------------------------------------------------------

    async def _send_frame(self, stream_id: int, parts: Sequence[bytes | bytearray | memoryview],
                          deadline: float | None, tail: bytes | bytearray | memoryview | None = None) -> None:
        """One DATA frame of ``stream_id`` (split, given a ``tail``): written
        whole or not at all, so a cancelled or timed-out send leaves nothing
        half-sent."""
        await self._wait_writable(deadline)
        if not self._session.can_send(stream_id):
            raise StreamResetError(f"stream {stream_id} is closed for writing")
        frame = self._encoder.encode(FrameType.DATA, stream_id, *parts, tail=tail)
        self._write(frame)
        if not self._tr.get_write_buffer_size():  # all of it is in the kernel already
            self._encoder.recycle(frame)
        overhead = FRAME_LENGTH.size + FRAME_OVERHEAD + (0 if tail is None else SPLIT_OVERHEAD)
        self.bytes_sent += len(frame) - overhead

    def _flush(self) -> None:
        """Write the control frames the muxer queued (OPEN, FIN, RESET)."""
        control = self._session.control
        if not control or self.closed:
            control.clear()
            return
        out = bytearray()
        for ftype, stream_id in control:
            out += self._encoder.encode(ftype, stream_id)
        control.clear()
        self._write(out)

    def _write_control(self, ftype: FrameType, payload: bytes = b"") -> bool:
        """A PING or PONG, unless the peer is behind on reading (see CONTROL_WRITE_MARK)."""
        if self.closed or self._tr.get_write_buffer_size() >= CONTROL_WRITE_MARK:
            return False
        self._write(self._encoder.encode(ftype, 0, payload))
        return True

    def _pay_pong(self) -> None:
        if self._pong_owed is not None and self._write_control(FrameType.PONG, self._pong_owed):
            self._pong_owed = None

    def _send_ping(self, now: float) -> bool:
        return self._write_control(FrameType.PING, now.hex().encode()[:MAX_PING_PAYLOAD])

    def _goodbye(self) -> None:
        if not self._tr.is_closing():
            self._session.go_away()
            self._write(self._encoder.encode(FrameType.CLOSE, 0))

    # --- streams ----------------------------------------------------------------------

    def _read_stream(self, stream_id: int) -> memoryview | Split | None:
        before = self.budget.used
        payload = self._session.read(stream_id)
        if payload is not None:
            self._buffered -= before - self.budget.used  # the payload and its queue slot
            self._try_resume()
        return payload

    def _close_write(self, stream_id: int) -> None:
        self._session.close_write(stream_id)
        self._flush()

    def _close_read(self, stream_id: int) -> None:
        before = self.budget.used
        self._session.close_read(stream_id)
        self._buffered -= before - self.budget.used
        self._try_resume()

    def _reset_stream(self, stream_id: int) -> None:
        before = self.budget.used
        self._session.reset(stream_id)
        self._buffered -= before - self.budget.used
        self._streams.pop(stream_id, None)
        self._flush()
        self._try_resume()

    def _close_muxer(self) -> None:
        self._session.close()
        self._buffered = 0
        self._decoder.close()
        self._encoder.release_spare()

    # --- receiving --------------------------------------------------------------------

    def _on_frames(self, frames: list) -> None:  # list[Frame]
        """Frames from one read (possibly none: a partial frame, or a large
        one waiting for budget). Also decides whether to keep reading."""
        if self.closed:
            return
        if not frames:  # a partial frame, or a large one waiting for budget
            self._check_memory()
            return
        self.last_rx = time.monotonic()
        events: list[yamux.Event] = []
        try:
            for frame in frames:
                ftype = frame.type
                if ftype in murmux.STREAM_FRAMES:
                    before = self.budget.used
                    events += self._session.on_frame(ftype, frame.stream, frame.payload, frame.tail)
                    self._buffered += self.budget.used - before
                    if ftype is FrameType.DATA:
                        self.bytes_received += len(frame.payload) + (0 if frame.tail is None else frame.tail.nbytes)
                    continue
                if frame.stream != 0:
                    raise MuxerError(f"{ftype.name} frame on stream {frame.stream}")
                if ftype is FrameType.PING:
                    if len(frame.payload) > MAX_PING_PAYLOAD:
                        raise FrameError(f"ping payload of {len(frame.payload)} bytes")
                    self._pong_owed = frame.payload
                    self._pay_pong()
                elif ftype is FrameType.CLOSE:
                    log.debug("peer closed", extra={"event": "peer_close", "conn": self.name})
                    self._on_events(events)
                    self._shutdown(None)
                    self._tr.close()
                    return
                # PONG: liveness only, already recorded in last_rx
        except PeerFault as fault:
            self._on_events(events)  # refusals that came before the violation count too
            self._fail(fault)
            return
        self._on_events(events)
        self._flush()
        self._check_memory()

    def _check_memory(self) -> None:
        """Pause reading while the budget is spent or a large frame waits for it."""
        if self.closed or not (self._decoder.blocked or self.budget.over):
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
            self.host._shed_memory(self)

    def _resume_soon(self) -> None:
        """The pool got bytes back. Try on the next loop iteration, not from
        inside the release: waking one connection may evict another, whose
        release wakes the next, and so on, which must not nest."""
        asyncio.get_running_loop().call_soon(self._try_resume)

    def _try_resume(self) -> None:
        """Resume reading once the budget has room again (after a read, or
        when the pool got bytes back)."""
        if self.closed or _ReadPause.MEMORY not in self._paused:
            return
        if self._decoder.blocked:
            try:
                frames = self._decoder.poll()  # the waiting frame may fit now; its bytes are here already
            except PeerFault as fault:
                self._fail(fault)
                return
            self._paused.discard(_ReadPause.MEMORY)  # re-decided below, from scratch
            self._on_frames(frames)
            if self._decoder.error is not None:
                self._fail(self._decoder.error)
                return
            if _ReadPause.MEMORY in self._paused or self.closed:
                return  # _on_frames paused again (and waits) or closed
            self._paused.add(_ReadPause.MEMORY)
        if self._buffered > self.budget.limit // 2 or self.budget.over:
            if self.budget.pool.over:
                self.budget.wait(self._resume_soon)
            return  # else the next read calls again as the streams drain
        self.last_rx = time.monotonic()  # we were not reading: the idle clock restarts
        self._resume(_ReadPause.MEMORY)

    def _idle_tick(self) -> None:
        """Frame-sized buffers kept for a stream go back once it paused for a
        tick (or at once while the node's pool has peers waiting for it)."""
        pressed = self.budget.pool.waiting > 0
        if pressed or self._decoder.large_frames == self._large_frames_seen:
            self._decoder.release_spare()
        if pressed or self._encoder.frames == self._frames_sent_seen:
            self._encoder.release_spare()
        self._large_frames_seen = self._decoder.large_frames
        self._frames_sent_seen = self._encoder.frames


class YamuxConnection(Libp2pConnection):
    """``/noise`` + ``/yamux/1.0.0``: the standard libp2p path."""

    security = "/noise"
    muxer = yamux.PROTOCOL_ID
    _stream_class = YamuxStream

    def __init__(self, host: Libp2pHost, wire: _WireLike, outbound: bool, conn_no: int, budget: PeerBudget,
                 peer_id: PeerId, remote: tuple[str, int], local: tuple[str, int], channel: NoiseChannel) -> None:
        super().__init__(host, wire, outbound, conn_no, budget, peer_id, remote, local)
        self._channel = channel
        self._session = yamux.YamuxSession(outbound, budget, self.limits.yamux())
        self._pings: dict[int, asyncio.Future[None]] = {}

    async def yamux_ping(self, timeout_s: float = 10.0) -> float:
        """Round trip of one yamux ping, in seconds."""
        if self.closed:
            raise ConnectionClosed(f"{self.name} is closed")
        opaque = self._session.ping()
        waiter = self._pings[opaque] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self._flush()
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        finally:
            self._pings.pop(opaque, None)
        return time.perf_counter() - start

    def _on_pong(self, opaque: int) -> None:
        waiter = self._pings.get(opaque)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- sending ----------------------------------------------------------------------

    def _flush(self) -> None:
        if self.closed or self._tr.is_closing():
            return
        session = self._session
        if session.starved:  # window updates that waited for budget: retry, else wait for the pool
            session.regrant_starved()
            if session.starved:
                self.budget.wait(self._budget_freed)
        data = session.data_to_send(control=self._tr.get_write_buffer_size() < CONTROL_WRITE_MARK)
        if data:
            self._write(self._channel.encrypt(data))

    def _budget_freed(self) -> None:
        """The pool got bytes back: retry on the next loop turn, not inside the release."""
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._flush)

    def _pay_pong(self) -> None:
        self._flush()  # an owed pong goes out once the socket has room

    def _send_ping(self, now: float) -> bool:
        self._session.ping()
        self._flush()
        return True

    def _goodbye(self) -> None:
        self._session.go_away()
        self._flush()

    def _flush_on_fail(self) -> None:
        if not self._tr.is_closing():
            data = self._session.data_to_send()  # the GoAway the session queued on a protocol error
            if data:
                self._write(self._channel.encrypt(data))

    def _abort_on_fault(self) -> None:
        self._tr.close()  # flushes the GoAway; the peer sees it, then EOF

    # --- streams ----------------------------------------------------------------------

    def _accepted(self, stream_id: int) -> None:
        if self._session.is_live(stream_id):
            self._session.accept(stream_id)

    def _close_write(self, stream_id: int) -> None:
        self._session.close_write(stream_id)
        self._flush()

    def _close_read(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._discard(stream)

    def _discard(self, stream: Stream) -> None:
        """yamux has no "close for reading": what arrives is read and dropped
        as it comes, so its window goes back to the peer and the budget."""
        while self._session.read(stream.id):
            pass
        self._flush()

    def _reset_stream(self, stream_id: int) -> None:
        self._session.reset(stream_id)
        self._streams.pop(stream_id, None)
        self._flush()

    def _close_muxer(self) -> None:
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(ConnectionClosed(f"{self.name} closed"))
                waiter.exception()
        self._session.close()

    # --- receiving --------------------------------------------------------------------

    def _on_plaintext(self, plaintext: memoryview) -> None:
        """One Noise transport message's plaintext: yamux frames."""
        self.last_rx = time.monotonic()
        session = self._session
        try:
            events = session.receive(plaintext)
        except PeerFault:
            self._on_events(session.unreported)  # refusals that came before the violation count too
            raise
        self._on_events(events)


Handler = Callable[[Stream], Awaitable[None]]
