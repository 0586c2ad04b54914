"""``/yamux/1.0.0`` (hashicorp's spec, as libp2p adopted it), sans-IO.

Many streams over one secure channel. Every frame has a 12-byte header::

    version u8 (0) | type u8 | flags u16 | stream id u32 | length u32     (big endian)

``type`` is DATA (``length`` payload bytes follow), WINDOW_UPDATE (``length``
more bytes the sender may send on that stream), PING (``length`` is an
opaque value, echoed with ACK) or GO_AWAY (``length`` is the reason code);
``flags`` are SYN (open), ACK (accept), FIN (half-close) and RST (reset).
The client (dialler) opens odd stream ids, the server even ones; 0 is the
session. Every stream starts with a 256 KiB window each way.

:class:`YamuxSession` takes the bytes that arrive (:meth:`~YamuxSession.receive`,
returning :class:`Event` objects) and the application's calls (open, send,
read, close, reset, ping, go away), and queues what must go on the wire
(:meth:`~YamuxSession.data_to_send`). It never blocks and never does I/O.

What a peer can make it hold is bounded, and every violation is typed:

* **receive memory** is the stream windows, drawn from the peer's
  :class:`~murmur.protocol.budget.PeerBudget` (shared with everything else
  the node holds for that peer): a stream's window is acquired
  (``try_acquire``) before it is granted, at open (256 KiB) and by every
  window update (growing while the stream is read promptly, see
  ``_regrant``), and released as the application reads. Data beyond the window is a
  :class:`~murmur.errors.MuxerError`: nothing beyond it is ever buffered;
* **streams**: at most ``max_streams`` live and ``max_ack_backlog`` opened by
  the peer but not yet taken by the application; a stream past either, or
  one whose window the budget cannot pay, is reset
  (:class:`~murmur.errors.StreamRefused`, no drop), and after
  ``max_refused_streams`` refusals in a row the session gives up on the
  peer (:class:`~murmur.errors.MuxerError`: a stream flood);
* **stream opens**: at most ``max_open_burst`` at once and one more every
  ``open_refill_s`` (:class:`~murmur.protocol.budget.StreamOpens`); an open
  beyond is refused the same way, and a peer that keeps opening past the
  refusals it is forgiven is a :class:`~murmur.errors.MuxerError` (drop),
  even when every one of its streams is reset at once;
* **control frames**: a ping owes one pong, and only the latest is owed
  (``data_to_send(control=False)`` holds it back while the socket is full),
  so pings that are never read cannot queue answers;
* **protocol errors** (bad version, type or flags; a window update past
  2^32 - 1; a frame for a stream never opened; a SYN for a live or
  wrong-parity id; data after FIN): the session queues GO_AWAY(protocol
  error) and raises a :class:`~murmur.errors.MuxerError` (drop). Frames for
  streams that *were* open (reset or closed while the peer's frames were in
  flight) are legitimate: window updates are ignored and data is discarded
  within the window the stream had when we reset it.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from murmur.errors import ConnectionClosed, MuxerError, PeerFault, StreamRefused
from murmur.protocol.budget import PeerBudget, StreamOpens

PROTOCOL_ID = "/yamux/1.0.0"
HEADER = struct.Struct(">BBHII")
HEADER_LEN = HEADER.size  # 12
VERSION = 0
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 2**32 - 1
MAX_STREAM_ID = 2**32 - 1
GRAVEYARD_SIZE = 4096  # recently reset streams whose in-flight data we still accept (and discard)
SMALL_PIECE = 4096
"""Pieces shorter than this are appended to the stream's last small piece
(up to :data:`MAX_MERGED`) rather than kept one object each: a window filled
with 1-byte DATA frames held 42 times the bytes the budget was charged."""
MAX_MERGED = 64 * 1024
OPEN_BURST = 128
"""Streams a peer may open at once on one connection (both muxers)."""
OPEN_REFILL_S = 1 / 64
"""And one more every this many seconds (64 a second): honest peers open a
few per connection, a flooder opened 30,000 a second (see StreamOpens)."""


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


_ALL_FLAGS = int(Flag.SYN | Flag.ACK | Flag.FIN | Flag.RST)


class GoAwayCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class StreamError(ConnectionClosed):
    """A local call on a stream that cannot proceed: it was reset, closed for
    writing, never existed, or the session is going away. Not a peer fault:
    for the caller, the stream is closed (what it sent may not have arrived)."""


@dataclass(frozen=True)
class YamuxLimits:
    """Every yamux bound, named once."""

    max_streams: int = 512  # live streams on one connection, both directions
    max_ack_backlog: int = 256  # streams the peer opened that the application has not taken yet (spec: 256)
    max_stream_window: int = 4 * 1024 * 1024  # a stream's receive window grows up to this while read promptly
    max_refused_streams: int = 256  # refusals in a row (no stream accepted between) before the peer is dropped
    max_frame_payload: int = 256 * 1024  # bytes of one DATA frame we send
    max_open_burst: int = OPEN_BURST  # streams the peer may open at once,
    open_refill_s: float = OPEN_REFILL_S  # and one more every this many seconds

    def __post_init__(self) -> None:
        if self.max_stream_window < INITIAL_WINDOW or self.max_stream_window > MAX_WINDOW:
            raise ValueError(f"max_stream_window must be in [{INITIAL_WINDOW}, {MAX_WINDOW}]")
        if min(self.max_streams, self.max_ack_backlog, self.max_refused_streams, self.max_frame_payload,
               self.max_open_burst, self.open_refill_s) <= 0:
            raise ValueError("yamux limits must be positive")

    def stream_opens(self, client: bool, clock: Callable[[], float] = time.monotonic) -> StreamOpens:
        """The rules on the peer's stream opens, one per session (``client``: we dialled)."""
        return StreamOpens(client, self.max_open_burst, self.open_refill_s, self.max_refused_streams,
                           self.max_streams, clock)


