"""Benchmark: choosing a top-k round message's coordinates, old method against new.

A top-k sender picks, every round, the k coordinates of largest magnitude
among d and sends them sorted (murmur/learning/compression.py). It used
``torch.topk(|v|, k, sorted=False)`` and sorted the indices, a selection of
O(d log k) plus a sort of k. Now it finds the k-th largest magnitude with
numpy's ``partition`` (a linear-time selection; torch's ``kthvalue`` on a
GPU), keeps what lies above it and the first ties at it, and reads the
indices off in order (no sort). Both
choose k coordinates of the same magnitudes; they may differ only among
values tied at the threshold, which the new method breaks toward the lower
index (topk's choice among ties is unspecified). Indices travel on the
wire, so receivers never re-derive the choice: bit-exactness does not
depend on it.

Prints per ratio the best of ``--repeats`` timings of each method, measured
in the same run, their ratio, and that the two selections carry the same
magnitudes; last, one JSON object.

    .venv/bin/python bench/topk.py [--params 10000000] [--ratios 0.5 0.1 0.01] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from murmur.learning.compression import top_k_indices


def old_top_k(v: torch.Tensor, k: int) -> torch.Tensor:
    """What compression.py did before: topk, unsorted, then sort the indices."""
    return torch.topk(v.abs(), k, sorted=False).indices.sort().values


def best_of(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), torch.empty(0)
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a node trains with learning.threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    # A residual-like vector: normal values, rounded so that many magnitudes tie.
    v = torch.randn(args.params, generator=gen).mul_(1000).round_().div_(1000)
    rows = []
    for ratio in args.ratios:
        k = max(1, round(ratio * args.params))
        old_s, old = best_of(lambda: old_top_k(v, k), args.repeats)
        new_s, new = best_of(lambda: top_k_indices(v, k), args.repeats)
        same = bool(torch.equal(v[old].abs().sort().values, v[new].abs().sort().values))
        assert new.numel() == k and bool((new[1:] > new[:-1]).all()), "not k sorted distinct indices"
        rows.append({"ratio": ratio, "k": k, "old_s": round(old_s, 4), "new_s": round(new_s, 4),
                     "speedup": round(old_s / new_s, 2), "same_magnitudes": same})
        print(f"ratio {ratio}: topk+sort {old_s:.3f} s, threshold {new_s:.3f} s ({old_s / new_s:.1f}x faster); "
              f"same magnitudes chosen: {same}")
    print(json.dumps({"params": args.params, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
