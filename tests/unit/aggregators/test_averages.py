"""The per-peer moving averages behind SybilWall's memory view and the
persistence bound (murmur.learning.aggregators.averages), with known answers."""

from __future__ import annotations

import pytest
import torch

from murmur.learning.aggregators.averages import PeerAverages


def _fed(store: PeerAverages, values: list[float], start: int = 1) -> PeerAverages:
    for r, v in enumerate(values, start=start):
        store.fold("p", torch.tensor([v]), r)
    return store


def test_a_plain_average_starts_at_its_first_value() -> None:
    """beta 0.5: 4, then 0 -> 2, then 2 -> 2, then 8 -> 5."""
    store = _fed(PeerAverages(0.5, warm_up=False), [4.0, 0.0, 2.0, 8.0])
    assert store.get("p").tolist() == [5.0] and store.count("p") == 4


def test_a_warmed_up_average_is_the_mean_until_it_covers_one_over_one_minus_beta_rounds() -> None:
    """beta 0.5 (two rounds): the mean of 4 and 0 is 2, then 2 -> 2, then 8 -> 5;
    beta 0.75 (four rounds): 4, 0, 2, 6 average to 3 with every value alike,
    and the fifth, 7, is weighed at 0.25 -> 4."""
    assert _fed(PeerAverages(0.5, warm_up=True), [4.0, 0.0, 2.0, 8.0]).get("p").tolist() == [5.0]
    store = _fed(PeerAverages(0.75, warm_up=True), [4.0, 0.0, 2.0, 6.0])
    assert store.get("p").tolist() == pytest.approx([3.0])
    store.fold("p", torch.tensor([7.0]), 5)
    assert store.get("p").tolist() == pytest.approx([4.0])


def test_a_peer_away_longer_than_forget_rounds_starts_afresh_and_forget_drops_it() -> None:
    store = _fed(PeerAverages(0.5, warm_up=True, forget_rounds=3), [4.0, 0.0])  # rounds 1, 2: mean 2
    store.fold("p", torch.tensor([6.0]), 5)  # seen 2 >= 5 - 3: folded
    assert store.get("p").tolist() == [4.0] and store.count("p") == 3
    store.fold("p", torch.tensor([9.0]), 9)  # seen 5 < 9 - 3: afresh
    assert store.get("p").tolist() == [9.0] and store.count("p") == 1
    store.fold("q", torch.tensor([1.0]), 9)
    store.forget(12)  # 9 >= 12 - 3: both kept
    assert set(store) == {"p", "q"}
    store.fold("q", torch.tensor([1.0]), 13)
    store.forget(13)  # p last seen 9 < 13 - 3
    assert set(store) == {"q"} and store.get("p") is None and store.count("p") == 0


def test_a_checkpoint_keeps_averages_rounds_and_counts_and_a_bad_one_is_refused() -> None:
    store = PeerAverages(0.5, warm_up=True)
    store.fold("a", torch.tensor([1.0, 2.0]), 3)
    store.fold("b", torch.tensor([3.0, 4.0]), 4)
    store.fold("b", torch.tensor([5.0, 6.0]), 5)
    state = store.state_dict("x_", "x_rows")
    assert state["x_peers"] == ["a", "b"] and state["x_seen"] == [3, 5] and state["x_count"] == [1, 2]
    again = PeerAverages(0.5, warm_up=True)
    again.load_state_dict(state, "x_", "x_rows", width=2)
    assert again.get("b").tolist() == [4.0, 5.0] and again.count("b") == 2
    again.fold("a", torch.tensor([3.0, 4.0]), 6)
    assert again.get("a").tolist() == [2.0, 3.0]  # the second of two rounds: the mean
    plain = PeerAverages(0.5, warm_up=False)
    plain.fold("a", torch.tensor([1.0]), 1)
    assert "x_count" not in plain.state_dict("x_", "x_rows")  # the memory view's format, as it always was
    for bad in ({**state, "x_rows": state["x_rows"][:1]}, {**state, "x_count": [0, 2]},
                {**state, "x_rows": torch.full((2, 2), float("nan"))}, {**state, "x_seen": [3]},
                {key: v for key, v in state.items() if key != "x_count"}):
        with pytest.raises(ValueError):
            PeerAverages(0.5, warm_up=True).load_state_dict(bad, "x_", "x_rows")
    with pytest.raises(ValueError):
        PeerAverages(0.5, warm_up=True).load_state_dict(state, "x_", "x_rows", width=3)
    empty = PeerAverages(0.5, warm_up=True)
    empty.load_state_dict({}, "x_", "x_rows")
    assert len(empty) == 0
