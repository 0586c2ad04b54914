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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from murmur.learning.aggregators.base import PeerUpdate, falloff

DEFAULT_NOISE_RATIO = 1.5  # times our own step's length: what an honest neighbour's offset reaches (1.41 measured)


def noise_scales(own: torch.Tensor, updates: Sequence[PeerUpdate], ratio: float) -> torch.Tensor:
    """Weight factor per update (float64, in [0, 1]): 1 while ``|delta_j|``
    is at most ``tau = ratio * |own|``, 0 from ``2 tau`` on, linear between
    (the persistence bound's and the probe's shape). All ones when our step
    is zero (nothing to measure by)."""
    if not ratio > 0:
        raise ValueError("noise ratio must be > 0")
    out = torch.ones(len(updates), dtype=torch.float64)
    tau = ratio * float(torch.linalg.vector_norm(own))
    if not updates or tau <= 0:
        return out
    lengths = torch.stack([torch.linalg.vector_norm(u.delta) for u in updates]).to(torch.float64).cpu()
    return falloff(lengths / tau)
