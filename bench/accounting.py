"""Example-level privacy accounting per round: the accountant against
dp_accounting's own composition, each round.

Every round a node checks its budget (ε one round on), and every node
calibrates its noise at start by root finding over ε. Composing the
Poisson-subsampled Gaussian afresh for each ε cost ~30 ms at q ≈ 0.2, so a
run of 40 rounds spent ~1.2 s of CPU a node on its ledger. The accountant
caches one round's RDP vector and scales it (RDP adds up over rounds).
Printed: the time of ``rounds`` budget checks both ways (same run, same
ε bit for bit), their ratio, and a calibration's time cold and warm (a
testnet worker's later nodes). The last line printed is one JSON object.

Usage: python bench/accounting.py [--rounds 40] [--rate 0.178] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import dp_accounting
from dp_accounting.rdp import RdpAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.masks

from bench.masks import fastest_of  # noqa: E402  (one timer for the benches)
from murmur.learning.privacy.accountant import RDP_ORDERS, Accountant, _one_step_rdp  # noqa: E402
from murmur.learning.privacy.calibration import assumed_graph, calibrate  # noqa: E402
from murmur.learning.privacy.schemes import NoiseObjective, PrivacyLevel, PrivacyScheme  # noqa: E402

DELTA = 1e-5
RHO = 0.553  # the default testnet's per-round coefficient (ε = 10 over 40 rounds at q = 32/180)


def direct(rounds: int, rate: float) -> list[float]:
    """Each round's ε composed from scratch, as the accountant did."""
    out = []
    for steps in range(1, rounds + 1):
        acc = RdpAccountant(orders=list(RDP_ORDERS))
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * RHO))),
                    steps)
        out.append(float(acc.get_epsilon(DELTA)))
    return out


def cached(rounds: int, rate: float) -> list[float]:
    _one_step_rdp.cache_clear()  # every repeat pays for its one series
    acc = Accountant(rdp_coef=RHO, delta=DELTA, budget=1e9, sampling_rate=rate)
    out = []
    for _ in range(rounds):
        acc.step()
        out.append(acc.epsilon_spent())
    return out


def calibration(rate: float) -> None:
    calibrate(PrivacyScheme.DECOR, epsilon=10.0, delta=DELTA, rounds=40, clip=1.0, graph=assumed_graph(8, 3, 0),
              level=PrivacyLevel.EXAMPLE, sampling_rate=rate, sensitivity=0.5 / 32, min_edges=3,
              objective=NoiseObjective.RUN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rate", type=float, default=32 / 180)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if direct(args.rounds, args.rate) != cached(args.rounds, args.rate):
        raise SystemExit("the cached accountant's epsilons differ from dp_accounting's")
    base = fastest_of(args.repeats, lambda: direct(args.rounds, args.rate))
    ours = fastest_of(args.repeats, lambda: cached(args.rounds, args.rate))
    _one_step_rdp.cache_clear()
    cold = fastest_of(1, lambda: calibration(args.rate))
    warm = fastest_of(args.repeats, lambda: calibration(args.rate))
    print(f"{args.rounds} rounds of budget checks: composed each round {base:.3f} s, cached {ours:.3f} s, "
          f"x{base / ours:.1f}")
    print(f"calibration: first node {cold:.3f} s, next nodes of the process {warm:.3f} s, x{cold / warm:.1f}")
    print(json.dumps({"rounds": args.rounds, "rate": round(args.rate, 4), "direct_s": round(base, 4),
                      "cached_s": round(ours, 4), "ratio": round(base / ours, 1),
                      "calibration_cold_s": round(cold, 4), "calibration_warm_s": round(warm, 4)}))


if __name__ == "__main__":
    main()
