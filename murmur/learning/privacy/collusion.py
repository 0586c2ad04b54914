"""Calibrating against colluding nodes: the worst coalition of ``k`` nodes.

SecLDP's adversary is a coalition that pools the seeds of every edge touching
one of its members (see :mod:`murmur.learning.privacy.accountant`): what it
cannot remove from the honest nodes' messages has covariance

    Σ_H(S) = σ² I + L_H(S),   L_H(S) = the edge variances among H = V \\ S only,

and one round costs ρ(S) = 2s²·max_{i∈H} [Σ_H(S)⁻¹]_ii (s: the sensitivity). A plan calibrated with
no coalition (S = ∅) holds against an outside observer only: a neighbour
that subtracts the noise of its own edge with a node already sees more (a
default plan, 10 nodes of degree 6 at ε = 10, spends about 10.7 against one
neighbour, and 20.7-479 against all of a node's neighbours together).

A plan calibrated against ``k`` colluders binds σ so that ρ(S) ≤ ρ for every
coalition of ``k`` nodes that matters. Which ones: a coalition hurts node i
by taking the noise of i's own edges out (those are the terms that hide i's
update), so the candidates are, for every node i, every ``k`` of its
neighbours (all of them when it has ``k`` or fewer). Coalitions further out
only thin the edges of i's neighbours, which matters less; the test suite
checks against every coalition on small random graphs that the worst one is
always among these candidates.

For speed each coalition's L_H(S) is diagonalised once (L = U Λ Uᵀ): then
[(σ² I + c L)⁻¹]_ii = Σ_m U_im² / (σ² + c λ_m) for any local variance σ²
and edge scale c, which is what calibration searches over.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from murmur.errors import ConfigError
from murmur.learning.topology import Graph

MAX_COALITION_WORK = 30_000_000
"""Coalitions × n² a calibration may weigh: each coalition is one eigen-
decomposition at start and n² work per σ tried, and a calibration tries
thousands (100 nodes of degree 8 against 2 colluders, 2,800 coalitions, is
about this: 46-58 s on a busy 2-core machine). A plan that would need more is
refused."""


class TooManyCoalitions(ConfigError):
    """Calibrating against that many colluders on that graph would take too long."""


def coalitions(graph: Graph, k: int) -> list[frozenset[int]]:
    """The coalitions of ``k`` nodes calibration weighs (see the module
    docstring): for every node, each ``k`` of its neighbours; ``[∅]`` for 0."""
    if k < 0:
        raise ValueError("colluders must be >= 0")
    if k == 0:
        return [frozenset()]
    n = len(graph)
    count = sum(1 if len(nbrs) <= k else math.comb(len(nbrs), k) for nbrs in graph)
    if count * n * n > MAX_COALITION_WORK:
        raise TooManyCoalitions(f"privacy.colluders: calibrating against {k} colluders on {n} nodes weighs {count} "
                                f"coalitions, too many to calibrate at start: use fewer, or scheme = \"ldp\"")
    out: set[frozenset[int]] = set()
    for nbrs in graph:
        ordered = sorted(nbrs)
        if len(ordered) <= k:
            out.add(frozenset(ordered))
        else:
            out.update(frozenset(c) for c in itertools.combinations(ordered, k))
    return sorted(out, key=sorted)


def strips_a_node(graph: Graph, k: int) -> bool:
    """Whether ``k`` colluders can hold every edge of some node (its
    neighbours, all of them): that node's message then carries only its
    local noise, which must be σ_ldp, and pairwise noise buys nothing."""
    return k > 0 and any(len(nbrs) <= k for nbrs in graph)


def hidden_laplacian(edge_lap: np.ndarray, coalition: frozenset[int]) -> np.ndarray:
    """L_H(S): the honest nodes' rows and columns of ``edge_lap`` (Σ_e var_e L_e)
    without the edges that touch ``coalition`` (its members know their seeds)."""
    n = edge_lap.shape[0]
    honest = [i for i in range(n) if i not in coalition]
    sub = edge_lap[np.ix_(honest, honest)].copy()
    if coalition:
        members = sorted(coalition)
        # an edge (i, j) adds var to L_ii and -var to L_ij: take the edges to S off the degrees
        sub[np.diag_indices_from(sub)] += edge_lap[np.ix_(honest, members)].sum(axis=1)
    return sub


@dataclass(frozen=True)
class _View:
    weights: np.ndarray  # U², one row per honest node
    eigenvalues: np.ndarray  # λ of L_H(S)


class CollusionBound:
    """max_{S, i∈H} [Σ_H(S)⁻¹]_ii of a noise shape against every candidate
    coalition S of ``k`` nodes (ρ is 2s² times it, see the accountant).

    ``edge_lap``: Σ_e var_e L_e of the pairwise terms a node adds, on the
    calibration graph; calibration scales it (``edge_scale``) and searches
    the local variance."""

    def __init__(self, graph: Graph, edge_lap: np.ndarray, k: int) -> None:
        self.k = k
        self._views = []
        for coalition in coalitions(graph, k):
            lap = hidden_laplacian(edge_lap, coalition)
            if lap.size == 0:
                continue
            lam, vec = np.linalg.eigh(lap)
            self._views.append(_View(vec**2, np.clip(lam, 0.0, None)))

    @property
    def coalitions(self) -> int:
        return len(self._views)

    def max_inverse_diag(self, local_var: float, edge_scale: float = 1.0) -> float:
        """max over coalitions S and honest nodes i of [(σ² I + c·L_H(S))⁻¹]_ii,
        with σ² = ``local_var`` and c = ``edge_scale``."""
        worst = 0.0
        for view in self._views:
            diag = view.weights @ (1.0 / (local_var + edge_scale * view.eigenvalues))
            worst = max(worst, float(diag.max()))
        return worst

    def bind_local_std(self, target: float, s_ldp: float, edge_scale: float = 1.0) -> float:
        """Smallest σ with :meth:`max_inverse_diag` ≤ ``target`` (σ_ldp, whose
        1/σ_ldp² is the target, always suffices: a coalition holding every
        edge of a node leaves it σ² I)."""
        def gap(log_s: float) -> float:
            return math.log(self.max_inverse_diag(math.exp(2 * log_s), edge_scale)) - math.log(target)

        lower = s_ldp * 1e-6
        if gap(math.log(lower)) <= 0:
            return lower
        return math.exp(brentq(gap, math.log(lower), math.log(s_ldp) + 1e-9, xtol=1e-12, rtol=1e-10))


def worst_inverse_diag(edge_lap: np.ndarray, local_var: float, candidates: Sequence[frozenset[int]]) -> float:
    """:meth:`CollusionBound.max_inverse_diag` over ``candidates`` by direct
    inversion: for one σ (a plan's exposure) cheaper than the bound's
    eigen-decompositions, and what tests check the bound against."""
    worst = 0.0
    for coalition in candidates:
        lap = hidden_laplacian(edge_lap, coalition)
        if lap.size:
            inv = np.linalg.inv(local_var * np.eye(lap.shape[0]) + lap)
            worst = max(worst, float(np.max(np.diag(inv))))
    return worst
