"""Privacy calibration: from a budget (ε, δ over T rounds, clip C, level) and
an assumed topology to the noise a node adds, fixed once at start.

Pure maths, no I/O: :func:`calibrate` returns a :class:`PrivacyPlan` with the
per-round RDP coefficient the accountant charges, σ_cdp and the edge scale
(DECOR: one σ_cor; CorN EDGE form: per-edge variances), and σ_ldp, the local
std private on its own that a round with too few active edges falls back to.
The node (:mod:`murmur.node.privacy`) calibrates on an *assumed* graph
(:func:`assumed_graph`), since SecLDP's constraint max_i [Σ⁻¹]_ii depends on
the whole graph and a node sees only its neighbourhood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from murmur.errors import ConfigError
from murmur.learning.privacy.accountant import (
    SENSITIVITY_FACTOR,
    calibrate_decor,
    epsilon_from_rdp_coef,
    example_level_epsilon,
    rdp_coef_from_epsilon,
    residual_noise,
)
from murmur.learning.privacy.collusion import (
    CollusionBound,
    TooManyCoalitions,
    coalitions,
    strips_a_node,
    worst_inverse_diag,
)
from murmur.learning.privacy.corn import CovarianceKind, corn_mu, solve_covariance
from murmur.learning.privacy.noise import EdgeScale, NoiseConfig, PerEdgeScale, UniformEdgeScale
from murmur.learning.privacy.schemes import NoiseObjective, PrivacyLevel, PrivacyScheme
from murmur.learning.topology import Graph, complete, edges, metropolis_hastings, random_regularish
from murmur.protocol.identity import PeerId

_EXAMPLE_LOG_RHO_RANGE = (math.log(1e-12), math.log(1e6))
_EXAMPLE_LOG_RHO_XTOL = 1e-6
_RUN_SCALE_GRID = 80  # log grid of edge-variance scales swept by the RUN objective
_LDP_RTOL = 1e-6  # a local std this close to σ_ldp is σ_ldp (the root finder's tolerance)
_RUN_SCALE_SPAN = (1e-4, 1e3)  # edge variance relative to σ_ldp², low and high end


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything a stage needs, fixed at start (calibration is not repeated)."""

    scheme: PrivacyScheme
    level: PrivacyLevel
    clip: float  # C: every outgoing delta is clipped to this norm
    sensitivity: float  # C (user level) or C / batch (example level)
    noise: NoiseConfig | None  # None: scheme "none", clipping only
    sigma_ldp: float  # local std private on its own (fallback)
    rdp_coef: float  # per-round ρ charged by the accountant
    sampling_rate: float | None  # example level: Poisson rate q; None: user level
    delta: float
    budget: float
    min_edges: int  # active edges needed to use σ_cdp instead of σ_ldp
    residual_ratio: float  # tr(WΣWᵀ) / tr(W Σ_ldp Wᵀ) on the calibration graph

    @property
    def uses_edges(self) -> bool:
        """Whether pairwise terms are part of the noise (else no seeds or commits are needed)."""
        return self.noise is not None and self.min_edges > 0


def assumed_graph(num_nodes: int, degree: int, seed: int) -> Graph:
    """The topology a node calibrates on (see the module docstring)."""
    if num_nodes < 2:
        return [set()]
    if degree >= num_nodes - 1:
        return complete(num_nodes)
    return random_regularish(num_nodes, max(2, degree), seed)


def example_rdp_coef(epsilon: float, delta: float, steps: int, sampling_rate: float) -> float:
    """The per-round ρ whose Poisson-subsampled composition over ``steps``
    rounds spends ``epsilon`` (Brent's method in log ρ; ε is monotone in ρ):
    each ε needs one round's subsampled RDP series (~20 ms), so the ~20
    evaluations (brackets and Brent's steps) are most of a node's start-up
    (the series are cached: a process's later nodes reuse them). The returned ρ
    is the bracket's lower end, so it never spends more than ``epsilon``."""
    def gap(log_rho: float) -> float:
        return example_level_epsilon(math.exp(log_rho), sampling_rate, steps, delta) - epsilon

    lo, hi = _EXAMPLE_LOG_RHO_RANGE
    if gap(lo) > 0:
        raise ValueError(f"epsilon {epsilon} is below what any noise level reaches over {steps} rounds")
    if gap(hi) <= 0:
        return math.exp(hi)
    log_rho = brentq(gap, lo, hi, xtol=_EXAMPLE_LOG_RHO_XTOL)
    while gap(log_rho) > 0:  # Brent stops within xtol of the root, on either side
        log_rho -= _EXAMPLE_LOG_RHO_XTOL
    return math.exp(log_rho)


