"""Plain decentralized averaging with Metropolis-Hastings weights (D-SGD, Lian et al., NeurIPS 2017).

W_ij = 1 / (max(deg_i, deg_j) + 1) for each neighbour j that delivered, and
W_ii = 1 - sum_j W_ij. The matrix is symmetric and doubly stochastic, so the
network average is preserved - which is what makes pairwise privacy noise
cancel. A neighbour that missed the deadline simply leaves its share on W_ii.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from murmur.learning.aggregators.base import (
    AggregationResult,
    Aggregator,
    PeerUpdate,
    candidate_ids,
    check_inputs,
    metropolis_hastings,
    register_aggregator,
    stack_candidates,
    weights_dict,
)


@register_aggregator("mean")
class MeanAggregator(Aggregator):
    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        peer_w = metropolis_hastings(own_degree, updates, own.device)
        weights = torch.cat([(1.0 - peer_w.sum()).reshape(1), peer_w])
        rows = stack_candidates(own, updates)
        delta = weights.to(rows.dtype) @ rows
        return AggregationResult(delta, weights_dict(candidate_ids(updates), weights))
