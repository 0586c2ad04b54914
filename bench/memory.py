"""Benchmark: a round engine's memory in units of the model's fp32 size S.

Memory per node grows with the model: every model-sized buffer the engine
keeps (public model, reference, consensus step, replicas, the round's
offsets...) is another S. This drives one RoundEngine (SybilWall, a
VectorTrainer of ``--params`` float32 parameters) through rounds with ``k``
neighbours whose messages are random increments, and prints, per k:

* steady: model-sized tensors the engine holds between rounds (its
  trainer's excluded), counted through gc (tracemalloc does not see torch
  storages), and the process's RSS above its start, in S;
* peak: the process's peak RSS within a round above its start, in S (the
  kernel's high-water mark, reset before each round);
* ratio: peak against the baseline measured in the same run, the trainer
  alone through one local update (its model, its data, the update's
  temporaries).

At 10M parameters a model buffer (40 MB) is above glibc's largest mmap
threshold, so it is mapped and unmapped whole and RSS follows the live
tensors; at a few million parameters freed models stay in the heap and RSS
also counts its fragmentation.

    .venv/bin/python bench/memory.py [--params 10000000] [--neighbours 2 4 8] [--rounds 3]

Prints a human line per figure and, last, one JSON object. About a minute
on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.trainers: the vector trainer the tests plug in

from murmur.learning.aggregators import get_aggregator  # noqa: E402
from murmur.learning.footprint import model_sized  # noqa: E402
from murmur.learning.rounds import RoundConfig, RoundEngine  # noqa: E402
from murmur.learning.trainers.base import TrainerContext  # noqa: E402
from tests.trainers import VectorTrainer  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # clear_refs: reset the peak RSS (VmHWM) to the current RSS


def rss() -> int:
    """Resident bytes now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def peak_rss() -> int:
    """Resident high-water mark since the last reset, in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    CLEAR_REFS.write_text(RESET_PEAK)


def peak_of(step: Callable[[], object]) -> int:
    """Peak RSS in bytes while ``step`` runs."""
    reset_peak()
    step()
    return peak_rss()


def trainer(params: int) -> VectorTrainer:
    return VectorTrainer(TrainerContext(node_index=0, num_nodes=2, seed=1, options={"size": params}))


def run_trainer(params: int, start: int) -> tuple[float, float]:
    """The baseline: the trainer alone, steady and peak through one local update, in S."""
    size = 4 * params
    alone = trainer(params)
    peak = (peak_of(lambda: alone.train(1)) - start) / size
    return (rss() - start) / size, peak


def run_engine(params: int, k: int, rounds: int, start: int) -> dict[str, float]:
    """Steady and peak memory of one engine with ``k`` neighbours, in S."""
    size = 4 * params
    engine = RoundEngine(trainer(params), get_aggregator("sybilwall"), RoundConfig(local_steps=1))
    gen = torch.Generator().manual_seed(k)
    peers = {f"peer{i}": k for i in range(k)}

    def one_round() -> None:
        round_ = engine.round
        engine.begin_round(peers)  # the message dropped, as a driver does once it is sent
        for peer in peers:
            engine.offer(peer, round_, torch.randn(params, generator=gen).mul_(0.01))
        engine.finish_round()

    peaks = [peak_of(one_round) for _ in range(rounds)]
    gc.collect()
    held = len(model_sized(engine, size, {id(engine.trainer)}))
    return {"k": k, "steady_held": held, "steady_rss": (rss() - start) / size,
            "peak_rss": (max(peaks[1:] or peaks) - start) / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="per k (the first one's peak is not counted)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = 4 * args.params
    gc.collect()
    start = rss()
    base_steady, base_peak = run_trainer(args.params, start)
    print(f"model: {args.params} fp32 parameters, S = {size / 1e6:.0f} MB")
    print(f"baseline, the trainer alone: steady {base_steady:.1f} S, peak in a local update {base_peak:.1f} S")
    gc.collect()
    results = []
    for k in args.neighbours:
        row = run_engine(args.params, k, args.rounds, start)
        row["ratio"] = row["peak_rss"] / base_peak
        results.append(row)
        print(f"engine, sybilwall, k={k}: steady {row['steady_held']} model copies held by the engine, "
              f"RSS {row['steady_rss']:.1f} S; peak RSS in a round {row['peak_rss']:.1f} S "
              f"({row['ratio']:.1f}x the trainer alone)")
        gc.collect()
    print(json.dumps({"params": args.params, "baseline_steady": round(base_steady, 2),
                      "baseline_peak": round(base_peak, 2),
                      "engine": [{key: round(v, 2) for key, v in row.items()} for row in results]}))


if __name__ == "__main__":
    main()
