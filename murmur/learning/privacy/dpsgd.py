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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from murmur.errors import ConfigError

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
    denominator: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean of per-example gradients, each clipped to L2 norm ``clip`` (over all
    parameters jointly), plus N(0, (σ_ex·C_ex/B)²) per coordinate when
    ``noise_multiplier`` σ_ex > 0. ``denominator``: divide the sum by it
    instead of the batch's size (Poisson sampling: the expected size, so
    that one example moves the result by at most C/denominator)."""
    if clip <= 0:
        raise ValueError("clip must be positive")
    grads = per_example_grads(model, loss_fn, inputs, targets)
    batch = inputs.shape[0]
    sq = sum(g.reshape(batch, -1).pow(2).sum(dim=1) for g in grads.values())
    kept = torch.isfinite(sq)
    scale = clip_scales(sq, kept, clip)
    out: dict[str, torch.Tensor] = {}
    divide = batch if denominator is None else denominator
    for name, g in grads.items():
        shape = (batch, *([1] * (g.dim() - 1)))
        mean = (torch.where(kept.view(shape), g, 0.0) * scale.view(shape)).sum(dim=0) / divide
        if noise_multiplier > 0:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + noise * (noise_multiplier * clip / divide)
        out[name] = mean
    return out


def clip_scales(sq: torch.Tensor, kept: torch.Tensor, clip: float) -> torch.Tensor:
    """Each example's clip factor min(1, C/‖g‖) from its squared norm, 0 for
    an example whose gradient is not finite (``kept`` False). Such an
    example made the whole mean NaN, and the round's step was then skipped:
    one example moved the step by lr·C instead of the accounted 2·lr·C/B.
    Counted as a zero gradient, it moves it by at most C/B like any other."""
    return torch.where(kept, torch.clamp(clip / (sq.sqrt() + 1e-12), max=1.0), 0.0)


def apply_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Store ``grads`` in ``.grad`` so any torch optimizer can take the step."""
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = grads[name].detach().clone()


# --------------------------------------------------------------------------- linear fast path


def linear_only(model: nn.Module) -> bool:
    """Whether every trainable parameter belongs to an ``nn.Linear`` (MLPs,
    logistic regression): then :func:`linear_clipped_mean_grad` applies."""
    owned = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return all(id(p) in owned for p in model.parameters() if p.requires_grad)


def linear_clipped_mean_grad(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, clip: float,
    denominator: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Exactly :func:`clipped_mean_grad` (no noise) for a :func:`linear_only`
    model (each layer called once per forward), plus the batch's mean loss, in one forward and one backward pass.

    Why: ``vmap(grad(...))`` costs ~10 ms a step on a tiny MLP (dispatch
    overhead), which made a 16-node × thousands-of-steps privacy sweep
    infeasible on two cores. For a Linear layer z = a·Wᵀ + b the gradient of
    example k's loss is the rank-one g_k ⊗ a_k (g_k = ∂ℓ_k/∂z_k), so its
    squared norm is ‖g_k‖²·‖a_k‖² (+ ‖g_k‖² for the bias), and the clipped
    mean is (s ⊙ G)ᵀA / B with per-example scales s — no per-example tensors.
    ``loss_fn`` must reduce by the mean (ℓ_k are recovered by scaling by B).
    """
    if clip <= 0:
        raise ValueError("clip must be positive")
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts: dict[nn.Linear, torch.Tensor] = {}
    outs: dict[nn.Linear, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if module in outs:
            raise ValueError("linear fast path needs each Linear layer called once per forward")
        acts[module] = args[0].detach()  # type: ignore[index]
        out.retain_grad()
        outs[module] = out  # type: ignore[index]

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        loss = loss_fn(model(inputs), targets)
    finally:
        for h in handles:
            h.remove()
    batch = inputs.shape[0]
    used = [layer for layer in layers if layer in outs]
    zs = [outs[layer] for layer in used]
    dz = torch.autograd.grad(loss * batch, zs)  # per-example ∂ℓ_k/∂z_k (sum, not mean)
    sq = torch.zeros(batch, dtype=torch.float32, device=inputs.device)
    for layer, g in zip(used, dz, strict=True):
        a = acts[layer]
        if a.dim() != 2:
            raise ValueError("linear fast path needs 2-D activations (flatten first)")
        gn = g.pow(2).sum(dim=1)
        sq += gn * a.pow(2).sum(dim=1)
        if layer.bias is not None:
            sq += gn
    kept = torch.isfinite(sq)
    scale = clip_scales(sq, kept, clip)
    divide = batch if denominator is None else denominator
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for layer, g in zip(used, dz, strict=True):
        sg = torch.where(kept.unsqueeze(1), g, 0.0) * scale.unsqueeze(1) / divide
        out[names[id(layer.weight)]] = sg.t() @ torch.where(kept.unsqueeze(1), acts[layer], 0.0)
        if layer.bias is not None:
            out[names[id(layer.bias)]] = sg.sum(dim=0)
    return out, loss.detach()


@dataclass(frozen=True)
class DpSgdStep:
    """What example-level accounting needs to know of the trainer's one step per round."""

    sampling_rate: float  # q = batch / local dataset size
    batch_size: int
    sensitivity: float  # lr · dp_clip / batch: one example's reach into the round delta


def dp_sgd_step(trainer: Any, local_steps: int) -> DpSgdStep:
    """Check that a round is exactly one DP-SGD step and return its accounting terms.

    Example-level ε holds only if the round delta is −lr·(mean of per-example
    clipped gradients): one local step (E steps would each be taken at a point
    that already depends on the data), momentum 0 (the buffer carries
    un-noised earlier gradients) and ``dp_clip`` > 0. Then one example moves
    the delta by at most lr·dp_clip/batch, and the delta clip C, a projection,
    cannot increase that. The engine must also train from the public model
    (:class:`~murmur.learning.rounds.TrainFrom`); the learner sees to that.
    """
    options = getattr(trainer, "options", None)
    batch = getattr(options, "batch_size", None)
    size = getattr(trainer, "train_size", None)
    if not isinstance(batch, int) or not isinstance(size, int) or size <= 0:
        raise ConfigError("example-level privacy needs a trainer with options.batch_size and train_size")
    problem = one_step_problem(options, local_steps)
    if problem is not None:
        raise ConfigError(f'privacy.level = "example" {problem}')
    lr, dp_clip = float(options.lr), float(options.dp_clip)
    return DpSgdStep(min(1.0, batch / size), batch, lr * dp_clip / batch)


def one_step_problem(options: Any, local_steps: int) -> str | None:
    """Why a round of a trainer with ``options`` (and ``learning.local_steps``,
    0 for the trainer's own) is not one DP-SGD step, or None. Needs no data,
    so a node's preflight (``config check``) asks it too."""
    steps = local_steps or getattr(options, "local_steps", 1)
    dp_clip = float(getattr(options, "dp_clip", 0.0) or 0.0)
    momentum = float(getattr(options, "momentum", 0.0) or 0.0)
    lr = float(getattr(options, "lr", 0.0) or 0.0)
    optimizer = getattr(options, "optimizer", "sgd")
    if steps != 1 or momentum != 0.0 or dp_clip <= 0.0 or lr <= 0.0 or optimizer != "sgd":
        return ('needs one DP-SGD step per round: learning.local_steps = 1 and trainer '
                f'options optimizer = "sgd", momentum = 0, dp_clip > 0 (got local_steps={steps}, '
                f"optimizer={optimizer}, momentum={momentum}, dp_clip={dp_clip})")
    return None
