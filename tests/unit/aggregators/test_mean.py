from __future__ import annotations

import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator

# A small irregular graph: degrees 1..4.
EDGES = [(0, 1), (1, 2), (1, 3), (2, 3), (3, 4), (0, 3)]
N = 5


def neighbours(i: int) -> list[int]:
    return [b if a == i else a for a, b in EDGES if i in (a, b)]


def mixing_matrix() -> torch.Tensor:
    """Row i = the weights node i's aggregator applies, read off by sending basis vectors."""
    agg = get_aggregator("mean")
    basis = torch.eye(N)
    rows = []
    for i in range(N):
        ups = [PeerUpdate(str(j), basis[j].clone(), len(neighbours(j))) for j in neighbours(i)]
        rows.append(agg.aggregate(basis[i].clone(), ups, len(neighbours(i))).delta)
    return torch.stack(rows).double()


def test_metropolis_hastings_is_symmetric_and_doubly_stochastic() -> None:
    w = mixing_matrix()
    ones = torch.ones(N, dtype=torch.float64)
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w @ ones, ones)
    torch.testing.assert_close(ones @ w, ones)
    assert (w >= 0).all()
    # known entries: edge (1, 3), deg 3 and 4 -> 1/5; node 4 (deg 1) keeps 1 - 1/5
    assert w[1, 3].item() == torch.tensor(0.2, dtype=torch.float32).item()
    assert abs(w[4, 4].item() - 0.8) < 1e-7


def test_network_average_preserved_by_one_round() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, generator=g)
    w = mixing_matrix().float()
    torch.testing.assert_close((w @ x).mean(0), x.mean(0), atol=1e-6, rtol=0)


def test_missing_neighbour_leaves_its_share_on_self() -> None:
    res = get_aggregator("mean").aggregate(torch.zeros(2), [PeerUpdate("a", torch.ones(2), 2)], 3)
    assert res.weights == {"self": 0.75, "a": 0.25}
    torch.testing.assert_close(res.delta, torch.full((2,), 0.25))
