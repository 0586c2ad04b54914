"""Coordinate-wise bound: on a coordinate most of our neighbours barely move,
no neighbour moves our model by much more than they do.

Why. SybilWall's other bounds judge whole models (similarity, the clip
radius, the probe, the persistence bound), and a Sybil that is our only Sybil
neighbour passes them all: it has no twin to resemble, it sits halfway
between the honest mean and its poisoned model (inside the clip radius,
under the probe margin), and it adds fresh noise each round (no persistent
pull builds up). What it carries is concentrated. A backdoor trigger lives
in the weights of the input pixels it stamps, and on 8x8 digits those pixels
are ~always 0 in clean data: honest training never moves those weights, so
nothing pulls them back once they are mixed in. On such a coordinate every
honest neighbour's pull is ~0, and the Sybil's pull is the backdoor.

What. Each neighbour's pull is ``delta_j - own`` (its model minus ours).
On each coordinate the *typical* pull is the lower median of the
neighbours' pull magnitudes (of the neighbours SybilWall trusts at all, as
for its clip radius; of all when it trusts none): an honest neighbour's
magnitude as long as Sybils are at most half of those, and ~0 on a
coordinate only a minority moves. A coordinate is *quiet* when its typical pull is at most
``quiet`` times the round's root-mean-square typical pull. On a quiet
coordinate every pull is clamped to ``factor`` times the typical pull;
elsewhere it is left alone. The engine then mixes ``own + clamped pull``:
the neighbour's model, with those coordinates pulled back toward ours.

Why only quiet coordinates. Honest non-IID peers differ in *how much* they
move a busy coordinate. A node rich in one class moves that class's output
weights several times more than its neighbours do, and that is information
the network needs. Clamped everywhere at twice the typical pull, honest
accuracy without attack fell from 0.901 to 0.874 (bench/sybil.py --quick),
nearly all of it on the dense layers. On a quiet coordinate no honest
majority moves, so a lone identity moving it has nothing to vouch for it.

Measured (bench/sybil.py --quick, digits-mlp, 8 honest nodes, 20 rounds,
the tuned diversified attacker), backdoor attack rate at 2 / 4 / 8 Sybils:
0.350 / 0.236 / 0.154 without the bound, 0.041 / 0.029 / 0.031 with it.
No-attack accuracy went from 0.901 to 0.895.

This is the coordinate-wise form of ClippedGossip's per-peer radius (He et
al. 2022), the same per-coordinate view as the robust learning rate of
Ozdayi et al. (AAAI 2021), but without its sign vote. The sign vote zeroed
every coordinate non-IID peers disagree on.

Cost: O(k*d) a round (a k-row lower median). No state is kept, and no
private data is read, so the bound is sound under privacy. There, DP noise
makes every coordinate busy and the bound does little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_COORDINATE_BOUND = 1.5  # on a quiet coordinate a pull keeps up to this times the typical pull
DEFAULT_QUIET = 1.0  # quiet: typical pull at most this times the round's RMS typical pull
CHUNK = 1 << 18  # coordinates per pass: k x CHUNK temporaries, not k x d, at real model sizes


def coordinate_bounds(pulls: torch.Tensor, factor: float, quiet: float = DEFAULT_QUIET) -> torch.Tensor:
    """Per-coordinate bound on ``pulls`` (k x d: each neighbour's model minus
    ours): ``factor`` times the lower median of ``|pulls|`` on each quiet
    coordinate (see the module doc), ``inf`` on the others."""
    if pulls.dim() != 2 or pulls.shape[0] == 0:
        raise ValueError("coordinate bound: pulls must be a non-empty k x d matrix")
    # torch.median along a dim returns the lower of the two middle values for an even count.
    return _bound_from_typical(pulls.abs().median(dim=0).values, factor, quiet)


def _bound_from_typical(typical: torch.Tensor, factor: float, quiet: float) -> torch.Tensor:
    """``factor * typical`` where typical is at most ``quiet`` times its RMS, else inf (in place)."""
    if not factor > 0 or not quiet > 0:
        raise ValueError("coordinate bound: factor and quiet must be > 0")
    rms = float(torch.linalg.vector_norm(typical)) / typical.numel() ** 0.5
    bound = typical.mul_(factor)
    bound[bound > factor * quiet * rms] = float("inf")
    return bound


def bound_offsets(own: torch.Tensor, offsets: Sequence[torch.Tensor], factor: float = DEFAULT_COORDINATE_BOUND,
                  quiet: float = DEFAULT_QUIET, trusted: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """Each offset (a neighbour's model minus the round's reference, as
    ``own`` is ours), its pull ``offset - own`` clamped to
    :func:`coordinate_bounds`, returned as an offset from that reference.
    With ``trusted``, the typical pull is over the trusted offsets only (all
    of them when none is): Sybils a node already muted, at a node where they
    are most of its neighbours, must not set what its honest neighbours may
    move it by."""
    if not offsets:
        return []
    judges = list(offsets)
    if trusted is not None:
        if len(trusted) != len(offsets):
            raise ValueError("coordinate bound: one trusted flag per offset")
        judges = [o for o, t in zip(offsets, trusted, strict=True) if t] or judges
    d = own.numel()
    typical = torch.empty_like(own)
    for lo in range(0, d, CHUNK):
        hi = min(d, lo + CHUNK)
        pulls = torch.stack([o[lo:hi] - own[lo:hi] for o in judges])
        typical[lo:hi] = pulls.abs_().median(dim=0).values
    bound = _bound_from_typical(typical, factor, quiet)
    out = []
    for o in offsets:
        pull = o - own
        out.append(pull.clamp_(min=-bound, max=bound).add_(own))
    return out
