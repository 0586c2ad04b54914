"""AEAD frame codec: round trips across arbitrary read boundaries, hard limits, fuzzing."""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import ConnectionClosed, DecryptError, FrameError, FrameTooLarge
from murmur.protocol.budget import BytePool
from murmur.protocol.framing import (
    FRAME_LENGTH,
    FRAME_OVERHEAD,
    LOOKAHEAD_BYTES,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    LengthPrefixedReader,
    PlaintextScratch,
)
from murmur.protocol.noise import CipherState
from murmur.protocol.sealed import Split

KEY = bytes(range(32))
MAX_FRAME = 64 * 1024
SCRATCH = 4096  # small, so both the in-scratch and the large-frame paths run


def pair(max_frame: int = MAX_FRAME) -> tuple[FrameEncoder, FrameDecoder]:
    return FrameEncoder(CipherState(KEY), max_frame), FrameDecoder(CipherState(KEY), max_frame, SCRATCH)


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=9000), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=20000), max_size=30),
)
def test_roundtrip_any_read_boundaries(payloads: list[bytes], cuts: list[int]) -> None:
    enc, dec = pair()
    wire = b"".join(enc.encode(FrameType.DATA, 1, p) for p in payloads)
    frames, pos = [], 0
    for cut in cuts + [len(wire)]:
        frames += dec.feed(wire[pos : pos + cut])
        pos += cut
    assert [f.payload for f in frames] == payloads
    assert all(f.type is FrameType.DATA for f in frames)
    dec.at_eof()