# --- events --------------------------------------------------------------------


class Event:
    """Something the application should know after :meth:`YamuxSession.receive`."""


@dataclass(frozen=True)
class StreamOpened(Event):
    """The peer opened ``stream_id`` and we accepted it: take it with :meth:`YamuxSession.accept`."""

    stream_id: int


@dataclass(frozen=True)
class StreamAcked(Event):
    """The peer accepted a stream we opened."""

    stream_id: int


@dataclass(frozen=True)
class DataReceived(Event):
    """Bytes wait in the stream's buffer (:meth:`YamuxSession.read`)."""

    stream_id: int
    nbytes: int


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer will send nothing more on the stream (FIN); buffered bytes remain readable."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    """The peer reset the stream; whatever was buffered is gone."""

    stream_id: int


@dataclass(frozen=True)
class WindowOpened(Event):
    """The stream's send window grew: a blocked writer may go on."""

    stream_id: int


@dataclass(frozen=True)
class PongReceived(Event):
    opaque: int


@dataclass(frozen=True)
class GoAwayReceived(Event):
    code: int


@dataclass(frozen=True)
class Refused(Event):
    """We refused a stream the peer opened; ``fault`` is for its score (no drop)."""

    stream_id: int
    fault: PeerFault


# --- streams -----------------------------------------------------------------------


@dataclass
class _Stream:
    id: int
    recv_window: int  # bytes the peer may still send us
    send_window: int = INITIAL_WINDOW  # bytes we may still send
    buffer: deque[bytes | bytearray | memoryview] = field(default_factory=deque)  # a partly read piece: a view of its rest
    buffered: int = 0
    consumed: int = 0  # bytes read by the application and released, not yet granted back
    target_window: int = INITIAL_WINDOW  # recv_window + buffered + consumed we aim to keep granted
    local_fin: bool = False
    remote_fin: bool = False
    acked: bool = False  # outbound: the peer accepted; inbound: the application took it
    taken: bool = False  # inbound: accept() called


