"""FoolsGold similarity core (Fung, Yoon, Beschastnikh, RAID 2020), shared by FoolsGold and SybilWall.

Input is a set of accumulated update histories, one per row. Sybils controlled by
one attacker push the model in the same direction every round, so their
histories are nearly parallel; honest peers with different data are not. The
core turns pairwise cosine similarity into a weight in [0, 1] per history:

1. cs_ab = cos(H_a, H_b), diagonal set to 0 (a history is not its own witness).
2. v_a = max_b cs_ab + 1e-5 (always > 0 because the zeroed diagonal is in the max).
3. Pardoning: if v_a < v_b then cs_ab <- cs_ab * v_a / v_b, so an honest peer that
   merely resembles a suspicious cluster is not punished as hard as the cluster.
4. w_a = clip(1 - max_b cs_ab, 0, 1); w <- w / max(w); w == 1 -> 0.99.
5. w_a = clip(kappa * (logit(w_a) + 0.5), 0, 1).

The cosine matrix comes from ONE matmul: the Gram matrix G = H H^T is computed
once and normalised by sqrt(diag(G)) afterwards. That equals the matmul of the
row-normalised histories without materialising a normalised copy of an
(n, d) matrix with d in the millions. The O(n^2) tail runs in float64.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch

PARDON_EPS = 1e-5
WEIGHT_CAP = 0.99
LOGIT_SHIFT = 0.5
DEFAULT_KAPPA = 1.0
SIMILARITY_TOLERANCE = 1e-6
"""1 - max cs below this counts as 0. The Gram is a float32 matmul, so parallel
histories come out at cs = 1 - O(1e-7); without the snap, w / max(w) would blow
that rounding noise up to weight 1 when *every* history is identical (e.g. all
neighbours are one attacker's Sybils)."""


def gram_matrix(rows: torch.Tensor, feature_weights: torch.Tensor | None = None) -> torch.Tensor:
    """G = rows @ rows^T (float64 result of one float32 matmul).

    ``feature_weights`` (length d, >= 0) gives the weighted inner product
    sum_k m_k a_k b_k used by FoolsGold's importance mask.
    """
    if feature_weights is None:
        g = rows @ rows.T
    else:
        g = (rows * feature_weights) @ rows.T
    return g.to(torch.float64)


def pairwise_gram(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix of separate rows, one dot product per pair, float64:
    :func:`gram_matrix` of their stack without the stack, an (n, d) copy that
    for a model of 10M parameters and four rows is 160 MB a call. A row
    equal to another, bit for bit, gives the same dot products as it: two
    clones stay at distance 0 exactly."""
    n = len(rows)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = float(torch.dot(rows[i], rows[j]))
    return g


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix from a Gram matrix; rows with zero norm get 0."""
    g = gram.to(torch.float64)
    norms = g.diagonal().clamp_min(0.0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cs = torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), 0.0)
    return cs.clamp_(-1.0, 1.0)


def cosine_matrix(rows: torch.Tensor, feature_weights: torch.Tensor | None = None) -> torch.Tensor:
    return cosine_from_gram(gram_matrix(rows, feature_weights))


def foolsgold_weights(cs: torch.Tensor, kappa: float = DEFAULT_KAPPA) -> torch.Tensor:
    """Steps 1-5 on a cosine matrix (its diagonal is ignored). Returns float64 weights in [0, 1].

    Edge cases: fewer than two histories -> weight 1 (nothing to compare with);
    every history identical -> every weight 0 (max(w) == 0, no division;
    see SIMILARITY_TOLERANCE);
    NaN similarities (from non-finite input) count as 0; the output is NaN-free.
    """
    n = cs.shape[0]
    if cs.dim() != 2 or cs.shape[1] != n:
        raise ValueError(f"cosine matrix must be square, got {tuple(cs.shape)}")
    if n < 2:
        return torch.ones(n, dtype=torch.float64, device=cs.device)
    cs = torch.nan_to_num(cs.to(torch.float64), nan=0.0, posinf=1.0, neginf=-1.0).clone()
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values + PARDON_EPS
    pardon = v[:, None] < v[None, :]
    cs = torch.where(pardon, cs * (v[:, None] / v[None, :]), cs)
    w = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    w = torch.where(w < SIMILARITY_TOLERANCE, 0.0, w)
    top = w.max()
    if not bool(top > 0):
        return torch.zeros(n, dtype=torch.float64, device=cs.device)
    w = w / top
    w = torch.where(w >= 1.0, WEIGHT_CAP, w)
    w = (kappa * (torch.logit(w) + LOGIT_SHIFT)).clamp(0.0, 1.0)
    return torch.nan_to_num(w, nan=0.0)


def distance_similarity(gram: torch.Tensor) -> torch.Tensor:
    """A similarity in [0, 1] from pairwise distances alone: 1 - D_ab / scale,
    clipped at 0, where scale is the median distance from a row to its
    nearest other row, over the rows whose nearest row is not the same point
    (closer than 1e-6 of the largest distance): identical rows cannot shrink
    the scale they are measured by, and rows far from everyone (an attacker's
    far-off models) cannot stretch it until honest neighbours look alike.

    Why not cosine: rows are offsets from our own reference point, and a
    cosine of two offsets holds the reference's own displacement in common.
    When the reference is off (we mixed in some of an attacker's model),
    honest offsets all point back from it and look alike, which gives the
    attacker more weight, which moves the reference further. Distances
    between rows do not depend on the reference at all.
    """
    g = gram.to(torch.float64)
    sq = g.diagonal()
    d = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0).sqrt()
    n = d.shape[0]
    if n < 2:
        return torch.zeros_like(d)
    others = d + torch.diag(torch.full((n,), math.inf, dtype=d.dtype, device=d.device))
    nearest = others.min(dim=1).values
    top = float(d.max())
    distinct = nearest[nearest > 1e-6 * top] if top > 0 else nearest[:0]
    if distinct.numel() == 0:
        return torch.ones_like(d)  # every row the same point
    scale = float(distinct.median())
    return (1.0 - d / scale).clamp(0.0, 1.0)


