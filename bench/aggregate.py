"""Benchmark: SybilWall aggregation of 64 peers x 1M parameters vs one matmul floor.

One SybilWall round does: stack the 64 deltas (one copy into a reused buffer),
accumulate them into the history matrix (one index_add_), the Gram of the
histories (one (64 x d) @ (d x 64) matmul), the O(n^2) FoolsGold core, and the
weighted average of the deltas (one (1 x 64) @ (64 x d) product). The floor is
that single Gram matmul, timed in the same process on the same data size.

Prints a human line per figure and, last, one JSON object.

    .venv/bin/python bench/aggregate.py [--peers 64] [--dim 1000000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator
from murmur.learning.aggregators.similarity import cosine_from_gram, foolsgold_weights, gram_matrix

TARGET_RATIO = 3.0


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in ms over ``repeats`` runs (callers warm up first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=64)
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    g = torch.Generator(device="cpu").manual_seed(0)
    deltas = torch.randn(args.peers, args.dim, generator=g).to(dev)
    own = torch.randn(args.dim, generator=g).to(dev)
    ups = [PeerUpdate(f"p{i}", deltas[i].clone(), args.peers) for i in range(args.peers)]  # separate tensors, as received

    def floor() -> None:
        deltas @ deltas.T
        sync()

    agg = get_aggregator("sybilwall", self_id="bench")

    def sybilwall_round() -> None:
        # What the round engine calls: fold updates into histories, score, weigh.
        agg.weigh(own, ups, args.peers)
        sync()

    agg_full = get_aggregator("sybilwall", self_id="bench")

    def sybilwall_aggregate() -> None:
        # The standalone API (weights plus the weighted update sum).
        agg_full.aggregate(own, ups, args.peers)
        sync()

    histories = torch.randn(args.peers, args.dim, generator=g).to(dev)

    def scores_only() -> None:
        foolsgold_weights(cosine_from_gram(gram_matrix(histories)))
        sync()

    # Interleave floor and round so both see the same load on a shared box;
    # the ratio is the median of per-pair ratios.
    floor()
    sybilwall_round()
    floors, rounds, ratios = [], [], []
    for _ in range(args.repeats):
        f_ms, r_ms = timed(floor, 1), timed(sybilwall_round, 1)
        floors.append(f_ms)
        rounds.append(r_ms)
        ratios.append(r_ms / f_ms)
    floor_ms, round_ms = statistics.median(floors), statistics.median(rounds)
    scores_only()
    scores_ms = timed(scores_only, args.repeats)
    mean = get_aggregator("mean")

    def mean_round() -> None:
        mean.aggregate(own, ups, args.peers)
        sync()

    mean_round()
    mean_ms = timed(mean_round, args.repeats)
    sybilwall_aggregate()
    aggregate_ms = timed(sybilwall_aggregate, args.repeats)

    ratio = statistics.median(ratios)
    print(f"floor: one ({args.peers} x {args.dim}) @ ({args.dim} x {args.peers}) matmul: {floor_ms:.1f} ms")
    print(f"sybilwall scores only (gram + core):            {scores_ms:.1f} ms ({scores_ms / floor_ms:.2f}x)")
    print(f"sybilwall weights (accumulate+score), engine path: {round_ms:.1f} ms ({ratio:.2f}x, target <= {TARGET_RATIO}x)")
    print(f"sybilwall aggregate() incl. weighted update sum:   {aggregate_ms:.1f} ms ({aggregate_ms / floor_ms:.2f}x)")
    print(f"mean (Metropolis-Hastings) round:               {mean_ms:.1f} ms")
    print(json.dumps({
        "peers": args.peers, "dim": args.dim, "device": str(dev), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "floor_matmul_ms": round(floor_ms, 2),
        "sybilwall_scores_ms": round(scores_ms, 2), "sybilwall_round_ms": round(round_ms, 2),
        "mean_round_ms": round(mean_ms, 2), "sybilwall_aggregate_ms": round(aggregate_ms, 2), "ratio_round_to_floor": round(ratio, 3),
        "ratio_scores_to_floor": round(scores_ms / floor_ms, 3), "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
    }))


if __name__ == "__main__":
    main()
