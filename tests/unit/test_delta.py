from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import blake3
import numpy as np
import pytest

from murmur.errors import ConnectionClosed, DecodeError, LimitExceeded, PeerFault, ReplayError, SignatureError
from murmur.protocol import codecs
from murmur.protocol.codecs import INT8_BLOCK, DeltaCodec
from murmur.protocol.delta import (
    AssemblerLimits,
    DeltaAssembler,
    DeltaSender,
    LandingPool,
    Misaddressed,
    PREFAULT_MIN_BYTES,
    PreparedDelta,
    ReplayGuard,
    SenderMismatch,
    StaleRound,
    signing_input,
)
from murmur.protocol.identity import Identity
from murmur.protocol.messages import DeltaChunk, DeltaEnd, DeltaStart, decode
from tests.sealing import sealed_tail
from tests.clocks import ManualClock

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
CAROL = Identity.from_seed(b"c" * 32)


def delta(n: int = 3 * INT8_BLOCK + 17, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def send(
    array: np.ndarray, codec: DeltaCodec = DeltaCodec.FP32, round: int = 5, chunk_bytes: int = 4096, **kw: Any
) -> tuple[DeltaSender, list[Any]]:
    sender = DeltaSender(ALICE, BOB.peer_id, round, array, codec, chunk_bytes=chunk_bytes, **kw)
    return sender, [decode(b"".join(parts)) for parts in sender]


def feed_all(assembler: DeltaAssembler, msgs: list[Any], sender: Identity = ALICE) -> Any:
    result = None
    for msg in msgs:
        result = assembler.feed(sender.peer_id, msg)
    return result


def forge(payload: bytes, shape: tuple[int, ...], codec: DeltaCodec = DeltaCodec.FP32, round: int = 5) -> list[Any]:
    """Build a correctly signed transfer by hand (independent of DeltaSender),
    so the receiver's value checks can be tested on payloads a sender refuses."""
    digest = blake3.blake3(payload).digest()
    signed = b"murmur-delta-v1" + digest + struct.pack(">Q", round) + ALICE.peer_id.raw + BOB.peer_id.raw
    return [
        DeltaStart(77, round, ALICE.peer_id, BOB.peer_id, codec, "float32", shape, len(payload), {}),
        DeltaChunk(77, 0, payload),
        DeltaEnd(77, digest, ALICE.sign(signed)),
    ]


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("codec", list(DeltaCodec))
def test_round_trip_every_codec(codec: DeltaCodec) -> None:
    x = delta().reshape(-1, 1)  # shape travels too
    sender, msgs = send(x, codec, meta={"kind": "model", "age": 3})
    assert isinstance(msgs[0], DeltaStart) and isinstance(msgs[-1], DeltaEnd)
    chunks = msgs[1:-1]
    assert all(isinstance(c, DeltaChunk) and 0 < len(c.data) <= 4096 for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assembler = DeltaAssembler(BOB.peer_id)
    done = feed_all(assembler, msgs)
    assert done.sender == ALICE.peer_id and done.round == 5 and done.codec is codec
    assert done.array.shape == x.shape and done.array.dtype == np.float32
    assert dict(done.meta) == {"kind": "model", "age": 3}
    payload, _ = codecs.encode(x, codec)
    assert done.content_hash == sender.content_hash == blake3.blake3(payload).digest()
    expected = codecs.decode(bytes(payload), codecs.CodecParams(codec, x.size)).reshape(x.shape)
    np.testing.assert_array_equal(done.array, expected)
    if codec is DeltaCodec.FP32:
        np.testing.assert_array_equal(done.array, x)
    assert assembler.buffered_bytes == 0 and assembler.active() == 0


def test_signature_layout_matches_architecture() -> None:
    h = bytes(range(32))
    data = signing_input(h, 258, ALICE.peer_id, BOB.peer_id)
    assert data == b"murmur-delta-v1" + h + b"\x00" * 6 + b"\x01\x02" + ALICE.peer_id.raw + BOB.peer_id.raw


def test_fp32_result_is_a_view_of_the_assembly_buffer() -> None:
    _, msgs = send(delta())
    assembler = DeltaAssembler(BOB.peer_id)
    feed_all(assembler, msgs[:-1])
    buffer = np.frombuffer(assembler.buffer_view(ALICE.peer_id, msgs[0].transfer_id), np.uint8)
    done = assembler.feed(ALICE.peer_id, msgs[-1])
    assert np.shares_memory(done.array, buffer)


def _sealed_chunks(msgs: list[Any], forged_seq: int | None = None) -> list[Any]:
    """``msgs`` with each chunk's payload as the sealed tail of a split frame."""
    return [replace(msg, data=sealed_tail(bytes(msg.data), forged=msg.seq == forged_seq))
            if isinstance(msg, DeltaChunk) else msg for msg in msgs]


def test_a_sealed_chunk_is_opened_straight_into_the_landing_buffer() -> None:
    array = delta(5000)
    _, msgs = send(array)
    sealed = _sealed_chunks(msgs)
    assembler = DeltaAssembler(BOB.peer_id)
    feed_all(assembler, sealed[:-1])
    assert all(msg.data.opened for msg in sealed if isinstance(msg, DeltaChunk))
    landed = np.frombuffer(assembler.buffer_view(ALICE.peer_id, msgs[0].transfer_id), np.float32)
    assert np.array_equal(landed, array)  # opened in place: nothing else wrote the landing buffer
    done = assembler.feed(ALICE.peer_id, sealed[-1])
    assert np.array_equal(done.array, array) and np.shares_memory(done.array, landed)


def test_a_forged_sealed_chunk_closes_the_connection_and_never_completes() -> None:
    _, msgs = send(delta(5000))
    assembler = DeltaAssembler(BOB.peer_id)
    with pytest.raises(ConnectionClosed):
        feed_all(assembler, _sealed_chunks(msgs, forged_seq=2))
    assert assembler.active(ALICE.peer_id) == 1  # left for the connection's end to abandon (abandon_peer)
    assembler.abandon_peer(ALICE.peer_id)
    assert assembler.buffered_bytes == 0


def test_large_delta_lands_in_a_prefaulted_mapping_that_outlives_the_assembler() -> None:
    array = delta(PREFAULT_MIN_BYTES // 4 + 5)  # just above the threshold: the mmap path
    _, msgs = send(array, chunk_bytes=1024 * 1024)
    assembler = DeltaAssembler(BOB.peer_id)
    feed_all(assembler, msgs[:-1])
    assert assembler.buffered_bytes == array.nbytes
    done = assembler.feed(ALICE.peer_id, msgs[-1])
    del assembler, msgs
    assert done.array.flags.writeable and np.array_equal(done.array, array)
    done.array[0] += 1.0  # the node may update it in place
    assert done.array[0] == array[0] + 1.0


def test_landing_buffers_are_reused_only_once_results_are_dropped() -> None:
    """A held result is never overwritten by a later delta; a dropped one's
    memory is reused (warm) for the next delta of the same size."""
    assembler = DeltaAssembler(BOB.peer_id)
    first_array, second_array = delta(5000, seed=1), delta(5000, seed=2)
    held = feed_all(assembler, send(first_array, round=1)[1])
    second = feed_all(assembler, send(second_array, round=2)[1])
    assert not np.shares_memory(held.array, second.array)
    assert np.array_equal(held.array, first_array) and np.array_equal(second.array, second_array)
    address = second.array.__array_interface__["data"][0]
    del second
    third_array = delta(5000, seed=3)
    third = feed_all(assembler, send(third_array, round=3)[1])
    assert third.array.__array_interface__["data"][0] == address  # the dropped one's buffer
    assert np.array_equal(third.array, third_array) and np.array_equal(held.array, first_array)


def test_landing_pool_tracks_at_most_its_budget() -> None:
    pool = LandingPool(max_bytes=3000)
    views = [pool.take(1000) for _ in range(5)]  # all in use: only three tracked
    assert pool.tracked_bytes == 3000
    del views
    pool.take(2000)  # free ones are dropped to make room
    assert pool.tracked_bytes <= 3000


def test_empty_delta_is_fine() -> None:
    done = feed_all(DeltaAssembler(BOB.peer_id), send(np.zeros(0, np.float32))[1])
    assert done.array.shape == (0,)


def test_sender_refuses_non_finite_before_sending_anything() -> None:
    x = delta()
    x[10] = np.nan
    with pytest.raises(ValueError):
        DeltaSender(ALICE, BOB.peer_id, 1, x, DeltaCodec.FP32)


# --------------------------------------------------------------------------- integrity


def test_tampered_chunk_is_a_hash_mismatch() -> None:
    _, msgs = send(delta())
    bad = bytearray(msgs[2].data)
    bad[100] ^= 1
    msgs[2] = replace(msgs[2], data=bytes(bad))
    assembler = DeltaAssembler(BOB.peer_id)
    with pytest.raises(SignatureError, match="hash"):
        feed_all(assembler, msgs)
    assert assembler.buffered_bytes == 0


def test_tampered_hash_and_chunk_together_fail_the_signature() -> None:
    _, msgs = send(delta())
    payload = b"".join(m.data for m in msgs[1:-1])
    forged = bytearray(payload)
    forged[0] ^= 1
    msgs[1:-1] = [DeltaChunk(msgs[0].transfer_id, 0, bytes(forged))]
    msgs[-1] = replace(msgs[-1], content_hash=blake3.blake3(forged).digest())
    with pytest.raises(SignatureError):
        feed_all(DeltaAssembler(BOB.peer_id), msgs)


def test_tampered_round_fails_the_signature() -> None:
    _, msgs = send(delta(), round=5)
    msgs[0] = replace(msgs[0], round=6)
    with pytest.raises(SignatureError):
        feed_all(DeltaAssembler(BOB.peer_id), msgs)


def test_redirected_to_another_recipient_fails_the_signature() -> None:
    # Alice signed for Bob; someone rewrites the recipient and feeds it to Carol.
    _, msgs = send(delta())
    msgs[0] = replace(msgs[0], recipient=CAROL.peer_id)
    with pytest.raises(SignatureError):
        feed_all(DeltaAssembler(CAROL.peer_id), msgs)


def test_signature_by_someone_else_is_rejected() -> None:
    _, msgs = send(delta())
    end = msgs[-1]
    msgs[-1] = replace(end, signature=CAROL.sign(signing_input(end.content_hash, 5, ALICE.peer_id, BOB.peer_id)))
    with pytest.raises(SignatureError):
        feed_all(DeltaAssembler(BOB.peer_id), msgs)


def test_wrong_recipient_is_rejected_at_start() -> None:
    _, msgs = send(delta())
    assembler = DeltaAssembler(CAROL.peer_id)
    with pytest.raises(Misaddressed):
        assembler.feed(ALICE.peer_id, msgs[0])
    assert assembler.buffered_bytes == 0


def test_sender_field_must_match_the_authenticated_peer() -> None:
    _, msgs = send(delta())
    with pytest.raises(SenderMismatch):
        DeltaAssembler(BOB.peer_id).feed(CAROL.peer_id, msgs[0])


# --------------------------------------------------------------------------- replay


def test_replay_of_a_full_valid_delta_is_rejected() -> None:
    _, msgs = send(delta())
    assembler = DeltaAssembler(BOB.peer_id)
    assert feed_all(assembler, msgs) is not None
    with pytest.raises(ReplayError):
        feed_all(assembler, msgs)
    assert assembler.buffered_bytes == 0


def test_same_round_different_content_is_not_a_replay() -> None:
    assembler = DeltaAssembler(BOB.peer_id)
    feed_all(assembler, send(delta(seed=1))[1])
    assert feed_all(assembler, send(delta(seed=2))[1]) is not None


def test_rounds_below_the_floor_are_rejected_before_allocation() -> None:
    guard = ReplayGuard(window=16, round_floor=10)
    assembler = DeltaAssembler(BOB.peer_id, replay_guard=guard)
    with pytest.raises(StaleRound):
        assembler.feed(ALICE.peer_id, send(delta(), round=9)[1][0])
    assert assembler.buffered_bytes == 0
    assert feed_all(assembler, send(delta(), round=10)[1]) is not None


def test_a_solicited_answer_skips_the_replay_guard_and_nothing_else() -> None:
    """A peer asked twice for a model that has not moved answers twice with the
    same signed bytes, and its round may be below our floor: both answers are
    accepted. Unsolicited transfers still meet the guard, and a solicited one
    still needs a valid signature."""
    guard = ReplayGuard(window=16, round_floor=10)
    asked = {"model"}
    assembler = DeltaAssembler(BOB.peer_id, replay_guard=guard, solicited=lambda start: start.meta.get("kind") in asked)
    answer = send(delta(), round=7, meta={"kind": "model"})[1]
    assert feed_all(assembler, answer) is not None
    assert feed_all(assembler, answer) is not None  # the same bytes again: no ReplayError
    assert len(guard) == 0  # nor remembered
    with pytest.raises(StaleRound):
        assembler.feed(ALICE.peer_id, send(delta(), round=7, meta={"kind": "round"})[1][0])
    round_msgs = send(delta(), round=11, meta={"kind": "round"})[1]
    feed_all(assembler, round_msgs)
    with pytest.raises(ReplayError):
        feed_all(assembler, round_msgs)
    forged = send(delta(), round=7, meta={"kind": "model"})[1]
    forged[-1] = replace(forged[-1], signature=bytes(64))
    with pytest.raises(SignatureError):
        feed_all(assembler, forged)
    asked.clear()  # the request was answered: the same answer is now a replay below the floor
    with pytest.raises(StaleRound):
        assembler.feed(ALICE.peer_id, answer[0])
    assert assembler.buffered_bytes == 0


def test_replay_guard_window_is_bounded_and_floor_forgets() -> None:
    guard = ReplayGuard(window=3)
    for r in range(5):
        guard.remember(ALICE.peer_id, r, b"h")
    assert len(guard) == 3
    guard.check(ALICE.peer_id, 0, b"h")  # evicted from the window (the floor must cover it)
    with pytest.raises(ReplayError):
        guard.check(ALICE.peer_id, 4, b"h")
    guard.raise_floor(4)
    assert len(guard) == 1
    with pytest.raises(StaleRound):
        guard.check(ALICE.peer_id, 3, b"other")
    guard.raise_floor(2)  # never lowers
    assert guard.round_floor == 4


# --------------------------------------------------------------------------- limits and stream shape


def test_oversized_nbytes_is_refused_before_allocation() -> None:
    # 2^60 bytes: allocating it would raise MemoryError, so reaching LimitExceeded proves no allocation
    count = 1 << 58
    start = DeltaStart(1, 5, ALICE.peer_id, BOB.peer_id, DeltaCodec.FP32, "float32", (count,), 4 * count, {})
    assembler = DeltaAssembler(BOB.peer_id, AssemblerLimits(max_delta_bytes=1 << 20))
    with pytest.raises(LimitExceeded):
        assembler.feed(ALICE.peer_id, start)
    assert assembler.buffered_bytes == 0 and assembler.active() == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"nbytes": 4 * 100 + 1},  # inconsistent with shape under fp32
        {"codec": DeltaCodec.FP16},  # fp16 of 100 values is 200 bytes
        {"shape": (10, 11)},
        {"dtype": "float64"},
    ],
)
def test_start_inconsistent_with_codec_is_decode_error(changes: dict[str, Any]) -> None:
    start = DeltaStart(1, 5, ALICE.peer_id, BOB.peer_id, DeltaCodec.FP32, "float32", (100,), 400, {})
    with pytest.raises(DecodeError):
        DeltaAssembler(BOB.peer_id).feed(ALICE.peer_id, replace(start, **changes))


