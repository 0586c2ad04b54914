"""ClippedGossip and centered clipping (He, Karimireddy, Jaggi 2022; Karimireddy, He, Jaggi, ICML 2021).

ClippedGossip (He, Karimireddy, Jaggi 2022) on deltas:
    result = own + sum_j W_ij * CLIP(delta_j - own, tau),  CLIP(z, tau) = min(1, tau/|z|) z
with Metropolis-Hastings W. However large one neighbour's delta is, it moves the
result by at most W_ij * tau. ``tau=None`` picks tau as the median distance
|delta_j - own| over this round's neighbours: a robust scale that a minority of
huge updates cannot inflate (our heuristic; the paper's adaptive rule needs the
honest-set size).

Centered clipping (Karimireddy, He, Jaggi 2021): starting from the own delta,
v <- v + (1/n) sum_i CLIP(x_i - v, tau) over all candidates (own included),
a few iterations. Weights are tracked exactly: v stays a linear combination of
the candidates.
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
    metropolis_hastings,
    register_aggregator,
    require,
    stack_candidates,
    weights_dict,
)


def clip_scales(diffs: torch.Tensor, tau: float) -> torch.Tensor:
    """min(1, tau / |z|) per row of ``diffs`` (float64; zero rows get 1)."""
    norms = torch.linalg.vector_norm(diffs, dim=1).to(torch.float64)
    return torch.where(norms > tau, tau / norms.clamp_min(1e-300), 1.0)


@dataclass(frozen=True)
class ClippedGossipOptions:
    tau: float | None = None  # clipping radius; None: median neighbour distance

    def validate(self) -> None:
        require(self.tau is None or self.tau > 0, "clipped_gossip: tau must be > 0")


@register_aggregator("clipped_gossip")
class ClippedGossipAggregator(Aggregator):
    combine = Combine.VALUES
    Options = ClippedGossipOptions

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        ids = candidate_ids(updates)
        if not updates:
            return AggregationResult(own.clone(), {ids[0]: 1.0})
        mh = metropolis_hastings(own_degree, updates, own.device)
        rows = stack_candidates(own, updates)[1:]
        diffs = rows.sub_(own)  # rows is our own fresh stack: reuse it in place
        if self.options.tau is not None:
            tau = self.options.tau
        else:
            tau = float(torch.linalg.vector_norm(diffs, dim=1).median())
        peer_w = mh * clip_scales(diffs, tau) if tau > 0 else torch.zeros_like(mh)
        delta = own + peer_w.to(diffs.dtype) @ diffs
        weights = torch.cat([(1.0 - peer_w.sum()).reshape(1), peer_w])
        return AggregationResult(delta, weights_dict(ids, weights))


@dataclass(frozen=True)
class CenteredClippingOptions:
    tau: float = 1.0
    iterations: int = 3

    def validate(self) -> None:
        require(self.tau > 0, "centered_clipping: tau must be > 0")
        require(self.iterations >= 1, "centered_clipping: iterations must be >= 1")


@register_aggregator("centered_clipping")
class CenteredClippingAggregator(Aggregator):
    combine = Combine.VALUES
    Options = CenteredClippingOptions

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        rows = stack_candidates(own, updates)
        n = rows.shape[0]
        coef = torch.zeros(n, dtype=torch.float64, device=own.device)
        coef[0] = 1.0  # v starts at the own delta
        v = own.clone()
        for _ in range(self.options.iterations):
            s = clip_scales(rows - v, self.options.tau) / n
            # v + sum_i s_i (x_i - v) = (1 - sum s) v + sum_i s_i x_i
            coef = coef * (1.0 - s.sum()) + s
            v = coef.to(rows.dtype) @ rows
        return AggregationResult(v, weights_dict(candidate_ids(updates), coef))
