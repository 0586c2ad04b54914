"""Noise bound: under privacy, no honest neighbour's offset is much longer
than our own noised step, so none may pull us further than that.

Why. With privacy on, every honest public model moves each round by a
clipped update plus calibrated noise whose scale the privacy plan fixes for
every node alike, and the noise dwarfs the update (example-level DECOR at
epsilon 1, bench/sybil.py --privacy 1: a noised step of length ~5.9 for an
update clipped to 0.5). A neighbour's offset from the point our last round
mixed to, ``delta_j``, is its step plus the small gap between our mixed
points, so its length sits close to that of our own step ``own`` (the same
noise, drawn by us): measured 0.95-1.41 times it for every honest neighbour
in every round. The round's distance clip and the persistence bound judge a
peer against the median of the peers we trust, which an attacker moves:
records forging twins of our honest neighbours (``forged_records``) mute
them, the median is then the Sybils', and their fixed and fresh offsets of
two honest spreads each (~2.8 times our step) pass in full (honest accuracy
0.73 -> 0.11). Our own step is a yardstick no peer can move, and it is
public (our noised increment less the consensus step we sent with it), so a
weight set from it is post-processing of released messages, as the
accountant requires. A peer keeps its full weight up to ``ratio`` times
it and loses it linearly to none at twice that: a fresh offset kept within
the noise does no more than noise does, and what is left to judge is the
persistent part (:mod:`.persistence`).

Why a ramp to zero and not a clip to ``ratio`` times our step (as until
this shape): a clipped peer still pulled us by that much every round, and
what it sent beyond honest noise is noise that no pairwise term cancels.
The forged_records attacker (offsets of two honest spreads, fixed and fresh
each, ~2.8 times our step) kept 0.02 of the weight at 8 Sybils and cost
honest nodes 4-5 points under epsilon 1 (bench/sybil.py --privacy 1, label
flip: 0.684-0.691 against 0.73 without attack); with the ramp it keeps none
(0.713). No honest offset comes near ``2 tau`` (at most 1.41 times our
step, measured), so no attack costs the same as before (0.725 / 0.726).

Without privacy our own step is the clean update, shorter than an honest
neighbour's drift from us, and nothing bounds the drift: the round engine
tells the aggregator whether its messages are noised (``noised``), and the
bound holds only then.

When we are the one apart. The bound assumes our model sits among our
neighbours', as it does once rounds are under way. A node whose first
rounds ran alone does not: one of eight daemons started by hand (example
level, k = 3) heard no neighbour in time for its first 7 rounds and then
rejoined them at the same round, having trained and noised its own way
meanwhile: every neighbour's offset was that gap, all three beyond twice
the bound, and it gave them no weight for the next 8 rounds (self weight
1.0 from round 7 to 14). Where the median offset is itself beyond
``2 tau``, more than half of our neighbours agree that it is our model that
is apart, so the median sets ``tau``: the neighbours up to it keep their
weight and we rejoin them. Sybils move that median only where they are
half of our neighbours or more (there the bound holds nothing anyway), and
an honest majority never sends it there: honest offsets stay within 1.41
times our step once we are among them.

The floor (``floor``, SybilWall's ``noise_floor``). Every honest message
carries its own fresh noise, so no honest offset is much *shorter* than the
noise either. A Sybil that adds none (it need not follow the protocol) and
sits near the honest models is: one that sends its attacker's model (the
``identical`` tactic) is 0.03-0.71 times our step at epsilon 1, every honest
neighbour 0.81-1.53 (bench/sybil.py --privacy 1, 2 and 8 Sybils). Such a
Sybil is what gets a backdoor through where it is our only Sybil neighbour
(two Sybils of two edges each): its twin is nobody else's neighbour, so
similarity has nothing to compare it with, and the coordinate bound that
holds it without noise is off under noise (DECOR's noise cancels only in
whole sums). It kept 0.15-0.18 of the weight and reached an attack rate of
0.55-0.63 (three runs); with the floor it keeps 0.04 and reaches 0.008, and
no attack, label flip and 4 or 8 Sybils stay as they were (accuracy
0.73-0.74, attack <= 0.024).

Its yardstick is the shorter of our own step and the median offset of the
round, not our step alone: an honest message's noise grows with its
sender's number of noise edges (pairwise terms dominate DECOR's noise), so a
node with more edges than its neighbours would find them all short, and a
node whose own round fell back to local noise sends a different amount
again. The median answers for both. Sybils can move the yardstick only
down (it is never above our own step), which loosens the floor, and only
where they are half of our neighbours or more (there they are held as
clones, or not at all). The daemon's degrees vary more than the bench's:
in the default testnet (privacy on, k = 3 plus the links others chose)
3.4% of honest offsets were under 0.8 times the yardstick and 0.24% under
0.7, which cost honest neighbours 1.2% of their weight on average; a floor
of 0.7 cost 0.2% but let the backdoor through (0.144). A peer that runs
with privacy off in a network that runs with it sends no noise and loses
its weight the same way.

An attacker that adds noise of its own to clear the floor is the one tuned
under privacy (``fresh`` offsets of the honest spread each round): the
floor does not move it, and its noise is what hides its push (see
:mod:`.persistence`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from murmur.learning.aggregators.base import PeerUpdate, falloff

DEFAULT_NOISE_RATIO = 1.5  # times our own step's length: what an honest neighbour's offset reaches (1.41 measured)
DEFAULT_NOISE_FLOOR = 0.8  # times the floor's yardstick: what an honest neighbour's offset stays above (0.83 measured)
FLOOR_RAMP = 0.125  # below the floor, weight is lost linearly over this share of it (none at 0.7 of the yardstick)


def noise_scales(own: torch.Tensor, updates: Sequence[PeerUpdate], ratio: float,
                 floor: float | None = None) -> torch.Tensor:
    """Weight factor per update (float64, in [0, 1]): 1 while ``|delta_j|``
    is at most ``tau = ratio * |own|``, 0 from ``2 tau`` on, linear between
    (the persistence bound's and the probe's shape); where the median
    ``|delta_j|`` is ``2 tau`` or more, ``tau`` is that median instead (our
    model is the one apart). With ``floor``, also 1
    only from ``floor * yard`` up and 0 at ``(1 - FLOOR_RAMP) * floor * yard``
    and below, linear between, where ``yard`` is the shorter of our own step
    and the median offset (see the module doc). All ones when our step is
    zero (nothing to measure by)."""
    if not ratio > 0:
        raise ValueError("noise ratio must be > 0")
    if floor is not None and not 0 < floor < ratio:
        raise ValueError("noise floor must be > 0 and below the noise ratio")
    out = torch.ones(len(updates), dtype=torch.float64)
    step = float(torch.linalg.vector_norm(own))
    if not updates or step <= 0:
        return out
    lengths = torch.stack([torch.linalg.vector_norm(u.delta) for u in updates]).to(torch.float64).cpu()
    median = float(lengths.median())
    # We are the one apart (see the module doc): judged by our step, the median neighbour would count for nothing.
    tau = median if median >= 2.0 * ratio * step else ratio * step
    out = falloff(lengths / tau)
    if floor is not None:
        yard = min(step, median)
        if yard > 0:
            out *= ((lengths / (floor * yard) - (1.0 - FLOOR_RAMP)) / FLOOR_RAMP).clamp(0.0, 1.0)
    return out
