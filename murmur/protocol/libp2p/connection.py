"""One libp2p connection over TCP, upgraded as the connections spec says.

The layers, bottom up, each a sans-IO piece driven from here::

    TCP ─ multistream-select (/noise) ─ Noise XX handshake (u16 frames)
        ─ Noise transport messages ─ multistream-select (/yamux/1.0.0)
        ─ yamux streams ─ multistream-select (a protocol id per stream) ─ handler

:class:`_Wire` is the :class:`asyncio.Protocol` that moves bytes through
those phases; :class:`Libp2pConnection` is what the host and the
application see (the proved peer id, streams, close); :class:`Stream` is
one yamux stream with ``read``/``write``/``close_write``/``reset``. The
dialler is the yamux client (odd stream ids) and multistream dialler for the
upgrade; either side opens streams.

Receive memory is the yamux windows, paid from the connection's
:class:`~murmur.protocol.budget.PeerBudget`, which the host draws from its
node-wide pool (the one the fast-path transport uses too, once integrated):
nothing a peer sends is buffered beyond the windows we granted. Sending
waits for the stream's window and for the socket's write buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from murmur.errors import MurmurError, NegotiationError, PeerFault, TimeoutFault
from murmur.protocol import multistream, yamux
from murmur.protocol.budget import PeerBudget
from murmur.protocol.identify import IdentifyInfo
from murmur.protocol.identity import PeerId
from murmur.protocol.noise import StandardNoiseHandshake
from murmur.protocol.noise_channel import NoiseChannel, NoiseHandshakeDriver, NoiseReader
from murmur.tasks import TaskManager

if TYPE_CHECKING:
    from murmur.protocol.libp2p.host import Libp2pHost

log = logging.getLogger(__name__)

NOISE = "/noise"
WRITE_HIGH_WATER = 1024 * 1024  # socket write buffer above which writers wait
CONTROL_WRITE_MARK = 64 * 1024  # pongs are written only below this (see yamux.data_to_send)
CLOSE_WAIT_S = 1.0
READ_CHUNK = 256 * 1024
RAW_READ_BYTES = 4096


class ConnectionClosed(MurmurError):
    """The connection is gone (closed by either side, or after a fault)."""


class StreamResetError(yamux.StreamError):
    """The stream was reset (by the peer, by us, or with its connection)."""


class _Phase(enum.Enum):
    SECURITY = "security"  # multistream-select for /noise, in the clear
    HANDSHAKE = "handshake"  # Noise XX
    MUXER = "muxer"  # multistream-select for /yamux/1.0.0, encrypted
    MUXED = "muxed"
    CLOSED = "closed"


class Stream:
    """One yamux stream of a :class:`Libp2pConnection`, with its negotiated ``protocol``."""

    def __init__(self, conn: Libp2pConnection, stream_id: int, outbound: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.outbound = outbound
        self.protocol: str | None = None
        self._pushback = b""  # bytes that came behind the multistream echo
        self._readable = asyncio.Event()
        self._window = asyncio.Event()
        self._reset = False
        self._closed_write = False

    @property
    def peer_id(self) -> PeerId:
        return self.conn.peer_id

    @property
    def is_reset(self) -> bool:
        return self._reset

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Up to ``max_bytes``; ``b""`` once the peer closed its side and all was read.
        Raises :class:`StreamResetError` if the stream was reset."""
        while True:
            if self._pushback:
                data, self._pushback = self._pushback[:max_bytes], self._pushback[max_bytes:]
                return data
            if self._reset:
                raise StreamResetError(f"stream {self.id} was reset")
            session = self.conn._session
            data = session.read(self.id, max_bytes) if session is not None else b""
            if data:
                self.conn._flush()  # a window update may be due
                return data
            if session is None or session.at_eof(self.id):
                return b""  # a stream cut with its connection was marked reset above
            self._readable.clear()
            await self._readable.wait()

    def _at_clean_eof(self) -> bool:
        session = self.conn._session
        return session is not None and session.is_live(self.id) and session.at_eof(self.id)

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await self.read(n - got)
            if not data:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    async def read_all(self, limit: int) -> bytes:
        """Everything until the peer's FIN; :class:`~murmur.errors.LimitExceeded`-free by
        construction: more than ``limit`` bytes resets the stream and raises ``ValueError``."""
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
        """Send all of ``data``, waiting for window and socket room as needed."""
        view = memoryview(data).cast("B")
        while True:
            if self._reset:
                raise StreamResetError(f"stream {self.id} was reset")
            if self._closed_write:
                raise yamux.StreamError(f"stream {self.id} is closed for writing")
            session = self.conn._session
            if session is None or self.conn.closed:
                raise StreamResetError(f"stream {self.id}: connection closed")
            await self.conn._writable.wait()
            if self._reset or self.conn.closed:
                continue
            self._window.clear()
            sent = session.send(self.id, view)
            if sent:
                self.conn._flush()
                view = view[sent:]
            if not view:
                return
            if not sent:
                await self._window.wait()

    async def close_write(self) -> None:
        """Half-close (FIN): the peer reads EOF; we may still read."""
        if self._closed_write or self._reset:
            return
        self._closed_write = True
        session = self.conn._session
        if session is not None and not self.conn.closed:
            session.close_write(self.id)
            self.conn._flush()

    async def close(self) -> None:
        await self.close_write()

    def reset(self) -> None:
        """Abort both directions (RST); pending and future reads and writes fail."""
        if self._reset:
            return
        self._on_reset()
        session = self.conn._session
        if session is not None and not self.conn.closed:
            session.reset(self.id)
            self.conn._flush()

    def _on_reset(self) -> None:
        self._reset = True
        self._readable.set()
        self._window.set()

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.protocol} {self.conn.peer_id.short() if self.conn.peer_id else '?'}>"


