"""adoption: the model a node far behind takes from several neighbours' public models."""

from __future__ import annotations

import pytest
import torch

from murmur.learning.adoption import MIN_ROBUST_SOURCES, PublicModel, adoption, within_claims


def _honest(seed: int, rounds: int) -> PublicModel:
    g = torch.Generator().manual_seed(seed)
    return PublicModel(torch.randn(1000, generator=g) * 0.1, rounds)


def test_one_poisoned_model_of_three_stays_outside() -> None:
    """Ranked first (the most trusted), far off and claiming a far round: the
    adopted model lies, coordinate by coordinate, between the honest two, and
    its round is theirs."""
    a, b = _honest(1, 40), _honest(2, 41)
    sybil = PublicModel(torch.full((1000,), 1e30), 10_000)
    chosen = adoption([sybil, a, b])
    assert torch.equal(chosen.model, torch.maximum(a.model, b.model))  # known answer: the sybil is above both
    assert chosen.state_round == 41
    flipped = adoption([PublicModel(-sybil.model, 0), a, b])
    assert torch.equal(flipped.model, torch.minimum(a.model, b.model))
    assert flipped.state_round == 40


def test_two_poisoned_of_five_and_an_even_count() -> None:
    honest = [_honest(i, 30) for i in range(3)]
    low, high = (torch.minimum(torch.minimum(*(h.model for h in honest[:2])), honest[2].model),
                 torch.maximum(torch.maximum(*(h.model for h in honest[:2])), honest[2].model))
    sybils = [PublicModel(torch.full((1000,), 3e38), 99), PublicModel(torch.full((1000,), -3e38), 99)]
    chosen = adoption(sybils + honest)
    assert bool(((chosen.model >= low) & (chosen.model <= high)).all())
    assert chosen.state_round == 30
    # of four, the three most trusted: one poisoned of four still stays outside
    four = adoption(sybils[:1] + honest)
    assert torch.equal(four.model, torch.maximum(honest[0].model, honest[1].model))
    assert four.state_round == 30


def test_with_fewer_than_three_the_most_trusted_is_adopted_at_the_lower_round() -> None:
    assert MIN_ROBUST_SOURCES == 3
    a, b = _honest(1, 5), _honest(2, 6)
    assert adoption([a]) is a
    two = adoption([b, a])
    assert two.model is b.model and two.state_round == 5
    # A Sybil ranked first that names a far round: its model, but the honest round.
    sybil = PublicModel(torch.full((1000,), 1e30), 10**9)
    chosen = adoption([sybil, a])
    assert chosen.model is sybil.model and chosen.state_round == 5
    with pytest.raises(ValueError):
        adoption([])


def test_a_lone_answer_is_held_to_the_lower_median_of_the_claims_ahead() -> None:
    """Known answers: one model arrived, naming round 10^9."""
    lone = PublicModel(torch.zeros(3), 10**9)
    # two honest voters ahead at 40 and 41, the Sybil claiming 10^9 too: the middle one
    held = within_claims(lone, [41, 10**9, 40])
    assert held.state_round == 41 and held.model is lone.model
    assert within_claims(lone, [40, 10**9]).state_round == 40  # half the voters ahead are not enough
    assert within_claims(lone, [10**9, 10**9, 40]).state_round == 10**9  # most of them are
    assert within_claims(PublicModel(lone.model, 30), [40, 41]).state_round == 30  # within: as is
    assert within_claims(lone, []) is lone  # no voter ahead: nothing to check it against
    assert adoption([lone], [41, 10**9, 40]).state_round == 41  # what catch-up calls, one model arrived
    two = adoption([lone, PublicModel(torch.ones(3), 50)], [41, 10**9, 40])
    assert two.state_round == 50  # of two, the lower of their rounds: the claims are not consulted
