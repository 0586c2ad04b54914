"""The noise bound (murmur.learning.aggregators.noise_bound) with known
answers, SybilWall's use of it only when its messages are noised, and the
round engine telling it so."""

from __future__ import annotations


import pytest
import torch

from murmur.errors import ConfigError
from murmur.learning.aggregators import get_aggregator
from murmur.learning.aggregators.noise_bound import noise_scales
from murmur.learning.aggregators.sybilwall import SybilWallAggregator

from .conftest import orthogonalish, updates

DIM = 512


def _along(length: float, axis: int) -> torch.Tensor:
    out = torch.zeros(DIM)
    out[axis] = length
    return out


def test_weight_falls_from_ratio_times_our_own_step_to_none_at_twice_that() -> None:
    """Our step 2, ratio 1.5 (tau 3): offsets of length 1 and 3 keep their
    weight, 4.5 keeps half (2 - 4.5 / 3), 6 and 9 none."""
    ups = updates({"a": _along(1.0, 1), "b": _along(3.0, 2), "c": _along(4.5, 3), "d": _along(6.0, 4),
                   "e": _along(9.0, 5)})
    assert noise_scales(_along(2.0, 0), ups, 1.5).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])


def test_where_most_neighbours_are_beyond_the_bound_their_median_sets_it() -> None:
    """Our step 1, ratio 1.5 (tau 1.5): offsets 4, 4.5 and 5 are all
    beyond 2 tau = 3, and so is their median 4.5: our model is the one apart
    (rounds run alone), and the median is the bound: 4 and 4.5 keep their
    weight, 5 keeps 2 - 5 / 4.5. Offsets 1, 1.2 and 5 (median 1.2) are
    judged by our step: 5 keeps nothing."""
    far = updates({"a": _along(4.0, 1), "b": _along(4.5, 2), "c": _along(5.0, 3)})
    assert noise_scales(_along(1.0, 0), far, 1.5).tolist() == pytest.approx([1.0, 1.0, 2.0 - 5.0 / 4.5])
    one_far = updates({"a": _along(1.0, 1), "b": _along(1.2, 2), "c": _along(5.0, 3)})
    assert noise_scales(_along(1.0, 0), one_far, 1.5).tolist() == pytest.approx([1.0, 1.0, 0.0])
    # at the edge: a median of exactly 2 tau is ours apart, one just under is not
    assert noise_scales(_along(1.0, 0), updates({"a": _along(3.0, 1)}), 1.5).tolist() == [1.0]
    assert noise_scales(_along(1.0, 0), updates({"a": _along(2.9, 1)}), 1.5).tolist() == pytest.approx([2.0 - 2.9 / 1.5])


def test_sybilwall_rejoins_neighbours_its_own_model_drifted_away_from() -> None:
    """Under noise, three neighbours 8, 8.5 and 9 from us where our step is
    2 (our model trained alone for a while): judged by our step alone every
    one is cut and we keep our own model (self weight 1); judged by their
    median each keeps weight."""
    agg = get_aggregator("sybilwall", self_id="me", clip=None, persistence=None)
    assert isinstance(agg, SybilWallAggregator)
    agg.noised = True
    dirs = [d / d.norm() for d in orthogonalish(4, DIM, 11)]
    weights = agg.weigh(2.0 * dirs[0], updates({"h0": 8.0 * dirs[1], "h1": 8.5 * dirs[2], "h2": 9.0 * dirs[3]}), 3)
    assert weights["self"] < 0.5 and min(weights["h0"], weights["h1"], weights["h2"]) > 0.1


def test_no_step_of_our_own_bounds_nothing() -> None:
    ups = updates({"a": _along(1.0, 1), "b": _along(6.0, 2)})
    assert noise_scales(torch.zeros(DIM), ups, 1.5).tolist() == [1.0, 1.0]
    assert noise_scales(torch.zeros(DIM), [], 1.5).numel() == 0
    with pytest.raises(ValueError):
        noise_scales(_along(1.0, 0), ups, 0.0)
    with pytest.raises(ConfigError):
        get_aggregator("sybilwall", noise_ratio=0.0)


def test_floor_takes_weight_from_offsets_shorter_than_the_noise() -> None:
    """Our step 2, offsets 1.2, 1.5, 2, 2.2 and 3 (median 2, so the
    yardstick is 2), floor 0.8: full weight from 1.6 up, none at 1.4 and
    below, 1.5 keeps (1.5 / 1.6 - 0.875) / 0.125 = 0.5. The ceiling (tau 3)
    cuts nothing here."""
    ups = updates({"a": _along(1.2, 1), "b": _along(1.5, 2), "c": _along(2.0, 3), "d": _along(2.2, 4),
                   "e": _along(3.0, 5)})
    assert noise_scales(_along(2.0, 0), ups, 1.5, 0.8).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert noise_scales(_along(2.0, 0), ups, 1.5).tolist() == pytest.approx([1.0] * 5)