class YamuxSession:
    """One yamux session; ``client`` is the side that dialled the connection."""

    def __init__(self, client: bool, budget: PeerBudget, limits: YamuxLimits = YamuxLimits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.budget = budget
        self.limits = limits
        self._opens = limits.stream_opens(client, clock)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._graveyard: OrderedDict[int, int] = OrderedDict()  # reset stream -> data it may still carry
        self._backlog = 0  # inbound streams not yet taken
        self._out = bytearray()
        self._owed_pong: int | None = None
        self._pings: set[int] = set()
        self._next_ping = 1
        self._starved: set[int] = set()  # streams whose window update waits for budget
        self._header = bytearray()  # a partly received header
        self._body_left = 0  # DATA payload bytes of the current frame still to come
        self._body_stream: _Stream | None = None  # where they go (None: discarded)
        self._body_flags = 0
        self._body_id = 0
        self.local_goaway = False
        self.remote_goaway: int | None = None
        self.failed: PeerFault | None = None
        self.unreported: list[Event] = []  # events of the receive() call that raised ``failed``

    # --- queries ------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def is_live(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def buffered(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.buffered if stream is not None else 0

    def at_eof(self, stream_id: int) -> bool:
        """Nothing more will ever be readable: the peer sent FIN and all was read, or the stream is gone."""
        stream = self._streams.get(stream_id)
        return stream is None or (stream.remote_fin and not stream.buffered)

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def held(self) -> int:
        """Budget bytes the session holds: every live stream's granted window and buffer."""
        inflight = self._body_left if self._body_stream is not None and self._body_stream.id in self._streams else 0
        return sum(s.recv_window + s.buffered for s in self._streams.values()) + inflight

    # --- output -------------------------------------------------------------------

    def data_to_send(self, control: bool = True) -> bytearray:
        """Everything queued for the wire (the queue itself, handed over, not
        a copy); with ``control=False`` an owed pong waits (the caller's
        socket buffer is full: a peer that pings and does not read gets one
        pong, later, not one per ping)."""
        if control and self._owed_pong is not None:
            self._frame(FrameType.PING, Flag.ACK, 0, self._owed_pong)
            self._owed_pong = None
        out, self._out = self._out, bytearray()
        return out

    def _frame(self, ftype: FrameType, flags: int, stream_id: int, length: int, payload: bytes | memoryview = b"") -> None:
        self._out += HEADER.pack(VERSION, ftype, flags, stream_id, length)
        if payload:
            self._out += payload

    # --- application calls ---------------------------------------------------------

    def open_stream(self) -> int:
        """A new outbound stream (SYN queued). Raises :class:`StreamError` when
        the session is going away, the stream limit is reached, the ids are
        spent or the budget cannot pay the initial window."""
        if self.failed is not None or self.local_goaway or self.remote_goaway is not None:
            raise StreamError("session is going away")
        if len(self._streams) >= self.limits.max_streams:
            raise StreamError(f"stream limit {self.limits.max_streams} reached")
        if self._next_id > MAX_STREAM_ID:
            raise StreamError("stream ids exhausted")
        window = self._acquire_window()
        if window is None:
            raise StreamError("receive budget exhausted")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(stream_id, recv_window=window)
        self._frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0)
        return stream_id

    def accept(self, stream_id: int) -> None:
        """The application takes an inbound stream (frees its backlog slot)."""
        stream = self._live(stream_id)
        if not stream.taken and stream.id % 2 != self._next_id % 2:
            stream.taken = True
            self._backlog -= 1

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the send window allows; returns how much.
        0 means wait for :class:`WindowOpened`."""
        stream = self._live(stream_id)
        if stream.local_fin:
            raise StreamError(f"stream {stream_id} is closed for writing")
        view = memoryview(data).cast("B")
        total = min(view.nbytes, stream.send_window)
        pos = 0
        while pos < total:
            n = min(total - pos, self.limits.max_frame_payload)
            self._frame(FrameType.DATA, 0, stream_id, n, view[pos : pos + n])
            pos += n
        stream.send_window -= total
        return total

    def read(self, stream_id: int, max_bytes: int = -1) -> bytes | memoryview:
        """Up to ``max_bytes`` (all if negative) of what the stream holds; b""
        when nothing is buffered. Releases what is read to the budget and grants
        it back to the peer as window (when the budget allows)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.buffered:
            return b""
        parts: list[bytes | memoryview] = []
        want = stream.buffered if max_bytes < 0 else min(max_bytes, stream.buffered)
        got = 0
        while got < want:
            chunk = stream.buffer[0]
            take = min(len(chunk), want - got)
            if take == len(chunk):
                stream.buffer.popleft()
                if type(chunk) is bytearray:
                    chunk = bytes(chunk)
            else:  # views: a message's length read byte by byte copies nothing
                piece = memoryview(chunk)
                stream.buffer[0], chunk = piece[take:], piece[:take]
            parts.append(chunk)
            got += take
        stream.buffered -= got
        stream.consumed += got
        self.budget.release(got)
        self._regrant(stream)
        if self._starved:  # what was just released may pay another stream's update
            self.regrant_starved()
        self._maybe_forget(stream)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close_write(self, stream_id: int) -> None:
        """Half-close: FIN queued, reading goes on until the peer's FIN."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            return
        stream.local_fin = True
        self._frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0)
        self._maybe_forget(stream)

    def reset(self, stream_id: int) -> None:
        """Abort the stream both ways: RST queued, buffer dropped, window released."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)
        self._bury(stream, stream.recv_window)

    def ping(self) -> int:
        """Queue a ping; :class:`PongReceived` with the returned opaque value answers it."""
        opaque = self._next_ping
        self._next_ping = self._next_ping % MAX_WINDOW + 1
        if len(self._pings) >= 16:  # unanswered pings are forgotten, oldest value first
            self._pings.discard(min(self._pings))
        self._pings.add(opaque)
        self._frame(FrameType.PING, Flag.SYN, 0, opaque)
        return opaque

    def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """No new streams either way from now on; queued once."""
        if not self.local_goaway:
            self.local_goaway = True
            self._frame(FrameType.GO_AWAY, 0, 0, code)

    def regrant_starved(self) -> None:
        """Retry the window updates that waited for budget (call when it has room)."""
        for stream_id in list(self._starved):
            stream = self._streams.get(stream_id)
            self._starved.discard(stream_id)
            if stream is not None:
                self._regrant(stream)

    @property
    def starved(self) -> bool:
        return bool(self._starved)

    def close(self) -> None:
        """The connection is gone: give every window back to the budget."""
        for stream in list(self._streams.values()):
            self._forget(stream)

    # --- receiving -------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process bytes from the peer. Raises a dropping :class:`PeerFault`
        (after queueing GO_AWAY) on a protocol violation; the session is dead then."""
        if self.failed is not None:
            raise self.failed
        events: list[Event] = []
        view = memoryview(data).cast("B")
        pos, end = 0, view.nbytes
        try:
            while pos < end:
                if self._body_left:
                    n = min(self._body_left, end - pos)
                    self._body(view[pos : pos + n], events)
                    pos += n
                    continue
                need = HEADER_LEN - len(self._header)
                self._header += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._header) < HEADER_LEN:
                    break
                header = HEADER.unpack(self._header)
                self._header.clear()
                self._on_header(*header, events=events)
        except PeerFault as fault:
            self.failed = fault
            self.unreported = events  # what the same bytes caused before the violation (e.g. refusals)
            if fault.drop:
                self.go_away(GoAwayCode.PROTOCOL_ERROR)
            raise
        return events

    def _on_header(self, version: int, ftype: int, flags: int, stream_id: int, length: int,
                   events: list[Event]) -> None:
        if version != VERSION:
            raise MuxerError(f"yamux version {version}")
        if flags & ~_ALL_FLAGS:
            raise MuxerError(f"unknown yamux flags {flags:#x}")
        if ftype == FrameType.PING:
            self._on_ping(flags, stream_id, length, events)
        elif ftype == FrameType.GO_AWAY:
            if stream_id != 0:
                raise MuxerError("GO_AWAY on a stream")
            self.remote_goaway = length
            events.append(GoAwayReceived(length))
        elif ftype in (FrameType.DATA, FrameType.WINDOW_UPDATE):
            if stream_id == 0:
                raise MuxerError("DATA or WINDOW_UPDATE on stream 0")
            self._on_stream_frame(FrameType(ftype), flags, stream_id, length, events)
        else:
            raise MuxerError(f"unknown yamux frame type {ftype}")

    def _on_ping(self, flags: int, stream_id: int, opaque: int, events: list[Event]) -> None:
        if stream_id != 0:
            raise MuxerError("PING on a stream")
        if flags & Flag.SYN:
            self._owed_pong = opaque  # only the latest is owed
        elif flags & Flag.ACK:
            if opaque in self._pings:
                self._pings.discard(opaque)
                events.append(PongReceived(opaque))
        else:
            raise MuxerError("PING without SYN or ACK")

    def _on_stream_frame(self, ftype: FrameType, flags: int, stream_id: int, length: int,
                         events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if flags & Flag.SYN:
            if stream is not None or stream_id in self._graveyard:
                raise MuxerError(f"SYN for stream {stream_id}, which is already open")
            stream = self._on_syn(stream_id, events)
            if stream is None:  # refused: its frame's data is discarded within the initial window
                return self._stale_frame(ftype, flags, stream_id, length)
        elif stream is None:
            return self._stale_frame(ftype, flags, stream_id, length)
        if flags & Flag.ACK and not stream.acked and stream.id % 2 == self._next_id % 2:
            stream.acked = True
            events.append(StreamAcked(stream_id))
        if ftype is FrameType.WINDOW_UPDATE:
            if length:
                if stream.send_window + length > MAX_WINDOW:
                    raise MuxerError(f"window update overflows stream {stream_id}'s window")
                stream.send_window += length
                events.append(WindowOpened(stream_id))
            self._end_flags(stream, flags, events)
            return
        # DATA
        if stream.remote_fin and length:
            raise MuxerError(f"data on stream {stream_id} after its FIN")
        if length > stream.recv_window:
            raise MuxerError(f"{length} bytes of data beyond stream {stream_id}'s window of {stream.recv_window}")
        stream.recv_window -= length
        self._body_left, self._body_stream, self._body_flags, self._body_id = length, stream, flags, stream_id
        if not length:
            self._end_body(events)

    def _on_syn(self, stream_id: int, events: list[Event]) -> _Stream | None:
        reason = self._opens.open(stream_id, len(self._streams), self.local_goaway)
        if reason is None and self._backlog >= self.limits.max_ack_backlog:
            reason = f"accept backlog {self.limits.max_ack_backlog} full"
        window = self._acquire_window() if reason is None else None
        if reason is None and window is None:
            reason = "receive budget exhausted"
        if window is None:
            self._opens.refused()
            self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)
            self._graveyard_add(stream_id, INITIAL_WINDOW)
            events.append(Refused(stream_id, StreamRefused(f"stream {stream_id} refused: {reason}")))
            return None
        self._opens.accepted()
        stream = self._streams[stream_id] = _Stream(stream_id, recv_window=window)
        self._backlog += 1
        # Accepted at once: the backlog bound, not a delayed ACK, is what holds an opener back.
        self._frame(FrameType.WINDOW_UPDATE, Flag.ACK, stream_id, 0)
        events.append(StreamOpened(stream_id))
        return stream

    def _stale_frame(self, ftype: FrameType, flags: int, stream_id: int, length: int) -> None:
        """A frame for a stream that is not live: legitimate if it was live."""
        if self._opens.never_opened(stream_id, self._next_id):
            raise MuxerError(f"frame for stream {stream_id}, which was never opened")
        if ftype is FrameType.DATA and length:
            credit = self._graveyard.get(stream_id)
            if credit is None or length > credit:
                raise MuxerError(f"{length} bytes of data for closed stream {stream_id}")
            self._graveyard[stream_id] = credit - length
            self._body_left, self._body_stream, self._body_flags, self._body_id = length, None, flags, stream_id
        if flags & (Flag.FIN | Flag.RST) and not (ftype is FrameType.DATA and length):
            self._graveyard.pop(stream_id, None)

    def _body(self, chunk: memoryview, events: list[Event]) -> None:
        self._body_left -= len(chunk)
        stream = self._body_stream
        if stream is not None and stream.id in self._streams:
            buffer = stream.buffer
            if len(chunk) >= SMALL_PIECE:
                buffer.append(bytes(chunk))
            elif buffer and type(buffer[-1]) is bytearray and len(buffer[-1]) + len(chunk) <= MAX_MERGED:
                buffer[-1] += chunk  # never a piece read() holds a view of: it swaps that for the view
            else:
                buffer.append(bytearray(chunk))
            stream.buffered += len(chunk)
            events.append(DataReceived(stream.id, len(chunk)))
        if not self._body_left:
            self._end_body(events)

    def _end_body(self, events: list[Event]) -> None:
        stream, flags = self._body_stream, self._body_flags
        self._body_stream = None
        if stream is not None and stream.id in self._streams:
            self._end_flags(stream, flags, events)
        elif flags & (Flag.FIN | Flag.RST):
            self._graveyard.pop(self._body_id, None)

    def _end_flags(self, stream: _Stream, flags: int, events: list[Event]) -> None:
        if flags & Flag.RST:
            events.append(StreamReset(stream.id))
            self._forget(stream)
            return
        if flags & Flag.FIN and not stream.remote_fin:
            stream.remote_fin = True
            # The peer sends nothing more: the window it did not use goes back now,
            # not when the stream ends (a half-closed request may wait long for its answer).
            self.budget.release(stream.recv_window)
            stream.recv_window = stream.consumed = 0
            self._starved.discard(stream.id)
            events.append(StreamEnded(stream.id))
            self._maybe_forget(stream)

    # --- windows and the budget ---------------------------------------------------------

    def _acquire_window(self) -> int | None:
        """A new stream's receive window, the protocol's initial 256 KiB, if the budget pays it."""
        return INITIAL_WINDOW if self.budget.try_acquire(INITIAL_WINDOW) else None

    def _regrant(self, stream: _Stream) -> None:
        """Grant read bytes back as window once half the target is read (fewer,
        larger updates, as other yamux implementations do). A stream read as
        fast as it arrives (nothing left buffered) doubles its window, up to
        ``max_stream_window`` and only while a quarter of the peer's budget
        stays free: a fast link is then not held to 256 KiB per round trip,
        and a slow reader never gets more than it cannot keep up with."""
        if stream.remote_fin:
            stream.consumed = 0
            return
        if stream.consumed == 0 or stream.consumed < stream.target_window // 2:
            return
        delta = stream.consumed
        grow = 0
        if not stream.buffered and stream.target_window < self.limits.max_stream_window:
            grow = min(stream.target_window, self.limits.max_stream_window - stream.target_window)
            if self.budget.headroom() - delta - grow < self.budget.limit // 4:
                grow = 0
        if not self.budget.try_acquire(delta + grow):
            if not grow or not self.budget.try_acquire(delta):
                self._starved.add(stream.id)
                return
            grow = 0
        stream.consumed = 0
        stream.target_window += grow
        stream.recv_window += delta + grow
        self._frame(FrameType.WINDOW_UPDATE, 0, stream.id, delta + grow)

    # --- stream lifetime ---------------------------------------------------------------

    def _live(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamError(f"stream {stream_id} is not open")
        return stream

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_fin and stream.remote_fin and not stream.buffered:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        inflight = 0
        if self._body_stream is stream:  # the rest of a DATA frame being received is discarded
            inflight, self._body_stream = self._body_left, None
        self.budget.release(stream.recv_window + stream.buffered + inflight)
        self._starved.discard(stream.id)
        if stream.id % 2 != self._next_id % 2 and not stream.taken:
            self._backlog -= 1

    def _bury(self, stream: _Stream, credit: int) -> None:
        """Forget a stream we reset, remembering how much data may still be in flight for it."""
        self._forget(stream)
        self._graveyard_add(stream.id, credit)

    def _graveyard_add(self, stream_id: int, credit: int) -> None:
        self._graveyard[stream_id] = credit
        while len(self._graveyard) > GRAVEYARD_SIZE:
            self._graveyard.popitem(last=False)