def test_int8_start_size_includes_scales() -> None:
    n = INT8_BLOCK + 1
    start = DeltaStart(1, 5, ALICE.peer_id, BOB.peer_id, DeltaCodec.INT8, "float32", (n,), n + 8, {})
    assembler = DeltaAssembler(BOB.peer_id)
    assembler.feed(ALICE.peer_id, start)
    assert assembler.buffered_bytes == n + 8


def test_out_of_order_chunk_is_decode_error_and_frees_the_transfer() -> None:
    _, msgs = send(delta())
    assembler = DeltaAssembler(BOB.peer_id)
    assembler.feed(ALICE.peer_id, msgs[0])
    assert assembler.buffered_bytes == msgs[0].nbytes
    with pytest.raises(DecodeError, match="order"):
        assembler.feed(ALICE.peer_id, msgs[2])
    assert assembler.buffered_bytes == 0 and assembler.active() == 0
    with pytest.raises(DecodeError):  # the rest of the stream now has no transfer
        assembler.feed(ALICE.peer_id, msgs[1])


def test_duplicated_chunk_is_decode_error() -> None:
    _, msgs = send(delta())
    with pytest.raises(DecodeError):
        feed_all(DeltaAssembler(BOB.peer_id), [msgs[0], msgs[1], msgs[1]])


