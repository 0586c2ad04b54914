"""Benchmark: bytes on the wire to reach a model's quality, compressed gossip vs fp32 D-SGD (issue 18).

Setup: 16 nodes on a random 4-regular-ish graph, Dirichlet(0.5) label skew
(Fashion-MNIST) or whole Shakespeare roles per node (the transformer), every
node's model evaluated on the shared test set. Rows, each a full run of the
real round engine (murmur.learning.simulate: the daemon's RoundEngine,
compressor, aggregator and trainers, messages delivered in memory):

    fp32        plain D-SGD, H = 1 local step a round, exact messages
    fp16, int8  the same, values rounded (error feedback keeps the rounding)
    topk1       top-k 1% + error feedback (CHOCO-SGD), fp32 values and uint32 indices
    randk1-4b   random-k 1% on a per-sender shared mask + 4-bit values, stochastic rounding
    H50-outer   H = 50 local steps, Nesterov outer optimizer (DiLoCo: lr 0.7,
                momentum 0.9) and the compressor given by --h50 (default
                dense 4-bit, stochastic rounding: the best measured)

Random-k's consensus step must be of the order of its ratio (CHOCO-SGD's
stability condition): on digits (8 nodes, 300 rounds) random-k 1% + 4-bit
at 0.05 climbed to 0.80 and fell back to 0.59, at 0.01 it climbs steadily;
random-k 10% at H = 50 fell from 0.75 to 0.60 at 0.5 and holds at 0.1.

Columns: final metric (mean over nodes, averaged over the last
FINAL_EVALS evaluations: one evaluation of 16 non-IID models moves by a
point or two from round to round), total bytes of round messages all
nodes sent (each message as the transport counts it: DeltaStart, every
chunk's envelope and payload, DeltaEnd, encoded for real once per run), and
the bytes sent when the mean metric first reached the fp32 run's final
metric minus 1 point (accuracy) or plus 2% (perplexity), with the reduction
against fp32. Target (the issue's): >= 100x fewer bytes than fp32 to that
metric on both models.

Wall time at --link-mbit (10 Mbit/s) is *modelled*, not measured: every
round costs the slowest node's measured local steps (plus compression) and
then the time its upload link needs for one message to each of its
neighbours (download is symmetric and overlaps). No daemon runs here; the
testnet scenario murmur/testnet/scenarios/compressed.toml runs real daemons
over emulated links.

--robustness adds the privacy x Sybil check: bench/sybil.py's privacy row
(8 Fashion-MNIST nodes, 300 rounds), example-level DECOR at epsilon = 1
(DP-SGD, one step a round), one attacker with 4
label-flip Sybils under SybilWall; the sound compressed configurations
(dense int4, random-k 10% on the network-wide mask + int8) against fp32.

Sizes: --size full is the issue's models (fashion-resnet 0.94 M parameters,
shakespeare-transformer 3.2 M); --size small (the default here) narrows them
(38 k and 0.12 M) so a run fits a shared 2-core CPU in about an hour. At
full size, H50-outer (int4) reached fp32's target with 306 MiB against
50,601 MiB on fashion-resnet (165.5x less; final accuracy 0.682 against
0.679) and with 837 MiB against 220,503 MiB on the transformer (263.5x;
perplexity target 6.60), each row ~1-2 hours of one core here. Rounds,
nodes, rows and models are all selectable:

    .venv/bin/python bench/compression.py --models fashion --rounds 200
    .venv/bin/python bench/compression.py --quick          # digits-mlp, 8 nodes: a smoke run
    .venv/bin/python bench/compression.py --size full --models transformer --rows fp32,H50-outer

Prints a table per model and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.learning.attacks import AttackKind  # noqa: E402
from murmur.learning.outer import OuterConfig  # noqa: E402
from murmur.learning.simulate import (  # noqa: E402
    SimCompression,
    SimConfig,
    SimResult,
    run_simulation,
)
from murmur.learning.trainers.base import TrainerContext  # noqa: E402
from murmur.learning.trainers.registry import load_trainer  # noqa: E402
from murmur.protocol.codecs import DeltaCodec, Rounding  # noqa: E402
from murmur.protocol.sparse import MaskScope, RoundFormat, Sparsifier  # noqa: E402

TORCH_THREADS = 1  # the machine is shared; one thread per process
ACCURACY_MARGIN = 0.01  # target: fp32's final accuracy minus 1 point
PERPLEXITY_MARGIN = 1.02  # target: fp32's final perplexity plus 2%
TARGET_REDUCTION = 100.0
FINAL_EVALS = 3  # the final metric is the mean of this many last evaluations
MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Row:
    """One configuration of the table."""

    name: str
    compression: SimCompression | None = None
    local_steps: int = 1
    consensus_step: float = 1.0
    outer: OuterConfig | None = None
    step_budget: float = 1.0  # local steps per node, relative to the fp32 row's rounds

    def describe(self) -> str:
        c = self.compression
        what = "fp32" if c is None else f"{c.codec.name.lower()}+{c.format.describe()}"
        outer = "" if self.outer is None else f", outer nesterov lr {self.outer.lr:g} mom {self.outer.momentum:g}"
        return f"{what}, H={self.local_steps}, gamma={self.consensus_step:g}{outer}"


def _sc(fmt: RoundFormat, codec: DeltaCodec, rounding: Rounding = Rounding.NEAREST) -> SimCompression:
    return SimCompression(fmt, codec, rounding)


DENSE = RoundFormat()
H50_COMPRESSORS: Mapping[str, SimCompression] = {
    "randk10-4b": _sc(RoundFormat(Sparsifier.RANDK, 0.1), DeltaCodec.INT4, Rounding.STOCHASTIC),
    "int4": _sc(DENSE, DeltaCodec.INT4, Rounding.STOCHASTIC),
    "int8": _sc(DENSE, DeltaCodec.INT8),
    "topk10-4b": _sc(RoundFormat(Sparsifier.TOPK, 0.1), DeltaCodec.INT4, Rounding.STOCHASTIC),
    "randk1-4b": _sc(RoundFormat(Sparsifier.RANDK, 0.01), DeltaCodec.INT4, Rounding.STOCHASTIC),
}
H50_GAMMA = {"randk10-4b": 0.1, "topk10-4b": 0.5, "randk1-4b": 0.01}


def rows(h50: str, topk_gamma: float, randk_gamma: float, h: int, h_budget: float) -> list[Row]:
    return [
        Row("fp32"),
        Row("fp16", _sc(DENSE, DeltaCodec.FP16)),
        Row("int8", _sc(DENSE, DeltaCodec.INT8)),
        Row("topk1", _sc(RoundFormat(Sparsifier.TOPK, 0.01), DeltaCodec.FP32), consensus_step=topk_gamma),
        Row("randk1-4b", _sc(RoundFormat(Sparsifier.RANDK, 0.01), DeltaCodec.INT4, Rounding.STOCHASTIC),
            consensus_step=randk_gamma),
        Row(f"H{h}-outer", H50_COMPRESSORS[h50], local_steps=h, consensus_step=H50_GAMMA.get(h50, 1.0),
            outer=OuterConfig(lr=0.7, momentum=0.9), step_budget=h_budget),
    ]


@dataclass(frozen=True)
class Model:
    key: str
    trainer: str
    options: Mapping[str, Any]
    rounds: int  # of the H = 1 rows
    eval_every: int
    partition: str = "dirichlet"


def models(size: str, quick: bool) -> dict[str, Model]:
    if quick:
        return {"digits": Model("digits", "digits-mlp", {}, 60, 10)}
    fashion = {"lr": 0.05, "momentum": 0.9, "batch_size": 32, "max_test_samples": 500, "eval_batch_size": 500}
    transformer = {"lr": 2e-3, "batch_size": 16, "max_test_samples": 64, "eval_batch_size": 64}
    if size == "small":
        fashion |= {"width": 8}
        transformer |= {"width": 64, "layers": 2, "heads": 2}
    return {
        "fashion": Model("fashion", "fashion-resnet", fashion, 300, 20),
        # Whole roles per node (the LSTM's LEAF split): the data is naturally non-IID.
        "transformer": Model("transformer", "shakespeare-transformer", transformer, 300, 20, partition="iid"),
    }


@dataclass
class Outcome:
    row: Row
    result: SimResult
    seconds: float
    curve: list[tuple[int, float, int]] = field(default_factory=list)  # (round, metric, bytes)

    @property
    def final(self) -> float:
        last = [value for _, value, _ in self.curve[-FINAL_EVALS:]]
        return sum(last) / len(last)

    @property
    def total_bytes(self) -> int:
        return sum(self.result.round_bytes)


def reached(outcome: Outcome, target: float, higher_is_better: bool) -> tuple[int, int] | None:
    """(round, bytes) of the first evaluation at or past ``target``."""
    for rnd, value, sent in outcome.curve:
        if (value >= target) if higher_is_better else (value <= target):
            return rnd, sent
    return None


def modelled_seconds(outcome: Outcome, up_to_round: int, degree: int, link_bytes_s: float) -> float:
    """Wall time of rounds 0..up_to_round: the slowest node's compute plus one
    message to each neighbour over its upload link, every round."""
    transfer = degree * outcome.result.message_bytes / link_bytes_s
    return sum(outcome.result.compute_s[: up_to_round + 1]) + (up_to_round + 1) * transfer


def run_row(model: Model, row: Row, args: argparse.Namespace) -> Outcome:
    rounds = max(1, round(model.rounds * row.step_budget / row.local_steps))
    eval_every = max(1, min(model.eval_every, math.ceil(rounds / 10)))
    cfg = SimConfig(
        trainer=model.trainer, trainer_options=dict(model.options), nodes=args.nodes, degree=args.degree,
        partition=model.partition, alpha=args.alpha, rounds=rounds, local_steps=row.local_steps, seed=args.seed,
        eval_every=eval_every, compression=row.compression, consensus_step=row.consensus_step, outer=row.outer,
        eval_nodes=args.eval_nodes,
    )
    started = time.time()
    outcome = Outcome(row, run_simulation(cfg, progress=lambda r: print(
        f"    {row.name:12s} round {r.round:4d} metric {r.mean_metric:8.4f} bytes {r.bytes / 2**20:10.2f} MiB "
        f"({time.time() - started:5.0f}s)", file=sys.stderr, flush=True)), 0.0)
    outcome.seconds = time.time() - started
    outcome.curve = [(r.round, r.mean_metric, r.bytes) for r in outcome.result.rows]
    return outcome


def table(model: Model, outcomes: Sequence[Outcome], args: argparse.Namespace) -> dict[str, Any]:
    baseline = outcomes[0]
    higher = baseline.result.metric == "accuracy"
    target = baseline.final - ACCURACY_MARGIN if higher else baseline.final * PERPLEXITY_MARGIN
    base_hit = reached(baseline, target, higher)
    link = args.link_mbit * MBIT
    print(f"\n{model.key}: {model.trainer} {dict(model.options)}, {args.nodes} nodes, degree {args.degree}, "
          f"{baseline.result.metric} target {target:.4f} (fp32 final {baseline.final:.4f})")
    print(f"{'row':12s} {'final':>8s} {'MiB total':>10s} {'MiB to target':>14s} {'x less':>8s} "
          f"{'msg bytes':>10s} {f'@{args.link_mbit:g}Mbit s':>12s}  configuration")
    out_rows = {}
    for o in outcomes:
        hit = reached(o, target, higher)
        to_target = hit[1] if hit else None
        factor = (base_hit[1] / to_target) if (hit and base_hit) else None
        wall = modelled_seconds(o, hit[0], args.degree, link) if hit else None
        print(f"{o.row.name:12s} {o.final:8.4f} {o.total_bytes / 2**20:10.2f} "
              f"{(f'{to_target / 2**20:.2f}' if to_target is not None else 'not reached'):>14s} "
              f"{(f'{factor:.1f}' if factor else '-'):>8s} {o.result.message_bytes:10d} "
              f"{(f'{wall:.0f}' if wall is not None else '-'):>12s}  {o.row.describe()}")
        out_rows[o.row.name] = {
            "configuration": o.row.describe(), "final_metric": o.final, "total_bytes": o.total_bytes,
            "bytes_to_target": to_target, "round_to_target": hit[0] if hit else None, "reduction_vs_fp32": factor,
            "message_bytes": o.result.message_bytes, "rounds": len(o.result.round_bytes),
            "local_steps": o.row.local_steps, "modelled_wall_s_to_target": wall,
            "modelled_wall_s_total": modelled_seconds(o, len(o.result.compute_s) - 1, args.degree, link),
            "sim_seconds": o.seconds, "curve": o.curve,
        }
    best = max((r["reduction_vs_fp32"] or 0.0) for r in out_rows.values())
    print(f"best reduction to target: {best:.1f}x (target {TARGET_REDUCTION:g}x: {'met' if best >= TARGET_REDUCTION else 'missed'})")
    return {"trainer": model.trainer, "options": dict(model.options), "metric": baseline.result.metric,
            "target": target, "num_params": _num_params(model), "rows": out_rows, "best_reduction": best,
            "target_met": best >= TARGET_REDUCTION}


def _num_params(model: Model) -> int:
    trainer = load_trainer(model.trainer)(TrainerContext(0, 1, 0, device="cpu", options=dict(model.options)))
    return trainer.num_params()


# --------------------------------------------------------------------------- privacy x Sybils


def robustness(quick: bool) -> list[dict[str, Any]]:
    """SybilWall with example-level DECOR (epsilon 1) and 4 label-flip Sybils,
    compressed (sound combinations only) against fp32: bench/sybil.py's
    privacy row (Fashion-MNIST, 8 honest nodes), whose 60k examples leave
    epsilon 1 trainable (8 nodes of digits learned nothing there: 0.15)."""
    from bench.sybil import PRIVATE_FASHION, privacy_perturbers, sim_config
    from bench.sybil import Row as SybilRow

    eps = 1.0
    setup = dataclasses.replace(PRIVATE_FASHION, rounds=100) if quick else PRIVATE_FASHION
    row = SybilRow(AttackKind.LABEL_FLIP, 4)
    base = sim_config(setup, row, "sybilwall")
    configs = [  # (name, compressor, consensus step: random-k's about its ratio, as CHOCO-SGD needs)
        ("fp32", None, 1.0),
        ("int4", _sc(DENSE, DeltaCodec.INT4, Rounding.STOCHASTIC), 1.0),
        ("randk10-network-int8", _sc(RoundFormat(Sparsifier.RANDK, 0.1, MaskScope.NETWORK), DeltaCodec.INT8), 0.1),
    ]
    print(f"\nprivacy x Sybils: {setup.describe()}, example-level DECOR eps={eps:g}, "
          f"label flip x{row.sybils} Sybils under SybilWall")
    out = []
    for name, compression, gamma in configs:
        for private in (False, True):
            cfg = dataclasses.replace(base, compression=compression, consensus_step=gamma)
            # fresh pairwise secrets per run, as a network draws them
            result = run_simulation(cfg, perturber_factory=privacy_perturbers(setup, eps) if private else None)
            final = result.final
            row_out = {"compression": name, "privacy": f"example eps={eps:g}" if private else "off",
                       "accuracy": final.mean_accuracy, "attack_rate": final.attack_rate,
                       "sybil_weight": final.sybil_weight, "message_bytes": result.message_bytes}
            out.append(row_out)
            print(f"  {name:22s} privacy={row_out['privacy']:15s} acc={final.mean_accuracy:.3f} "
                  f"attack={final.attack_rate:.3f} sybil_weight={final.sybil_weight:.3f} "
                  f"msg={result.message_bytes} B", flush=True)
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion,transformer", help="fashion,transformer (or digits with --quick)")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--quick", action="store_true", help="digits-mlp, 8 nodes, 60 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of the H = 1 rows (0: the model's default)")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-nodes", type=int, default=None, help="evaluate only this many nodes (default: all)")
    parser.add_argument("--h", type=int, default=50, help="local steps of the outer-optimizer row")
    parser.add_argument("--h-budget", type=float, default=2.0,
                        help="local steps of the outer-optimizer row, relative to the fp32 row's")
    parser.add_argument("--h50", choices=sorted(H50_COMPRESSORS), default="int4")
    parser.add_argument("--topk-gamma", type=float, default=0.1)
    parser.add_argument("--randk-gamma", type=float, default=0.01)
    parser.add_argument("--link-mbit", type=float, default=10.0)
    parser.add_argument("--robustness", action="store_true", help="also the privacy x Sybil check")
    args = parser.parse_args(argv)
    torch.set_num_threads(TORCH_THREADS)
    if args.quick:
        args.nodes, args.models = min(args.nodes, 8), "digits"
    catalogue = models(args.size, args.quick)
    wanted = [m for m in args.models.split(",") if m]
    unknown = [m for m in wanted if m not in catalogue]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(catalogue)}")
    report: dict[str, Any] = {"nodes": args.nodes, "degree": args.degree, "alpha": args.alpha, "size": args.size,
                              "link_mbit": args.link_mbit, "link_time": "modelled (measured compute + transfer at "
                              "the link rate), not measured on daemons", "models": {}}
    for key in wanted:
        model = catalogue[key]
        if args.rounds:
            model = dataclasses.replace(model, rounds=args.rounds)
        selected = rows(args.h50, args.topk_gamma, args.randk_gamma, args.h, args.h_budget)
        if args.rows:
            names = set(args.rows.split(","))
            selected = [selected[0]] + [r for r in selected[1:] if r.name in names]  # fp32 is the yardstick
        print(f"{key}: {model.trainer}, {len(selected)} rows", file=sys.stderr, flush=True)
        outcomes = [run_row(model, row, args) for row in selected]
        report["models"][key] = table(model, outcomes, args)
    if args.robustness:
        report["robustness"] = robustness(args.quick)
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
