from __future__ import annotations

import pytest
import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator


def honest_and_huge() -> tuple[torch.Tensor, list[PeerUpdate]]:
    g = torch.Generator().manual_seed(5)
    own = torch.randn(64, generator=g) * 0.1
    ups = [PeerUpdate(f"h{i}", own + 0.1 * torch.randn(64, generator=g), 4) for i in range(3)]
    ups.append(PeerUpdate("evil", torch.full((64,), 1e6), 4))
    return own, ups


def test_one_huge_update_moves_the_result_at_most_w_tau() -> None:
    own, ups = honest_and_huge()
    tau = 0.5
    res = get_aggregator("clipped_gossip", tau=tau).aggregate(own, ups, 4)
    honest_only = get_aggregator("clipped_gossip", tau=tau).aggregate(own, ups[:3], 4)
    shift = torch.linalg.vector_norm(res.delta - honest_only.delta).item()
    assert shift == pytest.approx(0.2 * tau, rel=1e-4)  # W = 1/(4+1), clipped to tau
    plain = get_aggregator("mean").aggregate(own, ups, 4)
    assert torch.linalg.vector_norm(plain.delta - own).item() > 1e5  # unclipped: ruined


def test_adaptive_tau_bounds_influence_without_configuration() -> None:
    own, ups = honest_and_huge()
    res = get_aggregator("clipped_gossip").aggregate(own, ups, 4)
    assert torch.linalg.vector_norm(res.delta - own).item() < 1.0
    assert res.weights["evil"] < 1e-5


def test_small_updates_are_plain_metropolis_hastings() -> None:
    own = torch.zeros(3)
    ups = [PeerUpdate("a", torch.ones(3) * 0.1, 1)]
    res = get_aggregator("clipped_gossip", tau=10.0).aggregate(own, ups, 1)
    ref = get_aggregator("mean").aggregate(own, ups, 1)
    torch.testing.assert_close(res.delta, ref.delta)
    assert res.weights == pytest.approx(ref.weights)


def test_centered_clipping_resists_outlier_and_weights_reproduce_delta() -> None:
    own, ups = honest_and_huge()
    res = get_aggregator("centered_clipping", tau=1.0, iterations=5).aggregate(own, ups, 4)
    assert torch.linalg.vector_norm(res.delta - own).item() < 1.5
    rows = torch.stack([own, *(u.delta for u in ups)]).double()
    w = torch.tensor([res.weights[k] for k in ["self", "h0", "h1", "h2", "evil"]], dtype=torch.float64)
    torch.testing.assert_close((w @ rows).float(), res.delta, rtol=1e-4, atol=1e-4)
