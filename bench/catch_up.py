"""Benchmark: what a node far behind adopts when a trusted Sybil is among the neighbours ahead.

Real daemons on loopback (digits-mlp, 4 data shares): two honest nodes and a
Sybil run ``--lead`` rounds together; then a late node starts, trusting the
Sybil most (what SybilWall under privacy can leave: the noise hides what
tells a diversified Sybil apart), with all three far ahead. The Sybil answers
its model request with a poisoned model: ``flip``, its own public model
trained on with labels 0 and 1 swapped (``--flip-steps`` steps), or
``noise``, its public model plus Gaussian noise (std 1). Printed: the late
node's accuracy and label-flip attack rate right after the catch-up, next to
an honest node's at that time and the poisoned model's own.

    .venv/bin/python bench/catch_up.py --poison flip --runs 3
    PYTHONPATH=/old/checkout .venv/bin/python bench/catch_up.py ...   # the code before, same script

Prints one JSON line per run. Measured (3 runs each, 2-core shared box):
with ``flip`` the late node adopted the Sybil's model outright before the
catch-up took the median (accuracy 0.755-0.758, attack rate 0.985-1.0, the
honest nodes 0.944-0.953 and 0.0), and 0.950-0.953 with attack rate 0.0
after (3 models each time); with ``noise`` 0.103 before, 0.947-0.955 after.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.integration.cluster; PYTHONPATH wins

import murmur  # noqa: E402
from murmur.node.config import Attack  # noqa: E402
from murmur.node.daemon import Node  # noqa: E402
from murmur.node.learner import NodeLearner  # noqa: E402
from murmur.node.preflight import build_trainer  # noqa: E402
from tests.integration.cluster import node_config, wait_until  # noqa: E402

RUN_S = 180.0
LEARNING: dict[str, Any] = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.device": "cpu",
    "learning.threads": 1,
    "learning.num_nodes": 4,
    "learning.eval_attack": "label_flip",
}


def _poison(sybil: Node, kind: str, steps: int, seed: int) -> torch.Tensor:
    public, _ = sybil.learner.engine.public_state()
    if kind == "noise":
        return public + torch.randn(public.shape, generator=torch.Generator().manual_seed(seed))
    section = dataclasses.replace(sybil.config.learning, attack=Attack.LABEL_FLIP)
    trainer = build_trainer(section)
    trainer.set_flat(public)
    trainer.train(steps)
    return trainer.get_flat()


def _scores(node: Node, model: torch.Tensor) -> tuple[float, float]:
    trainer = build_trainer(node.config.learning)
    trainer.set_flat(model)
    return trainer.evaluate().accuracy, trainer.attack_success_rate("label_flip")


async def run_once(tmp: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    ahead: list[Node] = []
    late: Node | None = None
    seen: list[dict[str, Any]] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "catch_up" and late is not None:
                seen.append({"accuracy": late.learner.last_eval[1], "attack_rate": late.learner.attack_rate,
                             "sources": getattr(record, "sources", 1)})

    logger = logging.getLogger("murmur.node.learner")
    logger.setLevel(logging.INFO)
    watch = Watch()
    logger.addHandler(watch)
    original_start = NodeLearner.start
    try:
        bootstrap: tuple = ()
        for i in range(3):
            overrides = {**LEARNING, "learning.node_index": i, "learning.start_wait_s": 0.0, "learning.seed": seed,
                         "learning.round_deadline_s": 0.3}
            node = Node(node_config(tmp / f"ahead{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            ahead.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        await wait_until(lambda: all(n.learner.round >= args.lead for n in ahead), RUN_S, "the lead rounds")
        honest, _, sybil = ahead
        poison = _poison(sybil, args.poison, args.flip_steps, seed)
        true_state = sybil.learner.engine.public_state
        sybil.learner.engine.public_state = lambda: (poison.clone(), true_state()[1])
        trust = {sybil.peer_id: 0.6, ahead[0].peer_id: 0.2, ahead[1].peer_id: 0.2}

        async def start_trusting(learner: NodeLearner) -> None:
            learner.neighbour_rounds.trust.update(trust)
            await original_start(learner)
        NodeLearner.start = start_trusting  # type: ignore[method-assign]
        late = Node(node_config(tmp / "late", bootstrap=bootstrap, overrides={
            **LEARNING, "learning.node_index": 3, "learning.start_wait_s": 60.0, "learning.seed": seed,
            "learning.round_deadline_s": 5.0}))
        await late.start()
        await wait_until(lambda: bool(seen), RUN_S, "the catch-up")
        honest_acc, honest_attack = _scores(honest, honest.learner.engine.public_state()[0])
        poison_acc, poison_attack = _scores(honest, poison)
    finally:
        NodeLearner.start = original_start  # type: ignore[method-assign]
        logger.removeHandler(watch)
        for node in ahead + ([late] if late is not None else []):
            await node.stop()
    return {"code": str(Path(murmur.__file__).parent.parent), "poison": args.poison, "seed": seed,
            "late": seen[0], "honest": {"accuracy": honest_acc, "attack_rate": honest_attack},
            "poison_model": {"accuracy": poison_acc, "attack_rate": poison_attack}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poison", choices=("flip", "noise"), default="flip")
    parser.add_argument("--lead", type=int, default=15, help="rounds the three run before the late node starts")
    parser.add_argument("--flip-steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(asyncio.run(run_once(Path(tmp), args, seed=run))), flush=True)


if __name__ == "__main__":
    main()
