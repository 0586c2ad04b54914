"""Per-example gradient clipping for example-level DP (DP-SGD step).

Threat model: honest-but-curious, possibly colluding peers (Sybils included)
that know only their own edges' seeds. Example-level accounting needs each
training example's influence on a step bounded by C_ex, so gradients are
computed per example (torch.func: ``vmap(grad(functional_call))``), each is
clipped to norm C_ex, and the batch mean is returned — optionally with
Gaussian noise of std σ_ex·C_ex/batch (the sensitivity of the mean).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_grads(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn`` for each example: name → [batch, *param.shape]."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)


def clipped_mean_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    clip: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mean of per-example gradients, each clipped to L2 norm ``clip`` (over all
    parameters jointly), plus N(0, (σ_ex·C_ex/B)²) per coordinate when
    ``noise_multiplier`` σ_ex > 0."""
    if clip <= 0:
        raise ValueError("clip must be positive")
    grads = per_example_grads(model, loss_fn, inputs, targets)
    batch = inputs.shape[0]
    sq = sum(g.reshape(batch, -1).pow(2).sum(dim=1) for g in grads.values())
    scale = torch.clamp(clip / (sq.sqrt() + 1e-12), max=1.0)
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        mean = (g * scale.view(batch, *([1] * (g.dim() - 1)))).mean(dim=0)
        if noise_multiplier > 0:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + noise * (noise_multiplier * clip / batch)
        out[name] = mean
    return out


def apply_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Store ``grads`` in ``.grad`` so any torch optimizer can take the step."""
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = grads[name].detach().clone()
