"""The TCP connection and its upgrade, as the libp2p connections spec has it.

::

    TCP ─ multistream-select: security ─ handshake ─ multistream-select: muxer ─ streams

Security, offered in this order by a murmur dialler and accepted by a murmur
listener (``TransportLimits.fast_path`` off leaves only the second):

* ``/murmur/noise-fast/2.0.0``: murmur's fast path, the XX handshake of
  :class:`~murmur.protocol.noise.Libp2pNoiseHandshake` (libp2p-noise's
  identity payload, the cipher negotiated inside it) and then the large AEAD
  records of :mod:`murmur.protocol.framing`; its muxer is
  ``/murmur/mux/2.0.0``, negotiated on stream 0 of those records;
* ``/noise``: :class:`~murmur.protocol.noise.StandardNoiseHandshake` and the
  libp2p-noise channel; its muxer is ``/yamux/1.0.0``.

On the fast path the dialler proposes its one muxer with handshake message 3
and takes it as agreed at once (multistream-select's lazy form, for a single
proposal): its first streams follow the proposal without waiting a round trip
for the echo, which it checks when it arrives (no other record may come
before it). A peer that speaks ``/murmur/noise-fast/2.0.0`` speaks
``/murmur/mux/2.0.0``; one that answers ``na`` is dropped.

No plaintext protocol is offered or accepted, ever: an unknown or plaintext
proposal gets ``na``, and after ``max_negotiation_attempts`` of them the
connection is closed (:class:`~murmur.errors.NegotiationError`). The whole
upgrade must finish within ``handshake_timeout_s``.

:class:`Wire` is the :class:`asyncio.BufferedProtocol`: the socket writes
straight into the reader of the current phase (a small buffer while
negotiating in the clear, then the handshake's, then the channel's), and once
the muxer is agreed it hands a :class:`~murmur.protocol.libp2p.connection.FastConnection`
or :class:`~murmur.protocol.libp2p.connection.YamuxConnection` to the host.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from murmur.errors import ConnectionClosed, HandshakeError, NegotiationError, PeerFault, TimeoutFault
from murmur.protocol import multistream, murmux, yamux
from murmur.protocol.admission import Slot
from murmur.protocol.budget import PeerBudget
from murmur.protocol.framing import (
    HANDSHAKE_LENGTH,
    HANDSHAKE_SCRATCH_BYTES,
    MAX_HANDSHAKE_MESSAGE,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    LengthPrefixedReader,
)
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.connection import FastConnection, Libp2pConnection, YamuxConnection
from murmur.protocol.noise import Libp2pNoiseHandshake, StandardNoiseHandshake
from murmur.protocol.noise_channel import NoiseChannel, NoiseHandshakeDriver, NoiseReader
from murmur.protocol.subnets import SubnetKey
from murmur.protocol.transport import send_high_water

if TYPE_CHECKING:
    from murmur.protocol.libp2p.host import Libp2pHost

FAST_SECURITY = FastConnection.security  # /murmur/noise-fast/2.0.0
NOISE = YamuxConnection.security  # /noise
RAW_READ_BYTES = 4096  # the clear-text security negotiation reads here


def security_protocols(fast_path: bool) -> list[str]:
    """What a dialler offers, most preferred first (and a listener accepts)."""
    return [FAST_SECURITY, NOISE] if fast_path else [NOISE]


class Phase(enum.Enum):
    SECURITY = "security"  # multistream-select for the security protocol, in the clear
    HANDSHAKE = "handshake"  # Noise XX (murmur's or the standard)
    MUXER = "muxer"  # multistream-select for the muxer, encrypted
    MUXED = "muxed"
    CLOSED = "closed"


class Wire(asyncio.BufferedProtocol):
    """One TCP connection through its upgrade, then the socket of its connection."""

    def __init__(self, host: Libp2pHost, outbound: bool, conn_no: int, expected: PeerId | None = None,
                 dialled: bool | None = None) -> None:
        self.host = host
        self.limits = host.config.limits
        # ``outbound``: our role in the upgrade (multistream dialer, Noise
        # initiator, odd stream ids); ``dialled``: whether we opened the TCP
        # connection. They differ only for a hole punch's simultaneous open,
        # where both sides dialled and DCUtR gives out the roles
        # (murmur/protocol/libp2p/dcutr.py).
        self.outbound = outbound
        self.dialled = outbound if dialled is None else dialled
        self.expected = expected
        self.conn_no = conn_no
        self.opened_at = time.monotonic()
        self.tr: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("?", 0)
        self.local: tuple[str, int] = ("?", 0)
        self.subnet: SubnetKey | None = None  # set for inbound connections holding a slot
        self.phase = Phase.SECURITY
        self.security: str | None = None
        self.peer_id: PeerId | None = None  # proved by the handshake
        self.relay: PeerId | None = None  # set when this runs over a relayed stream (host.upgrade_stream)
        self.conn: Libp2pConnection | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[Libp2pConnection] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._raw = bytearray(RAW_READ_BYTES)
        offered = security_protocols(self.limits.fast_path)
        self._mss: multistream.Dialer | multistream.Listener = (
            multistream.Dialer(offered) if outbound
            else multistream.Listener(offered, self.limits.max_negotiation_attempts)
        )
        self._budget: PeerBudget | None = None
        # fast path
        self._fast_hs: Libp2pNoiseHandshake | None = None
        self._hs_reader: LengthPrefixedReader | None = None
        self._encoder: FrameEncoder | None = None
        self._decoder: FrameDecoder | None = None
        # standard path
        self._reader = NoiseReader()
        self._noise_hs: NoiseHandshakeDriver | None = None
        self._channel: NoiseChannel | None = None
        self._muxer_mss: multistream.Dialer | multistream.Listener | None = None

    def slot(self) -> Slot:
        """This (inbound) connection as the admission policy sees it."""
        conn = self.conn
        return Slot(self.conn_no, self.subnet, self.opened_at, authenticated=self.peer_id is not None,
                    useful_at=conn.useful_at if conn is not None else None)

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        if not peer:
            # Reset before we got to it (accepted from the backlog after an
            # RST): nobody to talk to, nothing to blame, nothing to log.
            transport.abort()
            return
        sock = transport.get_extra_info("sockname")
        self.remote = (str(peer[0]), int(peer[1]))
        self.local = (str(sock[0]), int(sock[1])) if sock else ("?", 0)
        if not self.host._admit(self):
            transport.abort()
            return
        punch = None if self.dialled else self.host.punch_role(self.remote)
        if punch is not None:  # a hole punch's SYN our listener took: the punch's role (dcutr.py)
            self.expected, self.outbound = punch
            if self.outbound:
                self._mss = multistream.Dialer(security_protocols(self.limits.fast_path))
        transport.set_write_buffer_limits(high=send_high_water(self.limits))  # type: ignore[attr-defined]
        self._timer = asyncio.get_running_loop().call_later(self.limits.handshake_timeout_s, self._timed_out)
        self._guard(lambda: self._write(self._mss.start()))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.phase is Phase.SECURITY or self.phase is Phase.CLOSED:
            return memoryview(self._raw)
        if self._decoder is not None:
            return self._decoder.get_buffer(sizehint)
        if self._hs_reader is not None:
            return self._hs_reader.get_buffer(sizehint)
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        phase = self.phase
        if phase is Phase.SECURITY:
            data = bytes(self._raw[:nbytes])
            self._guard(lambda: self._on_security(data))
        elif phase is Phase.CLOSED:
            return
        elif (decoder := self._decoder) is not None:
            if not decoder.fill(nbytes):  # else the bytes only advanced a large record: nothing to decode yet
                self._guard(lambda: self._on_records(decoder.buffer_updated(nbytes)))
        elif self._hs_reader is not None:
            self._hs_reader.buffer_updated(nbytes)
            self._guard(self._advance_fast_handshake)
        else:
            self._reader.buffer_updated(nbytes)
            self._guard(self._on_noise)
        if self.conn is not None:
            self.conn._count_received(nbytes)

    def eof_received(self) -> bool:
        self._guard(self._on_eof)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionClosed(f"connection lost during the upgrade: {exc}"))
            self.ready.exception()
        if self.conn is not None:
            self.conn._on_lost()
        elif self._budget is not None:
            self._budget.close()
        if self._decoder is not None and self.conn is None:
            self._decoder.close()
        self.phase = Phase.CLOSED
        self.host._forget_wire(self)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_writable(False)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._set_writable(True)

    # --- failure -------------------------------------------------------------------

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except PeerFault as fault:
            self.fail(fault)

    def fail(self, fault: PeerFault) -> None:
        """Record ``fault`` and drop the connection (no goodbye to a misbehaving peer)."""
        if self.conn is not None:
            self.conn._fail(fault)
            return
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self.host._upgrade_failed(self, fault)
        if not self.ready.done():
            self.ready.set_exception(fault)
            self.ready.exception()
        if self.tr is not None:
            self.tr.abort()

    def evict(self) -> None:
        """Give the slot up for somebody else: not a fault, nobody is blamed."""
        if self.conn is not None:
            self.conn._drop()
            return
        self.phase = Phase.CLOSED
        self._cancel_timer()
        if not self.ready.done():
            self.ready.set_exception(ConnectionClosed("evicted during the upgrade"))
            self.ready.exception()
        if self.tr is not None:
            self.tr.abort()

    def _timed_out(self) -> None:
        self._timer = None
        if self.conn is None:
            self.fail(TimeoutFault(f"upgrade not finished within {self.limits.handshake_timeout_s}s "
                                   f"({self.phase.value})"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_eof(self) -> None:
        if self.conn is not None:
            if self._decoder is not None:
                self._decoder.at_eof()  # a record cut short is a FrameError
            self.conn._on_eof()
        elif self.phase is Phase.HANDSHAKE:
            if self._hs_reader is not None:
                self._hs_reader.at_eof()  # a handshake message cut short is a FrameError
            raise HandshakeError("peer closed the connection during the handshake")
        elif self.phase is not Phase.CLOSED:
            raise NegotiationError(f"peer closed the connection during the {self.phase.value} negotiation")

    # --- writing -------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        if data and self.tr is not None and not self.tr.is_closing():
            self.tr.write(data)

    # --- security negotiation ----------------------------------------------------------

    def _on_security(self, data: bytes) -> None:
        self._write(self._mss.feed(data))
        if not self._mss.done:
            return
        self.security = self._mss.selected
        leftover = self._mss.leftover
        self.phase = Phase.HANDSHAKE
        if self.security == FAST_SECURITY:
            self._fast_hs = Libp2pNoiseHandshake(self.host.identity, initiator=self.outbound, expected=self.expected,
                                                 ciphers=self.limits.ciphers)
            self._hs_reader = LengthPrefixedReader(HANDSHAKE_LENGTH, MAX_HANDSHAKE_MESSAGE, 1, HANDSHAKE_SCRATCH_BYTES)
            self._write_handshake(self._fast_hs.start())
            if leftover:
                _feed(self._hs_reader.get_buffer, self._hs_reader.buffer_updated, leftover)
                self._advance_fast_handshake()
        else:
            hs = StandardNoiseHandshake(self.host.identity, self.outbound, expected=self.expected)
            self._noise_hs = NoiseHandshakeDriver(hs, self._reader)
            self._write(self._noise_hs.start())
            if leftover:
                self._reader.feed(leftover)
                self._on_noise()

    # --- the fast path: murmur's handshake, records, /murmur/mux/2.0.0 ---------------------

    def _write_handshake(self, message: bytes | None) -> None:
        if message is not None:
            self._write(HANDSHAKE_LENGTH.pack(len(message)) + message)

    def _advance_fast_handshake(self) -> None:
        hs, reader = self._fast_hs, self._hs_reader
        assert hs is not None and reader is not None
        while not hs.complete:
            body = reader.next_body()
            if body is None:
                return
            self._write_handshake(hs.receive(bytes(body)))
        self.peer_id = hs.remote_peer
        send, receive = hs.split()
        host = self.host
        self._budget = host.pool.budget(self.limits.max_peer_buffered_bytes, self.limits.peer_reserve_bytes)
        self._encoder = FrameEncoder(send, self.limits.max_frame, host.plaintext_scratch)
        self._decoder = FrameDecoder(receive, self.limits.max_frame, budget=self._budget)
        self._hs_reader = None
        self.phase = Phase.MUXER
        if self.outbound:
            self._muxer_mss = multistream.Dialer([murmux.PROTOCOL_ID])
        else:
            self._muxer_mss = multistream.Listener({murmux.PROTOCOL_ID}, self.limits.max_negotiation_attempts)
        self._write_record(self._muxer_mss.start())  # the dialler's rides with handshake message 3
        if self.outbound:
            self._muxed()  # lazily: the echo is checked when it comes (see the module docstring)
        # Records that came with the handshake's last message are the peer's
        # first authenticated bytes: they count (and are judged) like any other.
        tail = reader.take_pending()
        if tail:
            self._on_records(self._decoder.feed(tail))

    def _write_record(self, data: bytes) -> None:
        """Bytes of the secure channel before the muxer: DATA records on stream 0."""
        if data:
            assert self._encoder is not None
            self._write(self._encoder.encode(FrameType.DATA, 0, data))

    def _on_records(self, frames: list[Frame]) -> None:
        """Records from one read: the muxer negotiation's, then the connection's
        (good records before a bad one still count)."""
        decoder = self._decoder
        assert decoder is not None
        if self.conn is not None:
            assert isinstance(self.conn, FastConnection)
            mss = self._muxer_mss
            if mss is not None and not mss.done:  # the dialler's lazy agreement: the echo comes first
                taken = 0
                for frame in frames:
                    if mss.done:
                        break
                    if frame.type is not FrameType.DATA or frame.stream != 0 or frame.tail is not None:
                        raise NegotiationError(f"{frame.type.name} record on stream {frame.stream} before the "
                                               "muxer's echo")
                    mss.feed(frame.payload)  # NoCommonProtocol if the peer refuses it
                    taken += 1
                if mss.done and mss.leftover:
                    raise NegotiationError("bytes behind the muxer agreement in the same record")
                frames = frames[taken:]
            self.conn._on_frames(frames)
        else:
            for i, frame in enumerate(frames):
                if frame.type is not FrameType.DATA or frame.stream != 0 or frame.tail is not None:
                    raise NegotiationError(f"{frame.type.name} record on stream {frame.stream} before the muxer")
                self._on_muxer_negotiation(frame.payload)
                if self.conn is not None:
                    assert isinstance(self.conn, FastConnection)
                    self.conn._on_frames(frames[i + 1 :])
                    break
        if decoder.error is not None:
            raise decoder.error

    def _on_muxer_negotiation(self, data: bytes | memoryview) -> None:
        mss = self._muxer_mss
        assert mss is not None and self._encoder is not None
        reply = mss.feed(data)
        if self.security == FAST_SECURITY:
            self._write_record(reply)
        elif reply:
            assert self._channel is not None
            self._write(self._channel.encrypt(reply))
        if not mss.done:
            return
        if self.security == FAST_SECURITY and mss.leftover:
            raise NegotiationError("bytes behind the muxer agreement in the same record")
        self._muxed()

    # --- the standard path: /noise, /yamux/1.0.0 -------------------------------------------

    def _on_noise(self) -> None:
        driver = self._noise_hs
        assert driver is not None
        if self.phase is Phase.HANDSHAKE:
            self._write(driver.advance())
            if not driver.complete:
                return
            self._on_noise_secure()
        channel = self._channel
        assert channel is not None
        for plaintext in channel.decrypt_ready():
            if self.conn is not None:
                assert isinstance(self.conn, YamuxConnection)
                self.conn._on_plaintext(plaintext)
            else:
                self._on_noise_negotiation(plaintext)
            if self.phase is Phase.CLOSED or (self.conn is not None and self.conn.closed):
                return
        if self.conn is not None:
            assert isinstance(self.conn, YamuxConnection)
            self.conn._flush()

    def _on_noise_secure(self) -> None:
        driver = self._noise_hs
        assert driver is not None
        self.peer_id = driver.handshake.remote_peer
        self._channel = driver.channel()
        self._budget = self.host.pool.budget(self.limits.max_peer_buffered_bytes, self.limits.peer_reserve_bytes)
        self.phase = Phase.MUXER
        if self.outbound:
            self._muxer_mss = multistream.Dialer([yamux.PROTOCOL_ID])
        else:
            self._muxer_mss = multistream.Listener({yamux.PROTOCOL_ID}, self.limits.max_negotiation_attempts)
        self._write(self._channel.encrypt(self._muxer_mss.start()))

    def _on_noise_negotiation(self, plaintext: memoryview) -> None:
        mss = self._muxer_mss
        assert mss is not None and self._channel is not None
        reply = mss.feed(plaintext)
        if reply:
            self._write(self._channel.encrypt(reply))
        if not mss.done:
            return
        self._muxed()
        leftover = mss.leftover
        if leftover and self.conn is not None:
            assert isinstance(self.conn, YamuxConnection)
            self.conn._on_plaintext(memoryview(leftover))

    # --- done ----------------------------------------------------------------------------

    def _muxed(self) -> None:
        """The muxer is agreed: the connection exists from here."""
        assert self.peer_id is not None and self._budget is not None and self.tr is not None
        self._cancel_timer()
        self.phase = Phase.MUXED
        if self.security == FAST_SECURITY:
            assert self._encoder is not None and self._decoder is not None and self._fast_hs is not None
            conn: Libp2pConnection = FastConnection(
                self.host, self, self.outbound, self.conn_no, self._budget, self.peer_id, self.remote, self.local,
                self._encoder, self._decoder, self._fast_hs.cipher)
        else:
            assert self._channel is not None
            conn = YamuxConnection(self.host, self, self.outbound, self.conn_no, self._budget, self.peer_id,
                                   self.remote, self.local, self._channel)
        conn.relay = self.relay
        self.conn = conn
        self.host._connection_up(self, conn)  # before any of its streams is served
        if not self.ready.done():
            self.ready.set_result(conn)


def _feed(get_buffer: Callable[[int], memoryview], buffer_updated: Callable[[int], None], data: bytes) -> None:
    """Push bytes that did not come from the socket through a BufferedProtocol-shaped reader."""
    view = memoryview(data)
    while view:
        buf = get_buffer(len(view))
        n = min(len(buf), len(view))
        if n == 0:
            raise NegotiationError("handshake read buffer full")
        buf[:n] = view[:n]
        view = view[n:]
        buffer_updated(n)
