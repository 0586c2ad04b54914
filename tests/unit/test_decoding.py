"""OffLoopDecoder: received payloads decode in a worker thread, a bounded number at once."""

from __future__ import annotations

import asyncio
import struct
import threading

import blake3
import numpy as np
import pytest

from murmur.errors import DecodeError
from murmur.node.decoding import OffLoopDecoder
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.delta import CompletedDelta, DeltaAssembler, VerifiedDelta
from murmur.protocol.identity import Identity
from murmur.protocol.messages import DeltaChunk, DeltaEnd, DeltaStart
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import RoundFormat, Sparsifier

ALICE = Identity.generate()
BOB = Identity.generate()
D = 50_000


def verified_round(fmt: RoundFormat, codec: DeltaCodec) -> tuple[CompletedDelta, DeltaAssembler, VerifiedDelta, np.ndarray, np.ndarray]:
    """A random-k round message from ALICE to BOB, signed by hand and fed
    through BOB's assembler up to the decode."""
    layout = TransferLayout.for_model(D, 1, fmt)
    mask = fmt.mask(D, 0, ALICE.peer_id.raw)
    values = np.linspace(-1, 1, fmt.count(D), dtype=np.float32)
    payload = bytes(fmt.encode(mask, values, codec, D)[0])
    digest = blake3.blake3(payload).digest()
    signed = b"murmur-delta-v1" + digest + struct.pack(">Q", 0) + ALICE.peer_id.raw + BOB.peer_id.raw
    assembler = DeltaAssembler(BOB.peer_id, layout=layout)
    for msg in (DeltaStart(7, 0, ALICE.peer_id, BOB.peer_id, codec, "float32", (1, D), len(payload),
                           layout.meta(TransferKind.ROUND)),
                DeltaChunk(7, 0, payload)):
        assert assembler.feed_verified(ALICE.peer_id, msg) is None
    verified = assembler.feed_verified(ALICE.peer_id, DeltaEnd(7, digest, ALICE.sign(signed)))
    assert verified is not None
    return assembler, verified, mask, values


async def test_a_random_k_payload_decodes_in_a_worker_thread_to_what_feed_decodes() -> None:
    fmt = RoundFormat(Sparsifier.RANDK, 0.5, seed=3)
    assembler, verified, mask, vals = verified_round(fmt, DeltaCodec.FP32)
    assert verified.costly
    seen: list[int] = []
    decoder = OffLoopDecoder()

    def spy() -> CompletedDelta:
        seen.append(threading.get_ident())
        return verified.decode()

    done = await decoder.run(spy)
    assert seen and seen[0] != threading.get_ident()
    expected = np.zeros(D, np.float32)
    expected[mask] = vals
    np.testing.assert_array_equal(done.array.reshape(-1), expected)
    assembler.accept(verified)
    assert len(assembler.replay_guard) == 1


async def test_at_most_workers_decodes_in_flight_even_when_callers_are_cancelled() -> None:
    decoder = OffLoopDecoder(workers=1)
    release = threading.Event()
    running = threading.Semaphore(0)
    concurrent = [0, 0]  # now, most
    lock = threading.Lock()

    def work() -> int:
        with lock:
            concurrent[0] += 1
            concurrent[1] = max(concurrent)
        running.release()
        release.wait(10)
        with lock:
            concurrent[0] -= 1
        return 1

    first = asyncio.create_task(decoder.run(work))
    await asyncio.to_thread(running.acquire, True, 10)  # the first decode runs
    second = asyncio.create_task(decoder.run(work))
    await asyncio.sleep(0)
    first.cancel()  # its connection closed: the thread still runs, and still holds the slot
    with pytest.raises(asyncio.CancelledError):
        await first
    assert decoder.in_flight == 1 and not running.acquire(timeout=0.2)  # the second waits for the slot
    release.set()
    assert await second == 1
    assert concurrent[1] == 1 and decoder.most_in_flight == 1 and decoder.in_flight == 0


async def test_a_payload_that_does_not_decode_is_a_decode_error_and_is_not_remembered() -> None:
    fmt = RoundFormat(Sparsifier.RANDK, 0.5, seed=3)
    assembler, verified, _, _ = verified_round(fmt, DeltaCodec.FP32)
    bad = np.frombuffer(verified.payload, dtype=np.float32)
    bad[3] = np.nan  # the landing buffer: what a NaN on the wire would have put there
    with pytest.raises(DecodeError):
        await OffLoopDecoder().decode(verified)
    assert len(assembler.replay_guard) == 0


async def test_an_urgent_decode_overtakes_deferred_ones_and_a_cancelled_waiter_passes_its_turn_on() -> None:
    """One slot, busy. Two deferred jobs (neighbours' rounds far ahead) queue,
    then an urgent one (a message for our round): the urgent runs next, then
    the deferred in their order; a waiter cancelled in the queue is skipped,
    and the slot is free again at the end (a FIFO slot ran the urgent job
    last, behind every far-ahead decode already waiting)."""
    decoder = OffLoopDecoder(workers=1)
    gate = threading.Event()
    order: list[str] = []

    def job(name: str):  # noqa: ANN202 - a work callable
        def work() -> str:
            if name == "busy":
                gate.wait(10)
            order.append(name)
            return name
        return work

    busy = asyncio.create_task(decoder.run(job("busy")))
    while decoder.in_flight == 0:
        await asyncio.sleep(0)
    late = [asyncio.create_task(decoder.run(job(f"far{i}"), urgent=False)) for i in range(3)]
    await asyncio.sleep(0)
    gone = late.pop(1)  # far1: its connection closed while it waited
    gone.cancel()
    urgent = asyncio.create_task(decoder.run(job("ours")))
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(busy, urgent, *late) == ["busy", "ours", "far0", "far2"]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert order == ["busy", "ours", "far0", "far2"]
    assert decoder.in_flight == 0
    assert await asyncio.wait_for(decoder.run(job("after"), urgent=False), 5) == "after"  # the slot came back


async def test_a_deferred_decode_runs_at_once_when_nothing_waits() -> None:
    decoder = OffLoopDecoder(workers=1)
    assert await asyncio.wait_for(decoder.run(lambda: 7, urgent=False), 5) == 7
    assert decoder.in_flight == 0
