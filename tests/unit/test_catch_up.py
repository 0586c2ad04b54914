"""catch_up_target: adopt only what a majority of neighbours has reached, from the most trusted."""

from __future__ import annotations

from murmur.node.learner import CATCH_UP_GAP, catch_up_target
from murmur.protocol.identity import Identity

A, B, C, SYBIL = (Identity.generate().peer_id for _ in range(4))


def test_one_neighbour_claiming_a_far_round_is_not_followed() -> None:
    """A lone Sybil claiming round 10_000 among honest peers at our round moves nothing."""
    assert catch_up_target({A: 5, B: 5, C: 6, SYBIL: 10_000}, 5, {}) is None


def test_majority_ahead_is_followed_from_the_most_trusted() -> None:
    claimed = {A: 20, B: 21, C: 4, SYBIL: 500}
    trust = {A: 0.3, B: 0.2, C: 0.3, SYBIL: 0.0}
    assert catch_up_target(claimed, 4, trust) is A
    # a Sybil plus one honest peer are not a majority of four
    assert catch_up_target({A: 20, B: 4, C: 4, SYBIL: 500}, 4, {}) is None
    # without trust figures (a fresh node), the least extreme claim at the majority round
    assert catch_up_target(claimed, 4, {}) is A


def test_gap_and_empty() -> None:
    assert catch_up_target({}, 0, {}) is None
    assert catch_up_target({A: CATCH_UP_GAP, B: CATCH_UP_GAP}, 0, {}) is None
    assert catch_up_target({A: CATCH_UP_GAP + 1}, 0, {}) is A  # one neighbour: nothing else to go by
