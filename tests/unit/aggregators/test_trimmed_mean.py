from __future__ import annotations

import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator


def test_trimmed_mean_rejects_a_huge_outlier() -> None:
    own = torch.tensor([1.0, 1.0])
    vals = [2.0, 3.0, 4.0]
    ups = [PeerUpdate(f"p{i}", torch.tensor([v, v])) for i, v in enumerate(vals)]
    ups.append(PeerUpdate("evil", torch.tensor([1e9, -1e9])))
    # n = 5, beta = 0.2 -> drop one per side per coordinate
    res = get_aggregator("trimmed_mean").aggregate(own, ups, 4)
    torch.testing.assert_close(res.delta, torch.tensor([3.0, 2.0]))
    assert res.weights["evil"] == 0.0
    assert abs(sum(res.weights.values()) - 1.0) < 1e-12


def test_beta_zero_is_the_plain_mean() -> None:
    g = torch.Generator().manual_seed(0)
    own = torch.randn(8, generator=g)
    ups = [PeerUpdate(f"p{i}", torch.randn(8, generator=g)) for i in range(3)]
    res = get_aggregator("trimmed_mean", beta=0.0).aggregate(own, ups, 3)
    torch.testing.assert_close(res.delta, torch.stack([own, *(u.delta for u in ups)]).mean(0))
