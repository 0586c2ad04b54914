"""How many model-sized tensors the round engine keeps, between rounds and
in an open round, with SybilWall and k neighbours.

At real model sizes every model copy the engine keeps is a model's worth of
a node's memory (a user's 3.6 M-parameter model, 14 MB, ran at 1.05-1.23 GB
a daemon). These tests count the distinct storages of at least half a model
reachable from the engine, its aggregator and its pending round (the
trainer's own model excluded: it is the trainer's), so a copy kept by
mistake shows up as a count, not as a slow drift in a benchmark."""

from __future__ import annotations

import ctypes
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from murmur.learning import sketch
from murmur.learning.aggregators import coordinate_bound, get_aggregator, median, sybilwall
from murmur.learning.footprint import model_sized
from murmur.learning.rounds import RoundConfig, RoundEngine
from murmur.learning.trainers.base import TrainerContext
from tests.trainers import VectorTrainer
from tests.unit.test_heap import GLIBC

SIZE = 100_000  # 400 KB: far above SybilWall's sketches (128 KB), so only model-sized buffers count
MODEL_BYTES = 4 * SIZE
ROUNDS = 3


def _engine(size: int = SIZE) -> RoundEngine:
    trainer = VectorTrainer(TrainerContext(node_index=0, num_nodes=2, seed=3, options={"size": size}))
    return RoundEngine(trainer, get_aggregator("sybilwall"), RoundConfig(local_steps=1))