class Libp2pConnection:
    """An upgraded connection: ``peer_id`` proved by Noise, streams over yamux."""

    def __init__(self, host: Libp2pHost, outbound: bool, conn_no: int, budget: PeerBudget) -> None:
        self.host = host
        self.outbound = outbound
        self.name = f"p2p-conn-{conn_no}"
        self.budget = budget
        self.peer_id: PeerId = None  # type: ignore[assignment]  # set when the handshake proves it
        self.remote: tuple[str, int] = ("?", 0)
        self.local: tuple[str, int] = ("?", 0)
        self.identify: IdentifyInfo | None = None  # what the peer told us about itself
        self.identified = asyncio.Event()
        self.fault: PeerFault | None = None
        self.closed = False
        self._session: yamux.YamuxSession | None = None
        self._streams: dict[int, Stream] = {}
        self._wire: _Wire | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._pings: dict[int, asyncio.Future[None]] = {}
        self.tasks = TaskManager(self.name)
        self.last_rx = time.monotonic()

    # --- streams -------------------------------------------------------------------

    async def open_stream(self, protocols: Sequence[str] | str, timeout_s: float | None = None) -> Stream:
        """A new stream speaking the first of ``protocols`` the peer accepts.

        Raises :class:`~murmur.errors.NoCommonProtocol` (stream reset) when it
        accepts none, :class:`~murmur.errors.TimeoutFault` when negotiation
        does not finish in time, :class:`StreamError` when no stream can be opened."""
        if isinstance(protocols, str):
            protocols = [protocols]
        session = self._session
        if session is None or self.closed:
            raise ConnectionClosed(f"{self.name} is closed")
        stream_id = session.open_stream()
        stream = self._streams[stream_id] = Stream(self, stream_id, outbound=True)
        self._flush()
        dialer = multistream.Dialer(protocols)
        try:
            async with asyncio.timeout(timeout_s or self.host.config.negotiate_timeout_s):
                await stream.write(dialer.start())
                while not dialer.done:
                    data = await stream.read(multistream.MAX_MESSAGE)
                    if not data:
                        raise NegotiationError(f"stream {stream_id} closed during negotiation")
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

    async def _serve_stream(self, stream: Stream) -> None:
        """Inbound: negotiate the protocol with the host's handlers, then run the handler."""
        host = self.host
        listener = multistream.Listener(host.handles, host.config.max_negotiation_attempts, listing=host.protocols)
        try:
            async with asyncio.timeout(host.config.negotiate_timeout_s):
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
            host._report(self, fault)
            if fault.drop:
                self._fail(fault)
            return
        except yamux.StreamError:
            return
        stream.protocol = listener.selected
        stream._pushback = listener.leftover
        if self._session is not None and self._session.is_live(stream.id):
            self._session.accept(stream.id)
        handler = host.handler_for(stream.protocol)  # type: ignore[arg-type]
        if handler is None:  # unregistered since: nothing to run
            stream.reset()
            return
        try:
            await handler(stream)
        except (yamux.StreamError, ConnectionClosed, asyncio.IncompleteReadError):
            stream.reset()
        except PeerFault as fault:
            stream.reset()
            host._report(self, fault)
            if fault.drop:
                self._fail(fault)
        except Exception:
            log.exception("stream handler failed", extra={"event": "handler_failed", "protocol": stream.protocol,
                                                          "conn": self.name})
            stream.reset()

    # --- liveness ----------------------------------------------------------------

    async def yamux_ping(self, timeout_s: float = 10.0) -> float:
        """Round trip of one yamux ping, in seconds."""
        session = self._session
        if session is None or self.closed:
            raise ConnectionClosed(f"{self.name} is closed")
        opaque = session.ping()
        waiter = self._pings[opaque] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self._flush()
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        finally:
            self._pings.pop(opaque, None)
        return time.perf_counter() - start

    async def _keepalive(self) -> None:
        config = self.host.config
        if time.monotonic() - self.last_rx >= config.idle_timeout_s:
            self._fail(TimeoutFault(f"nothing received for {config.idle_timeout_s}s"))
            return
        if self._session is not None and not self.closed:
            self._session.ping()
            self._flush()

    # --- close ----------------------------------------------------------------------

    async def close(self) -> None:
        """GoAway, then close the socket once what we wrote is flushed."""
        if not self.closed and self._session is not None:
            self._session.go_away()
            self._flush()
        wire = self._wire
        self._shutdown(None)
        if wire is not None and wire.tr is not None:
            wire.tr.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wire.lost), CLOSE_WAIT_S)
            if not wire.lost.done():
                wire.tr.abort()
        await self.tasks.shutdown()

    def _fail(self, fault: PeerFault) -> None:
        if self.closed:
            return
        self.host._report(self, fault)
        if self._session is not None and self._wire is not None and self._wire.channel is not None:
            self._flush()  # the GoAway the session queued on a protocol error
        self._shutdown(fault)
        tr = self._wire.tr if self._wire is not None else None
        if tr is not None:
            tr.close()  # flushes the GoAway; the peer sees it, then EOF

    def _shutdown(self, fault: PeerFault | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.fault = fault
        for stream in self._streams.values():
            if not stream._at_clean_eof():
                stream._on_reset()
            stream._readable.set()
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(ConnectionClosed(f"{self.name} closed"))
                waiter.exception()
        if self._session is not None:
            self._session.close()
        self.budget.close()
        self._writable.set()
        self.identified.set()
        self.tasks.cancel("keepalive")
        self.host._forget(self)

    # --- called by the wire ------------------------------------------------------------

    def _start_muxed(self, session: yamux.YamuxSession) -> None:
        self._session = session
        interval = self.host.config.ping_interval_s
        self.tasks.periodic("keepalive", interval, self._keepalive, delay_s=interval)

    def _on_events(self, events: list[yamux.Event]) -> None:
        for event in events:
            if isinstance(event, yamux.DataReceived | yamux.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._readable.set()
            elif isinstance(event, yamux.WindowOpened):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._window.set()
            elif isinstance(event, yamux.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_reset()
            elif isinstance(event, yamux.StreamOpened):
                stream = self._streams[event.stream_id] = Stream(self, event.stream_id, outbound=False)
                if not self.closed:
                    self.tasks.spawn(f"stream-{event.stream_id}", lambda s=stream: self._run_stream(s))
            elif isinstance(event, yamux.PongReceived):
                waiter = self._pings.get(event.opaque)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, yamux.Refused):
                self.host._report(self, event.fault)
            elif isinstance(event, yamux.GoAwayReceived):
                log.debug("peer goes away", extra={"event": "go_away", "conn": self.name, "code": event.code})
        self._forget_finished()

    async def _run_stream(self, stream: Stream) -> None:
        try:
            await self._serve_stream(stream)
        finally:
            if self._session is None or not self._session.is_live(stream.id):
                self._streams.pop(stream.id, None)

    def _budget_freed(self) -> None:
        """The pool got bytes back: retry on the next loop turn, not inside the release."""
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._flush)

    def _forget_finished(self) -> None:
        session = self._session
        if session is None or len(self._streams) <= session.streams:
            return
        for sid in [sid for sid in self._streams if not session.is_live(sid)]:
            stream = self._streams[sid]
            if not stream._pushback and (stream._reset or stream._closed_write):
                del self._streams[sid]

    def _flush(self) -> None:
        wire = self._wire
        if self._session is None or wire is None or wire.channel is None or wire.tr is None or wire.tr.is_closing():
            return
        if self._session.starved:  # window updates that waited for budget: retry, else wait for the pool
            self._session.regrant_starved()
            if self._session.starved:
                self.budget.wait(self._budget_freed)
        data = self._session.data_to_send(control=wire.tr.get_write_buffer_size() < CONTROL_WRITE_MARK)
        if data:
            wire.write_encrypted(data)


class _Wire(asyncio.BufferedProtocol):
    """The TCP connection: upgrade phases, then yamux frames to the connection.

    Once the security protocol is agreed, the socket writes straight into the
    Noise reader's buffer (``get_buffer``) and each message is opened in place."""

    def __init__(self, host: Libp2pHost, outbound: bool, conn_no: int, expected: PeerId | None = None) -> None:
        self.host = host
        self.outbound = outbound
        self.expected = expected
        self.conn_no = conn_no
        self.tr: asyncio.Transport | None = None
        self.phase = _Phase.SECURITY
        self.ready: asyncio.Future[Libp2pConnection] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.conn: Libp2pConnection | None = None
        self.channel: NoiseChannel | None = None
        self._reader = NoiseReader()
        self._raw = bytearray(RAW_READ_BYTES)  # the clear-text security negotiation reads here
        self._mss: multistream.Dialer | multistream.Listener = (
            multistream.Dialer([NOISE]) if outbound else multistream.Listener({NOISE}, host.config.max_negotiation_attempts)
        )
        self._handshake: NoiseHandshakeDriver | None = None
        self._muxer_mss: multistream.Dialer | multistream.Listener | None = None

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if not peer or not self.host._admit(self):
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        budget = self.host.pool.budget(self.host.config.max_peer_buffered_bytes, self.host.config.peer_reserve_bytes)
        self.conn = Libp2pConnection(self.host, self.outbound, self.conn_no, budget)
        self.conn._wire = self
        self.conn.remote = (str(peer[0]), int(peer[1]))
        self.conn.local = (str(sock[0]), int(sock[1])) if sock else ("?", 0)
        self._guard(lambda: self._write_raw(self._mss.start()))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.phase is _Phase.SECURITY:
            return memoryview(self._raw)
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.conn is not None:
            self.conn.last_rx = time.monotonic()
        if self.phase is _Phase.SECURITY:
            data = bytes(self._raw[:nbytes])
            self._guard(lambda: self._on_security(data))
        elif self.phase is not _Phase.CLOSED:
            self._reader.buffer_updated(nbytes)
            self._guard(self._on_noise)

    def eof_received(self) -> bool:
        self._guard(self._on_eof)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionClosed(f"connection lost during the upgrade: {exc}"))
            self.ready.exception()
        if self.conn is not None:
            self.conn._shutdown(None)
        self.host._forget_wire(self)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._writable.clear()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._writable.set()
            self.conn._flush()  # an owed pong

    # --- phases ----------------------------------------------------------------------

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except PeerFault as fault:
            self.fail(fault)

    def fail(self, fault: PeerFault) -> None:
        if self.conn is not None and self.phase is _Phase.MUXED:
            self.conn._fail(fault)
            return
        self.phase = _Phase.CLOSED
        self.host._report(self.conn, fault, remote=self.conn.remote if self.conn else None)
        if not self.ready.done():
            self.ready.set_exception(fault)
            self.ready.exception()
        if self.tr is not None:
            self.tr.abort()

    def _on_eof(self) -> None:
        if self.phase is _Phase.MUXED and self.conn is not None:
            self.conn._shutdown(None)
        elif self.phase is not _Phase.CLOSED:
            self.fail(NegotiationError(f"peer closed the connection during the upgrade ({self.phase.value})"))

    def _on_security(self, data: bytes) -> None:
        self._write_raw(self._mss.feed(data))
        if not self._mss.done:
            return
        self.phase = _Phase.HANDSHAKE
        hs = StandardNoiseHandshake(self.host.identity, self.outbound, expected=self.expected)
        self._handshake = NoiseHandshakeDriver(hs, self._reader)
        self._write_raw(self._handshake.start())
        if self._mss.leftover:  # at most one raw read: fits the reader
            self._reader.feed(self._mss.leftover)
            self._on_noise()

    def _on_noise(self) -> None:
        if self.phase is _Phase.HANDSHAKE:
            assert self._handshake is not None
            self._write_raw(self._handshake.advance())
            if not self._handshake.complete:
                return
            self._on_secure()
        assert self.channel is not None
        for plaintext in self.channel.decrypt_ready():
            self._on_plaintext(plaintext)
            if self.phase is _Phase.CLOSED or (self.conn is not None and self.conn.closed):
                return
        if self.conn is not None:
            self.conn._flush()

    def _on_secure(self) -> None:
        assert self._handshake is not None and self.conn is not None
        self.channel = self._handshake.channel()
        self.conn.peer_id = self._handshake.handshake.remote_peer  # type: ignore[assignment]
        self.phase = _Phase.MUXER
        if self.outbound:
            self._muxer_mss = multistream.Dialer([yamux.PROTOCOL_ID])
        else:
            self._muxer_mss = multistream.Listener({yamux.PROTOCOL_ID}, self.host.config.max_negotiation_attempts)
        self.write_encrypted(self._muxer_mss.start())

    def _on_plaintext(self, plaintext: memoryview) -> None:
        if self.phase is _Phase.MUXED:
            assert self.conn is not None and self.conn._session is not None
            session = self.conn._session
            try:
                events = session.receive(plaintext)
            except PeerFault:
                self.conn._on_events(session.unreported)  # refusals that came before the violation count too
                raise
            self.conn._on_events(events)
            return
        if self.phase is not _Phase.MUXER:
            return
        assert self._muxer_mss is not None and self.conn is not None
        reply = self._muxer_mss.feed(plaintext)
        if reply:
            self.write_encrypted(reply)
        if not self._muxer_mss.done:
            return
        self.phase = _Phase.MUXED
        session = yamux.YamuxSession(self.outbound, self.conn.budget, self.host.config.yamux)
        self.conn._start_muxed(session)
        if not self.ready.done():
            self.ready.set_result(self.conn)
        leftover = self._muxer_mss.leftover
        if leftover:
            self.conn._on_events(session.receive(leftover))

    # --- writing ------------------------------------------------------------------

    def _write_raw(self, data: bytes) -> None:
        if data and self.tr is not None and not self.tr.is_closing():
            self.tr.write(data)

    def write_encrypted(self, data: bytes) -> None:
        assert self.channel is not None
        if self.tr is not None and not self.tr.is_closing():
            self.tr.write(self.channel.encrypt(data))


Handler = Callable[[Stream], Awaitable[None]]
