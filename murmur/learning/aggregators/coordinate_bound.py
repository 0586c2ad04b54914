"""Coordinate-wise bound: on a coordinate most of our neighbours barely move,
no neighbour moves our model by much more than they do.

Why. SybilWall's other bounds judge whole models (similarity, the clip
radius, the probe when on, the persistence bound), and a Sybil that is our only Sybil
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
neighbours' pull magnitudes: an honest neighbour's magnitude as long as
Sybils are at most half of our neighbours, and ~0 on a coordinate only a
minority moves. Every neighbour counts, not only those SybilWall trusts (as
its clip radius does): forged twin records mute honest neighbours, and
judged by the trusted alone the Sybils set the range (bench/sybil.py
--quick, forged_records, backdoor: seed 0, 8 Sybils 0.078 against 0.024;
seed 1, 4 Sybils 0.421 against 0.163). A coordinate is *quiet* when its
typical pull is at most ``quiet`` times the round's root-mean-square typical
pull. On a quiet coordinate a pull upward is clamped to ``factor`` times the
lower median of the neighbours' upward parts (``max(pull, 0)``), a pull
downward likewise: a neighbour moves our model on it only the way most
neighbours do, and only about as far. Busy coordinates are left alone. The engine then mixes
``own + clamped pull``: the neighbour's model, with those coordinates pulled
back toward ours.

Why by direction. A magnitude bound alone lets a lone Sybil go on pushing
once its backdoor has leaked into its honest neighbours: they then differ
from us on the trigger's weights too, and the typical magnitude is no longer
~0. But a less contaminated neighbour pulls us *back*. Counted by direction,
the Sybil's push has no majority, and the honest pull back does. This is the
sign vote of Ozdayi et al.'s robust learning rate (AAAI 2021), taken per
neighbour and with a magnitude. bench/sybil.py --quick, backdoor at 2 and 8
Sybils over seeds 0, 1 and 2: a magnitude bound alone left 0.041-0.093 (seed
2); by direction, at most 0.035.

Why only quiet coordinates. Honest non-IID peers differ in *how much* they
move a busy coordinate. A node rich in one class moves that class's output
weights several times more than its neighbours do, and that is information
the network needs. Bounding every coordinate at twice the typical pull (by
magnitude) cost 3 points of honest accuracy without attack (0.901 -> 0.874),
nearly all of it on the dense layers. On a quiet coordinate no honest
majority moves, so a lone identity moving it has nothing to vouch for it.

Measured (bench/sybil.py --quick, digits-mlp, 8 honest nodes, 20 rounds,
seed 0, the tuned attackers), backdoor attack rate at 2 / 4 / 8 Sybils,
diversified: 0.350 / 0.236 / 0.154 without the bound, 0.035 / 0.033 / 0.029
with it; sleeper 0.340 / 0.213 / 0.130 -> 0.032 / 0.030 / 0.024;
forged_records 0.029 / 0.086 / 0.377 -> 0.013 / 0.017 / 0.024. No-attack
accuracy went from 0.901 to 0.890; over seeds 0, 1 and 2 from 0.901 / 0.904
/ 0.912 to 0.890 / 0.882 / 0.911. On mnist-cnn (the bench's full mode)
no-attack accuracy went from 0.921 to 0.913, and the backdoor rows stayed at
or under 0.007.

This is the coordinate-wise form of ClippedGossip's per-peer radius (He et
al. 2022).

Cost: O(k*d) a round (three k-row lower medians, a chunk of coordinates at
a time). No state is kept and no private data is read. The round engine
does not apply it under privacy (:meth:`Aggregator.mixed_offsets`): there
every pull is mostly noise, and correlated noise (DECOR) cancels only in
whole sums. Applied, it cost 8 to 10 points of honest accuracy without attack
(bench/sybil.py --privacy 10, 100 rounds: 0.53-0.56 -> 0.43-0.46, three runs
each).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_COORDINATE_BOUND = 1.5  # on a quiet coordinate a pull keeps up to this times the typical pull its way
DEFAULT_QUIET = 1.0  # quiet: typical pull at most this times the round's RMS typical pull
CHUNK = 1 << 18  # coordinates per pass: k x CHUNK temporaries, not k x d, at real model sizes
INF = float("inf")


def coordinate_bounds(pulls: torch.Tensor, factor: float = DEFAULT_COORDINATE_BOUND,
                      quiet: float = DEFAULT_QUIET) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate range ``(low, high)`` a pull is clamped to, for
    ``pulls`` (k x d: each neighbour's model minus ours): on a quiet
    coordinate ``-factor`` times the lower median of the pulls' downward
    parts and ``factor`` times that of their upward parts; ``-inf, inf`` on
    the others (see the module doc)."""
    if pulls.dim() != 2 or pulls.shape[0] == 0:
        raise ValueError("coordinate bound: pulls must be a non-empty k x d matrix")
    typical, up, down = _medians(pulls)
    return _range(typical, up, down, factor, quiet)


