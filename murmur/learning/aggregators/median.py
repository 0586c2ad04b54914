"""Coordinate-wise median (Yin et al., ICML 2018).

Candidates are the own delta and every peer delta (documented choice: the own
update is one vote, so a node with few neighbours still gets a median). With an
even count the two middle values are averaged.

Reported weights are the fraction of coordinates whose median came from each
candidate (a middle pair counts half each): an outlier that never lands in the
middle gets weight 0, and the weights sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from murmur.learning.aggregators.base import (
    Combine,
    AggregationResult,
    Aggregator,
    PeerUpdate,
    candidate_ids,
    check_inputs,
    register_aggregator,
    stack_rows,
    weights_dict,
)


CHUNK = 1 << 18
"""Coordinates sorted at a time (1 MB a candidate). The whole model at once
held the candidates' stack, its sorted copy and the sort's int64 indices:
4 (n) models more, 36 at 8 neighbours, next to the offsets the engine made."""


def sorted_band_mean(candidates: Sequence[torch.Tensor], lo: int, hi: int,
                     whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the mean of the candidates' sorted values with ranks
    [lo, hi). Returns (result, weight per candidate) where the weight is the
    share of all (coordinate, kept value) slots that came from that candidate.

    CHUNK coordinates at a time (``whole``: all at once). Each coordinate is
    sorted on its own, and a band of one or two values (the median) has one
    rounding whatever the width, so its values are the whole stack's, bit
    for bit; a wider band's sum along the rows rounds differently with the
    chunk's width (a trimmed mean over 9 candidates moved in its last bits)."""
    n, d = len(candidates), candidates[0].numel()
    result = torch.empty_like(candidates[0])
    counts = torch.zeros(n, dtype=torch.int64, device=result.device)
    step = max(d, 1) if whole else CHUNK
    for start in range(0, d, step):
        stop = min(d, start + step)
        values, order = torch.sort(stack_rows([c[start:stop] for c in candidates]), dim=0)
        result[start:stop] = values[lo:hi].mean(dim=0)
        counts += torch.bincount(order[lo:hi].reshape(-1), minlength=n)
    return result, counts.to(torch.float64) / ((hi - lo) * d)


@register_aggregator("median")
class MedianAggregator(Aggregator):
    combine = Combine.VALUES
    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        candidates = [own, *(u.delta for u in updates)]
        n = len(candidates)
        lo = (n - 1) // 2
        hi = n // 2 + 1
        delta, weights = sorted_band_mean(candidates, lo, hi)
        return AggregationResult(delta, weights_dict(candidate_ids(updates), weights))
