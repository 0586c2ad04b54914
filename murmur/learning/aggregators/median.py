"""Coordinate-wise median (Yin et al. 2018; SPECS section 3).

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
    stack_candidates,
    weights_dict,
)


def sorted_band_mean(rows: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the mean of the sorted values with ranks [lo, hi).

    Returns (result, weight per candidate) where the weight is the share of all
    (coordinate, kept value) slots that came from that candidate.
    """
    n, d = rows.shape
    values, order = torch.sort(rows, dim=0)
    kept = hi - lo
    result = values[lo:hi].mean(dim=0)
    counts = torch.bincount(order[lo:hi].reshape(-1), minlength=n).to(torch.float64)
    return result, counts / (kept * d)


@register_aggregator("median")
class MedianAggregator(Aggregator):
    combine = Combine.VALUES
    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        rows = stack_candidates(own, updates)
        n = rows.shape[0]
        lo = (n - 1) // 2
        hi = n // 2 + 1
        delta, weights = sorted_band_mean(rows, lo, hi)
        return AggregationResult(delta, weights_dict(candidate_ids(updates), weights))