def calibrate(
    scheme: PrivacyScheme,
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    clip: float,
    graph: Graph,
    level: PrivacyLevel = PrivacyLevel.USER,
    sampling_rate: float | None = None,
    batch_size: int = 1,
    sensitivity: float | None = None,
    budget: float | None = None,
    min_edges: int | None = None,
    peers: Sequence[PeerId] | None = None,
    objective: NoiseObjective = NoiseObjective.ONE_STEP,
    colluders: int = 0,
) -> PrivacyPlan:
    """Choose the noise for a budget of (ε, δ) over ``rounds`` rounds.

    User level: ρ = ε₁ (SecLDP closed form), sensitivity C. Example level:
    ρ from dp_accounting's subsampled RDP at rate ``sampling_rate``,
    sensitivity ``sensitivity`` if given (the daemon passes lr·dp_clip/B, see
    :func:`dp_sgd_step`), else C / ``batch_size`` (right when C = lr·dp_clip).
    Then

    * LDP: σ_ldp = s·√(2/ρ), no edges;
    * DECOR: (σ_cdp, σ_cor) from :func:`calibrate_decor` on ``graph``;
    * CorN: the EDGE form of :func:`solve_covariance` (falls back to pairwise,
      then LDP). With ``peers`` (node index → id of ``graph``'s nodes) each
      edge gets its own variance; without, every edge gets the largest c_e —
      Σ only grows in the Loewner order, so the constraint still holds.

    ``objective`` RUN (see :class:`NoiseObjective`) keeps the pairwise *shape*
    (DECOR: the unweighted Laplacian; CorN: its solved per-edge variances) and
    re-chooses its magnitude, binding σ_cdp to the same ρ.

    ``colluders`` k > 0: ρ holds against any coalition of k nodes pooling the
    seeds of their edges, not only against an outside observer (see
    :mod:`murmur.learning.privacy.collusion`): DECOR's sweep binds σ_cdp
    against the worst coalition; CorN's solved edge variances are kept and
    its local std re-bound against it.
    """
    if colluders < 0:
        raise ConfigError("colluders must be >= 0")
    objective = objective.resolve(level)
    if level is PrivacyLevel.EXAMPLE:
        if sampling_rate is None or not 0 < sampling_rate <= 1:
            raise ConfigError("example-level privacy needs a sampling rate in (0, 1]")
        rho = example_rdp_coef(epsilon, delta, rounds, sampling_rate)
        sens = sensitivity if sensitivity is not None else clip / batch_size
    else:
        sampling_rate = None
        rho = rdp_coef_from_epsilon(epsilon, rounds, delta)
        sens = clip
    eps_equiv = epsilon_from_rdp_coef(rho, rounds, delta)  # the user-level ε with the same ρ
    s_ldp = sens * math.sqrt(2.0 / rho)
    n = len(graph)
    # Never fewer than a node of the graph calibrated on has: with degree 1
    # the plan is calibrated on a ring (two edges each), and a node sending
    # with the ring's noise on its one edge spent ε 12.6 (user level) or 43.7
    # (example level) where 10 was reported, for five linked pairs.
    graph_degree = min((len(g) for g in graph), default=0)
    degree_need = graph_degree if min_edges is None else max(min_edges, graph_degree)
    noise: NoiseConfig | None
    ratio = 1.0
    if scheme is PrivacyScheme.NONE:
        noise, rho = None, math.inf
    elif scheme is PrivacyScheme.LDP or strips_a_node(graph, colluders):
        # (a coalition holding all of some node's edges leaves it its local noise alone)
        noise = NoiseConfig(clip, s_ldp, UniformEdgeScale(0.0))
    elif scheme is PrivacyScheme.DECOR:
        cal = calibrate_decor(eps_equiv, delta, rounds, sens, graph, colluders=colluders)
        noise = NoiseConfig(clip, cal.sigma_cdp, UniformEdgeScale(cal.sigma_cor))
        ratio = cal.residual_ratio
    elif scheme is PrivacyScheme.CORN:
        sol = solve_covariance(CovarianceKind.EDGE, graph, corn_mu(eps_equiv, delta, rounds, sens))
        ratio = sol.ratio
        noise = _corn_noise(sol, clip, s_ldp, graph, peers)
        # The SDP meets the constraint only to solver tolerance (and the pairwise
        # read-back rounds), and with no coalition: re-bind the local std so ρ
        # is never exceeded, against ``colluders`` too.
        bound = CollusionBound(graph, _edge_laplacian(noise, graph, peers), colluders)
        local = bound.bind_local_std(_inverse_diag_target(rho, sens), s_ldp)
        if local >= s_ldp * (1 - _LDP_RTOL):  # a coalition can strip a node of all its edges: they would only add noise
            noise, ratio = NoiseConfig(clip, s_ldp, UniformEdgeScale(0.0)), 1.0
        elif local > noise.sigma_cdp:
            noise = NoiseConfig(clip, local, noise.edge_scale)
    else:  # pragma: no cover - the enum is exhaustive
        raise ConfigError(f"unknown privacy scheme {scheme}")
    if objective is NoiseObjective.RUN and noise is not None and scheme in (PrivacyScheme.DECOR, PrivacyScheme.CORN):
        if scheme is PrivacyScheme.DECOR and _uniform_var(noise) == 0.0 and not strips_a_node(graph, colluders):
            # DECOR's shape is the graph's Laplacian whatever the one-step sweep chose: when
            # that sweep found no σ_cor worth it (LDP), the run's objective may still find one
            # (50 nodes of degree 6 against one colluder: σ_local 0.27 of σ_ldp, not LDP)
            noise = NoiseConfig(clip, s_ldp, UniformEdgeScale(1.0))
        noise, ratio = _rescale_for_run(noise, graph, peers, rho, sens, s_ldp, rounds, colluders)
    if noise is None or noise.sigma_cdp >= s_ldp:
        degree_need = 0  # no correlated part: nothing to fall back from
    return PrivacyPlan(
        scheme=scheme, level=level, clip=clip, sensitivity=sens, noise=noise, sigma_ldp=s_ldp,
        rdp_coef=rho, sampling_rate=sampling_rate, delta=delta,
        budget=budget if budget is not None else epsilon, min_edges=degree_need if n > 1 else 0,
        residual_ratio=ratio,
    )


