"""The model a node far behind adopts from the public models of neighbours ahead.

Catch-up used to adopt one neighbour's public model outright, the most
trusted one's. Trust is no proof under privacy: the noise hides what tells a
diversified Sybil apart, SybilWall gives it weight, and a node that fell
behind adopted its model (in a loaded default testnet, nodes 6-8 rounds
behind fell from accuracy 0.21-0.40 to 0.08-0.11). With the models of
several neighbours at hand, the coordinate-wise median of them lies, in
every coordinate, between the values of honest models as long as fewer than
half are poisoned: one Sybil among three cannot move it outside the honest
models' range, however far its own model is.

The decision depends only on the models received: they are public (built
from what their senders already sent, noise included), so choosing from
them spends nothing outside the privacy accountant, as the node's own data
would.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from murmur.learning.aggregators.coordinate_bound import lower_median

MIN_ROBUST_SOURCES = 3
"""Models needed before their median is taken: of two, one poisoned model
moves the median (their mean) halfway to it, no better than trusting one, so
with fewer the most trusted model is adopted as before."""


@dataclass(frozen=True)
class PublicModel:
    """A neighbour's public model and the round of the message it reflects."""

    model: torch.Tensor
    state_round: int


def adoption(models: Sequence[PublicModel], claims_ahead: Collection[int] = ()) -> PublicModel:
    """What to adopt from ``models``, ranked most trusted first.

    Fewer than MIN_ROBUST_SOURCES: the first (the most trusted, as catch-up
    always did); of one at most at the round :func:`within_claims` allows
    (``claims_ahead``: what the voting neighbours ahead claim), and of two
    at the lower of their rounds: a Sybil ranked
    first that names a far round (10^9 ended a node's run: past
    ``learning.rounds``) moves the node no further than the honest one
    beside it, and an honest pair a round apart costs the node one round
    run again. Otherwise the coordinate-wise median of an odd number of
    them (of four, the three most trusted: the median of four withstands one
    poisoned model, as that of three does) at the median of their rounds: a
    Sybil's claim of a far round moves the round no more than its model
    moves the model, and an honest neighbour a round or two ahead of that
    re-sends what the node then lacks (its replica is exact, see the
    caller). Seconds of CPU for large models (1.3 s for five of 11M
    parameters): the caller runs it off the event loop.
    """
    if not models:
        raise ValueError("adoption needs at least one model")
    if len(models) == 1:
        return within_claims(models[0], claims_ahead)
    if len(models) < MIN_ROBUST_SOURCES:
        return PublicModel(models[0].model, min(m.state_round for m in models))
    voting = models[: len(models) - (len(models) + 1) % 2]
    median = lower_median(torch.stack([m.model.to(torch.float32) for m in voting]))
    rounds = sorted(m.state_round for m in voting)
    return PublicModel(median, rounds[len(rounds) // 2])


def within_claims(chosen: PublicModel, claims_ahead: Collection[int]) -> PublicModel:
    """A lone answer's round, bounded by the lower median of the rounds the
    voting neighbours ahead of us claim (``claims_ahead``, the sender's own
    claim among them where it votes).

    With one model arrived its sender names the round alone, and a Sybil
    answering 10^9 while the honest neighbours ahead were slow to answer
    ended the node's run (past ``learning.rounds``). The claims are what
    the neighbours said in their hellos and round messages, so a Sybil can
    claim 10^9 there too: the lower median, not the furthest claim, holds
    as long as fewer than half of the voters ahead are Sybils (the bound
    :func:`adoption`'s median keeps for three models and more). Honest
    neighbours a round or two apart cost the node those rounds run again.
    With no voter ahead (a lone neighbour vouched for by weight), nothing
    checks it, and it stands."""
    if not claims_ahead:
        return chosen
    ordered = sorted(claims_ahead)
    bound = ordered[(len(ordered) - 1) // 2]
    return chosen if chosen.state_round <= bound else PublicModel(chosen.model, bound)
