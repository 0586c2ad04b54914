"""Plug-in trainers for tests, named in configs as ``tests.trainers:Class``
(the way a user plugs in their own model), and the least-squares trainer
of the round engine's known-answer tests (:class:`LeastSquaresTrainer`).

:class:`VectorTrainer` is one flat vector of any size with a quadratic loss:
node i pulls it toward its own target, so the network optimum is the mean
of the targets. Its cost per step is a few vector operations, which is what
lets a test exchange a 10-million-parameter model on a 2-core machine and
measure the wire and the node, not a network's forward pass. Every number
is real torch, and "accuracy" rises as the model nears the network optimum.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from murmur.learning.trainers.base import EvalStats, Trainer, TrainerContext, TrainStats

DEFAULT_SIZE = 100_000
TARGET_SCALE = 1.0


def _targets(seed: int, node_index: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + node_index)
    return torch.randn(size, generator=generator) * TARGET_SCALE


class VectorTrainer(Trainer):
    """``size`` float32 parameters (option ``size``), all starting at zero;
    loss = mean squared distance to this node's target; one step of
    gradient descent with rate ``lr`` per local step."""

    name = "vector"

    def __init__(self, ctx: TrainerContext) -> None:
        super().__init__(ctx)
        self.device = torch.device("cpu")
        self.size = int(ctx.options.get("size", DEFAULT_SIZE))
        self.lr = float(ctx.options.get("lr", 0.2))
        self.local_steps = int(ctx.options.get("local_steps", 1))
        self.sleep_s = float(ctx.options.get("sleep_s", 0.0))  # a slow trainer (stall tests)
        self.model = torch.zeros(self.size)
        self.target = _targets(ctx.seed, ctx.node_index, self.size)
        # The network optimum is the mean of every node's target; accuracy
        # is 1 there and falls toward 0 with the distance from it.
        self.optimum = torch.zeros(self.size)
        for i in range(ctx.num_nodes):  # one target at a time: a 10M model must not cost n copies
            self.optimum.add_(_targets(ctx.seed, i, self.size), alpha=1.0 / ctx.num_nodes)

    def num_params(self) -> int:
        return self.size

    def get_flat(self) -> torch.Tensor:
        return self.model.clone()

    def set_flat(self, flat: torch.Tensor) -> None:
        self.model.copy_(flat)

    def train(self, steps: int | None = None) -> TrainStats:
        steps = steps or self.local_steps
        time.sleep(self.sleep_s)  # runs in the learner's worker thread, like real training
        loss = 0.0
        for _ in range(steps):
            diff = self.model - self.target
            loss += float(diff.square().mean())
            self.model.sub_(diff, alpha=self.lr)
        return TrainStats(loss=loss / steps, examples=steps, steps=steps)

    def evaluate(self) -> EvalStats:
        distance = float((self.model - self.optimum).square().mean())
        return EvalStats(loss=distance, accuracy=math.exp(-distance), n=self.size)

    def attack_success_rate(self, attack: str) -> float:
        return 0.0


class LeastSquaresTrainer(Trainer):
    """Least squares 0.5 * mean((X w - y)^2) on fixed per-node data, full-batch
    SGD through torch autograd and ``torch.optim.SGD``: no randomness at all,
    so a known-answer test can compute every model independently in float64
    numpy from :meth:`node_data` and :meth:`initial_model`. A test module
    subclasses it with its own sizes (``dim``, ``samples``, ``lr``, ``steps``)
    and data (``data_seed``); node i's targets are offset by i, so the nodes
    disagree and mixing shows."""

    name = "least-squares-test"
    dim = 5
    samples = 12
    lr = 0.1
    steps = 3
    data_seed = 1000

    @classmethod
    def node_data(cls, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(cls.data_seed + index)
        x = rng.standard_normal((cls.samples, cls.dim))
        y = rng.standard_normal(cls.samples) + index
        return x, y

    @classmethod
    def initial_model(cls, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(cls.dim)

    def __init__(self, ctx: TrainerContext) -> None:
        super().__init__(ctx)
        self.device = torch.device("cpu")
        x, y = self.node_data(ctx.node_index)
        self._x = torch.tensor(x, dtype=torch.float32)
        self._y = torch.tensor(y, dtype=torch.float32)
        self._w = torch.tensor(self.initial_model(ctx.seed), dtype=torch.float32, requires_grad=True)
        self._opt = torch.optim.SGD([self._w], lr=self.lr)

    def _loss(self) -> torch.Tensor:
        return 0.5 * ((self._x @ self._w - self._y) ** 2).mean()

    def num_params(self) -> int:
        return self.dim

    def get_flat(self) -> torch.Tensor:
        return self._w.detach().clone()

    def set_flat(self, flat: torch.Tensor) -> None:
        if flat.shape != (self.dim,):
            raise ValueError("wrong size")
        with torch.no_grad():
            self._w.copy_(flat)

    def train(self, steps: int | None = None) -> TrainStats:
        steps = self.steps if steps is None else steps
        total = 0.0
        for _ in range(steps):
            self._opt.zero_grad()
            loss = self._loss()
            loss.backward()
            self._opt.step()
            total += float(loss.detach())
        return TrainStats(loss=total / max(steps, 1), examples=steps * self.samples, steps=steps)

    def evaluate(self) -> EvalStats:
        with torch.no_grad():
            return EvalStats(loss=float(self._loss()), accuracy=0.0, n=self.samples)

    def attack_success_rate(self, attack: str) -> float:
        return 0.0