def _edge_laplacian(noise: NoiseConfig, graph: Graph, peers: Sequence[PeerId] | None) -> np.ndarray:
    """Σ_e s_e² L_e for the pairwise terms ``noise`` adds on ``graph`` (peers: node index → id)."""
    n = len(graph)
    lap = np.zeros((n, n))
    for i, j in edges(graph):
        var = noise.edge_scale.std(peers[i], peers[j]) ** 2 if peers is not None else _uniform_var(noise)
        lap[i, i] += var
        lap[j, j] += var
        lap[i, j] -= var
        lap[j, i] -= var
    return lap


def _uniform_var(noise: NoiseConfig) -> float:
    scale = noise.edge_scale
    if isinstance(scale, UniformEdgeScale):
        return scale.sigma_cor**2
    return float(getattr(scale, "default_std", 0.0)) ** 2


def _inverse_diag_target(rho: float, sens: float) -> float:
    """The bound on max [Σ⁻¹]_ii that spends ρ per round at sensitivity ``sens``."""
    return rho / (SENSITIVITY_FACTOR * sens**2)


def run_residual(sigma: np.ndarray, mixing: np.ndarray, rounds: int) -> float:
    """(1/n)·Σ_{k=1..T} tr(W^k Σ W^k): per-node noise variance left after T
    rounds of mixing the noise of every round (W symmetric)."""
    lam, vec = np.linalg.eigh(mixing)
    lam2 = np.clip(lam**2, 0.0, 1.0)
    near_one = lam2 > 1 - 1e-12
    safe = np.where(near_one, 0.5, lam2)
    geometric = np.where(near_one, float(rounds), safe * (1 - safe**rounds) / (1 - safe))
    proj = np.einsum("im,ij,jm->m", vec, sigma, vec)
    return float(geometric @ proj) / sigma.shape[0]


