"""Per-example clipping with torch.func against a reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from murmur.learning.privacy.dpsgd import apply_grads, clipped_mean_grad, linear_clipped_mean_grad, per_example_grads


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(9, 5) * 3
    y = torch.randint(0, 3, (9,))
    return model, x, y


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[dict, list[float]]:
    loss_fn = nn.CrossEntropyLoss()
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = {k: p.grad.clone() for k, p in model.named_parameters()}
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        norms.append(float(norm))
        s = min(1.0, clip / float(norm))
        for k in total:
            total[k] += g[k] * s
    return {k: v / x.shape[0] for k, v in total.items()}, norms


def test_matches_reference_loop_and_clips() -> None:
    model, x, y = tiny()
    clip = 0.5
    ref, norms = reference(model, x, y, clip)
    assert max(norms) > clip  # the test would be vacuous otherwise
    got = clipped_mean_grad(model, nn.CrossEntropyLoss(), x, y, clip)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    per = per_example_grads(model, nn.CrossEntropyLoss(), x, y)
    raw = torch.sqrt(sum(g.reshape(9, -1).pow(2).sum(1) for g in per.values()))
    assert torch.allclose(raw, torch.tensor(norms), rtol=1e-5)
    scale = torch.clamp(clip / raw, max=1.0)
    clipped = raw * scale
    assert float(clipped.max()) <= clip * (1 + 1e-5)


def test_noise_has_the_right_scale() -> None:
    model, x, y = tiny()
    clip, sigma = 0.5, 4.0
    clean = clipped_mean_grad(model, nn.CrossEntropyLoss(), x, y, clip)
    gen = torch.Generator().manual_seed(1)
    diffs = []
    for _ in range(200):
        noisy = clipped_mean_grad(model, nn.CrossEntropyLoss(), x, y, clip, sigma, gen)
        diffs.append(torch.cat([(noisy[k] - clean[k]).reshape(-1) for k in clean]))
    std = float(torch.stack(diffs).std())
    assert std == pytest.approx(sigma * clip / x.shape[0], rel=0.05)


def test_apply_grads_feeds_an_optimizer() -> None:
    model, x, y = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    grads = clipped_mean_grad(model, nn.CrossEntropyLoss(), x, y, 1.0)
    apply_grads(model, grads)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for b, (k, p) in zip(before, model.named_parameters()):
        torch.testing.assert_close(p.detach(), b - 0.1 * grads[k])


@pytest.mark.parametrize("value", [3e38, math.nan])
@pytest.mark.parametrize("fast", [False, True], ids=["vmap", "linear"])
def test_an_example_with_a_non_finite_gradient_counts_as_zero(fast: bool, value: float) -> None:
    """One input at 3e38 (finite in the data) made the clipped mean NaN, the
    round's step was then skipped, and one example moved the step by lr·C,
    not the accounted 2·lr·C/B. It now contributes a zero gradient: the
    others' clipped mean over the whole batch, finite."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    torch.manual_seed(0)
    x, y = torch.randn(9, 5) * 3, torch.randint(0, 3, (9,))
    bad = x.clone()
    bad[4] = value
    clip = 0.5
    if fast:
        got, _ = linear_clipped_mean_grad(model, nn.CrossEntropyLoss(), bad, y, clip)
    else:
        got = clipped_mean_grad(model, nn.CrossEntropyLoss(), bad, y, clip)
    others = torch.cat([torch.arange(4), torch.arange(5, 9)])
    ref, _ = reference(model, x[others], y[others], clip)
    for k in ref:
        assert bool(torch.isfinite(got[k]).all())
        torch.testing.assert_close(got[k], ref[k] * 8 / 9, rtol=1e-5, atol=1e-6)  # eight of nine, over nine
