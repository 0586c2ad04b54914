"""The outer optimizer of local-steps training (DiLoCo, Douillard et al. 2023).

With H local steps a round, a node's round is one *outer* step: the inner
optimizer (the trainer's own) moves the model H steps, the round engine
mixes the result with the neighbours', and the model's total move in the
round, start − mixed, is the round's pseudo-gradient g (DiLoCo's
θ_start − θ_end, here after gossip averaging instead of an all-reduce). An
outer optimizer decides the actual step from g; plain SGD with lr 1 is the
engine without one. DiLoCo's choice is SGD with Nesterov momentum (lr 0.7,
momentum 0.9): g is smoothed over rounds, which tolerates the noise of few,
large, compressed updates and speeds up the slow directions.

State: the momentum buffer, checkpointed with the engine (restart resumes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OuterConfig", "OuterOptimizer"]


@dataclass(frozen=True)
class OuterConfig:
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"outer lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")


class OuterOptimizer:
    """SGD with (Nesterov) momentum on a model's per-round pseudo-gradient:

        g = start − target,  m ← μ·m + g,  step = g + μ·m (Nesterov) or m,
        new = start − lr·step

    exactly ``torch.optim.SGD(lr, momentum, nesterov)`` applied to one
    parameter vector whose gradient is g."""

    def __init__(self, config: OuterConfig = OuterConfig()) -> None:
        self.config = config
        self.momentum: torch.Tensor | None = None

    def step(self, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The model after this round: ``start`` is the model the round began
        with, ``target`` where the round's local steps and mixing took it."""
        cfg = self.config
        grad = start - target
        if self.momentum is None or self.momentum.shape != grad.shape:
            self.momentum = grad.clone()  # torch's SGD: the first buffer is the gradient itself
        else:
            self.momentum.mul_(cfg.momentum).add_(grad)
        step = grad.add(self.momentum, alpha=cfg.momentum) if cfg.nesterov else self.momentum
        return start - cfg.lr * step

    def reset(self) -> None:
        """Forget the momentum (the model was replaced: a catch-up)."""
        self.momentum = None

    def state(self) -> dict[str, Any]:
        return {} if self.momentum is None else {"outer_momentum": self.momentum.clone()}

    def restore(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        buf = state.get("outer_momentum")
        self.momentum = None if buf is None else buf.to(device, torch.float32).clone()
