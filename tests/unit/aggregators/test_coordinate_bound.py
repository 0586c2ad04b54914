"""The coordinate-wise bound (murmur.learning.aggregators.coordinate_bound),
each with a known answer, and SybilWall's use of it against a lone Sybil that
moves coordinates no honest neighbour moves (a backdoor trigger's weights)."""

from __future__ import annotations

import pytest
import torch

from murmur.errors import ConfigError
from murmur.learning.aggregators import get_aggregator
from murmur.learning.aggregators.base import SELF
from murmur.learning.aggregators.coordinate_bound import NETWORK_ROWS, bound_offsets, coordinate_bounds, lower_median

from .conftest import orthogonalish, updates

INF = float("inf")


def test_quiet_coordinates_are_bounded_by_direction_busy_ones_are_not() -> None:
    """Lower medians of |pulls| per coordinate 1, 0, 5, 0; RMS sqrt(26 / 4) ~ 2.55:
    coordinate 2 is busy, the others quiet. On coordinate 0 two of three
    pull up by 1 (up to 1.5 allowed) and one down alone (cut to 0); on 1 and
    3 one neighbour alone moves (cut to 0)."""
    pulls = torch.tensor([[1.0, 0.0, 5.0, 2.0],
                          [-1.0, 0.0, 4.0, 0.0],
                          [1.0, 9.0, -6.0, 0.0]])
    low, high = coordinate_bounds(pulls, 1.5)
    assert high.tolist() == [1.5, 0.0, INF, 0.0]
    assert low.tolist() == [0.0, 0.0, -INF, 0.0]
    out = bound_offsets(torch.zeros(4), list(pulls), 1.5)
    assert [o.tolist() for o in out] == [[1.0, 0.0, 5.0, 0.0], [0.0, 0.0, 4.0, 0.0], [1.0, 0.0, -6.0, 0.0]]


def test_with_two_neighbours_the_lower_one_sets_the_bound() -> None:
    """An even count takes the lower middle value: one honest neighbour
    moving a quiet coordinate up by 0.1 caps the other at 0.15 that way; one
    pulling the other way leaves neither a majority."""
    busy = torch.full((2, 8), 3.0)
    low, high = coordinate_bounds(torch.cat([busy, torch.tensor([[0.1], [10.0]])], dim=1), 1.5)
    assert high[:8].isinf().all() and low[:8].isinf().all()
    assert float(high[8]) == pytest.approx(0.15) and float(low[8]) == 0.0
    low, high = coordinate_bounds(torch.cat([busy, torch.tensor([[-0.1], [10.0]])], dim=1), 1.5)
    assert float(high[8]) == 0.0 and float(low[8]) == 0.0


def test_a_lone_sybil_cannot_push_against_neighbours_that_pull_back() -> None:
    """Its backdoor leaked into our honest neighbours, less than into us: on
    the trigger's coordinate they pull us back (down), the Sybil pushes up.
    A bound on magnitude alone would let its push through (the typical
    magnitude is no longer ~0); by direction it has no majority, the pull
    back has."""
    busy = torch.full((3, 8), 4.0)
    trigger = torch.tensor([[-0.2], [-0.3], [0.5]])  # honest a, honest b, Sybil
    pulls = torch.cat([busy, trigger], dim=1)
    out = bound_offsets(torch.zeros(9), list(pulls), 1.5)
    assert [float(o[8]) for o in out] == pytest.approx([-0.2, -0.3, 0.0])


def test_pulls_are_measured_from_our_model_and_returned_as_offsets() -> None:
    """Offsets are from the round's reference, as ``own`` is; the bound is on
    offset - own, and what comes back is own + the bounded pull."""
    own = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    busy = torch.tensor([0.0, 0.0, 4.0, -4.0, 4.0, -4.0])
    a, b = own + busy, own + 0.5 * busy
    sybil = own + busy + torch.tensor([3.0, -7.0, 0.0, 0.0, 0.0, 0.0])
    out = bound_offsets(own, [a, b, sybil], 1.5)
    assert torch.equal(out[0], a) and torch.equal(out[1], b)
    assert torch.equal(out[2], own + busy)


def test_a_lone_neighbour_is_its_own_typical_pull() -> None:
    """With one neighbour there is nothing to compare it with: left whole."""
    own, other = orthogonalish(2, 64, 0)
    (out,) = bound_offsets(own, [other], 1.5)
    assert torch.allclose(out, other)
    assert bound_offsets(own, [], 1.5) == []