def _rescale_for_run(
    noise: NoiseConfig, graph: Graph, peers: Sequence[PeerId] | None, rho: float, sens: float, s_ldp: float,
    rounds: int, colluders: int = 0,
) -> tuple[NoiseConfig, float]:
    """Scale the pairwise shape of ``noise`` by k ≥ 0 (σ_cdp bound to ρ, against
    ``colluders``) to minimise :func:`run_residual`; returns the noise and its
    one-step ratio."""
    n = len(graph)
    mixing = metropolis_hastings(graph)
    shape = _edge_laplacian(noise, graph, peers)
    top = float(np.max(np.diag(shape))) if n else 0.0
    if top <= 0:  # no pairwise part to scale (the solver fell back to LDP)
        return noise, 1.0
    shape = shape / top  # unit: the largest node's total edge variance
    eye = np.eye(n)
    bound = CollusionBound(graph, shape, colluders)
    target = _inverse_diag_target(rho, sens)

    def score(log_k: float) -> float:
        k = math.exp(log_k)
        local = bound.bind_local_std(target, s_ldp, k)
        return run_residual(local**2 * eye + k * shape, mixing, rounds)

    lo, hi = (math.log(f * s_ldp**2) for f in _RUN_SCALE_SPAN)
    grid = np.linspace(lo, hi, _RUN_SCALE_GRID)
    values = [score(g) for g in grid]
    best = int(np.argmin(values))
    best_log = float(grid[best])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    if b > a:
        res = minimize_scalar(score, bounds=(a, b), method="bounded")
        if res.success and res.fun <= values[best]:
            best_log = float(res.x)
    k = math.exp(best_log)
    if run_residual(s_ldp**2 * eye, mixing, rounds) <= score(best_log):
        return NoiseConfig(noise.clip, s_ldp, UniformEdgeScale(0.0)), 1.0
    local = bound.bind_local_std(target, s_ldp, k)
    factor = math.sqrt(k / top)  # every edge std scales by this
    scale: EdgeScale
    if isinstance(noise.edge_scale, PerEdgeScale):
        old = noise.edge_scale
        scale = PerEdgeScale({e: v * factor**2 for e, v in old.variances.items()}, old.default_std * factor)
    else:
        scale = UniformEdgeScale(math.sqrt(_uniform_var(noise)) * factor)
    out = NoiseConfig(noise.clip, local, scale)
    one_step = residual_noise(local**2 * eye + k * shape, mixing) / residual_noise(s_ldp**2 * eye, mixing)
    return out, one_step


def _corn_noise(sol: Any, clip: float, s_ldp: float, graph: Graph, peers: Sequence[PeerId] | None) -> NoiseConfig:
    if sol.used is CovarianceKind.EDGE and sol.edge_variances is not None and sol.local_variances is not None:
        local = math.sqrt(float(np.max(sol.local_variances)))
        variances = sol.edge_variances
        top = math.sqrt(max(variances.values(), default=0.0))
        scale: EdgeScale
        if peers is not None:
            scale = PerEdgeScale.from_pairs({(peers[i], peers[j]): v for (i, j), v in variances.items()}, top)
        else:
            scale = UniformEdgeScale(top)
        return NoiseConfig(clip, local, scale)
    if sol.used is CovarianceKind.PAIRWISE:
        # Σ = aI + bL: local a, every edge b (read back off the solved Σ).
        lap_diag = np.array([len(g) for g in graph], dtype=float)
        diag = np.diag(sol.sigma)
        k = int(np.argmax(lap_diag))
        b = max(0.0, -float(sol.sigma[k, next(iter(graph[k]))])) if graph[k] else 0.0
        a = max(0.0, float(diag[k] - b * lap_diag[k]))
        return NoiseConfig(clip, math.sqrt(a), UniformEdgeScale(math.sqrt(b)))
    return NoiseConfig(clip, s_ldp, UniformEdgeScale(0.0))


def epsilon_against(plan: PrivacyPlan, graph: Graph, k: int, rounds: int,
                    peers: Sequence[PeerId] | None = None) -> float | None:
    """The ε ``plan`` spends over ``rounds`` rounds on ``graph`` against the
    worst coalition of ``k`` nodes pooling their edges' seeds (see
    :mod:`~murmur.learning.privacy.collusion`), where ``plan.budget`` is what
    it spends against outsiders (or against ``privacy.colluders``). None: no
    noise, or too many coalitions to weigh."""
    if plan.noise is None or rounds <= 0:
        return None
    try:
        candidates = coalitions(graph, k)
    except TooManyCoalitions:
        return None
    # one σ to try: a direct inverse per coalition is cheaper than CollusionBound's eigen-decompositions
    worst = worst_inverse_diag(_edge_laplacian(plan.noise, graph, peers), plan.noise.sigma_cdp**2, candidates)
    rho = SENSITIVITY_FACTOR * plan.sensitivity**2 * worst
    if plan.sampling_rate is not None:
        return example_level_epsilon(rho, plan.sampling_rate, rounds, plan.delta)
    return epsilon_from_rdp_coef(rho, rounds, plan.delta)


def residual_ratio_of(plan: PrivacyPlan, graph: Graph, peers: Sequence[PeerId]) -> float:
    """tr(WΣWᵀ) relative to LDP for the noise ``plan`` injects on ``graph``
    (node index k is ``peers[k]``), all edges active."""
    n = len(graph)
    mixing = metropolis_hastings(graph)
    ldp = residual_noise(plan.sigma_ldp**2 * np.eye(n), mixing)
    if plan.noise is None:
        return 0.0
    sigma = plan.noise.sigma_cdp**2 * np.eye(n)
    for i, j in edges(graph):
        var = plan.noise.edge_scale.std(peers[i], peers[j]) ** 2
        sigma[i, i] += var
        sigma[j, j] += var
        sigma[i, j] -= var
        sigma[j, i] -= var
    return residual_noise(sigma, mixing) / ldp
