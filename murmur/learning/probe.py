"""What a node's probe reports about models: how each does on a fixed sample of
the node's own training data (SybilWall's behavioural checks).

Kept apart from trainers and aggregators: trainers produce it, the round
engine hands it to aggregators, and neither should import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProbeResult:
    """Per probed model, in the order asked: its mean loss on the probe sample
    and its outputs there (float32 logits, one row per prediction: examples,
    or examples x positions for a sequence model). Outputs let an aggregator
    compare models by what they *do* on our data, where an offset in a
    direction that changes little (an attacker's random diversification)
    barely shows."""

    losses: list[float]
    outputs: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.losses) != len(self.outputs):
            raise ValueError("probe result: one loss and one output per model")