def test_chunk_overrunning_nbytes_is_decode_error() -> None:
    _, msgs = send(delta(10), chunk_bytes=1024)
    msgs[1] = replace(msgs[1], data=bytes(msgs[1].data) + b"\x00\x00\x00\x00")
    with pytest.raises(DecodeError, match="overrun"):
        feed_all(DeltaAssembler(BOB.peer_id), msgs)


def test_end_before_all_bytes_is_decode_error() -> None:
    _, msgs = send(delta())
    with pytest.raises(DecodeError):
        feed_all(DeltaAssembler(BOB.peer_id), [msgs[0], msgs[1], msgs[-1]])


def test_duplicate_transfer_id_is_decode_error() -> None:
    _, msgs = send(delta())
    assembler = DeltaAssembler(BOB.peer_id)
    assembler.feed(ALICE.peer_id, msgs[0])
    with pytest.raises(DecodeError):
        assembler.feed(ALICE.peer_id, msgs[0])


def test_too_many_concurrent_transfers_per_peer() -> None:
    assembler = DeltaAssembler(BOB.peer_id, AssemblerLimits(max_concurrent_per_peer=2))
    streams = [send(delta(100, seed=i), transfer_id=i)[1] for i in range(3)]
    assembler.feed(ALICE.peer_id, streams[0][0])
    assembler.feed(ALICE.peer_id, streams[1][0])
    with pytest.raises(LimitExceeded):
        assembler.feed(ALICE.peer_id, streams[2][0])
    assert assembler.active(ALICE.peer_id) == 2
    # interleaved transfers still complete independently, and free their slot
    for a, b in zip(streams[0][1:], streams[1][1:]):
        assembler.feed(ALICE.peer_id, b)
        assembler.feed(ALICE.peer_id, a)
    assert assembler.active() == 0
    assert feed_all(assembler, streams[2]) is not None


