"""``/murmur/mux/2.0.0``: murmur's stream muxer on its fast-path records, sans-IO.

Between two murmur nodes the connection is upgraded to
``/murmur/noise-fast/2.0.0`` (large AEAD records, negotiated cipher) and this
muxer, both offered first by multistream-select; a libp2p peer that offers only
``/noise`` and ``/yamux/1.0.0`` gets those instead. Its frames are the records
of :mod:`murmur.protocol.framing`: ``type | stream id | payload`` inside one
AEAD record, so a stream's frame costs what the single-stream fast path cost.

A stream carries *messages*: one DATA frame is one message (murmur's
protocols are message-oriented), or one write of a byte-stream protocol
(identify, ping). A message is never split into window-sized pieces, copied
into a stream buffer and reassembled: the decoded record's payload is what the
application reads. A message with a large tail comes as a split frame (2.0.0;
see :mod:`murmur.protocol.framing`) and is queued as a
:class:`~murmur.protocol.sealed.Split`, its tail still sealed: the application
opens it where the bytes belong. Stream ids: the dialler opens odd ones, the listener even
ones, each side in increasing order; 0 is the connection (PING, PONG, CLOSE,
and the muxer's own negotiation before it).

Flow control is the connection's, not each stream's, as on the single-stream
fast path of issue 14: every DATA payload is charged to the peer's
:class:`~murmur.protocol.budget.PeerBudget` on arrival, with
:data:`QUEUED_MESSAGE_COST` for the message itself, and released when the
application reads it; once the budget is over, the connection stops reading
its socket and TCP pushes back on the sender. So no stream can be left
holding that budget: a stream closed for reading (:meth:`MuxSession.close_read`:
a handler that is done, a send-only stream), reset, or refused discards what
arrives for it at once.

What a peer can make it do is bounded, and every violation is typed:

* at most ``max_streams`` live streams; an OPEN beyond is refused (RESET,
  :class:`~murmur.errors.StreamRefused`, no drop), and after
  ``max_refused_streams`` refusals in a row the peer is dropped
  (:class:`~murmur.errors.MuxerError`: a stream flood);
* stream opens are limited in rate as on yamux (``max_open_burst``,
  ``open_refill_s``, :class:`~murmur.protocol.budget.StreamOpens`): an OPEN
  beyond is refused, and a peer that keeps opening is dropped;
* an OPEN of the wrong parity or not above the peer's last one, a stream
  frame on stream 0, a frame for a stream never opened, or DATA after the
  peer's FIN is a :class:`~murmur.errors.MuxerError` (drop); frames for a
  stream that was open (reset while they were in flight) are discarded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from murmur.errors import MuxerError, StreamRefused
from murmur.protocol.budget import PeerBudget
from murmur.protocol.framing import MAX_STREAM_ID, FrameType
from murmur.protocol.sealed import SealedTail, Split
from murmur.protocol.yamux import (
    DataReceived,
    Event,
    Refused,
    StreamEnded,
    StreamError,
    StreamOpened,
    StreamReset,
    YamuxLimits,
)

PROTOCOL_ID = "/murmur/mux/2.0.0"  # 2.0.0: split frames
STREAM_FRAMES = frozenset({FrameType.DATA, FrameType.OPEN, FrameType.FIN, FrameType.RESET})

QUEUED_MESSAGE_COST = 512
"""What a queued message holds besides its payload (its view, the decrypted
record's buffer object, the queue slot: ~500 bytes measured), charged to the
budget with the payload: 200,000 empty DATA frames (25 bytes each on the
wire) held 97 MiB while the budget read 0 and never paused reading."""

MuxLimits = YamuxLimits
"""The same bounds as yamux's (streams, refusals); its window sizes do not apply."""


@dataclass
class _Stream:
    id: int
    queue: deque[memoryview | Split] = field(default_factory=deque)
    buffered: int = 0
    local_fin: bool = False
    remote_fin: bool = False
    reading: bool = True  # False: closed for reading, arriving data is discarded


class MuxSession:
    """The streams of one ``/murmur/mux/2.0.0`` connection; ``client`` dialled it.

    Feed it the stream frames that arrive (:meth:`on_frame`, returning
    :mod:`~murmur.protocol.yamux` events); the control frames it wants sent
    (OPEN, FIN, RESET) wait in :attr:`control` until the owner writes them.
    DATA frames are the owner's to write (straight from the application's
    buffers)."""

    def __init__(self, client: bool, budget: PeerBudget, limits: MuxLimits = MuxLimits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.budget = budget
        self.limits = limits
        self._opens = limits.stream_opens(client, clock)  # the peer's stream opens (yamux's rules)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self.control: list[tuple[FrameType, int]] = []
        self.going_away = False

    # --- queries ------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    def is_live(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def at_eof(self, stream_id: int) -> bool:
        """Nothing more will be readable: the peer sent FIN and all was read, or the stream is gone."""
        stream = self._streams.get(stream_id)
        return stream is None or (stream.remote_fin and not stream.queue)

    def can_send(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.local_fin

    # --- application calls ---------------------------------------------------------

    def open_stream(self) -> int:
        """A new outbound stream (OPEN queued); :class:`StreamError` when going away or full."""
        if self.going_away:
            raise StreamError("session is going away")
        if len(self._streams) >= self.limits.max_streams:
            raise StreamError(f"stream limit {self.limits.max_streams} reached")
        if self._next_id > MAX_STREAM_ID:
            raise StreamError("stream ids exhausted")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(stream_id)
        self.control.append((FrameType.OPEN, stream_id))
        return stream_id

    def read(self, stream_id: int) -> memoryview | Split | None:
        """The stream's next message (its bytes released to the budget), or ``None``."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.queue:
            return None
        payload = stream.queue.popleft()
        cost = len(payload) + QUEUED_MESSAGE_COST
        stream.buffered -= cost
        self.budget.release(cost)
        self._maybe_forget(stream)
        return payload

    def close_write(self, stream_id: int) -> None:
        """Half-close: FIN queued; reading goes on until the peer's FIN."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            return
        stream.local_fin = True
        self.control.append((FrameType.FIN, stream_id))
        self._maybe_forget(stream)

    def close_read(self, stream_id: int) -> None:
        """Nobody reads this stream any more: drop what waits, discard what comes."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.reading = False
        self._drop_queue(stream)
        self._maybe_forget(stream)

    def reset(self, stream_id: int) -> None:
        """Abort the stream both ways: RESET queued, what waits dropped."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self.control.append((FrameType.RESET, stream_id))
        self._forget(stream)

    def go_away(self) -> None:
        """No new streams either way from now on."""
        self.going_away = True

    def close(self) -> None:
        """The connection is gone: give every queued byte back to the budget."""
        for stream in list(self._streams.values()):
            self._forget(stream)

    # --- receiving -------------------------------------------------------------------

    def on_frame(self, ftype: FrameType, stream_id: int, payload: memoryview,
                 tail: SealedTail | None = None) -> list[Event]:
        """One stream frame from the peer (DATA, OPEN, FIN or RESET; a DATA
        frame may come with a sealed tail)."""
        if stream_id == 0:
            raise MuxerError(f"{ftype.name} frame on stream 0")
        if tail is not None and ftype is not FrameType.DATA:
            raise MuxerError(f"{ftype.name} frame with a tail")
        if ftype is FrameType.OPEN:
            if payload:
                raise MuxerError("OPEN frame with a payload")
            return self._on_open(stream_id)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._stale(stream_id)
            return []
        if ftype is FrameType.DATA:
            if stream.remote_fin:
                raise MuxerError(f"data on stream {stream_id} after its FIN")
            if not stream.reading:
                return []
            message = payload if tail is None else Split(payload, tail)
            size = len(message)
            stream.queue.append(message)
            stream.buffered += size + QUEUED_MESSAGE_COST
            self.budget.charge(size + QUEUED_MESSAGE_COST)
            return [DataReceived(stream_id, size)]
        if payload:
            raise MuxerError(f"{ftype.name} frame with a payload")
        if ftype is FrameType.RESET:
            self._forget(stream)
            return [StreamReset(stream_id)]
        if stream.remote_fin:  # FIN twice
            raise MuxerError(f"second FIN on stream {stream_id}")
        stream.remote_fin = True
        self._maybe_forget(stream)
        return [StreamEnded(stream_id)]

    def _on_open(self, stream_id: int) -> list[Event]:
        reason = self._opens.open(stream_id, len(self._streams), self.going_away)
        if reason is not None:
            self._opens.refused()
            self.control.append((FrameType.RESET, stream_id))
            return [Refused(stream_id, StreamRefused(f"stream {stream_id} refused: {reason}"))]
        self._opens.accepted()
        self._streams[stream_id] = _Stream(stream_id)
        return [StreamOpened(stream_id)]

    def _stale(self, stream_id: int) -> None:
        """A frame for a stream that is not live: fine if it was (late frames), else a violation."""
        if self._opens.never_opened(stream_id, self._next_id):
            raise MuxerError(f"frame for stream {stream_id}, which was never opened")

    # --- stream lifetime ---------------------------------------------------------------

    def _drop_queue(self, stream: _Stream) -> None:
        if stream.buffered:
            self.budget.release(stream.buffered)
        for message in stream.queue:
            if isinstance(message, Split):
                message.tail.discard()  # its ciphertext buffer freed now, not when the queue is collected
        stream.queue.clear()
        stream.buffered = 0

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_fin and stream.remote_fin and not stream.queue:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self._drop_queue(stream)
