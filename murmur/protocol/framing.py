"""Length-prefixed AEAD records: murmur's fast path after its handshake.

Wire format of one record::

    u32 big-endian L | AEAD( type:u8 || stream:u32 || payload )   (L = 5 + len(payload) + 16)

These records are both the secure channel of ``/murmur/noise-fast/2.0.0``
and the frames of its muxer ``/murmur/mux/2.0.0`` (see
:mod:`murmur.protocol.murmux`): the muxer's header (frame type and stream id)
rides inside the AEAD record, so one message costs one seal and one open,
whatever stream it travels on. Before the muxer is agreed, the
multistream-select bytes that choose it travel as DATA records on stream 0.

A message with a large tail (at least ``SPLIT_MIN_TAIL`` bytes: a delta
chunk's payload behind its envelope) travels as a *split* frame, two records
written as one::

    u32 L1 | AEAD_n( SPLIT:u8 || stream:u32 || head ) | u32 L2 | AEAD_n+1( tail )

The second record has no header: it is the rest of the first one's payload.
The receiver opens the head, which names the stream, and hands the tail on
still sealed (:class:`~murmur.protocol.sealed.SealedTail`), so the reader
opens it straight where it wants it; the sender seals it straight from the
caller's memory. Each payload byte is then written once on either side, as
in the "crypto alone" baseline of ``bench/transport.py``, instead of twice
(gathered with the head before sealing; opened into a buffer, then copied to
its place). Head and tail together are one message: at most ``max_frame``.

The AEAD is the cipher the handshake negotiated (AES-256-GCM or
ChaCha20-Poly1305, see :class:`~murmur.protocol.noise.NoiseCipher`); the nonce
of each record is the message counter of the sending side's split Noise
:class:`~murmur.protocol.noise.CipherState`. Records are never sent in the
clear, so there is nothing to fall back to.

Deviation from Noise / libp2p-noise, on purpose (this is murmur's own
security protocol; the standard ``/noise`` is :mod:`murmur.protocol.noise_channel`):
Noise caps a transport message at 65535 bytes and libp2p-noise uses a 2-byte
length prefix. murmur moves multi-megabyte model deltas, and per-record
overhead (a Python call, a nonce, a tag, a syscall) dominates at 64 KiB, so a
record carries up to ``max_frame`` plaintext bytes (4 MiB by default) behind a
4-byte length. The AEAD, the key schedule and the nonce rules are unchanged;
only the size cap differs. The cap is a hard limit checked on the length
prefix *before* any buffer is allocated for the body
(:class:`~murmur.errors.FrameTooLarge`).

Reading is shaped like :class:`asyncio.BufferedProtocol` (``get_buffer`` /
``buffer_updated``) so the event loop receives straight into our buffers:
small frames are parsed out of one fixed scratch buffer, and a large frame
gets exactly one buffer of its announced size that the socket fills directly.

Memory follows the bytes, not the announcement. Both buffers are anonymous
mappings (:func:`lazy_buffer`): the kernel commits a page when the socket
first writes it, so a peer that announces a 4 MiB frame and sends 10 bytes
costs one page, not 4 MiB (240 such headers used to pin 1 GiB), and an
unmapped buffer goes straight back to the system instead of fragmenting the
heap. With a :class:`~murmur.protocol.budget.PeerBudget`, a large frame's
buffer is also paid for from the peer's budget before its body is read
(:attr:`LengthPrefixedReader.blocked` until the budget has room), so what one
peer, and all peers together, can make the node hold is bounded by the
budget, not by ``max_frame`` times the connections. Paying up front rather
than per byte means a frame once started always completes: no two peers can
each hold half the pool waiting for the other's half.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag

from murmur.errors import DecryptError, FrameError, FrameTooLarge, PeerFault
from murmur.protocol.budget import PeerBudget
from murmur.protocol.noise import TAG_LEN, CipherState
from murmur.protocol.sealed import SealedTail

FRAME_LENGTH = struct.Struct(">I")
FRAME_HEADER = struct.Struct(">BI")  # frame type, stream id: the first plaintext bytes of every record
HEADER_LEN = FRAME_HEADER.size
FRAME_OVERHEAD = HEADER_LEN + TAG_LEN  # ciphertext bytes beyond the payload
SPLIT_OVERHEAD = FRAME_LENGTH.size + TAG_LEN  # a split frame's second length prefix and tag
# Tails from here on travel split: below it, the copy a split saves costs
# less than the second record's tag, nonce and Python calls.
SPLIT_MIN_TAIL = 64 * 1024
# A large record's buffer has room for this much of what follows it, read in
# the same call and moved to the scratch: the next record's prefix and, behind
# a split frame's tail, the next frame's head and its tail's prefix. A stream
# of split frames then takes one read per frame, not three.
LOOKAHEAD_BYTES = 1024
MAX_STREAM_ID = 2**32 - 1
DEFAULT_SCRATCH_BYTES = 256 * 1024  # frames up to this size are parsed in place
# Handshake messages travel as in libp2p-noise: u16 big-endian length, then the
# Noise message. XX messages with our payload are 32/200/168 bytes; anything
# far beyond that is an attack, so the cap is much tighter than Noise's 65535.
HANDSHAKE_LENGTH = struct.Struct(">H")
MAX_HANDSHAKE_MESSAGE = 1024
HANDSHAKE_SCRATCH_BYTES = 16 * 1024


def _no_owner(fault: PeerFault) -> None:
    return None


def lazy_buffer(nbytes: int) -> mmap.mmap:
    """``nbytes`` of zeroed, writable memory that the kernel commits page by
    page as it is written, and returns whole when the object is freed."""
    return mmap.mmap(-1, nbytes)


def _unmap(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view of it is still alive somewhere: freed with it
        pass


class FrameType(enum.IntEnum):
    """First plaintext byte of every record (the ``/murmur/mux/2.0.0`` frame types).

    PING, PONG and CLOSE concern the connection and travel on stream 0; OPEN,
    FIN and RESET open, half-close and abort a stream; DATA carries one
    message of a stream (or, on stream 0, the muxer negotiation); SPLIT is
    a DATA frame whose payload goes on in the next record (the decoder
    gives it out as DATA with a sealed tail)."""

    DATA = 0
    PING = 1
    PONG = 2
    CLOSE = 3
    OPEN = 4
    FIN = 5
    RESET = 6
    SPLIT = 7


_FRAME_TYPES = tuple(FrameType)  # by code: a lookup per record, not an Enum call
assert all(ftype.value == code for code, ftype in enumerate(_FRAME_TYPES))


@dataclass(frozen=True, slots=True)
class Frame:
    """One authenticated record. ``payload`` is a read-only view of a buffer
    of its own (nothing else refers to it or writes it), so it can be queued
    and handed to the application as it is: it stays valid as long as it is held."""

    type: FrameType
    stream: int
    payload: memoryview
    tail: SealedTail | None = None  # a split frame's rest, still sealed: the message is payload + tail


class LengthPrefixedReader:
    """Incremental splitter of ``prefix | body`` records, sans-IO.

    ``next_body`` returns a completed body as a memoryview that stays valid
    only until the next ``get_buffer`` call: the caller must consume (decrypt,
    copy) it at once. That contract is what lets small records be read
    without any intermediate copy.
    """

    def __init__(
        self,
        prefix: struct.Struct,
        max_body: int,
        min_body: int = 0,
        scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        budget: PeerBudget | None = None,
    ) -> None:
        if scratch_bytes < prefix.size:
            raise ValueError("scratch buffer smaller than the length prefix")
        self._prefix = prefix
        self.max_body = max_body
        self.min_body = min_body
        self._scratch = lazy_buffer(scratch_bytes)
        self._view = memoryview(self._scratch)
        self._start = 0  # first unparsed byte in scratch
        self._end = 0  # end of valid data in scratch
        # One large record being filled: its body, then room for the next
        # record's prefix, so a stream of large records takes one read each.
        self._big: memoryview | None = None
        self._big_len = 0  # its body's length
        self._big_filled = 0
        # Backing store of ``_big``, kept for the next large record while
        # records keep coming: a fresh multi-MiB buffer per record cost a
        # page fault per 4 KiB (about a third of the receiver's CPU on a
        # delta stream). Its whole size is charged to the budget while it
        # exists; :meth:`release_spare` gives it back once the stream pauses.
        self._spare: mmap.mmap | None = None
        self._budget = budget
        # The next record is a split frame's tail (see expect_tail); a large
        # one then fills a buffer the tail takes with it (detach).
        self._tail_expected = False
        self._tail_buffer: np.ndarray | None = None  # the buffer a large tail is being read into
        self.last_large = False  # the last body returned was a large record's (see detach)
        self.blocked = False  # a large record waits for budget (see next_body)
        self.large_records = 0  # large records started so far (the owner's idleness check)
        # The last record was large, or a split frame's head: read the next
        # prefix alone, or with the small record it announces (see
        # _record_stop), or with the body before it (see _big). Read into the
        # scratch, a large record's body was copied from there into its own
        # buffer; read after its prefix, it lands there directly (a delta
        # stream's chunks are all just over the scratch's size).
        self._prefix_alone = False

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole record."""
        if self._big is not None:
            return self._prefix.size + self._big_filled
        return self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._big is not None:
            return self._big[self._big_filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and len(self._scratch) - self._end < len(self._scratch) // 4:
            self._compact()  # the partial record always fits: larger ones moved to _big
        if self._prefix_alone:
            stop = self._record_stop()
            if self._end < stop:
                return self._view[self._end : stop]
        return self._view[self._end :]

    def _record_stop(self) -> int:
        """Where a read into the scratch stops while prefixes are read alone:
        at the end of the next prefix or, once that is in, of the small
        record it announces and the prefix behind it. Never inside a large
        record's body, which gets a buffer of its own."""
        psize = self._prefix.size
        want = psize
        if self._end - self._start >= psize:
            (length,) = self._prefix.unpack_from(self._scratch, self._start)
            want += length + psize
        if self._start + want > len(self._scratch):
            self._compact()
        return min(self._start + want, len(self._scratch))

    def expect_tail(self) -> None:
        """The next record is a split frame's tail: read up to its prefix
        alone, so that its body lands in its own buffer, one the tail takes
        with it (:meth:`detach`)."""
        self._prefix_alone = True
        self._tail_expected = True

    def fill(self, nbytes: int) -> bool:
        """Account for ``nbytes`` read into a large record that they do not
        complete, and say so; ``False`` (nothing accounted) for any other read,
        which goes through :meth:`buffer_updated`. The cheap path of a read
        that can neither complete a record nor change what is charged."""
        if self._big is None or self._big_filled + nbytes >= self._big_len:
            return False
        self._big_filled += nbytes
        return True

    def _compact(self) -> None:
        live = self._end - self._start
        if live and self._start:
            self._view[:live] = bytes(self._view[self._start : self._end])
        self._start, self._end = 0, live

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last ``get_buffer`` view."""
        if self._big is not None:
            self._big_filled += nbytes
        else:
            self._end += nbytes

    def next_body(self) -> memoryview | None:
        """The next complete body, or ``None`` until more bytes arrive.

        Parsing is one record at a time so a caller can stop between records
        (the handshake hands the rest to the frame decoder). ``None`` with
        :attr:`blocked` set means a large record's buffer does not fit in the
        budget: the owner stops reading and calls again once it may fit.
        """
        if self._big is not None:
            filled, length = self._big_filled, self._big_len
            if filled < length:
                return None
            big, self._big = self._big, None
            behind = filled - length  # the start of the next prefix, read with the body
            self._view[:behind] = big[length:filled]  # the scratch is empty while a large record fills
            self._start, self._end = 0, behind
            self._prefix_alone = True
            self._tail_expected = False
            self.last_large = True
            return big[:length]
        self.last_large = False
        psize = self._prefix.size
        if self._end - self._start < psize:
            return None
        (length,) = self._prefix.unpack_from(self._scratch, self._start)
        if length > self.max_body:
            raise FrameTooLarge(f"length prefix {length} exceeds the maximum {self.max_body}")
        if length < self.min_body:
            raise FrameError(f"record of {length} bytes is shorter than the minimum {self.min_body}")
        body_start = self._start + psize
        available = self._end - body_start
        if available >= length:
            self._start = body_start + length
            self._prefix_alone = self._tail_expected = False
            return self._view[body_start : self._start]
        if psize + length > len(self._scratch):
            # Large record: its own buffer, sized by the (already checked)
            # prefix, paid for from the budget, committed by the kernel only
            # as the socket fills it directly.
            size = length + psize + LOOKAHEAD_BYTES
            self.blocked = not (self._tail_for(size) if self._tail_expected else self._spare_for(size))
            if self.blocked:
                return None
            self.large_records += 1
            buffer = self._tail_buffer if self._tail_expected else self._spare
            self._big = memoryview(buffer)[:size]  # type: ignore[arg-type]
            self._big_len = length
            self._big[:available] = self._view[body_start : self._end]
            self._big_filled = available
            self._start = self._end = 0
        return None

    def _tail_for(self, length: int) -> bool:
        """A buffer for a large tail, which takes it along (:meth:`detach`), if
        the budget pays for it. From the heap, not a mapping: it is freed
        once the tail is opened, and a warm heap hands the next one out
        without a page fault per 4 KiB (see ``transport.tune_allocator``);
        the budget, paid up front, bounds what announced bytes can hold."""
        if self._budget is not None and not self._budget.try_acquire(length):
            return False
        self._tail_buffer = np.empty(length, dtype=np.uint8)
        return True

    def _spare_for(self, length: int) -> bool:
        """Make the spare at least ``length`` bytes, if the budget pays the difference."""
        held = len(self._spare) if self._spare is not None else 0
        if held >= length:
            return True
        if self._budget is not None and not self._budget.try_acquire(length - held):
            return False
        if self._spare is not None:
            _unmap(self._spare)
        self._spare = lazy_buffer(length)
        return True

    def detach(self) -> np.ndarray:
        """Hand over the buffer of the large tail just returned (the sealed
        tail takes it, views and all). Its charge goes back to the budget:
        the muxer charges the message it belongs to while it waits to be read."""
        tail = self._tail_buffer
        assert self.last_large and tail is not None and self._big is None
        self._tail_buffer = None
        self.last_large = False
        if self._budget is not None:
            self._budget.release(tail.nbytes)
        return tail

    def release_spare(self) -> int:
        """Unmap the kept large-record buffer, unless a record is being filled
        into it; returns the bytes given back (to the system and the budget)."""
        if self._spare is None or self._big is not None:
            return 0
        spare, self._spare = self._spare, None
        freed = len(spare)
        _unmap(spare)
        if self._budget is not None:
            self._budget.release(freed)
        return freed

    def close(self) -> None:
        """Drop every buffer (the owner's connection is gone). The budget is
        the owner's to close."""
        self._big = None
        self._tail_buffer = None  # its charge goes with the budget, which the owner closes
        self.release_spare()

    def bodies(self) -> list[memoryview]:
        out = []
        while (body := self.next_body()) is not None:
            out.append(body)
        return out

    def take_pending(self) -> bytes:
        """Hand the unparsed tail to another reader (handshake -> frames)."""
        if self._big is not None:
            raise FrameError("cannot hand over a partly received large record")
        tail = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return tail

    def at_eof(self) -> None:
        """The peer closed its side: leftover bytes mean a truncated record."""
        if self.pending:
            raise FrameError(f"connection closed inside a record ({self.pending} bytes pending)")


class FrameDecoder:
    """Bytes in, authenticated :class:`Frame` objects out. Raises only
    :class:`FrameError` (bad length, truncation, unknown type) or
    :class:`DecryptError` (authentication failure); after one error it stays failed.

    A split frame comes out as one DATA frame once both its records are in,
    its tail still sealed: the tail's authentication is its reader's, and a
    failure there goes to ``on_tail_fault`` (the owner drops the connection)."""

    def __init__(
        self,
        cipher: CipherState,
        max_frame: int,
        scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        budget: PeerBudget | None = None,
    ) -> None:
        self._cipher = cipher
        self.max_frame = max_frame
        self._reader = LengthPrefixedReader(
            FRAME_LENGTH, max_frame + FRAME_OVERHEAD, TAG_LEN + 1, scratch_bytes, budget  # a tail: one byte or more
        )
        self._failed: PeerFault | None = None
        self._split: Frame | None = None  # a split frame's head, waiting for its tail
        self.on_tail_fault: Callable[[PeerFault], None] = _no_owner

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self._reader.get_buffer(sizehint)

    @property
    def error(self) -> PeerFault | None:
        """The fault that stopped decoding, if any (see :meth:`buffer_updated`)."""
        return self._failed

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Frames completed by the last read.

        Authenticated frames that precede a bad one in the same read are not
        thrown away: they are returned, the fault is kept in :attr:`error` and
        raised by the next call. With no frame before it, it is raised at once.
        """
        if self._failed is not None:
            raise self._failed
        self._reader.buffer_updated(nbytes)
        return self._drain()

    def fill(self, nbytes: int) -> bool:
        """The cheap path of :meth:`buffer_updated` for a read that only
        advances a large frame (see :meth:`LengthPrefixedReader.fill`): ``True``
        when it was that, ``False`` (nothing done) when the caller must call
        :meth:`buffer_updated`."""
        return self._failed is None and self._reader.fill(nbytes)

    def _drain(self) -> list[Frame]:
        frames: list[Frame] = []
        try:
            while (body := self._reader.next_body()) is not None:
                if self._split is not None:
                    frames.append(self._with_tail(self._split, body))
                    self._split = None
                    continue
                frame = self._open(body)
                if frame.type is FrameType.SPLIT:
                    self._split = frame
                    self._reader.expect_tail()
                else:
                    frames.append(frame)
        except (FrameError, DecryptError) as exc:
            self._failed = exc
            if not frames:
                raise
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Push bytes that did not come through ``get_buffer`` (tests, handshake tail).
        Same error contract as :meth:`buffer_updated`."""
        frames: list[Frame] = []
        view = memoryview(data)
        while view and self._failed is None and not self.blocked:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self._reader.buffer_updated(n)
            try:
                frames.extend(self._drain())
            except (FrameError, DecryptError):
                if not frames:
                    raise
        if view and self.blocked:
            raise BufferError(f"{len(view)} bytes not fed: a large frame waits for budget")
        if self._failed is not None and not frames:
            raise self._failed
        return frames

    def at_eof(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._split is not None:
            raise FrameError("connection closed between a split frame's head and its tail")
        self._reader.at_eof()

    @property
    def blocked(self) -> bool:
        """A large frame waits for budget (see :meth:`poll`)."""
        return self._reader.blocked

    def poll(self) -> list[Frame]:
        """Frames the bytes already received complete now (after
        :attr:`blocked`: the budget may have room). Same error contract as
        :meth:`buffer_updated`."""
        if self._failed is not None:
            raise self._failed
        return self._drain()

    @property
    def large_frames(self) -> int:
        """Large frames started so far (see :meth:`release_spare`)."""
        return self._reader.large_records

    def release_spare(self) -> int:
        """Give back the buffer kept for the next large frame (a stream paused)."""
        return self._reader.release_spare()

    def close(self) -> None:
        self._reader.close()

    def _open(self, body: memoryview) -> Frame:
        # The AEAD opens the record straight into the payload's own buffer,
        # which the frame hands on as a view: no scratch to copy out of (that
        # copy was a fifth of a delta stream's receive work). np.empty, not
        # bytearray: a buffer the AEAD overwrites whole needs no zero-fill,
        # and a frame-sized one comes warm from the heap (tune_allocator).
        # After a failed tag it holds unauthenticated bytes and is dropped.
        if len(body) < FRAME_OVERHEAD:
            raise FrameError(f"record of {len(body)} bytes is shorter than the minimum {FRAME_OVERHEAD}")
        plaintext = np.empty(len(body) - TAG_LEN, dtype=np.uint8)
        try:
            self._cipher.open_into(body, plaintext)
        except InvalidTag:
            raise DecryptError("frame failed authentication") from None
        code, stream = FRAME_HEADER.unpack_from(plaintext)
        if code >= len(_FRAME_TYPES):
            raise FrameError(f"unknown frame type {code}")
        return Frame(_FRAME_TYPES[code], stream, memoryview(plaintext)[HEADER_LEN:].toreadonly())

    def _with_tail(self, head: Frame, body: memoryview) -> Frame:
        """The DATA frame a split head and its tail record make, the tail
        left sealed under the nonce it came with."""
        size = len(head.payload) + len(body) - TAG_LEN
        if size > self.max_frame:
            raise FrameTooLarge(f"split frame of {size} bytes exceeds the maximum {self.max_frame}")
        nonce = self._cipher.reserve()
        if self._reader.last_large:  # in a buffer of its own: the tail takes it, no copy
            backing: object = self._reader.detach()
        else:  # inside the scratch, which the next read overwrites
            backing = bytearray(body)
            body = memoryview(backing)
        tail = SealedTail(body, backing, self._cipher, nonce, self.on_tail_fault)
        return Frame(FrameType.DATA, head.stream, head.payload, tail)


class FrameEncoder:
    """Payload in, ``length | ciphertext`` out, in one buffer ready for ``transport.write``.

    The ``type || payload`` plaintext the AEAD needs is assembled in a
    :class:`PlaintextScratch` (shared with the other encoders of the same
    host: each uses it synchronously). The output buffer may still be held by the
    socket transport after ``write`` returns, so it is fresh per frame unless
    the caller hands it back with :meth:`recycle` once the transport has
    flushed it; a fresh multi-MiB buffer costs a zero-fill and a page fault
    per 4 KiB, a recycled one neither.
    """

    def __init__(self, cipher: CipherState, max_frame: int, plaintext: PlaintextScratch | None = None) -> None:
        self._cipher = cipher
        self.max_frame = max_frame
        self._plaintext = plaintext if plaintext is not None else PlaintextScratch(max_frame)
        self._spare: bytearray | None = None  # one flushed output buffer, at most max_frame + overhead
        self.frames = 0  # frames encoded so far (the owner's idleness check)

    def encode(self, ftype: FrameType, stream: int, *parts: bytes | bytearray | memoryview,
               tail: bytes | bytearray | memoryview | None = None) -> bytearray:
        """One frame of ``stream`` whose payload is ``parts`` concatenated
        (gathered straight into the plaintext scratch: a message's envelope
        and its tail need no joining first), and then ``tail``: given one, a
        DATA frame goes split, the tail sealed straight from the caller's
        memory into its own record. Raises ``ValueError`` for a payload over
        ``max_frame``: that is a local bug (callers chunk large objects), not
        something to put on the wire."""
        views = [memoryview(part).cast("B") for part in parts]
        rest = None if tail is None else memoryview(tail).cast("B")
        self.frames += 1
        size = sum(view.nbytes for view in views)
        rest_len = 0 if rest is None else rest.nbytes
        if size + rest_len > self.max_frame:
            raise ValueError(f"payload of {size + rest_len} bytes exceeds max_frame {self.max_frame}")
        if rest is not None and (ftype is not FrameType.DATA or not rest_len):
            raise ValueError(f"only a DATA frame with a tail goes split, not {ftype.name} of {rest_len} bytes")
        wire_len = size + FRAME_OVERHEAD
        head_end = FRAME_LENGTH.size + wire_len
        total = head_end if rest is None else head_end + FRAME_LENGTH.size + rest_len + TAG_LEN
        out, self._spare = self._spare, None
        if out is None or len(out) != total:  # a stream's frames are mostly one size
            out = bytearray(total)
        FRAME_LENGTH.pack_into(out, 0, wire_len)
        with self._plaintext.view(HEADER_LEN + size) as plaintext, memoryview(out) as out_view:
            FRAME_HEADER.pack_into(plaintext, 0, ftype if rest is None else FrameType.SPLIT, stream)
            offset = HEADER_LEN
            for view in views:
                plaintext[offset : offset + view.nbytes] = view
                offset += view.nbytes
            self._cipher.seal_into(plaintext, out_view[FRAME_LENGTH.size : head_end])
            if rest is not None:
                FRAME_LENGTH.pack_into(out, head_end, rest_len + TAG_LEN)
                self._cipher.seal_into(rest, out_view[head_end + FRAME_LENGTH.size :])
        return out

    def recycle(self, frame: bytearray) -> None:
        """Give back a frame :meth:`encode` returned, once nothing holds it for
        writing any more (the transport's write buffer is empty). One spare
        per encoder, at most one largest frame."""
        self._spare = frame

    def release_spare(self) -> None:
        """Drop the recycled frame (sending paused: keep no frame-sized buffer)."""
        self._spare = None


class PlaintextScratch:
    """One reusable buffer for frame plaintext, at most ``max_frame + HEADER_LEN`` bytes.

    Encoding uses it synchronously (gather, seal) and never across an
    ``await``, so every encoder of one event loop may share one: memory for
    plaintext staging is then one largest frame per host, not one per
    connection. It grows to the largest frame seen, never beyond the cap.
    (Decoding needs none: a record opens into its payload's own buffer.)
    """

    def __init__(self, max_frame: int) -> None:
        self.max_bytes = HEADER_LEN + max_frame
        self._buf = bytearray()

    def view(self, nbytes: int) -> memoryview:
        """A view of exactly ``nbytes``; release it (``with``) before the next call."""
        if nbytes > self.max_bytes:
            raise ValueError(f"{nbytes} plaintext bytes exceed the scratch cap {self.max_bytes}")
        if len(self._buf) < nbytes:
            self._buf = bytearray(min(self.max_bytes, max(nbytes, DEFAULT_SCRATCH_BYTES)))
        return memoryview(self._buf)[:nbytes]