def _held(engine: RoundEngine, *exclude: torch.Tensor) -> int:
    """Model-sized storages the engine holds, apart from its trainer's and ``exclude``'s."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    return len(model_sized(engine, MODEL_BYTES, {id(engine.trainer)}) - excluded)


def _run(engine: RoundEngine, k: int, rounds: int) -> None:
    """``rounds`` rounds with ``k`` neighbours whose messages are random increments."""
    gen = torch.Generator().manual_seed(7)
    peers = {f"peer{i}": k for i in range(k)}
    for _ in range(rounds):
        round_ = engine.round
        engine.begin_round(peers)
        for peer in peers:
            engine.offer(peer, round_, torch.randn(engine.num_params, generator=gen) * 0.01)
        engine.finish_round()


def _held_in_open_round(k: int) -> int:
    engine = _engine()
    _run(engine, k, ROUNDS)
    gen = torch.Generator().manual_seed(8)
    peers = {f"peer{i}": k for i in range(k)}
    round_ = engine.round
    message = engine.begin_round(peers)
    for peer in peers:
        engine.offer(peer, round_, torch.randn(SIZE, generator=gen) * 0.01)
    return _held(engine, message.increment)


def test_each_neighbour_costs_one_model_copy_in_an_open_round() -> None:
    """A neighbour's message advances its replica and is scored through the
    replica's snapshot: the increment itself was kept too, one more model per
    neighbour for the whole round."""
    assert _held_in_open_round(4) - _held_in_open_round(2) == 2


def test_between_rounds_the_engine_keeps_one_reference_not_three() -> None:
    """Between rounds: the public model, the reference, the consensus step,
    the initial model and one replica per neighbour. Past references are for
    gossiped records, which carry sketches: two more whole models were kept
    for them."""
    k = 2
    engine = _engine()
    _run(engine, k, ROUNDS)
    assert _held(engine) == 4 + k


def test_an_open_round_keeps_no_zero_consensus_step() -> None:
    """Opening a round publishes the consensus step in its message; the
    engine then keeps its own clean update for the round, and nothing else
    new: a fresh zero consensus step was held all round (the message is the
    driver's, and excluded here)."""
    k = 2
    engine = _engine()
    _run(engine, k, ROUNDS)
    between = _held(engine)
    message = engine.begin_round({f"peer{i}": k for i in range(k)})
    assert _held(engine, message.increment) == between  # the consensus step gone, the clean update kept


def _live_model_sized() -> int:
    """Model-sized storages alive in the whole process (gc sees every tensor object)."""
    return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                if issubclass(type(o), torch.Tensor) and o.untyped_storage().nbytes() >= MODEL_BYTES // 2})


def _engine_with_an_open_round(k: int, size: int = SIZE) -> RoundEngine:
    """An engine past ROUNDS rounds, its next one open with every neighbour's
    message in (its own message dropped, as a driver does once it is sent)."""
    engine = _engine(size)
    _run(engine, k, ROUNDS)
    _open_round(engine, k, size)
    return engine


def _open_round(engine: RoundEngine, k: int, size: int) -> None:
    """Open ``engine``'s next round with a message in from each of ``k`` neighbours."""
    gen = torch.Generator().manual_seed(9)
    peers = {f"peer{i}": k for i in range(k)}
    round_ = engine.round
    engine.begin_round(peers)
    for peer in peers:
        engine.offer(peer, round_, torch.randn(size, generator=gen) * 0.01)
    gc.collect()


def test_the_coordinate_bound_adds_no_model_copy_per_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a round's peak the engine holds each neighbour's offset from the
    reference (SybilWall scores them); the coordinate bound wrote its
    bounded offsets into fresh tensors next to them, one more model per
    neighbour (8 neighbours: 8 of the peak's ~27 models)."""
    k = 4
    engine = _engine_with_an_open_round(k)
    before = _live_model_sized()
    seen: list[int] = []
    real = sybilwall.bound_offsets

    def counting(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        out = real(*args, **kwargs)
        seen.append(_live_model_sized())
        return out

    monkeypatch.setattr(sybilwall, "bound_offsets", counting)
    engine.finish_round()
    # Besides what the open round held: our own offset, one offset per neighbour (at most our half step too).
    assert seen and seen[0] - before <= 2 + k


def test_our_half_step_is_not_held_while_neighbours_are_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The round's peak is while every neighbour's offset is scored and
    bounded; our private half step x + Δ is needed only once the weights are
    known, and was made before (one model more at the peak)."""
    k = 4
    engine = _engine_with_an_open_round(k)
    before = _live_model_sized()
    seen: list[int] = []
    real = engine.aggregator.weigh

    def counting(*args: Any, **kwargs: Any) -> dict[str, float]:
        seen.append(_live_model_sized())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.aggregator, "weigh", counting)
    engine.finish_round()
    assert seen and seen[0] - before == 1 + k  # our own offset and one per neighbour


def _peak_allocated(step: Callable[[], object], trace: Path) -> float:
    """The most bytes torch's CPU allocator held at once while ``step`` ran,
    above what it held when it began, in bytes. Every allocation and free
    counts, the transients inside one call too (a count of live tensors at
    chosen points misses those): torch's profiler records each one, as a
    ``[memory]`` event of its trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def test_a_round_close_peaks_at_the_offsets_plus_two_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """While a round closes, the engine needs our own offset and each
    neighbour's (SybilWall scores them, the bound clamps them into the mixed
    models), and one model more: the coordinate bound's typical pull. The
    bound kept three whole-model medians, and the weighted sum a scratch
    vector and our half step next to the k mixed models: about k + 4.5
    models at the peak here (k + 5 at 10M parameters, bench/memory.py),
    k + 2 and the chunks' temporaries now. A model of 1M parameters and
    chunks of 1/64 of it, as they are against a real model (10M: a bound's
    chunk is 1/38 of it), keep SybilWall's sketches (128 KB) and the
    chunks' temporaries from weighing like models."""
    size = 1_000_000
    monkeypatch.setattr(coordinate_bound, "CHUNK", size // 64)
    monkeypatch.setattr(sketch, "CHUNK", size // 64)
    k = 4
    engine = _engine_with_an_open_round(k, size)
    peak = _peak_allocated(engine.finish_round, tmp_path / "trace.json") / (4 * size)
    assert peak <= k + 3, peak


def _heap_resident() -> int:
    """Resident bytes of the main C heap (``[heap]`` in /proc/self/smaps)."""
    resident, in_heap = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:
            in_heap = fields[-1] == "[heap]"
        elif in_heap and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


@pytest.mark.skipif(not GLIBC, reason="glibc's heap only")  # CI (Debian, glibc 2.36) runs it; mallinfo2 is 2.33+
def test_a_closed_round_leaves_no_free_heap_pages_resident() -> None:
    """A model below glibc's largest mmap threshold (32 MB: 8M parameters)
    lives in the heap once a freed one has raised the threshold, and so do a
    round's chunk temporaries at any size; freed, they leave holes the heap
    keeps resident between rounds. Closing a round hands them back: here
    (2M parameters, 4 neighbours) ~8 models of free heap stayed resident."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    size = 2_000_000
    engine = _engine(size)
    gc.collect()  # earlier tests' garbage, freed now rather than by a collection after the last round
    gc.disable()
    try:
        _run(engine, 4, ROUNDS)
    finally:
        gc.enable()
    free_resident = _heap_resident() - libc.mallinfo2().uordblks
    assert free_resident < 4 * size, free_resident / (4 * size)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: ``uordblks`` is the heap's bytes in use."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_a_median_round_holds_no_sorted_stack_of_the_candidates(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The median sorted the candidates' whole stack: the stack, its sorted
    copy and the sort's int64 indices, 4 (k + 1) models on top of the k
    offsets the engine hands it (here, k = 4: 26.0 models at the peak).
    Sorted a chunk of coordinates at a time it needs the offsets, the zero
    own offset and its result (6.6 models; 11.0 at k = 8, against 46.0)."""
    size = 1_000_000
    monkeypatch.setattr(median, "CHUNK", size // 64)
    k = 4
    trainer = VectorTrainer(TrainerContext(node_index=0, num_nodes=2, seed=3, options={"size": size}))
    engine = RoundEngine(trainer, get_aggregator("median"), RoundConfig(local_steps=1))
    _run(engine, k, 1)
    _open_round(engine, k, size)
    peak = _peak_allocated(engine.finish_round, tmp_path / "trace.json") / (4 * size)
    assert peak <= k + 3, peak
