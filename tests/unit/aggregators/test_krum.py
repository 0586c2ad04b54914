from __future__ import annotations

import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator


def scenario() -> tuple[torch.Tensor, list[PeerUpdate]]:
    g = torch.Generator().manual_seed(7)
    centre = torch.randn(100, generator=g)
    own = centre + 0.05 * torch.randn(100, generator=g)
    honest = [PeerUpdate(f"h{i}", centre + 0.05 * torch.randn(100, generator=g)) for i in range(5)]
    attack = [PeerUpdate(f"b{i}", -10 * centre + torch.randn(100, generator=g)) for i in range(2)]
    return own, honest + attack


def test_krum_picks_a_member_of_the_honest_cluster() -> None:
    own, ups = scenario()
    res = get_aggregator("krum", f=2).aggregate(own, ups, 7)
    chosen = [p for p, w in res.weights.items() if w == 1.0]
    assert len(chosen) == 1 and not chosen[0].startswith("b")
    assert res.weights["b0"] == res.weights["b1"] == 0.0


def test_multi_krum_averages_only_honest_candidates() -> None:
    own, ups = scenario()
    res = get_aggregator("multi-krum", f=2).aggregate(own, ups, 7)  # m = n - f = 6
    assert {p for p, w in res.weights.items() if w > 0} == {"self", "h0", "h1", "h2", "h3", "h4"}
    expected = torch.stack([own, *(u.delta for u in ups[:5])]).mean(0)
    torch.testing.assert_close(res.delta, expected)


def test_krum_distance_scores_known_answer() -> None:
    from murmur.learning.aggregators.krum import krum_scores, squared_distances

    rows = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    d2 = squared_distances(rows)
    assert d2[0].tolist() == [0.0, 1.0, 9.0, 100.0]
    # n=4, f=0: sum of the 2 nearest others
    assert krum_scores(d2, 0).tolist() == [10.0, 5.0, 13.0, 130.0]
