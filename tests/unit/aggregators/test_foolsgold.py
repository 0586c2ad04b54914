from __future__ import annotations

import io
import math

import pytest
import torch

from murmur.learning.aggregators import get_aggregator

from .conftest import orthogonalish, updates

DIM = 2048


def run_rounds(agg, rounds: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """5 honest peers with their own drift + noise; 3 Sybils sending one identical delta."""
    dirs = orthogonalish(6, DIM, seed)
    g = torch.Generator().manual_seed(seed + 1)
    res = None
    for _ in range(rounds):
        deltas = {f"h{i}": dirs[i] + 0.5 * torch.randn(DIM, generator=g) for i in range(5)}
        sybil = dirs[5] + 0.5 * torch.randn(DIM, generator=g)
        deltas.update({f"s{i}": sybil.clone() for i in range(3)})
        own = torch.randn(DIM, generator=g)
        res = agg.aggregate(own, updates(deltas), 8)
    return res, own, deltas


def test_sybils_zero_honest_full_weight_self_one_renormalised() -> None:
    res, own, deltas = run_rounds(get_aggregator("foolsgold"), 3)
    assert [res.weights[f"s{i}"] for i in range(3)] == [0.0, 0.0, 0.0]
    assert [res.weights[f"h{i}"] for i in range(5)] == [pytest.approx(1 / 6)] * 5
    assert res.weights["self"] == pytest.approx(1 / 6)
    expected = (own + sum(deltas[f"h{i}"] for i in range(5))) / 6
    torch.testing.assert_close(res.delta, expected, rtol=1e-5, atol=1e-5)


def test_memory_window_of_one_only_sees_the_current_update() -> None:
    a, b, c = torch.eye(3)
    first = {"x": a, "y": a.clone(), "z": c}  # x, y identical this round
    second = {"x": a, "y": b, "z": c}  # all orthogonal this round
    windowed = get_aggregator("foolsgold", memory=1)
    windowed.aggregate(torch.zeros(3), updates(first), 3)
    res = windowed.aggregate(torch.zeros(3), updates(second), 3)
    assert res.weights == pytest.approx({"self": 0.25, "x": 0.25, "y": 0.25, "z": 0.25})
    full = get_aggregator("foolsgold")
    full.aggregate(torch.zeros(3), updates(first), 3)
    res_full = full.aggregate(torch.zeros(3), updates(second), 3)  # sums: cos(x, y) = 0.707
    assert res_full.weights["x"] == res_full.weights["y"] == 0.0
    assert res_full.weights["z"] == pytest.approx(0.5)


def test_memory_window_history_equals_sum_of_last_k() -> None:
    agg = get_aggregator("foolsgold", memory=2)
    seq = [torch.full((4,), float(v)) for v in (1, 2, 4, 8)]
    for d in seq:
        agg.aggregate(torch.zeros(4), updates({"x": d}), 1)
    state = agg.state_dict()
    torch.testing.assert_close(state["histories"][0], torch.full((4,), 12.0))


def test_feature_mask_ignores_masked_coordinates() -> None:
    mask = torch.tensor([1.0, 1.0, 0.0])
    agg = get_aggregator("foolsgold", feature_mask=mask)
    # identical on the masked-in coordinates -> Sybil-like, despite the big difference elsewhere
    res = agg.aggregate(torch.zeros(3), updates({"x": torch.tensor([1.0, 0, 9]),
                                                 "y": torch.tensor([1.0, 0, -9]),
                                                 "z": torch.tensor([0.0, 1, 0])}), 3)
    assert res.weights["x"] == res.weights["y"] == 0.0
    assert res.weights["z"] == pytest.approx(0.5)


def test_importance_fraction_keeps_only_large_coordinates() -> None:
    agg = get_aggregator("foolsgold", importance_fraction=0.5)
    res = agg.aggregate(torch.zeros(4), updates({"x": torch.tensor([5.0, 5.0, 0.1, 0.0]),
                                                 "y": torch.tensor([5.0, 5.0, 0.0, 0.1]),
                                                 "z": torch.tensor([-5.0, 5.0, 0.0, 0.0])}), 3)
    assert res.weights["x"] == res.weights["y"] == 0.0  # identical on the important half


def test_state_dict_round_trip_through_torch_save_weights_only() -> None:
    agg = get_aggregator("foolsgold", memory=3)
    run_rounds(agg, 2)
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)
    buf.seek(0)
    clone = get_aggregator("foolsgold", memory=3)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    r1, _, _ = run_rounds(agg, 1, seed=9)
    r2, _, _ = run_rounds(clone, 1, seed=9)
    assert r1.weights == r2.weights
    torch.testing.assert_close(r1.delta, r2.delta)


def test_a_checkpoint_it_cannot_use_is_refused_whole() -> None:
    """Another memory, non-finite histories or a short count: ValueError, and
    the aggregator stays as it was. Before, a checkpoint of memory 3 loaded
    into memory 5 and every later round raised; a short count was refused
    after the histories were replaced, and every later round raised too."""
    source = get_aggregator("foolsgold", memory=3)
    run_rounds(source, 2)
    good = source.state_dict()
    bad_states = [
        (get_aggregator("foolsgold", memory=5), good),
        (get_aggregator("foolsgold", memory=3), {**good, "histories": torch.full_like(good["histories"], math.nan)}),
        (get_aggregator("foolsgold", memory=3), {**good, "count": good["count"][:-1]}),
    ]
    for agg, state in bad_states:
        with pytest.raises(ValueError):
            agg.load_state_dict(state)
        assert agg.state_dict() == {"round": 0}  # nothing of it loaded
        run_rounds(agg, 1)  # and it still aggregates


def test_max_peers_forgets_least_recently_seen() -> None:
    agg = get_aggregator("foolsgold", max_peers=2)
    agg.aggregate(torch.zeros(2), updates({"a": torch.ones(2)}), 1)
    agg.aggregate(torch.zeros(2), updates({"b": torch.ones(2)}), 1)
    agg.aggregate(torch.zeros(2), updates({"c": torch.ones(2)}), 1)
    assert sorted(agg.state_dict()["ids"]) == ["b", "c"]