def test_total_buffer_budget_across_peers_refuses_quietly() -> None:
    """A start that meets a full node-wide budget is refused, and what follows
    it dropped, without a fault: within its own allowance the sender did
    nothing wrong. (It was a LimitExceeded, then its chunks were DecodeErrors
    that dropped the connection: strangers filling the budget got an honest
    neighbour penalised, dropped and banned.) Its next transfer is taken."""
    limits = AssemblerLimits(max_total_buffered_bytes=600)
    assembler = DeltaAssembler(BOB.peer_id, limits)
    first = send(delta(100))[1]
    assembler.feed(ALICE.peer_id, first[0])  # 400 bytes
    carol = [decode(b"".join(parts)) for parts in DeltaSender(CAROL, BOB.peer_id, 5, delta(100), DeltaCodec.FP32)]
    for msg in carol:
        assert assembler.feed(CAROL.peer_id, msg) is None
    assert assembler.buffered_bytes == 400 and assembler.refused_for_room == 1
    assert feed_all(assembler, first[1:]) is not None  # Alice's transfer completes, and frees the room
    again = [decode(b"".join(parts)) for parts in DeltaSender(CAROL, BOB.peer_id, 6, delta(100), DeltaCodec.FP32)]
    assert feed_all(assembler, again, CAROL) is not None