def test_an_honest_neighbour_that_moves_a_busy_coordinate_more_keeps_it() -> None:
    """Non-IID: a node rich in one class moves its output weights several
    times more than its neighbours; on a coordinate most neighbours move,
    that is information, not an attack."""
    g = torch.Generator().manual_seed(3)
    pulls = torch.randn(4, 256, generator=g)
    pulls[2, 7] = 4.0 * float(pulls[:, 7].abs().max())  # one neighbour moves coordinate 7 the most
    out = bound_offsets(torch.zeros(256), list(pulls), 1.5)
    low, high = coordinate_bounds(pulls, 1.5)
    assert bool(high[7].isinf()) and bool(low[7].isinf())
    assert float(out[2][7]) == float(pulls[2, 7])


def test_in_place_gives_the_same_bits_into_the_offsets_given() -> None:
    """The round engine has the bound written into its own offsets (no copy
    per neighbour): the same operations, so the same values, bit for bit."""
    own, *offsets = orthogonalish(5, 1000, 4)
    fresh = bound_offsets(own, offsets, 1.5)
    mine = [o.clone() for o in offsets]
    out = bound_offsets(own, mine, 1.5, in_place=True)
    assert all(a is b for a, b in zip(out, mine, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fresh, mine, strict=True))


def test_chunks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big models are bounded a chunk of coordinates at a time (bounded
    temporaries); the result is the one-pass answer."""
    from murmur.learning.aggregators import coordinate_bound

    own, *offsets = orthogonalish(5, 1000, 4)
    whole = bound_offsets(own, offsets, 1.5)
    monkeypatch.setattr(coordinate_bound, "CHUNK", 7)
    chunked = bound_offsets(own, offsets, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    low, high = coordinate_bounds(torch.stack([o - own for o in offsets]), 1.5)
    assert all(torch.equal(a, (o - own).clamp(low, high) + own) for a, o in zip(whole, offsets, strict=True))


@pytest.mark.parametrize("factor, quiet", [(0.0, 1.0), (-1.0, 1.0), (1.5, 0.0)])
def test_bad_parameters(factor: float, quiet: float) -> None:
    with pytest.raises(ValueError):
        coordinate_bounds(torch.ones(2, 3), factor, quiet)


def test_sybilwall_cuts_what_a_lone_sybil_moves_alone() -> None:
    """Three honest neighbours move the first 256 coordinates (their data);
    nobody moves the last 16 (a backdoor trigger's input weights) but the
    Sybil, otherwise an honest-looking model. SybilWall still gives it
    weight (nothing to compare it with), but none of the trigger reaches our
    model; without the bound (the old wall) a share of it did."""
    dim, trigger = 272, slice(256, 272)
    honest = orthogonalish(4, 256, 5)
    own = torch.zeros(dim)
    own[:256] = honest[0]
    deltas = {}
    for i, name in enumerate(("a", "b", "c")):
        deltas[name] = torch.zeros(dim)
        deltas[name][:256] = honest[i + 1]
    sybil = torch.zeros(dim)
    sybil[:256] = (honest[1] + honest[2]) / 2
    sybil[trigger] = 0.5
    deltas["sybil"] = sybil
    bounded = get_aggregator("sybilwall", self_id="me").aggregate(own.clone(), updates(deltas), 4)
    assert bounded.weights["sybil"] > 0.05
    assert torch.count_nonzero(bounded.delta[trigger]) == 0
    whole = get_aggregator("sybilwall", self_id="me", coordinate_bound=None).aggregate(own.clone(), updates(deltas), 4)
    assert float(whole.delta[trigger].min()) == pytest.approx(0.5 * whole.weights["sybil"])
    assert float(whole.delta[trigger].min()) > 0.02
    assert bounded.weights[SELF] == pytest.approx(whole.weights[SELF])


def test_sybilwall_mixes_whole_models_without_the_bound() -> None:
    wall = get_aggregator("sybilwall", self_id="me", coordinate_bound=None)
    assert wall.mixed_offsets(torch.zeros(4), updates({"a": torch.ones(4), "b": torch.ones(4)})) is None
    assert get_aggregator("mean").mixed_offsets(torch.zeros(4), updates({"a": torch.ones(4)})) is None


def test_sybilwall_rejects_a_bad_coordinate_bound() -> None:
    with pytest.raises(ConfigError):
        get_aggregator("sybilwall", coordinate_bound=0.0)


@pytest.mark.parametrize("k", range(1, NETWORK_ROWS + 3))
def test_the_sorting_network_median_is_torchs_lower_median(k: int) -> None:
    """The same values as ``torch.median`` (lower of the middle two), ties and
    zeros included, and the rows are left as they were."""
    g = torch.Generator().manual_seed(k)
    rows = torch.randn(k, 4000, generator=g)
    rows[:, :500] = 0.0  # every upward part of a pull that went down
    rows[0, 500:900] = rows[-1, 500:900]  # ties
    before = rows.clone()
    median = lower_median(rows)
    assert torch.equal(median, rows.median(dim=0).values)
    median.mul_(2.0)  # callers scale it in place
    assert torch.equal(rows, before)
