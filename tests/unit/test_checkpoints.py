"""LearnerCheckpoints: when a checkpoint is due, and that what it writes is
what a restarted node resumes from (real round engines, real SybilWall
history, real files in a state dir)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from murmur.learning.aggregators import get_aggregator
from murmur.learning.rounds import RoundConfig, RoundEngine
from murmur.learning.trainers.base import TrainerContext
from murmur.node.checkpoints import LearnerCheckpoints
from murmur.node.config import LearningSection
from murmur.node.state import StateDir
from tests.clocks import ManualClock
from tests.trainers import LeastSquaresTrainer

STEPS = 2


class LinearTrainer(LeastSquaresTrainer):
    name = "linear-test"
    dim, samples, lr, steps, data_seed = 5, 12, 0.1, STEPS, 1000


def _engine(index: int) -> RoundEngine:
    trainer = LinearTrainer(TrainerContext(node_index=index, num_nodes=2, seed=7, device="cpu"))
    return RoundEngine(trainer, get_aggregator("sybilwall", self_id=f"n{index}", functional=False),
                       RoundConfig(local_steps=STEPS))


def _rounds(engines: list[RoundEngine], count: int) -> None:
    """``count`` D-SGD rounds of two engines that hear each other."""
    for _ in range(count):
        messages = [e.open_round({f"n{1 - i}": 1}, e.local_update()) for i, e in enumerate(engines)]
        for i, engine in enumerate(engines):
            engine.offer(f"n{1 - i}", engine.round, messages[1 - i].stacked())
        for engine in engines:
            engine.finish_round()


def _cfg(**changes: object) -> LearningSection:
    return dataclasses.replace(LearningSection(), **{"trainer": LinearTrainer.name, **changes})  # type: ignore[arg-type]


def _checkpoints(state: StateDir, engine: RoundEngine, cfg: LearningSection,
                 clock: ManualClock | None = None) -> LearnerCheckpoints:
    return LearnerCheckpoints(state, cfg, engine.trainer, engine, engine.aggregator, clock=clock or ManualClock())


async def test_a_restarted_learner_resumes_exactly_where_the_checkpoint_was(tmp_path: Path) -> None:
    state = StateDir(tmp_path).create()
    engines = [_engine(0), _engine(1)]
    _rounds(engines, 3)
    await _checkpoints(state, engines[0], _cfg()).save()
    before = engines[0].state()
    history = engines[0].aggregator.state_dict()
    model = engines[0].trainer.get_flat().clone()

    restarted = _engine(0)  # a fresh process: the initial model, round 0
    assert restarted.round == 0
    _checkpoints(state, restarted, _cfg()).restore()
    assert restarted.round == before["round"] == 3
    assert torch.equal(restarted.trainer.get_flat(), model)
    assert torch.equal(restarted.public, before["public"])
    restored = restarted.aggregator.state_dict()
    assert restored.keys() == history.keys()
    for key, value in history.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key


async def test_a_checkpoint_of_another_model_is_set_aside_not_resumed_or_overwritten(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = StateDir(tmp_path).create()
    engines = [_engine(0), _engine(1)]
    _rounds(engines, 2)
    await _checkpoints(state, engines[0], _cfg()).save()
    written = state.checkpoint_path.read_bytes()

    other = _engine(0)
    _checkpoints(state, other, _cfg(trainer="another-trainer")).restore()
    assert other.round == 0  # started fresh
    assert not state.checkpoint_path.exists()
    aside = [p for p in tmp_path.iterdir() if p.is_file() and p.read_bytes() == written]
    assert len(aside) == 1 and aside[0] != state.checkpoint_path, list(tmp_path.iterdir())
    assert any(getattr(r, "event", None) == "checkpoint_set_aside" for r in caplog.records)


async def test_a_checkpoint_is_due_after_its_rounds_or_its_seconds(tmp_path: Path) -> None:
    state = StateDir(tmp_path).create()
    engines = [_engine(0), _engine(1)]
    clock = ManualClock(100.0)
    by_rounds = _checkpoints(state, engines[0], _cfg(checkpoint_every_rounds=2, checkpoint_every_s=0.0), clock)
    by_time = _checkpoints(state, engines[1], _cfg(checkpoint_every_rounds=0, checkpoint_every_s=60.0), clock)
    _rounds(engines, 1)
    assert not by_rounds.due() and not by_time.due()
    _rounds(engines, 1)
    assert by_rounds.due() and not by_time.due()
    await by_rounds.save()
    assert not by_rounds.due()
    clock.now += 60.0
    assert by_time.due() and not by_rounds.due()
    await by_time.save()
    assert not by_time.due()

