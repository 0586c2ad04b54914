"""docs/TRAINERS.md's trainer, config and error messages, run as written: the doc cannot rot."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from murmur.errors import TrainerError
from murmur.learning.aggregators.base import get_aggregator
from murmur.learning.rounds import RoundEngine
from murmur.learning.trainers.base import EvalStats, TrainerContext
from murmur.learning.trainers.checked import CheckedTrainer, checked
from murmur.learning.trainers.registry import create_trainer, load_trainer
from murmur.node.config import load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "TRAINERS.md"
ROUNDS = 3
CHANCE = 1 / 3  # three classes


def _blocks(lang: str) -> list[str]:
    """The bodies of the doc's fenced blocks whose info string is ``lang`` ("" for plain ones)."""
    blocks: list[tuple[str, list[str]]] = []
    inside = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if not inside:
                blocks.append((line[3:].strip(), []))
            inside = not inside
        elif inside:
            blocks[-1][1].append(line)
    assert not inside, "an unclosed code fence"
    return ["\n".join(body) + "\n" for info, body in blocks if info == lang]


@pytest.fixture
def mymod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The doc's one Python block, written where its first line says."""
    [code] = _blocks("python")
    name = re.match(r"# (\w+)\.py:", code)
    assert name, "the trainer block starts with '# <module>.py: ...'"
    (tmp_path / f"{name[1]}.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name[1], raising=False)
    return name[1]


def _doc_config(tmp_path: Path, node_index: int):
    [toml] = [b for b in _blocks("toml") if b.startswith("[learning]")]
    path = tmp_path / "node.toml"
    path.write_text(toml, encoding="utf-8")
    return load_config(path, {"learning.device": "cpu", "learning.num_nodes": 2, "learning.node_index": node_index})


def test_documented_trainer_learns_in_rounds_through_the_registry(mymod, tmp_path):
    configs = [_doc_config(tmp_path, i) for i in range(2)]
    assert configs[0].learning.trainer == f"{mymod}:MyTrainer" and configs[0].learning.enabled
    trainers = [create_trainer(c.learning.trainer, c.learning.trainer_context()) for c in configs]
    assert all(isinstance(t, CheckedTrainer) for t in trainers)
    # the documented options reached the trainer: hidden = 32 gives 2*32+32 + 32*3+3 parameters
    assert trainers[0].options.hidden == 32 and trainers[0].options.lr == 0.05
    assert trainers[0].num_params() == 195
    names = ["n0", "n1"]
    engines = [RoundEngine(t, get_aggregator("mean", self_id=n)) for t, n in zip(trainers, names, strict=True)]
    before = trainers[0].evaluate().accuracy
    for _ in range(ROUNDS):
        messages = [e.open_round({names[1 - i]: 1}, e.local_update()) for i, e in enumerate(engines)]
        for i, engine in enumerate(engines):
            engine.offer(names[1 - i], engine.round, messages[1 - i].increment)
            assert engine.quorum_reached()
        reports = [e.finish_round(evaluate=True) for e in engines]
    assert all(r.received == 1 for r in reports)
    accuracies = [r.eval.accuracy for r in reports if r.eval is not None]
    assert before < CHANCE + 0.1 and len(accuracies) == 2 and min(accuracies) > 0.8, (before, accuracies)
    # two nodes, equal Metropolis-Hastings weights: they hold the same (averaged) model
    torch.testing.assert_close(trainers[0].get_flat(), trainers[1].get_flat())


def test_documented_error_messages_are_the_real_ones(mymod):
    """Break the doc's trainer the three ways the doc quotes; the messages must match."""
    [block] = [b for b in _blocks("") if "returned" in b]
    quoted = block.strip().splitlines()
    base = load_trainer(f"{mymod}:MyTrainer")

    class MyTrainer(base):  # the doc's class name, so the messages read as quoted
        broken = ""

        def train(self, steps=None):
            stats = super().train(steps)
            return {"loss": stats.loss} if self.broken == "train" else stats

        def get_flat(self):
            flat = super().get_flat()
            return flat.double() if self.broken == "get_flat" else flat

        def evaluate(self):
            stats = super().evaluate()
            return EvalStats(stats.loss, 91.0, stats.n) if self.broken == "evaluate" else stats

    raw = MyTrainer(TrainerContext(0, 1, 0, device="cpu", options={"hidden": 32}))
    trainer = checked(raw)
    messages = []
    for method in ("train", "get_flat", "evaluate"):
        raw.broken = method
        with pytest.raises(TrainerError) as err:
            getattr(trainer, method)()
        messages.append(str(err.value))
    assert messages == quoted
