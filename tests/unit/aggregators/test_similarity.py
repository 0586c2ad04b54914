from __future__ import annotations

import math

import torch

from murmur.learning.aggregators.similarity import (
    PARDON_EPS,
    anchored_similarity,
    cosine_from_gram,
    cosine_matrix,
    foolsgold_weights,
    gram_matrix,
)


def logit_weight(w: float) -> float:
    return min(1.0, max(0.0, math.log(w / (1 - w)) + 0.5))


def test_cosine_from_one_gram_matches_normalised_rows() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 1000, generator=g)
    rows[3] = 0.0
    normed = torch.nn.functional.normalize(rows.double(), dim=1)
    torch.testing.assert_close(cosine_matrix(rows), normed @ normed.T, atol=1e-6, rtol=0)
    assert cosine_matrix(rows)[3].abs().max() == 0  # zero history: similarity 0, not NaN


def test_feature_weights_restrict_the_similarity() -> None:
    a = torch.tensor([1.0, 0.0, 5.0])
    b = torch.tensor([1.0, 0.0, -5.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    assert cosine_from_gram(gram_matrix(torch.stack([a, b]), mask))[0, 1] == 1.0
    assert cosine_matrix(torch.stack([a, b]))[0, 1] < 0


def test_fewer_than_two_histories_get_weight_one() -> None:
    assert foolsgold_weights(torch.ones(1, 1)).tolist() == [1.0]
    assert foolsgold_weights(torch.ones(0, 0)).numel() == 0


def test_all_zero_histories_keep_weight_one() -> None:
    w = foolsgold_weights(cosine_matrix(torch.zeros(4, 10)))
    assert w.tolist() == [1.0] * 4


def test_identical_histories_all_zero_without_nan() -> None:
    w = foolsgold_weights(cosine_matrix(torch.ones(3, 10)))
    assert w.tolist() == [0.0] * 3


def test_nan_similarities_give_nan_free_weights() -> None:
    cs = torch.full((3, 3), float("nan"), dtype=torch.float64)
    w = foolsgold_weights(cs)
    assert torch.isfinite(w).all()


def test_pardoning_known_answer() -> None:
    # A, B: Sybil pair (cos 0.95). C: honest, cos 0.6 with both. D: unrelated.
    cs = torch.tensor(
        [
            [1.0, 0.95, 0.6, 0.0],
            [0.95, 1.0, 0.6, 0.0],
            [0.6, 0.6, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    w = foolsgold_weights(cs)
    v_a, v_c = 0.95 + PARDON_EPS, 0.6 + PARDON_EPS
    pardoned = 0.6 * v_c / v_a  # C's similarity to A/B, scaled because v_C < v_A
    w_c = 1.0 - pardoned  # D has max cs 0 -> w_D = 1 is the normaliser
    assert w[2].item() == pytest_approx(logit_weight(w_c))
    assert 0.99 < w[2].item() < 1.0  # without pardoning: logit(0.4) + 0.5 = 0.095
    assert w[3].item() == 1.0
    assert w[0].item() == 0.0 and w[1].item() == 0.0


def pytest_approx(x: float) -> object:
    import pytest

    return pytest.approx(x, rel=1e-9)


def test_sybil_pair_weight_zero_and_honest_weight_one_from_vectors() -> None:
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(5, 4096, generator=g)
    sybil = torch.randn(4096, generator=g)
    rows = torch.cat([honest, sybil.expand(3, -1)])
    w = foolsgold_weights(cosine_matrix(rows))
    assert w[:5].tolist() == [1.0] * 5
    assert w[5:].tolist() == [0.0] * 3


def test_anchored_similarity_known_answers() -> None:
    # row 0 is our own model; a and b near each other, far from us; c apart
    rows = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 1.0], [0.0, 10.0]])
    sim = anchored_similarity(gram_matrix(rows))
    # pairs: 0a 10, 0b sqrt(101), 0c 10, ab 1, ac sqrt(200), bc sqrt(181): median sqrt(101)
    assert sim[0, 1].item() == pytest_approx(1.0 - 1.0 / 10.0)  # 1 - D_ab / min(D_a0, D_b0, m)
    assert sim[1, 0].item() == sim[0, 1].item()
    assert sim[0, 2].item() == 0.0 and sim[1, 2].item() == 0.0  # further apart than from us
    assert torch.equal(sim.diagonal(), torch.ones(3, dtype=torch.float64))


def test_anchored_similarity_caps_the_yardstick_at_the_median_pair() -> None:
    # a and b far from us (our model off) but no nearer each other than the round's
    # typical pair: the median (not their distance from us) is the yardstick
    rows = torch.tensor([[0.0, 0.0], [100.0, 0.0], [100.0, 4.0], [104.0, 0.0], [104.0, 4.0]])
    sim = anchored_similarity(gram_matrix(rows))
    d = torch.cdist(rows.double(), rows.double())
    m = float(d[torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)].median())
    assert m < 100.0
    assert sim[0, 1].item() == pytest_approx(max(0.0, 1.0 - 4.0 / m))


def test_anchored_similarity_edge_cases() -> None:
    assert anchored_similarity(gram_matrix(torch.ones(2, 3))).shape == (1, 1)
    assert anchored_similarity(gram_matrix(torch.ones(2, 3))).tolist() == [[0.0]]  # one peer: nothing to compare
    same = anchored_similarity(gram_matrix(torch.zeros(3, 4)))  # every model ours: no yardstick, nothing alike
    assert same.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_anchored_similarity_takes_rows_at_one_point_for_clones_unless_it_is_ours() -> None:
    """Four identical rows away from us: most pairs are at distance 0, so the
    median pair (the cap on the yardstick) is 0; they are still clones. Rows
    at our own point are not (every model still the common start)."""
    clones = torch.cat([torch.zeros(1, 4), torch.ones(4, 4)])
    assert anchored_similarity(gram_matrix(clones)).tolist() == [[1.0] * 4] * 4
    mixed = torch.cat([torch.zeros(1, 4), torch.ones(2, 4), torch.zeros(1, 4)])
    sim = anchored_similarity(gram_matrix(mixed))
    assert sim[0, 1].item() == 1.0 and sim[2, 2].item() == 0.0  # (the row at our point: no yardstick)