def _medians(pulls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower medians over the rows of |pulls|, of their upward and of their
    downward parts (torch.median along a dim returns the lower of the two
    middle values for an even count)."""
    up = lower_median(pulls.clamp(min=0))
    down = lower_median(pulls.neg().clamp_(min=0))
    return lower_median(pulls.abs()), up, down


NETWORK_ROWS = 8
"""Up to this many rows a lower median is taken by a sorting network of
elementwise min and max: ``torch.median`` along the rows of a few-row matrix
ran at ~30 ms per million coordinates and row, three medians a round made
the bound 0.47 s of a 3.2M-parameter model's round with three neighbours."""


def lower_median(rows: torch.Tensor) -> torch.Tensor:
    """``rows.median(dim=0).values`` (the lower of the two middle values for an
    even count), the same values: a median picks one of its inputs, and a
    compare-exchange of two floats by min and max moves them exactly."""
    k = rows.shape[0]
    if k > NETWORK_ROWS:
        return rows.median(dim=0).values
    cols = list(rows.unbind(0))
    for phase in range(k):  # odd-even transposition sort: k phases sort k values
        for i in range(phase % 2, k - 1, 2):
            cols[i], cols[i + 1] = torch.minimum(cols[i], cols[i + 1]), torch.maximum(cols[i], cols[i + 1])
    middle = cols[(k - 1) // 2]
    return middle.clone() if k == 1 else middle  # one row: a view of it, which callers scale in place


def _range(typical: torch.Tensor, up: torch.Tensor, down: torch.Tensor, factor: float,
           quiet: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(factor, quiet)
    return _clamps(typical > quiet * _rms(typical), up, down, factor)


def _check(factor: float, quiet: float) -> None:
    if not factor > 0 or not quiet > 0:
        raise ValueError("coordinate bound: factor and quiet must be > 0")


def _rms(typical: torch.Tensor) -> float:
    """The round's root-mean-square typical pull, over the whole model at once."""
    return float(torch.linalg.vector_norm(typical)) / typical.numel() ** 0.5


def _clamps(busy: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
            factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` from the medians of the upward and downward parts
    (scaled in place): unbounded where ``busy``."""
    high = up.mul_(factor).masked_fill_(busy, INF)
    low = down.mul_(-factor).masked_fill_(busy, -INF)
    return low, high


def _pulls(own: torch.Tensor, offsets: Sequence[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """The offsets' pulls ``offset - own`` on coordinates ``lo .. hi``, one row each."""
    return torch.stack([o[lo:hi] - own[lo:hi] for o in offsets])


def bound_offsets(own: torch.Tensor, offsets: Sequence[torch.Tensor], factor: float = DEFAULT_COORDINATE_BOUND,
                  quiet: float = DEFAULT_QUIET, *, in_place: bool = False) -> list[torch.Tensor]:
    """Each offset (a neighbour's model minus the round's reference, as
    ``own`` is ours), its pull ``offset - own`` clamped to
    :func:`coordinate_bounds`, returned as an offset from that reference.
    ``in_place``: written into ``offsets`` themselves (the same operations,
    so the same values), which are returned: no model copy per offset.

    Two passes over chunks of coordinates. Only the typical pull is kept for
    the whole model (the round's RMS, which says which coordinates are
    quiet, is over all of them); the medians of the upward and downward
    parts are taken chunk by chunk in the second pass, where each chunk is
    clamped as soon as its range is known. The three whole-model medians
    were two model-sized buffers more at the round's peak, next to every
    neighbour's offset (bench/memory.py, 10M parameters). Every step is
    elementwise or picks one of its inputs, so chunking changes no value."""
    if not offsets:
        return []
    _check(factor, quiet)
    d = own.numel()
    typical = torch.empty_like(own)
    for lo in range(0, d, CHUNK):
        hi = min(d, lo + CHUNK)
        typical[lo:hi] = lower_median(_pulls(own, offsets, lo, hi).abs_())
    threshold = quiet * _rms(typical)
    out = list(offsets) if in_place else [torch.empty_like(o) for o in offsets]
    for lo in range(0, d, CHUNK):
        hi = min(d, lo + CHUNK)
        pulls = _pulls(own, offsets, lo, hi)
        up = lower_median(pulls.clamp(min=0))
        down = lower_median(pulls.neg().clamp_(min=0))
        low, high = _clamps(typical[lo:hi] > threshold, up, down, factor)
        torch.maximum(pulls, low, out=pulls)
        torch.minimum(pulls, high, out=pulls)
        pulls.add_(own[lo:hi])
        for row, target in zip(pulls, out, strict=True):
            target[lo:hi] = row
    return out
