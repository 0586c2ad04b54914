from __future__ import annotations

import io
import math
import random

import pytest
import torch
from scipy.stats import chisquare

from murmur.errors import ConfigError, DecodeError
from murmur.learning.aggregators import HistoryRecordData, get_aggregator
from murmur.learning.aggregators.sybilwall import SybilWallAggregator

from .conftest import orthogonalish, updates

DIM = 1024
ME = "me"


def make(**opts: object) -> SybilWallAggregator:
    agg = get_aggregator("sybilwall", self_id=ME, **opts)
    assert isinstance(agg, SybilWallAggregator)
    return agg


def record(peer: str, round_: int, distance: int, value: float = 1.0, observer: str = "x") -> HistoryRecordData:
    return HistoryRecordData(peer, round_, distance, torch.full((DIM,), value), observer)


def started(**opts: object) -> SybilWallAggregator:
    """An aggregator that has seen one round (knows the model dimension)."""
    agg = make(**opts)
    agg.aggregate(torch.ones(DIM), [], 0)
    return agg


# --- weights -------------------------------------------------------------------


def test_identical_sybils_get_zero_and_dissimilar_honest_keep_one() -> None:
    agg = make()
    dirs = orthogonalish(6, DIM, 0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        deltas = {f"h{i}": dirs[i] + 0.3 * torch.randn(DIM, generator=g) for i in range(5)}
        sybil = dirs[5] + 0.3 * torch.randn(DIM, generator=g)
        deltas.update({f"s{i}": sybil.clone() for i in range(3)})
        own = torch.randn(DIM, generator=g)
        res = agg.aggregate(own, updates(deltas), 8)
    assert [res.weights[f"s{i}"] for i in range(3)] == [0.0] * 3
    assert [res.weights[f"h{i}"] for i in range(5)] == [pytest.approx(1 / 6)] * 5
    assert res.weights["self"] == pytest.approx(1 / 6)
    expected = (own + sum(deltas[f"h{i}"] for i in range(5))) / 6
    torch.testing.assert_close(res.delta, expected, rtol=1e-5, atol=1e-5)


def test_all_neighbours_one_attacker_get_zero_weight() -> None:
    agg = make()
    sybil = torch.randn(DIM, generator=torch.Generator().manual_seed(2))
    own = torch.randn(DIM)
    res = agg.aggregate(own, updates({f"s{i}": sybil.clone() for i in range(4)}), 4)
    assert res.weights["self"] == 1.0
    torch.testing.assert_close(res.delta, own)


def test_gossiped_history_shapes_scores_but_is_not_averaged() -> None:
    agg = started()
    sybil = torch.randn(DIM, generator=torch.Generator().manual_seed(3))
    # a far-away Sybil identity sends the same direction as our neighbour s
    assert agg.receive_record("h", HistoryRecordData("far-sybil", 0, 1, sybil.clone(), "h"))
    h = torch.randn(DIM, generator=torch.Generator().manual_seed(4))
    res = agg.aggregate(torch.zeros(DIM), updates({"s": sybil.clone(), "h": h}), 2)
    assert "far-sybil" not in res.weights
    assert res.weights["s"] == 0.0 and res.weights["h"] == pytest.approx(0.5)
    without = make().aggregate(torch.zeros(DIM), updates({"s": sybil.clone(), "h": h}), 2)
    assert without.weights["s"] == pytest.approx(1 / 3)  # nothing to compare s with


def test_direct_history_is_the_sum_of_deltas() -> None:
    agg = make()
    for v in (1.0, 2.0, 4.0):
        agg.aggregate(torch.full((DIM,), v), updates({"a": torch.full((DIM,), -v)}), 1)
    torch.testing.assert_close(agg.history("a"), torch.full((DIM,), -7.0))
    torch.testing.assert_close(agg.history("self"), torch.full((DIM,), 7.0))
    info = agg.record_info("a")
    assert info is not None and info.distance == 1 and info.round == 2 and info.received_from is None


# --- receiving records -------------------------------------------------------------


def test_received_record_is_stored_at_distance_plus_one() -> None:
    agg = started()
    assert agg.receive_record("n1", record("far", 0, 2, observer="o"))
    info = agg.record_info("far")
    assert info is not None and (info.distance, info.received_from, info.observer) == (3, "n1", "o")


def test_gossip_never_overwrites_a_direct_observation() -> None:
    agg = make()
    agg.aggregate(torch.zeros(DIM), updates({"a": torch.full((DIM,), 2.0)}), 1)
    assert not agg.receive_record("n1", record("a", 50, 1, value=-9.0))
    torch.testing.assert_close(agg.history("a"), torch.full((DIM,), 2.0))
    assert agg.record_info("a").distance == 1  # type: ignore[union-attr]


def test_newer_gossip_replaces_older_gossip_and_older_does_not() -> None:
    agg = started()
    assert agg.receive_record("n1", record("far", 3, 2, value=1.0))
    assert not agg.receive_record("n2", record("far", 3, 1, value=5.0))  # same round: keep
    assert not agg.receive_record("n2", record("far", 2, 1, value=5.0))  # older
    torch.testing.assert_close(agg.history("far"), torch.full((DIM,), 1.0))
    assert agg.receive_record("n2", record("far", 4, 4, value=6.0))  # newer, even if farther
    torch.testing.assert_close(agg.history("far"), torch.full((DIM,), 6.0))
    assert agg.record_info("far").distance == 5  # type: ignore[union-attr]


def test_direct_observation_replaces_gossip_and_starts_from_own_view() -> None:
    agg = started()
    agg.receive_record("n1", record("a", 0, 1, value=100.0))
    agg.aggregate(torch.zeros(DIM), updates({"a": torch.full((DIM,), 1.0)}), 1)
    torch.testing.assert_close(agg.history("a"), torch.full((DIM,), 1.0))
    assert agg.record_info("a").distance == 1  # type: ignore[union-attr]


def test_records_about_self_and_far_or_future_records_are_ignored() -> None:
    agg = started()
    assert not agg.receive_record("n1", record(ME, 0, 1))
    assert not agg.receive_record("n1", record("far", 0, 8))  # would be distance 9 > 8
    assert not agg.receive_record("n1", record("future", 10_000, 1))
    assert agg.known_peers() == []


@pytest.mark.parametrize(
    "bad",
    [
        HistoryRecordData("p", 0, 0, torch.zeros(DIM), "o"),  # distance 0
        HistoryRecordData("p", -1, 1, torch.zeros(DIM), "o"),
        HistoryRecordData("p", 0, 1, torch.zeros(DIM + 1), "o"),
        HistoryRecordData("p", 0, 1, torch.zeros(DIM, dtype=torch.float64), "o"),
        HistoryRecordData("p", 0, 1, torch.full((DIM,), float("nan")), "o"),
        HistoryRecordData("", 0, 1, torch.zeros(DIM), "o"),
    ],
)
def test_malformed_records_raise_decode_error(bad: HistoryRecordData) -> None:
    with pytest.raises(DecodeError):
        started().receive_record("n1", bad)


def test_gossip_needs_self_id() -> None:
    agg = get_aggregator("sybilwall")
    with pytest.raises(ConfigError):
        agg.receive_record("n1", record("p", 0, 1))  # type: ignore[attr-defined]


# --- sending records ---------------------------------------------------------------


def test_record_selection_excludes_neighbours_own_and_learned_records() -> None:
    agg = make()
    agg.aggregate(torch.ones(DIM), updates({"k": torch.ones(DIM), "j": torch.ones(DIM)}), 2)
    agg.receive_record("k", record("from-k", 0, 1))
    agg.receive_record("j", record("seen-by-k", 0, 1, observer="k"))
    rng = random.Random(0)
    sent = set()
    for r in range(2, 400):
        agg.begin_round(r)
        rec = agg.records_to_send("k", rng)
        assert rec is not None
        assert agg.records_to_send("k", rng) is None  # one per neighbour per round
        sent.add(rec.peer)
    assert sent == {ME, "j"}
    own = None
    for r in range(400, 800):
        agg.begin_round(r)
        rec = agg.records_to_send("k", rng)
        if rec is not None and rec.peer == ME:
            own = rec
            break
    assert own is not None
    assert (own.distance, own.observer, own.round) == (1, ME, 0)
    torch.testing.assert_close(own.history, torch.ones(DIM))


def test_record_distance_distribution_follows_lambda_exp() -> None:
    agg = started()
    per_distance = {1: 1, 2: 3, 3: 2, 4: 4, 5: 3}  # own record is the one distance-1 entry
    for d, count in per_distance.items():
        if d == 1:
            continue
        for c in range(count):
            assert agg.receive_record("n", record(f"d{d}-{c}", 0, d - 1))
    rng = random.Random(1234)
    draws = 20_000
    seen = {d: 0 for d in per_distance}
    for r in range(1, draws + 1):
        agg.begin_round(r)
        rec = agg.records_to_send("other", rng)
        assert rec is not None
        seen[rec.distance] += 1
    lam = 0.8
    mass = {d: c * lam * math.exp(-lam * (d - 1)) for d, c in per_distance.items()}
    total = sum(mass.values())
    expected = [draws * mass[d] / total for d in per_distance]
    observed = [seen[d] for d in per_distance]
    assert chisquare(observed, expected).pvalue > 1e-3
    uniform = [draws * c / sum(per_distance.values()) for c in per_distance.values()]
    assert chisquare(observed, uniform).pvalue < 1e-6  # the test can tell the difference


# --- memory and checkpoints ----------------------------------------------------------


def test_record_cap_evicts_oldest_then_farthest_and_never_this_rounds_senders() -> None:
    agg = started(max_records=3)
    assert agg.receive_record("n", record("old-near", 1, 1))
    assert agg.receive_record("n", record("old-far", 1, 5))
    assert agg.receive_record("n", record("new", 5, 1))
    assert agg.receive_record("n", record("newer", 6, 1))  # evicts old-far
    assert set(agg.known_peers()) == {"old-near", "new", "newer"}
    assert not agg.receive_record("n", record("ancient", 0, 1))  # would be the victim itself
    agg.aggregate(torch.zeros(DIM), updates({f"p{i}": torch.randn(DIM) for i in range(4)}), 4)
    assert set(agg.known_peers()) == {"p0", "p1", "p2", "p3"}  # senders always fit


def test_state_dict_round_trip_and_identical_continuation() -> None:
    agg = make()
    g = torch.Generator().manual_seed(5)
    agg.aggregate(torch.randn(DIM, generator=g), updates({"a": torch.randn(DIM, generator=g),
                                                          "b": torch.randn(DIM, generator=g)}), 2)
    agg.receive_record("a", record("far", 0, 2))
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)
    buf.seek(0)
    clone = make()
    clone.load_state_dict(torch.load(buf, weights_only=True))
    assert clone.round == agg.round and clone.known_peers() == agg.known_peers()
    assert clone.record_info("far") == agg.record_info("far")
    nxt = updates({"a": torch.randn(DIM, generator=g), "b": torch.randn(DIM, generator=g)})
    own = torch.randn(DIM, generator=g)
    r1, r2 = agg.aggregate(own, nxt, 2), clone.aggregate(own, nxt, 2)
    assert r1.weights == r2.weights
    torch.testing.assert_close(r1.delta, r2.delta)


def test_history_matrix_grows_past_initial_capacity() -> None:
    agg = make()
    deltas = {f"p{i}": torch.full((DIM,), float(i)) for i in range(20)}
    agg.aggregate(torch.zeros(DIM), updates(deltas), 20)
    agg.aggregate(torch.zeros(DIM), updates(deltas), 20)
    for i in (0, 7, 19):
        torch.testing.assert_close(agg.history(f"p{i}"), torch.full((DIM,), 2.0 * i))
