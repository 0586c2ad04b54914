from __future__ import annotations

import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator


def test_median_rejects_a_huge_outlier() -> None:
    own = torch.tensor([1.0, 2.0])
    ups = [PeerUpdate("a", torch.tensor([2.0, 3.0])), PeerUpdate("b", torch.tensor([3.0, 1.0])),
           PeerUpdate("evil", torch.tensor([1e9, -1e9]))]
    res = get_aggregator("median").aggregate(own, ups, 3)
    torch.testing.assert_close(res.delta, torch.tensor([2.5, 1.5]))  # even count: middle pair mean
    assert res.weights["evil"] == 0.0


def test_median_odd_count_known_answer_and_weights() -> None:
    own = torch.tensor([0.0, 10.0])
    ups = [PeerUpdate("a", torch.tensor([1.0, 20.0])), PeerUpdate("b", torch.tensor([5.0, -3.0]))]
    res = get_aggregator("median").aggregate(own, ups, 2)
    torch.testing.assert_close(res.delta, torch.tensor([1.0, 10.0]))
    assert res.weights == {"self": 0.5, "a": 0.5, "b": 0.0}