def anchored_similarity(gram: torch.Tensor) -> torch.Tensor:
    """Similarity in [0, 1] of rows 1.. from their distances, row 0 (our own
    model) the anchor: 1 - D_ab / min(D_a0, D_b0, m), clipped at 0, where m is
    the median distance over every pair of rows, row 0's included; 0 where
    that yardstick is 0.

    Two peers are alike when they are much closer to each other than either
    is to us: honest peers, each with data of its own, differ from one
    another about as much as from us. The yardstick is per pair and
    anchored on our own model, so neither Sybils that keep apart by a random
    offset (and would set :func:`distance_similarity`'s nearest-neighbour
    scale themselves when they are most of our neighbours) nor far-off ones
    (that would stretch a median of all pairs until honest peers look alike)
    can move it; ``m`` caps it when both peers are far from us (our own
    model off, or an attacker's models far from ours) so that two peers far
    from us are not alike merely for being nearer to each other. Two rows at
    the same point (within 1e-6 of the largest distance) that is not ours
    are alike, 1, whatever ``m``: when clones are most of the rows, ``m`` is
    0. At our own point they are not (every model still the common start).
    """
    g = gram.to(torch.float64)
    sq = g.diagonal()
    d = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0).sqrt()
    n = d.shape[0]
    if n < 3:
        return torch.zeros(max(n - 1, 0), max(n - 1, 0), dtype=torch.float64, device=d.device)
    m = float(d[torch.triu(torch.ones(n, n, dtype=torch.bool, device=d.device), diagonal=1)].median())
    anchor = d[0, 1:]
    scale = torch.minimum(anchor[:, None], anchor[None, :]).clamp_max(m)
    sim = torch.where(scale > 0, 1.0 - d[1:, 1:] / torch.where(scale > 0, scale, 1.0), 0.0)
    tiny = 1e-6 * float(d.max())
    clones = (d[1:, 1:] <= tiny) & (torch.minimum(anchor[:, None], anchor[None, :]) > tiny)
    return torch.where(clones, 1.0, sim).clamp(0.0, 1.0)
