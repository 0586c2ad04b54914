"""Coordinate-wise trimmed mean (Yin et al., ICML 2018).

Per coordinate, drop the floor(beta * n) largest and smallest values and average
the rest (beta = 0.2 per side by default). Candidates include the own delta, as
for the median. If trimming would leave nothing, it degrades to the median.
Weights: share of kept (coordinate, value) slots per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from murmur.learning.aggregators.base import (
    Combine,
    AggregationResult,
    Aggregator,
    PeerUpdate,
    candidate_ids,
    check_inputs,
    register_aggregator,
    require,
    weights_dict,
)
from murmur.learning.aggregators.median import sorted_band_mean

DEFAULT_BETA = 0.2


@dataclass(frozen=True)
class TrimmedMeanOptions:
    beta: float = DEFAULT_BETA  # fraction trimmed per side

    def validate(self) -> None:
        require(0.0 <= self.beta < 0.5, "trimmed_mean: beta must be in [0, 0.5)")


@register_aggregator("trimmed_mean")
class TrimmedMeanAggregator(Aggregator):
    combine = Combine.VALUES
    Options = TrimmedMeanOptions

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        candidates = [own, *(u.delta for u in updates)]
        n = len(candidates)
        k = min(int(self.options.beta * n), (n - 1) // 2)
        delta, weights = sorted_band_mean(candidates, k, n - k, whole=True)  # whole: see sorted_band_mean
        return AggregationResult(delta, weights_dict(candidate_ids(updates), weights))