def test_what_follows_a_refused_start_is_dropped_not_faulted() -> None:
    assembler = DeltaAssembler(BOB.peer_id)
    _, msgs = send(delta(100), round=5)
    bad = replace(msgs[0], recipient=CAROL.peer_id)
    with pytest.raises(PeerFault):
        assembler.feed(ALICE.peer_id, bad)
    assert all(assembler.feed(ALICE.peer_id, msg) is None for msg in msgs[1:])
    with pytest.raises(DecodeError, match="no transfer"):  # an end nobody started is still a fault
        assembler.feed(ALICE.peer_id, msgs[-1])


def test_limit_exceeded_does_not_ask_to_drop_the_connection() -> None:
    assert LimitExceeded.drop is False and issubclass(LimitExceeded, PeerFault)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "codec, payload",
    [
        (DeltaCodec.FP32, np.array([1.0, np.nan], np.float32).tobytes()),
        (DeltaCodec.FP32, np.array([np.inf, 0.0], np.float32).tobytes()),
        (DeltaCodec.FP16, np.array([1.0, np.inf], np.float16).tobytes()),
        (DeltaCodec.BF16, b"\x80\x3f\xc0\x7f"),  # 1.0, nan
    ],
)
def test_non_finite_values_are_decode_errors_even_when_signed(codec: DeltaCodec, payload: bytes) -> None:
    assembler = DeltaAssembler(BOB.peer_id)
    with pytest.raises(DecodeError):
        feed_all(assembler, forge(payload, (2,), codec))
    assert assembler.replay_guard.round_floor == 0 and len(assembler.replay_guard) == 0


