"""Benchmark: what calibrating against colluders costs (``privacy.colluders``).

For each graph (the node's assumed graph: ``num_nodes`` nodes of a degree)
and level, calibrates the DECOR plan for k = 0 (the baseline: outsiders
only) and each k up to ``--max-k``, and prints per k: the start-up time of
the calibration and its ratio to the baseline's (same run), the local std
against σ_ldp, the one-step noise residual against LDP (user level, where
the one-step objective is the node's), the ε the plan spends against the
worst coalition of k (it must be the budget) and, for the baseline plan,
what it spends against k. Machines are noisy: compare the ratios.

Usage: python bench/collusion.py [--graphs 10x6,50x6,100x8] [--max-k 3] [--rounds 100]; last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.errors import ConfigError  # noqa: E402
from murmur.learning.privacy.calibration import (  # noqa: E402
    NoiseObjective,
    PrivacyLevel,
    PrivacyScheme,
    assumed_graph,
    calibrate,
    epsilon_against,
)

EPSILON, DELTA, CLIP = 10.0, 1e-5, 1.0
SAMPLING_RATE, BATCH = 0.1, 32  # example level


def _plan(graph, level: PrivacyLevel, k: int, rounds: int):  # noqa: ANN001, ANN202 - a Graph, a PrivacyPlan
    return calibrate(PrivacyScheme.DECOR, epsilon=EPSILON, delta=DELTA, rounds=rounds, clip=CLIP, graph=graph,
                     level=level, sampling_rate=SAMPLING_RATE if level is PrivacyLevel.EXAMPLE else None,
                     batch_size=BATCH, objective=NoiseObjective.AUTO, colluders=k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="10x6,50x6,100x8", help="num_nodes x degree, comma separated")
    ap.add_argument("--max-k", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    rows = []
    for spec in args.graphs.split(","):
        n, d = (int(x) for x in spec.split("x"))
        graph = assumed_graph(n, d, 0)
        for level in (PrivacyLevel.USER, PrivacyLevel.EXAMPLE):
            t0 = time.perf_counter()
            base = _plan(graph, level, 0, args.rounds)
            base_s = time.perf_counter() - t0
            assert base.noise is not None
            print(f"\n{n} nodes of degree {d}, {level.value} level: σ_ldp {base.sigma_ldp:.4g}, "
                  f"baseline calibration {base_s:.2f} s")
            print(f"{'k':>3} {'start s':>8} {'x base':>7} {'σ_loc/σ_ldp':>12} {'residual':>9} "
                  f"{'ε vs k':>7} {'base ε vs k':>12}")
            for k in range(args.max_k + 1):
                t0 = time.perf_counter()
                try:
                    plan = _plan(graph, level, k, args.rounds)
                except ConfigError as exc:
                    print(f"{k:>3} refused: {exc}")
                    continue
                took = time.perf_counter() - t0
                assert plan.noise is not None
                held = epsilon_against(plan, graph, k, args.rounds)
                base_eps = epsilon_against(base, graph, k, args.rounds)
                row = {"nodes": n, "degree": d, "level": level.value, "k": k, "seconds": took,
                       "ratio_to_base": took / base_s if base_s else None,
                       "local_over_ldp": plan.noise.sigma_cdp / plan.sigma_ldp,
                       "residual_ratio": plan.residual_ratio, "epsilon_vs_k": held, "base_epsilon_vs_k": base_eps}
                rows.append(row)
                fmt = (lambda v: f"{v:.2f}" if v is not None else "–")  # noqa: E731
                print(f"{k:>3} {took:>8.2f} {row['ratio_to_base']:>7.1f} {row['local_over_ldp']:>12.3f} "
                      f"{plan.residual_ratio:>9.3f} {fmt(held):>7} {fmt(base_eps):>12}")
    print(json.dumps({"bench": "collusion", "epsilon": EPSILON, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
