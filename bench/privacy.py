"""Accuracy against example-level ε: no noise, central DP, LDP, DECOR, CorN.

Regime (the DECOR paper's example-level experiments, Allouah et al., ICML
2024): 16 nodes on a 4×4 torus, D-SGD with Metropolis–Hastings mixing, and
per round exactly one DP-SGD step per node — per-example gradients clipped to C_ex inside the
trainer (``TorchOptions.dp_clip``), mean over a batch of B, plain SGD
(momentum 0, ``local_steps=1``). The round delta is then −lr·ḡ with
per-example sensitivity lr·C_ex/B, so the noise the privacy stage adds to the
delta *is* DP-SGD noise on the gradient. ε is example level: Poisson rate
q = B / local dataset size, T = rounds, δ = 1e-5, composed with dp_accounting
(``calibrate(level=EXAMPLE)``). Each honest node's noise comes from the same
:class:`~murmur.learning.privacy.stage.PrivacyStage` the daemon runs, with edge secrets
from real signed X25519 key shares (exchanged in memory).

Model and data (a proxy, stated): multinomial logistic regression (d = 7850)
on Fashion-MNIST (Debian ``dataset-fashion-mnist``, 60k train → 3750 per node,
IID; 10k test). Why: DECOR's MNIST runs are 16 nodes × T = 3500 DP-SGD steps;
a convex linear model keeps every mechanism identical (per-example clipping,
subsampled-RDP accounting, pairwise terms, mixing) while a step costs ~2 ms on
a shared core, so T in the hundreds-to-thousand fits the time budget.
Fashion-MNIST is harder than MNIST (logreg tops out ≈ 0.84, not ≈ 0.92), so
absolute numbers are not the DECOR paper's MNIST accuracies; the *gaps*
between schemes are what the bench measures. Batches are shuffled fixed-size batches, accounted as
Poisson at q = B/N (the usual DP-SGD practice; a strict reading needs
Poisson sampling).

Schemes: DECOR and CorN are calibrated with ``NoiseObjective.RUN`` (the split
between local and pairwise noise that minimises the noise left after T rounds
of mixing; the node's default); ``decor-1step`` is DECOR with the one-step
objective, for comparison. Central DP is simulated as every node adding
σ_ldp/√n local noise (the same noise in the network mean as a trusted
curator's; it protects no single message — the reference only). Residual
ratios are tr(WΣWᵀ) relative to LDP for the noise each scheme injects on the
torus (the CorN paper's measure, Rodio, Chen, Larsson 2025).

Every run trains from the public model (``TrainFrom.PUBLIC``, DECOR's
algorithm): example-level accounting holds only for gradients taken at a point
that is a function of released messages (see ``murmur.learning.rounds``).
Rows report the mean accuracy of the models the nodes hold and of the network
average. After the T training rounds every scheme runs ``--mixing-rounds``
(default 20) rounds that only mix public models: pairwise noise cancels in the
network mean but each node's model still holds the last rounds' terms, and
mixing — post-processing of released models, so free in privacy — moves every
node toward that mean. ``--mixing-rounds 0`` shows the nodes straight after
training.

Also: SybilWall with example-level DECOR in the 8-node Sybil scenario
(:func:`sybil_check`).

``--colluders K`` calibrates the DECOR and CorN rows against any K nodes
pooling the seeds of their edges (the node's ``privacy.colluders``): what
the guarantee against curious neighbours costs in accuracy.

Usage: python bench/privacy.py [--quick] [--rounds T] [--lr LR] [--colluders K] [--no-sybil | --sybil-only]; last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from absl import logging as absl_logging
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.learning.data import ArrayDataset  # noqa: E402
from murmur.learning.privacy.noise import NoiseConfig, UniformEdgeScale  # noqa: E402
from murmur.learning.privacy.seeds import PairwiseSeeds  # noqa: E402
from murmur.learning.rounds import Perturber  # noqa: E402
from murmur.learning import simulate  # noqa: E402
from murmur.learning.rounds import RoundEngine, RoundReport, TrainFrom  # noqa: E402
from murmur.learning.simulate import (  # noqa: E402
    PerturberFactory,
    SimConfig,
    SybilAttack,
    node_name,
    run_simulation,
)
from murmur.learning.topology import Graph, random_regularish, torus  # noqa: E402
from murmur.learning.trainers.base import TorchTrainer, TrainerContext  # noqa: E402
from murmur.learning.trainers.fashion import FashionCNNTrainer  # noqa: E402
from murmur.learning.trainers.registry import load_trainer  # noqa: E402
from murmur.learning.privacy.calibration import (  # noqa: E402
    NoiseObjective,
    PrivacyLevel,
    PrivacyPlan,
    PrivacyScheme,
    calibrate,
    residual_ratio_of,
)
from murmur.learning.privacy.stage import PrivacyStage  # noqa: E402
from murmur.protocol.identity import Identity, PeerId  # noqa: E402

C_EX = 1.0  # per-example gradient clip
BATCH = 64
DELTA = 1e-5
TORUS_SIDE = 4  # 16 nodes
EPSILONS = (0.01, 0.1, 1.0, 10.0)
QUICK_EPSILONS = (0.1, 1.0)
FULL_ROUNDS = 500
QUICK_ROUNDS = 150
DEFAULT_LR = 0.2
DEFAULT_MIXING_ROUNDS = 20
QUICK_TEST_SAMPLES = 2000
SYBIL_NODES = 8
TRAINER_SPEC = "bench.privacy:FashionLinearTrainer"


class Scheme(enum.Enum):
    """A table row: a node :class:`PrivacyScheme`, or the central-DP reference."""

    NONE = "none"
    CENTRAL = "central"
    LDP = "ldp"
    DECOR = "decor"
    CORN = "corn"
    DECOR_ONE_STEP = "decor-1step"


#: Node scheme and calibration objective of each noised row (CENTRAL is built from LDP).
NODE_SCHEME: dict[Scheme, tuple[PrivacyScheme, NoiseObjective]] = {
    Scheme.LDP: (PrivacyScheme.LDP, NoiseObjective.RUN),
    Scheme.DECOR: (PrivacyScheme.DECOR, NoiseObjective.RUN),
    Scheme.CORN: (PrivacyScheme.CORN, NoiseObjective.RUN),
    Scheme.DECOR_ONE_STEP: (PrivacyScheme.DECOR, NoiseObjective.ONE_STEP),
}


class FashionLinearTrainer(FashionCNNTrainer):
    """Multinomial logistic regression on Fashion-MNIST (see the module
    docstring); its data as the built-in trainer finds it (``data_dir``)."""

    name: ClassVar[str] = "fashion-linear"

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(dataset.x_train[0].size), dataset.num_classes))


@dataclass(frozen=True)
class Setup:
    rounds: int
    lr: float
    epsilons: tuple[float, ...]
    max_test_samples: int  # 0: the whole test set
    mixing_rounds: int = 0  # after training, rounds that only mix public models (free: no data, no noise)
    colluders: int = 0  # DECOR and CorN calibrated against this many nodes pooling their seeds

    def trainer_options(self) -> dict[str, object]:
        return {"lr": self.lr, "batch_size": BATCH, "momentum": 0.0, "local_steps": 1, "dp_clip": C_EX,
                "max_test_samples": self.max_test_samples}


class CollectingEngine(RoundEngine):
    """Keeps every node's model at its last evaluation, to score the network average.

    The runs train from the public model (``TrainFrom.PUBLIC``, required for
    example-level accounting), so the model a node holds *is* its public model
    s_i — what DECOR evaluates. The network average is reported too: there
    every pairwise term cancels and only the local noise is left.
    """

    models: ClassVar[list[torch.Tensor]] = []

    def finish_round(self, evaluate: bool = False) -> RoundReport:
        report = super().finish_round(evaluate=evaluate)
        if evaluate:
            type(self).models.append(self.trainer.get_flat())
        return report


@dataclass(frozen=True)
class Accuracies:
    node: float  # mean over nodes of the model each node holds (its public model)
    average: float  # the network-average model (pairwise noise cancels exactly)


def run_all(cfg: SimConfig, perturbers: PerturberFactory, evaluator: TorchTrainer) -> Accuracies:
    """Accuracies at the end of ``cfg``; ``evaluator`` scores the average model."""
    CollectingEngine.models.clear()
    original = simulate.RoundEngine
    simulate.RoundEngine = CollectingEngine  # type: ignore[misc]  # the simulator has no engine hook (yet)
    try:
        node = run_simulation(cfg, perturber_factory=perturbers).final.mean_accuracy
    finally:
        simulate.RoundEngine = original  # type: ignore[misc]
    n = len(cfg.graph or ())
    evaluator.set_flat(torch.stack(CollectingEngine.models[-n:]).mean(dim=0))
    return Accuracies(node, evaluator.evaluate().accuracy)


class AllCommitted:
    """The simulator has no dropouts: every honest neighbour commits every round."""

    def __init__(self, stage: PrivacyStage, honest: Sequence[str]) -> None:
        self.stage = stage
        self.honest = list(honest)

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        return self.stage.clip(delta)

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        return self.stage.perturb(delta, round, self.honest)


def identities(n: int) -> list[PairwiseSeeds]:
    return [PairwiseSeeds(Identity.generate()) for _ in range(n)]


def exchange(graph: Graph, seeds: list[PairwiseSeeds]) -> None:
    """Real signed X25519 shares along every edge (in memory)."""
    for i, nbrs in enumerate(graph):
        for j in nbrs:
            seeds[j].accept_share(seeds[i].me, seeds[i].share_for(seeds[j].me))


def plan_for(scheme: Scheme, eps: float, graph: Graph, peers: Sequence[PeerId], setup: Setup, q: float) -> PrivacyPlan | None:
    """The node plan for ``scheme`` at example-level ``eps`` (delta clip lr·C_ex, sensitivity lr·C_ex/B)."""
    if scheme is Scheme.NONE:
        return None
    clip = setup.lr * C_EX
    common = dict(epsilon=eps, delta=DELTA, rounds=setup.rounds, clip=clip, graph=graph, level=PrivacyLevel.EXAMPLE,
                  sampling_rate=q, batch_size=BATCH, peers=peers)
    if scheme is Scheme.CENTRAL:
        ldp = calibrate(PrivacyScheme.LDP, **common)  # type: ignore[arg-type]
        central = NoiseConfig(clip, ldp.sigma_ldp / math.sqrt(len(graph)), UniformEdgeScale(0.0))
        return dataclasses.replace(ldp, noise=central, min_edges=0)
    node_scheme, objective = NODE_SCHEME[scheme]
    return calibrate(node_scheme, objective=objective, colluders=setup.colluders, **common)  # type: ignore[arg-type]


def factory(plan: PrivacyPlan | None, peers: Sequence[PeerId], seeds: list[PairwiseSeeds]) -> PerturberFactory:
    names = {node_name(i): p for i, p in enumerate(peers)}

    def make(i: int, neighbour_names: Sequence[str]) -> Perturber | None:
        if plan is None:
            return None
        secrets = {p: seeds[i].secret(p) for p in seeds[i].peers()}
        stage = PrivacyStage(peers[i], plan, secrets, resolve=names.__getitem__)
        return AllCommitted(stage, [n for n in neighbour_names if n in names])

    return make


def noise_multiplier(plan: PrivacyPlan | None) -> tuple[float, float]:
    """(local std, edge std) in units of the per-example sensitivity lr·C_ex/B."""
    if plan is None or plan.noise is None:
        return 0.0, 0.0
    edge = plan.noise.edge_scale
    top = edge.sigma_cor if isinstance(edge, UniformEdgeScale) else getattr(edge, "default_std", 0.0)
    return plan.noise.sigma_cdp / plan.sensitivity, top / plan.sensitivity


Table = dict[str, dict[str, float]]
MODEL_KINDS = ("node", "average")


def accuracy_table(setup: Setup) -> tuple[dict[str, Table], Table, float]:
    """Tables keyed by model kind (node, average), the residual ratios, and q."""
    graph = torus(TORUS_SIDE)
    seeds = identities(len(graph))
    exchange(graph, seeds)
    peers = [s.me for s in seeds]
    evaluator = FashionLinearTrainer(TrainerContext(0, len(graph), 0, partition="iid",
                                                    options=setup.trainer_options()))
    q = BATCH / evaluator.train_size
    cfg = SimConfig(trainer=TRAINER_SPEC, trainer_options=setup.trainer_options(), graph=graph, partition="iid",
                    rounds=setup.rounds, local_steps=1, eval_every=setup.rounds + setup.mixing_rounds, seed=0,
                    train_from=TrainFrom.PUBLIC, mixing_rounds=setup.mixing_rounds)
    t0 = time.time()
    tables: dict[str, Table] = {kind: {} for kind in MODEL_KINDS}
    ratios: Table = {}
    none_acc: Accuracies | None = None
    for scheme in Scheme:
        ratios[scheme.value] = {}
        for table in tables.values():
            table[scheme.value] = {}
        for eps in setup.epsilons:
            plan = plan_for(scheme, eps, graph, peers, setup, q)
            if plan is not None:
                ratios[scheme.value][str(eps)] = residual_ratio_of(plan, graph, peers)
            if scheme is Scheme.NONE and none_acc is not None:
                acc = none_acc  # no noise: ε does not matter
            else:
                acc = run_all(cfg, factory(plan, peers, seeds), evaluator)
            if scheme is Scheme.NONE:
                none_acc = acc
            for kind, table in tables.items():
                table[scheme.value][str(eps)] = getattr(acc, kind)
            z_local, z_edge = noise_multiplier(plan)
            print(f"{scheme.value:11s} eps={eps:<5} node={acc.node:.4f} "
                  f"average={acc.average:.4f} z_local={z_local:.3g} z_edge={z_edge:.3g} ({time.time() - t0:.0f}s)",
                  flush=True)
    return tables, ratios, q


SYBIL_ATTACK = SybilAttack("label_flip", 4, 2)  # the 8-node Sybil scenario of tests/integration/test_learning.py
SYBIL_EPSILONS = (10.0, 1.0)
SYBIL_ROUNDS, QUICK_SYBIL_ROUNDS = 200, 100
SYBIL_LR, SYBIL_BATCH = 0.5, 32


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def sybil_check(quick: bool) -> list[dict[str, object]]:
    """SybilWall next to plain averaging, privacy off and with example-level DECOR (RUN objective).

    The 8-node digits Sybil scenario (Dirichlet α = 0.5, degree 3, one label-flip
    attacker behind 4 Sybil identities, 2 edges each), trained as DP-SGD: one
    step per round, per-example clip 1, batch 32. The honest nodes noise what
    they send; the attacker does not (it need not follow the protocol), so its
    Sybils' histories stay identical while honest histories carry noise — the
    case SybilWall has to survive. q is the largest node's rate (the smallest
    local dataset: Dirichlet leaves some nodes ~40 examples), so every node is
    accounted at ≤ ε. Rows: aggregator × privacy, final mean node accuracy,
    attack success rate, and the weight an honest node gave a Sybil.
    """
    rounds = QUICK_SYBIL_ROUNDS if quick else SYBIL_ROUNDS
    epsilons = SYBIL_EPSILONS[:1] if quick else SYBIL_EPSILONS
    graph = random_regularish(SYBIL_NODES, 3, 0)
    seeds = identities(SYBIL_NODES)
    exchange(graph, seeds)
    peers = [s.me for s in seeds]
    options = {"lr": SYBIL_LR, "batch_size": SYBIL_BATCH, "momentum": 0.0, "local_steps": 1, "dp_clip": C_EX}
    base = SimConfig(attack=SYBIL_ATTACK, nodes=SYBIL_NODES, graph=graph, rounds=rounds, eval_every=rounds, seed=0,
                     trainer_options=options, local_steps=1, train_from=TrainFrom.PUBLIC)
    trainer_cls = load_trainer(base.trainer)
    smallest = min(trainer_cls(TrainerContext(i, SYBIL_NODES + 1, base.seed, partition=base.partition,
                                              alpha=base.alpha, options=options)).train_size
                   for i in range(SYBIL_NODES))
    q = min(1.0, SYBIL_BATCH / smallest)
    print(f"\nSybilWall with privacy: {SYBIL_NODES} nodes digits-mlp, {SYBIL_ATTACK.kind} x{SYBIL_ATTACK.sybils} Sybils, "
          f"T={rounds}, DP-SGD B={SYBIL_BATCH} q={q:.2f} C_ex={C_EX}, example-level DECOR (run objective)")
    rows: list[dict[str, object]] = []
    for eps in (None, *epsilons):
        plan = None if eps is None else calibrate(
            PrivacyScheme.DECOR, epsilon=eps, delta=DELTA, rounds=rounds, clip=SYBIL_LR * C_EX, graph=graph,
            level=PrivacyLevel.EXAMPLE, sampling_rate=q, batch_size=SYBIL_BATCH, peers=peers,
            objective=NoiseObjective.RUN)
        for aggregator in ("sybilwall", "mean"):
            cfg = dataclasses.replace(base, aggregator=aggregator)
            final = run_simulation(cfg, perturber_factory=factory(plan, peers, seeds) if plan else None).final
            row = {"aggregator": aggregator, "epsilon": eps, "accuracy": final.mean_accuracy,
                   "attack_rate": final.attack_rate, "sybil_weight": final.sybil_weight}
            rows.append(row)
            print(f"  {aggregator:10s} privacy={'off' if eps is None else f'ε={eps:g}':7s} acc={final.mean_accuracy:.3f} "
                  f"attack={_fmt(final.attack_rate)} sybil_weight={_fmt(final.sybil_weight)}", flush=True)
    return rows


def verdict(table: dict[str, dict[str, float]], epsilons: Sequence[float]) -> dict[str, bool]:
    """The issue's target: DECOR and CorN within 2 points of central DP at ε ≥ 0.1, above LDP."""
    out: dict[str, bool] = {}
    for scheme in (Scheme.DECOR, Scheme.CORN):
        row = table[scheme.value]
        checked = [e for e in epsilons if e >= 0.1]
        close = all(table[Scheme.CENTRAL.value][str(e)] - row[str(e)] <= 0.02 for e in checked)
        above = all(row[str(e)] > table[Scheme.LDP.value][str(e)] for e in checked)
        out[scheme.value] = close and above
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--mixing-rounds", type=int, default=DEFAULT_MIXING_ROUNDS,
                    help="rounds after training that only mix public models (every scheme alike)")
    ap.add_argument("--colluders", type=int, default=0,
                    help="calibrate DECOR and CorN against this many colluding nodes (privacy.colluders)")
    ap.add_argument("--no-sybil", action="store_true")
    ap.add_argument("--sybil-only", action="store_true", help="only the SybilWall-with-privacy rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting: non-converging low orders are skipped
    setup = Setup(
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS),
        lr=args.lr,
        epsilons=QUICK_EPSILONS if args.quick else EPSILONS,
        max_test_samples=QUICK_TEST_SAMPLES if args.quick else 0,
        mixing_rounds=args.mixing_rounds,
        colluders=args.colluders,
    )
    t0 = time.time()
    if args.sybil_only:
        rows = sybil_check(args.quick)
        print(json.dumps({"bench": "privacy", "sybilwall": rows, "seconds": round(time.time() - t0, 1)}))
        return
    tables, ratios, q = accuracy_table(setup)
    print(f"\nexample-level ε, δ={DELTA}, T={setup.rounds}, B={BATCH}, q={q:.4f}, C_ex={C_EX}, lr={setup.lr}; "
          f"16 nodes torus(4), Fashion-MNIST logistic regression, 1 DP-SGD step per round, "
          f"then {setup.mixing_rounds} mixing-only rounds; DECOR and CorN calibrated against "
          f"{setup.colluders} colluders")
    header = "".join(f"{'ε=' + str(e):>9s}" for e in setup.epsilons)
    for kind in MODEL_KINDS:
        print(f"\n{kind + ' model':13s}{header}")
        for scheme in Scheme:
            print(f"{scheme.value:13s}" + "".join(f"{tables[kind][scheme.value][str(e)]:9.4f}" for e in setup.epsilons))
    print(f"\n{'residual/LDP':13s}{header}")
    for scheme in Scheme:
        if ratios[scheme.value]:
            print(f"{scheme.value:13s}" + "".join(f"{ratios[scheme.value][str(e)]:9.3f}" for e in setup.epsilons))
    met = {kind: verdict(tables[kind], setup.epsilons) for kind in MODEL_KINDS}
    print(f"target (within 2 points of central at ε≥0.1 and above LDP): {met}")
    sybil = None if args.no_sybil else sybil_check(args.quick)
    print(json.dumps({"bench": "privacy", "level": "example", "rounds": setup.rounds, "mixing_rounds": setup.mixing_rounds, "batch": BATCH, "q": q,
                      "colluders": setup.colluders,
                      "lr": setup.lr, "clip_example": C_EX, "delta": DELTA, "trainer": "fashion-linear",
                      "topology": "torus(4)", "accuracy": tables, "residual_ratio": ratios, "target_met": met,
                      "sybilwall": sybil, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
