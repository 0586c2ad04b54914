"""Random-k mask derivation: its cost against one sort of its k coordinates.

Every receiver derives each sender's random-k mask every round (and the
sender its own), so the mask's cost is paid once per neighbour per round.
Sorting every word drawn (np.unique) cost 33-58x one sort of k at ratio 0.5
(14.6 s per mask for 10M parameters); a scatter of first draws costs a few
sorts of k. Printed per ratio: the mask's best time, the reference's (one
``np.sort`` of k random coordinates, same run), and their ratio. The last
line printed is one JSON object.

Usage: python bench/masks.py [--params N] [--ratios 0.01,0.1,0.3,0.5] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from murmur.protocol.sparse import random_mask


def fastest_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--ratios", default="0.01,0.1,0.3,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    d = args.params
    rng = np.random.default_rng(0)
    out = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        k = max(1, int(d * ratio))
        reference = fastest_of(args.repeats, lambda k=k: np.sort(rng.integers(0, d, k)))
        mask = fastest_of(args.repeats, lambda k=k: random_mask(1, 2, b"sender", d, k))
        out[str(ratio)] = {"k": k, "mask_s": round(mask, 4), "sort_of_k_s": round(reference, 4),
                           "ratio": round(mask / reference, 2)}
        print(f"ratio {ratio:<5} k {k:>9}  mask {mask:8.3f} s  sort of k {reference:7.3f} s  x{mask / reference:.1f}")
    print(json.dumps({"params": d, "masks": out}))


if __name__ == "__main__":
    main()
