"""Accuracy against example-level ε for no noise, central DP, LDP, DECOR and CorN.

Setup (SPECS §4): 16 nodes on a 4×4 torus, D-SGD with Metropolis–Hastings
mixing, one DP-SGD step per round (per-example gradients clipped to C_ex,
``privacy/dpsgd.py``), so the delta is −lr·ḡ with per-example sensitivity
lr·C_ex/B. ε is EXAMPLE level (Poisson rate q = B / local dataset size,
dp_accounting), as in the SPECS accuracy anchors. Each honest node's noise is
produced by the same :class:`~murmur.node.privacy.PrivacyStage` the daemon
uses, with edge secrets from real X25519 key shares (in memory).

Trainer: digits-mlp (sklearn digits, 8×8) — mnist-cnn is too slow for a sweep
on a 2-core box; so the absolute accuracies are not the SPECS MNIST anchors.

Central DP is simulated as each node adding σ_ldp/√n local noise (the same
noise in the network mean as a trusted aggregator's); it protects no single
message and is only the reference. Residual ratios are tr(WΣWᵀ) relative to
LDP for the noise each scheme injects on the torus.

Also: SybilWall with DECOR on, 8 nodes, label-flip attacker with 4 Sybils.

Usage: python bench/privacy.py [--quick]; last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from absl import logging as absl_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.learning.privacy.dpsgd import apply_grads, clipped_mean_grad  # noqa: E402
from murmur.learning.privacy.noise import NoiseConfig, UniformEdgeScale  # noqa: E402
from murmur.learning.privacy.seeds import PairwiseSeeds  # noqa: E402
from murmur.learning.simulate import SimConfig, SybilAttack, node_name, run_simulation  # noqa: E402
from murmur.learning.topology import Graph, random_regularish, torus  # noqa: E402
from murmur.learning.trainers.digits import DigitsMLPTrainer  # noqa: E402
from murmur.node.config import PrivacyLevel, PrivacyScheme  # noqa: E402
from murmur.node.privacy import PrivacyPlan, PrivacyStage, calibrate, residual_ratio_of  # noqa: E402
from murmur.protocol.identity import Identity, PeerId  # noqa: E402

C_EX = 1.0  # per-example gradient clip
LR = 0.1
BATCH = 16
DELTA = 1e-5
EPSILONS = (0.01, 0.1, 1.0, 10.0)
SCHEMES = ("none", "central", "ldp", "decor", "corn")


class DPDigitsTrainer(DigitsMLPTrainer):
    """digits-mlp with per-example clipped gradients (DP-SGD without its own noise:
    the privacy stage adds the noise to the delta)."""

    def compute_gradients(self, batch):  # type: ignore[no-untyped-def]
        grads = clipped_mean_grad(self.model, self.loss_fn, batch.x, batch.y, C_EX)
        apply_grads(self.model, grads)
        with torch.no_grad():
            return self.loss_fn(self.model(batch.x), batch.y).detach()


def identities(n: int) -> tuple[list[Identity], list[PairwiseSeeds]]:
    ids = [Identity.generate() for _ in range(n)]
    return ids, [PairwiseSeeds(i) for i in ids]


def exchange(graph: Graph, seeds: list[PairwiseSeeds]) -> None:
    """Real signed X25519 shares along every edge (in memory)."""
    for i, nbrs in enumerate(graph):
        for j in nbrs:
            seeds[j].accept_share(seeds[i].me, seeds[i].share_for(seeds[j].me))


def plans(scheme: str, eps: float, graph: Graph, peers: Sequence[PeerId], rounds: int, q: float) -> PrivacyPlan | None:
    if scheme == "none":
        return None
    clip = LR * C_EX
    common = dict(epsilon=eps, delta=DELTA, rounds=rounds, clip=clip, graph=graph, level=PrivacyLevel.EXAMPLE,
                  sampling_rate=q, batch_size=BATCH, peers=peers)
    if scheme == "central":
        ldp = calibrate(PrivacyScheme.LDP, **common)  # type: ignore[arg-type]
        return dataclasses.replace(ldp, noise=NoiseConfig(clip, ldp.sigma_ldp / math.sqrt(len(graph)),
                                                          UniformEdgeScale(0.0)), min_edges=0)
    return calibrate(PrivacyScheme(scheme), **common)  # type: ignore[arg-type]


def factory(plan: PrivacyPlan | None, peers: Sequence[PeerId], seeds: list[PairwiseSeeds]) -> Callable:
    names = {node_name(i): p for i, p in enumerate(peers)}

    def make(i: int, neighbour_names: Sequence[str]):  # type: ignore[no-untyped-def]
        if plan is None:
            return None
        stage = PrivacyStage(peers[i], plan, {p: seeds[i].secret(p) for p in seeds[i].peers()},
                             resolve=names.__getitem__)
        honest = [n for n in neighbour_names if n in names]

        class Committed:  # the simulator commits every honest neighbour (no dropouts)
            def perturb(self, delta, round, committed):  # type: ignore[no-untyped-def]
                return stage.perturb(delta, round, honest)

        return Committed()

    return make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting: non-converging low orders are skipped
    rounds = 60 if args.quick else 200
    epsilons = (0.1, 1.0) if args.quick else EPSILONS
    graph = torus(4)
    n = len(graph)
    ids, seeds = identities(n)
    peers = [i.peer_id for i in ids]
    exchange(graph, seeds)
    spec = f"{__name__}:DPDigitsTrainer" if __name__ != "__main__" else "bench.privacy:DPDigitsTrainer"
    probe = DPDigitsTrainer(__import__("murmur.learning.trainers.base", fromlist=["TrainerContext"]).TrainerContext(
        0, n, 0, partition="iid", options={"lr": LR, "batch_size": BATCH, "momentum": 0.0}))
    q = BATCH / probe.train_size
    cfg = SimConfig(trainer=spec, trainer_options={"lr": LR, "batch_size": BATCH, "momentum": 0.0, "local_steps": 1},
                    graph=graph, partition="iid", rounds=rounds, local_steps=1, eval_every=rounds, seed=0)
    t0 = time.time()
    table: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    for scheme in SCHEMES:
        table[scheme] = {}
        for eps in epsilons:
            if scheme == "none" and table[scheme]:
                table[scheme][str(eps)] = next(iter(table[scheme].values()))
                continue
            plan = plans(scheme, eps, graph, peers, rounds, q)
            if plan is not None and eps == epsilons[-1]:
                ratios[scheme] = residual_ratio_of(plan, graph, peers)
            res = run_simulation(cfg, perturber_factory=factory(plan, peers, seeds))
            table[scheme][str(eps)] = res.final.mean_accuracy
            print(f"{scheme:8s} eps={eps:<5} acc={res.final.mean_accuracy:.4f} "
                  f"sigma_ldp={plan.sigma_ldp if plan else 0:.4g} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\nexample-level ε, δ={DELTA}, T={rounds}, q={q:.3f}, 16 nodes torus(4), digits-mlp, DP-SGD C_ex={C_EX}")
    print(f"{'scheme':10s}" + "".join(f"ε={e:<8}" for e in epsilons) + "residual/LDP")
    for scheme in SCHEMES:
        row = "".join(f"{table[scheme][str(e)]:<10.4f}" for e in epsilons)
        print(f"{scheme:10s}{row}{ratios.get(scheme, float('nan')):.3f}")

    # SybilWall with DECOR on (user level, ε = 10 over the run): 8 nodes, 4 Sybils.
    sg = random_regularish(8, 3, 0)
    sids, sseeds = identities(8)
    exchange(sg, sseeds)
    speers = [i.peer_id for i in sids]
    srounds = 20 if args.quick else 40
    splan = calibrate(PrivacyScheme.DECOR, epsilon=10.0, delta=DELTA, rounds=srounds, clip=1.0, graph=sg)
    scfg = SimConfig(aggregator="sybilwall", attack=SybilAttack("label_flip", 4, 2), nodes=8, graph=sg,
                     rounds=srounds, eval_every=srounds, seed=0)
    sres = run_simulation(scfg, perturber_factory=factory(splan, speers, sseeds))
    base = run_simulation(scfg)
    sybil = {"attack_rate_private": sres.final.attack_rate, "accuracy_private": sres.final.mean_accuracy,
             "attack_rate_plain": base.final.attack_rate, "accuracy_plain": base.final.mean_accuracy}
    print(f"\nSybilWall 8 nodes, label_flip x4 Sybils: plain attack={base.final.attack_rate:.3f} "
          f"acc={base.final.mean_accuracy:.3f}; DECOR ε=10 attack={sres.final.attack_rate:.3f} "
          f"acc={sres.final.mean_accuracy:.3f}")
    print(json.dumps({"bench": "privacy", "level": "example", "rounds": rounds, "q": q, "trainer": "digits-mlp",
                      "accuracy": table, "residual_ratio": ratios, "sybilwall": sybil,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