def test_a_non_finite_fp32_value_ends_the_transfer_at_its_chunk() -> None:
    """FP32 values are checked as their chunks land (while in cache), so the
    transfer ends with the chunk that completes a NaN, here one straddling two
    chunks, not after every byte arrived; its buffer is freed at once."""
    payload = np.array([1.0, 2.0, np.nan, 4.0], np.float32).tobytes()
    start, _, end = forge(payload, (4,))
    chunks = [DeltaChunk(77, seq, payload[offset : offset + 6]) for seq, offset in enumerate(range(0, 16, 6))]
    assembler = DeltaAssembler(BOB.peer_id)
    assembler.feed(ALICE.peer_id, start)
    assembler.feed(ALICE.peer_id, chunks[0])  # 1.0 and half of 2.0
    with pytest.raises(DecodeError):
        assembler.feed(ALICE.peer_id, chunks[1])  # 2.0 and the NaN complete here
    assert assembler.active() == 0 and assembler.buffered_bytes == 0
    with pytest.raises(DecodeError):  # what follows belongs to no transfer any more
        assembler.feed(ALICE.peer_id, end)


def test_forged_valid_payload_is_accepted() -> None:
    # the forge helper itself is correct: the same path with finite values succeeds
    done = feed_all(DeltaAssembler(BOB.peer_id), forge(np.array([1.5, -2.0], np.float32).tobytes(), (2,)))
    assert done.array.tolist() == [1.5, -2.0]


# --------------------------------------------------------------------------- abort / timeout


def test_abandon_and_peer_disconnect_free_memory() -> None:
    assembler = DeltaAssembler(BOB.peer_id)
    s1, s2 = send(delta(100), transfer_id=1)[1], send(delta(100), transfer_id=2)[1]
    assembler.feed(ALICE.peer_id, s1[0])
    assembler.feed(ALICE.peer_id, s2[0])
    assert assembler.buffered_bytes == 800
    assert assembler.abandon(ALICE.peer_id, 1) is True
    assert assembler.abandon(ALICE.peer_id, 1) is False
    assert assembler.buffered_bytes == 400
    assert assembler.abandon_peer(ALICE.peer_id) == 1
    assert assembler.buffered_bytes == 0


def test_idle_transfers_expire() -> None:
    clock = ManualClock(1000.0)
    assembler = DeltaAssembler(BOB.peer_id, AssemblerLimits(transfer_timeout_s=30), clock=clock)
    slow, fast = send(delta(100), transfer_id=1)[1], send(delta(100), transfer_id=2)[1]
    assembler.feed(ALICE.peer_id, slow[0])
    assembler.feed(ALICE.peer_id, fast[0])
    clock.now += 20
    assembler.feed(ALICE.peer_id, fast[1])  # activity keeps it alive
    clock.now += 15
    assert assembler.expire() == [(ALICE.peer_id, 1)]
    assert assembler.active() == 1 and assembler.buffered_bytes == 400
    assert feed_all(assembler, fast[2:]) is not None


@pytest.mark.parametrize("codec", list(DeltaCodec))
def test_a_prepared_delta_is_signed_per_recipient_and_equals_the_streamed_one(codec: DeltaCodec) -> None:
    """A node sends one round message to every neighbour: encoded and hashed
    once, then signed for each. What each recipient assembles is exactly what
    a sender given the array would have delivered, and the signature binds the
    recipient: Bob's copy is refused by Carol."""
    x = delta()
    prepared = PreparedDelta.prepare(x, codec)
    streamed, streamed_msgs = send(x, codec)
    for recipient in (BOB, CAROL):
        sender = DeltaSender(ALICE, recipient.peer_id, 5, prepared, chunk_bytes=4096)
        msgs = [decode(b"".join(parts)) for parts in sender]
        done = feed_all(DeltaAssembler(recipient.peer_id), msgs)
        assert done is not None and done.codec is codec
        assert sender.content_hash == prepared.content_hash == streamed.content_hash == done.content_hash
        np.testing.assert_array_equal(done.array, feed_all(DeltaAssembler(BOB.peer_id), streamed_msgs).array)
    bobs = [decode(b"".join(parts)) for parts in DeltaSender(ALICE, BOB.peer_id, 5, prepared)]
    with pytest.raises(Misaddressed):
        feed_all(DeltaAssembler(CAROL.peer_id), bobs)


def test_preparing_a_non_finite_delta_fails_before_any_message() -> None:
    x = delta()
    x[7] = np.nan
    with pytest.raises(ValueError):
        PreparedDelta.prepare(x, DeltaCodec.FP32)