def test_floor_is_set_by_the_median_offset_where_our_own_step_is_longer() -> None:
    """Our step 4 (more noise edges than our neighbours, or a round of ours
    that fell back): offsets 1.5, 2, 2 and 2.2 are judged against their
    median 2, not against our step (which would cut them all): 1.5 keeps
    0.5, the rest full weight."""
    ups = updates({"a": _along(1.5, 1), "b": _along(2.0, 2), "c": _along(2.0, 3), "d": _along(2.2, 4)})
    assert noise_scales(_along(4.0, 0), ups, 1.5, 0.8).tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_floor_must_sit_below_the_ratio() -> None:
    ups = updates({"a": _along(1.0, 1)})
    for floor in (0.0, 1.5, 2.0):
        with pytest.raises(ValueError):
            noise_scales(_along(1.0, 0), ups, 1.5, floor)
    with pytest.raises(ConfigError):
        get_aggregator("sybilwall", noise_floor=1.5)
    with pytest.raises(ConfigError):
        get_aggregator("sybilwall", noise_floor=0.0)


def test_sybilwall_mutes_a_noiseless_neighbour_only_when_its_messages_are_noised() -> None:
    """Two offsets as long as our noised step and one a quarter as long (a
    Sybil that adds no noise): noised, it keeps no weight; not noised, or
    with ``noise_floor`` off, it keeps what it had."""
    def weights(noised: bool, **opts: object) -> dict[str, float]:
        agg = get_aggregator("sybilwall", self_id="me", clip=None, persistence=None, **opts)
        assert isinstance(agg, SybilWallAggregator)
        agg.noised = noised
        dirs = [d / d.norm() for d in orthogonalish(4, DIM, 7)]
        return agg.weigh(2.0 * dirs[0], updates({"h0": 2.0 * dirs[1], "h1": 2.0 * dirs[2], "quiet": 0.5 * dirs[3]}), 3)

    plain, noised = weights(False), weights(True)
    assert plain["quiet"] > 0
    assert noised["quiet"] == 0.0
    assert noised["h1"] / noised["h0"] == pytest.approx(plain["h1"] / plain["h0"], rel=1e-9)
    off = weights(True, noise_floor=None)
    assert off["quiet"] / off["h0"] == pytest.approx(plain["quiet"] / plain["h0"], rel=1e-9)


def _weights(noised: bool, **opts: object) -> dict[str, float]:
    """One round of SybilWall: two honest offsets as long as our own (noised)
    step, and one 2.25 times as long."""
    agg = get_aggregator("sybilwall", self_id="me", clip=None, persistence=None, **opts)
    assert isinstance(agg, SybilWallAggregator)
    agg.noised = noised
    dirs = [d / d.norm() for d in orthogonalish(4, DIM, 7)]
    return agg.weigh(2.0 * dirs[0], updates({"h0": 2.0 * dirs[1], "h1": 2.0 * dirs[2], "far": 4.5 * dirs[3]}), 3)


def test_sybilwall_bounds_pulls_by_its_own_step_only_when_its_messages_are_noised() -> None:
    """Everything else equal, the far peer's weight relative to an honest one's
    is cut to 2 - 4.5 / (1.5 * 2) = 0.5 of what it is without the bound."""
    plain, noised = _weights(False), _weights(True)
    assert noised["far"] / noised["h0"] == pytest.approx(0.5 * plain["far"] / plain["h0"], rel=1e-9)
    assert noised["h1"] / noised["h0"] == pytest.approx(plain["h1"] / plain["h0"], rel=1e-9)
    off = _weights(True, noise_ratio=None)
    assert off == pytest.approx(plain)


def test_under_noise_the_bound_replaces_the_rounds_median_clip() -> None:
    """Offsets 2, 2 and 4.5 along their own axes, our step 2 along a fourth:
    the median clip (distances from our step: sqrt 8, sqrt 8, sqrt 24.25)
    would cut the far peer to sqrt(8 / 24.25) of its weight; noised, the
    noise bound alone cuts it to 2 - 4.5 / 3 = 0.5 and the median clip is
    not applied on top."""
    def weights(noised: bool, clip: float | None) -> dict[str, float]:
        agg = get_aggregator("sybilwall", self_id="me", clip=clip, persistence=None)
        assert isinstance(agg, SybilWallAggregator)
        agg.noised = noised
        return agg.weigh(_along(2.0, 0), updates({"h0": _along(2.0, 1), "h1": _along(2.0, 2),
                                                 "far": _along(4.5, 3)}), 3)

    bare = weights(False, None)
    ratio = bare["far"] / bare["h0"]
    clipped = weights(False, 1.0)
    assert clipped["far"] / clipped["h0"] == pytest.approx(ratio * (8 / 24.25) ** 0.5, rel=1e-6)
    noised = weights(True, 1.0)
    assert noised["far"] / noised["h0"] == pytest.approx(ratio * 0.5, rel=1e-6)
    assert noised == pytest.approx(weights(True, None))
