"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

score(i) = sum of the n - f - 2 smallest squared distances from candidate i to
the others; Krum returns the argmin, Multi-Krum the mean of the m best.

The own delta is one of the candidates (row 0): the node trusts its own update
but Krum's guarantee is about the selected set, so we let the own delta compete
like any other rather than forcing it in. Pairwise squared distances come from
one Gram matmul: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b (clamped at 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from murmur.learning.aggregators.base import (
    AggregationResult,
    Aggregator,
    PeerUpdate,
    candidate_ids,
    check_inputs,
    register_aggregator,
    require,
    stack_candidates,
    weights_dict,
)
from murmur.learning.aggregators.similarity import gram_matrix


@dataclass(frozen=True)
class KrumOptions:
    f: int | None = None  # assumed Byzantine count; None: largest f with n > 2f + 2
    m: int | None = 1  # how many best candidates to average; None: n - f

    def validate(self) -> None:
        require(self.f is None or self.f >= 0, "krum: f must be >= 0")
        require(self.m is None or self.m >= 1, "krum: m must be >= 1")


@dataclass(frozen=True)
class MultiKrumOptions(KrumOptions):
    m: int | None = None


def squared_distances(rows: torch.Tensor) -> torch.Tensor:
    g = gram_matrix(rows)
    sq = g.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)


def krum_scores(dist2: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of the n - f - 2 smallest distances to other candidates (at least 1)."""
    n = dist2.shape[0]
    k = max(1, n - f - 2)
    others = dist2 + torch.diag(torch.full((n,), float("inf"), dtype=dist2.dtype, device=dist2.device))
    return others.topk(min(k, n - 1), dim=1, largest=False).values.sum(dim=1)


@register_aggregator("krum")
class KrumAggregator(Aggregator):
    Options = KrumOptions

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        rows = stack_candidates(own, updates)
        n = rows.shape[0]
        f = self.options.f if self.options.f is not None else max(0, (n - 3) // 2)
        m = self.options.m if self.options.m is not None else max(1, n - f)
        m = min(m, n)
        weights = torch.zeros(n, dtype=torch.float64, device=own.device)
        if n == 1:
            weights[0] = 1.0
        else:
            best = krum_scores(squared_distances(rows), f).topk(m, largest=False).indices
            weights[best] = 1.0 / m
        delta = weights.to(rows.dtype) @ rows
        return AggregationResult(delta, weights_dict(candidate_ids(updates), weights))


@register_aggregator("multi-krum")
class MultiKrumAggregator(KrumAggregator):
    Options = MultiKrumOptions