def _message(frame: Frame) -> bytes:
    """A frame's whole message: its tail, if it came split, opened behind the head."""
    return bytes(frame.payload if frame.tail is None else Split(frame.payload, frame.tail).join())


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=9000)), max_size=10),
    cuts=st.lists(st.integers(min_value=1, max_value=20000), max_size=30),
)
def test_split_frames_round_trip_at_any_read_boundaries(messages: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    """Tails in the scratch and tails over it (their own buffer), opened in
    any order: each has the nonce it came with."""
    enc, dec = pair()
    wire = b"".join(enc.encode(FrameType.DATA, 1, head, tail=tail or None) for head, tail in messages)
    frames, pos = [], 0
    for cut in cuts + [len(wire)]:
        frames += dec.feed(wire[pos : pos + cut])
        pos += cut
    assert [f.type for f in frames] == [FrameType.DATA] * len(messages)  # a split frame comes out as DATA
    assert [f.tail is not None for f in frames] == [bool(tail) for _, tail in messages]
    assert [_message(f) for f in reversed(frames)] == [head + tail for head, tail in reversed(messages)]
    dec.at_eof()


def test_a_forged_tail_fails_where_it_is_opened_and_faults_the_connection() -> None:
    enc, dec = pair()
    faults: list[Exception] = []
    dec.on_tail_fault = faults.append
    wire = bytearray(enc.encode(FrameType.DATA, 1, b"head", tail=os.urandom(8000)))
    wire[-1] ^= 1  # in the tail's tag
    wire += enc.encode(FrameType.DATA, 1, b"after")  # the nonces went on past the tail
    split, after = dec.feed(wire)
    assert split.payload == b"head" and after.payload == b"after" and not faults  # the head authenticated
    with pytest.raises(ConnectionClosed):
        split.tail.open_into(memoryview(bytearray(8000)))
    assert [type(f) for f in faults] == [DecryptError]
    assert split.tail.opened
    with pytest.raises(RuntimeError):  # once, whatever came of it
        split.tail.open_into(memoryview(bytearray(8000)))


def test_a_split_frame_is_one_message_of_at_most_max_frame() -> None:
    wide = FrameEncoder(CipherState(KEY), 2 * MAX_FRAME)  # each record fits, the two together do not
    _, dec = pair()
    with pytest.raises(FrameTooLarge):
        dec.feed(wide.encode(FrameType.DATA, 1, bytes(MAX_FRAME // 2), tail=bytes(MAX_FRAME // 2 + 1)))
    enc = pair()[0]
    with pytest.raises(ValueError):
        enc.encode(FrameType.DATA, 1, bytes(MAX_FRAME // 2), tail=bytes(MAX_FRAME // 2 + 1))
    with pytest.raises(ValueError):  # only DATA goes split, and only with a tail
        enc.encode(FrameType.PING, 0, b"p", tail=b"x")
    with pytest.raises(ValueError):
        enc.encode(FrameType.DATA, 1, b"h", tail=b"")


def test_a_connection_closed_between_head_and_tail_is_truncated() -> None:
    enc, dec = pair()
    wire = enc.encode(FrameType.DATA, 1, b"head", tail=b"tail" * 10)
    head_record = FRAME_LENGTH.size + FRAME_OVERHEAD + len(b"head")
    assert dec.feed(wire[:head_record]) == []
    with pytest.raises(FrameError):
        dec.at_eof()


def test_a_large_tail_is_paid_for_while_it_arrives_then_handed_over() -> None:
    """The budget pays for the tail's buffer up front, as for any large
    record; once the tail is out, the charge is the muxer's to make (for the
    whole message, while it waits to be read)."""
    budget = BytePool(10 * MAX_FRAME).budget(limit=4 * MAX_FRAME, reserve=0)
    enc = FrameEncoder(CipherState(KEY), MAX_FRAME)
    dec = FrameDecoder(CipherState(KEY), MAX_FRAME, SCRATCH, budget=budget)
    tail = os.urandom(MAX_FRAME - 10)
    wire = enc.encode(FrameType.DATA, 1, b"head", tail=tail)
    assert dec.feed(wire[:-1]) == []
    assert budget.used >= len(tail)
    (frame,) = dec.feed(wire[-1:])
    assert budget.used == 0 and _message(frame) == b"head" + tail


def test_max_frame_exact_and_control_types() -> None:
    enc, dec = pair()
    big = os.urandom(MAX_FRAME)
    wire = (enc.encode(FrameType.DATA, 1, big) + enc.encode(FrameType.PING, 0, b"p") + enc.encode(FrameType.CLOSE, 0)
            + enc.encode(FrameType.OPEN, 2**32 - 1) + enc.encode(FrameType.RESET, 7))
    frames = dec.feed(wire)
    assert [(f.type, f.stream, f.payload) for f in frames] == [
        (FrameType.DATA, 1, big),
        (FrameType.PING, 0, b"p"),
        (FrameType.CLOSE, 0, b""),
        (FrameType.OPEN, 2**32 - 1, b""),
        (FrameType.RESET, 7, b""),
    ]
    with pytest.raises(ValueError):
        enc.encode(FrameType.DATA, 1, bytes(MAX_FRAME + 1))


def test_oversized_length_prefix_rejected_before_allocation() -> None:
    dec = FrameDecoder(CipherState(KEY), 4 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            dec.feed(struct.pack(">I", 0xFFFFFFFF) + b"x" * 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # nothing near the announced 4 GiB, nor even one max frame
    with pytest.raises(FrameTooLarge):  # and the decoder stays failed
        dec.buffer_updated(0)


def test_one_past_the_limit_is_too_large() -> None:
    _, dec = pair()
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", MAX_FRAME + FRAME_OVERHEAD + 1))


def test_too_short_frame_is_a_frame_error() -> None:
    _, dec = pair()
    with pytest.raises(FrameError):
        dec.feed(struct.pack(">I", FRAME_OVERHEAD - 1) + bytes(FRAME_OVERHEAD - 1))


def test_truncated_frame_detected_at_eof() -> None:
    enc, dec = pair()
    wire = enc.encode(FrameType.DATA, 1, b"hello world")
    assert dec.feed(wire[:-3]) == []
    with pytest.raises(FrameError):
        dec.at_eof()


def test_tampered_replayed_and_reordered_frames_fail_authentication() -> None:
    enc, dec = pair()
    first, second = enc.encode(FrameType.DATA, 1, b"one"), enc.encode(FrameType.DATA, 1, b"two")
    tampered = bytearray(first)
    tampered[-1] ^= 0x80
    with pytest.raises(DecryptError):
        pair()[1].feed(tampered)
    with pytest.raises(DecryptError):  # reordered: nonce 0 expected, frame sealed with nonce 1
        pair()[1].feed(second)
    assert dec.feed(first)[0].payload == b"one"
    with pytest.raises(DecryptError):  # replay of nonce 0
        dec.feed(first)


def test_unknown_frame_type_is_a_frame_error() -> None:
    cipher = CipherState(KEY)
    body = bytearray(5 + 3 + 16)
    cipher.seal_into(b"\x09\x00\x00\x00\x01abc", body)
    _, dec = pair()
    with pytest.raises(FrameError):
        dec.feed(struct.pack(">I", len(body)) + body)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(min_value=1, max_value=600))
def test_fuzz_decoder_raises_only_typed_errors(data: bytes, chunk: int) -> None:
    _, dec = pair()
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
        dec.at_eof()
    except (FrameError, DecryptError):
        pass


@settings(max_examples=200, deadline=None)
@given(prefix_count=st.integers(min_value=0, max_value=3), garbage=st.binary(min_size=1, max_size=3000))
def test_fuzz_garbage_after_valid_frames(prefix_count: int, garbage: bytes) -> None:
    enc, dec = pair()
    wire = b"".join(enc.encode(FrameType.DATA, 1, b"ok%d" % i) for i in range(prefix_count)) + garbage
    try:
        frames = dec.feed(wire)
        dec.at_eof()
    except (FrameError, DecryptError):
        return
    # The only way garbage survives is by never completing a frame (then at_eof raises).
    assert [f.payload for f in frames] == [b"ok%d" % i for i in range(prefix_count)]


def test_reader_hands_over_unparsed_tail() -> None:
    reader = LengthPrefixedReader(struct.Struct(">H"), 100, 1, 64)
    buf = reader.get_buffer()
    data = b"\x00\x03abc" + b"tail-bytes"
    buf[: len(data)] = data
    reader.buffer_updated(len(data))
    assert bytes(reader.next_body()) == b"abc"  # type: ignore[arg-type]
    assert reader.take_pending() == b"tail-bytes"
    assert reader.pending == 0


def test_connections_sharing_one_plaintext_scratch_stay_independent() -> None:
    """Two links interleaved over one encoder scratch (as a host's connections
    share it): every payload comes out intact, read-only and in a buffer of
    its own, not a view of a buffer the decoder reuses."""
    shared = PlaintextScratch(MAX_FRAME)
    links = [
        (FrameEncoder(CipherState(bytes([i]) * 32), MAX_FRAME, shared),
         FrameDecoder(CipherState(bytes([i]) * 32), MAX_FRAME, SCRATCH))
        for i in (1, 2)
    ]
    received: list[memoryview] = []
    sent = [os.urandom(n) for n in (MAX_FRAME, 10, 5000, MAX_FRAME - 1)]
    for i, payload in enumerate(sent):
        enc, dec = links[i % 2]
        (frame,) = dec.feed(enc.encode(FrameType.DATA, 1, payload))
        assert frame.payload.readonly
        received.append(frame.payload)
    assert [bytes(p) for p in received] == sent  # earlier payloads were not overwritten by later frames
    assert len({id(p.obj) for p in received}) == len(sent)


def test_recycled_output_buffer_is_reused_and_others_are_not() -> None:
    enc, dec = pair()
    big = os.urandom(MAX_FRAME)
    first = enc.encode(FrameType.DATA, 1, big)
    held = enc.encode(FrameType.DATA, 1, big[::-1])
    assert held is not first
    assert dec.feed(first)[0].payload == big  # "flushed" ...
    enc.recycle(first)  # ... and handed back
    third = enc.encode(FrameType.DATA, 1, big[:: 2] * 2)
    assert third is first  # reused: no fresh multi-MiB buffer
    assert [f.payload for f in dec.feed(held) + dec.feed(third)] == [big[::-1], big[::2] * 2]  # held kept intact
    small = enc.encode(FrameType.DATA, 1, b"x")  # a different size never takes the spare
    assert len(small) == 4 + 1 + FRAME_OVERHEAD


def test_failed_frame_exposes_no_plaintext() -> None:
    enc, dec = pair()
    wire = bytearray(enc.encode(FrameType.DATA, 1, b"secret payload"))
    wire[-1] ^= 1
    with pytest.raises(DecryptError):
        dec.feed(wire)
    with pytest.raises(DecryptError):  # stays failed; nothing is ever returned
        dec.feed(b"")


def _resident_kib() -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from /proc")
def test_a_large_frame_costs_what_arrived_not_what_was_announced() -> None:
    """Forty 4 MiB headers with a page behind each: forty pages resident, not
    160 MiB (the buffers are mappings the kernel commits as they are written)."""
    max_frame = 4 * 1024 * 1024
    decoders = [FrameDecoder(CipherState(KEY), max_frame) for _ in range(40)]
    before = _resident_kib()
    for dec in decoders:
        assert dec.feed(struct.pack(">I", max_frame + FRAME_OVERHEAD) + os.urandom(4096)) == []
    grown_kib = _resident_kib() - before
    assert grown_kib < 8 * 1024, f"{grown_kib} KiB resident for 40 headers"
    for dec in decoders:
        dec.close()


def test_a_large_frame_waits_for_its_budget_then_completes() -> None:
    """Its buffer is paid for before the body is read; without room the
    decoder is blocked (nothing charged, the bytes wait), and once room comes
    back the same bytes complete the frame."""
    pool = BytePool(10 * MAX_FRAME)
    hog = pool.budget(limit=20 * MAX_FRAME)
    budget = pool.budget(limit=4 * MAX_FRAME, reserve=0)
    enc = FrameEncoder(CipherState(KEY), MAX_FRAME)
    dec = FrameDecoder(CipherState(KEY), MAX_FRAME, SCRATCH, budget=budget)
    payload = os.urandom(MAX_FRAME)
    wire = bytes(enc.encode(FrameType.DATA, 1, payload))
    hog.charge(10 * MAX_FRAME)  # the pool is dry
    assert dec.feed(wire[:SCRATCH]) == [] and dec.blocked and budget.used == 0
    with pytest.raises(BufferError):  # feeding cannot wait: the caller must stop reading
        dec.feed(wire[SCRATCH:])
    buffer = MAX_FRAME + FRAME_OVERHEAD + FRAME_LENGTH.size + LOOKAHEAD_BYTES  # the record, and room behind it
    hog.release(buffer)
    assert dec.poll() == [] and not dec.blocked
    assert budget.used == buffer  # the whole buffer, paid up front
    frames = dec.feed(wire[SCRATCH:])
    assert [f.payload for f in frames] == [payload]
    # The buffer is kept for the next large frame until the stream pauses.
    assert dec.large_frames == 1 and budget.used == buffer
    assert dec.release_spare() == buffer and budget.used == 0
    assert [f.payload for f in dec.feed(enc.encode(FrameType.DATA, 1, payload))] == [payload]
    dec.close()
    assert budget.used == 0


def _socket_reads(dec: FrameDecoder, wire: bytes) -> tuple[list[Frame], int]:
    """Deliver ``wire`` as a socket with all of it queued does (each read
    fills as much of ``get_buffer`` as there is); the frames and the reads."""
    frames: list[Frame] = []
    reads = pos = 0
    while pos < len(wire):
        buf = dec.get_buffer()
        n = min(len(buf), len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        pos += n
        reads += 1
        if not dec.fill(n):
            frames += dec.buffer_updated(n)
    return frames, reads


def test_a_stream_of_large_frames_takes_one_read_each() -> None:
    """A delta stream's chunks are large frames: after the first, each body
    lands in the frame buffer straight from the socket together with the
    next prefix, in one read (read through the scratch, every frame took two
    reads and a copy of most of its body). Small frames in between still
    come out whole and in order."""
    enc, dec = pair()
    payloads = [os.urandom(3 * SCRATCH) for _ in range(20)] + [b"end", b""] + [os.urandom(2 * SCRATCH)] * 3
    wire = b"".join(enc.encode(FrameType.DATA, 1, p) for p in payloads)
    frames, reads = _socket_reads(dec, wire)
    assert [bytes(f.payload) for f in frames] == payloads
    assert reads <= len(payloads) + 3
    dec.at_eof()
