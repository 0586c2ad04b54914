"""The privacy layer of a node: seeds, round commits, calibrated noise, accounting.

Threat model (SPECS §4): honest-but-curious peers that may collude (Sybils
included) and know only the seeds of their own edges. What a node sends is

    Δ̃_i = clip(Δ_i, C) + Σ_{j ∈ active(t)} v_ij^t + v̄_i,   v̄_i ~ N(0, σ_local² I)

Three parts, each with one job:

* :func:`calibrate` (pure) turns the ``[privacy]`` budget (ε, δ, T, C, level)
  and an assumed topology into a :class:`PrivacyPlan`: the per-round RDP
  coefficient the accountant charges, σ_cdp and the edge scale (DECOR: one
  σ_cor; CorN EDGE form: per-edge variances), and σ_ldp, the local std that is
  private on its own.
* :class:`PrivacyStage` (sans-IO) is the engine's perturber: it clips, adds
  the pairwise terms of the *active* edges and local noise, steps the
  accountant, and reports un-cancelled noise after a round. The in-process
  simulator (bench/privacy.py) uses it directly.
* :class:`NodePrivacy` puts a stage on the network: signed ``KeyShare`` per
  learning edge (fresh X25519 key per node start), signed ``RoundCommit`` per
  round, and the bounded wait for the neighbours' commits.

Topology assumption: a node sees only its neighbourhood, but SecLDP's
constraint max_i [Σ⁻¹]_ii depends on the whole graph. A node therefore
calibrates on an *assumed* graph: a connected random ``d``-regular-ish graph on
``learning.num_nodes`` nodes, ``d = privacy.assumed_degree`` (0: the
configured ``network.neighbours``). The correlated (smaller) local std σ_cdp is
used only in rounds where the node has at least ``d`` active edges; in any
other round it falls back to σ_ldp, which satisfies the per-round constraint
by itself (Σ ⪰ σ_ldp² I), so a node's own missing edges never cost privacy.
Edges missing *elsewhere* in the network are not visible to a node and are not
accounted: that is the documented assumption.

Commit consistency: an edge is active at i iff i's commit lists j and j's
commit, received within the wait, lists i. A commit that arrives after the
partner's wait expired makes the edge active at one end only; the partner
counts such late commits (``late_commits``) — that noise does not cancel, it
is extra noise (privacy unharmed, utility hit), like a neighbour that dies
after committing, which :meth:`PrivacyStage.after_round` measures.

Decision (accepted, not fixed): no finite exchange of messages over a lossy,
asynchronous link makes both ends agree on "active" (two generals); a
"confirm" bit only moves the one-sided case from the commit to the confirm.
Agreement could only be restored *after* sending (carry the active set with
the delta and have the receiver subtract the partner's term), but the
receiver cannot remove noise from a model it has already mixed, and the
sender's term cannot be withdrawn. So the protocol keeps the safe direction:
an asymmetric edge only ever adds noise, the wait is bounded (min(1 s,
deadline/3)), and the cost is observable (``late_commits``; un-cancelled
variance d·s_ij² per such edge).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prometheus_client import Counter, Gauge
from scipy.optimize import brentq, minimize_scalar

from murmur.errors import ConfigError, ReplayError, StateError
from murmur.learning.privacy.accountant import (
    Accountant,
    Spent,
    calibrate_decor,
    epsilon_from_rdp_coef,
    example_level_epsilon,
    rdp_coef_from_epsilon,
    rdp_coef_of_covariance,
    residual_noise,
)
from murmur.learning.privacy.corn import CovarianceKind, corn_mu, solve_covariance
from murmur.learning.privacy.noise import (
    DropoutReport,
    EdgeScale,
    NoiseConfig,
    PerEdgeScale,
    PrivacyNoise,
    RoundCommit as CommitData,
    UniformEdgeScale,
    active_peers,
    clip_to_norm,
    make_round_commit,
    verify_round_commit,
)
from murmur.learning.privacy.outlook import NoiseOutlook, outlook
from murmur.learning.privacy.seeds import EdgeSecret, PairwiseSeeds, SignedKeyShare
from murmur.learning.rounds import MAX_FUTURE_ROUNDS
from murmur.learning.topology import Graph, complete, edges, metropolis_hastings, random_regularish
from murmur.node.config import NoiseObjective, PrivacyLevel, PrivacyScheme, PrivacySection
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import KeyShare, RoundCommit
from murmur.protocol.transport import ConnectionClosed

if TYPE_CHECKING:
    from murmur.node.daemon import Node
    from murmur.node.session import Handler, PeerSession

log = logging.getLogger(__name__)

COMMIT_WAIT_MAX_S = 1.0
COMMIT_WAIT_DEADLINE_FRACTION = 1.0 / 3.0
"""The commit exchange may take at most min(1 s, deadline/3) of a round: the
rest of the deadline is for the deltas themselves."""
SHARE_GRACE_ROUNDS = 1
"""A neighbour that has not answered our KeyShare this many rounds after it
went out is not waited for: a node with privacy answers the moment it gets
one, so it is not running the protocol (privacy off, or a Sybil), and
waiting for it would cost every round half the commit budget."""
KEPT_ROUNDS = 4
"""Rounds whose pairwise sums and commits are kept (inspection, late arrivals)."""
FALLBACK_STREAK = 3
FALLBACK_WARN_EVERY = 100
"""A node whose rounds keep falling back to LDP noise says so after
FALLBACK_STREAK such rounds in a row and then once per this many more: a
node in a network smaller or sparser than its plan assumes falls back every
round, and what to change is the same each time. A lone fallback (a
neighbour's commit came late at start-up, churn) is only counted."""
_EXAMPLE_LOG_RHO_RANGE = (math.log(1e-12), math.log(1e6))
_EXAMPLE_LOG_RHO_XTOL = 1e-6
_RUN_SCALE_GRID = 80  # log grid of edge-variance scales swept by the RUN objective
_RUN_SCALE_SPAN = (1e-4, 1e3)  # edge variance relative to σ_ldp², low and high end
_NAMESPACE = "murmur"


# --------------------------------------------------------------------------- calibration


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
    each ε is a full RDP composition, so the ~10 evaluations Brent needs
    instead of bisection's ~30 are most of a node's start-up. The returned ρ
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
    """
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
    degree_need = min_edges if min_edges is not None else min((len(g) for g in graph), default=0)
    noise: NoiseConfig | None
    ratio = 1.0
    if scheme is PrivacyScheme.NONE:
        noise, rho = None, math.inf
    elif scheme is PrivacyScheme.LDP:
        noise = NoiseConfig(clip, s_ldp, UniformEdgeScale(0.0))
    elif scheme is PrivacyScheme.DECOR:
        cal = calibrate_decor(eps_equiv, delta, rounds, sens, graph)
        noise = NoiseConfig(clip, cal.sigma_cdp, UniformEdgeScale(cal.sigma_cor))
        ratio = cal.residual_ratio
    elif scheme is PrivacyScheme.CORN:
        sol = solve_covariance(CovarianceKind.EDGE, graph, corn_mu(eps_equiv, delta, rounds, sens))
        ratio = sol.ratio
        noise = _corn_noise(sol, clip, s_ldp, graph, peers)
        # The SDP meets the constraint only to solver tolerance (and the pairwise
        # read-back rounds): re-bind the local std so ρ is never exceeded.
        bound = _bind_local_std(_edge_laplacian(noise, graph, peers), rho, sens, s_ldp)
        if bound > noise.sigma_cdp:
            noise = NoiseConfig(clip, bound, noise.edge_scale)
    else:  # pragma: no cover - the enum is exhaustive
        raise ConfigError(f"unknown privacy scheme {scheme}")
    if objective is NoiseObjective.RUN and noise is not None and scheme in (PrivacyScheme.DECOR, PrivacyScheme.CORN):
        noise, ratio = _rescale_for_run(noise, graph, peers, rho, sens, s_ldp, rounds)
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


def _bind_local_std(edge_lap: np.ndarray, rho: float, sens: float, s_ldp: float) -> float:
    """Smallest σ with 2·sens²·max_i [(σ²I + edge_lap)⁻¹]_ii ≤ ρ (σ_ldp always suffices)."""
    eye = np.eye(edge_lap.shape[0])

    def gap(log_s: float) -> float:
        return math.log(rdp_coef_of_covariance(math.exp(2 * log_s) * eye + edge_lap, sens)) - math.log(rho)

    lower = s_ldp * 1e-6
    if gap(math.log(lower)) <= 0:
        return lower
    return math.exp(brentq(gap, math.log(lower), math.log(s_ldp) + 1e-9, xtol=1e-12, rtol=1e-10))


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
    rounds: int,
) -> tuple[NoiseConfig, float]:
    """Scale the pairwise shape of ``noise`` by k ≥ 0 (σ_cdp bound to ρ) to
    minimise :func:`run_residual`; returns the noise and its one-step ratio."""
    n = len(graph)
    mixing = metropolis_hastings(graph)
    shape = _edge_laplacian(noise, graph, peers)
    top = float(np.max(np.diag(shape))) if n else 0.0
    if top <= 0:  # no pairwise part to scale (the solver fell back to LDP)
        return noise, 1.0
    shape = shape / top  # unit: the largest node's total edge variance
    eye = np.eye(n)

    def score(log_k: float) -> float:
        k = math.exp(log_k)
        local = _bind_local_std(k * shape, rho, sens, s_ldp)
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
    local = _bind_local_std(k * shape, rho, sens, s_ldp)
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


# --------------------------------------------------------------------------- the stage


@dataclass
class StageCounters:
    rounds_sent: int = 0
    fallback_rounds: int = 0  # rounds sent with σ_ldp because too few edges were active
    uncancelled_rounds: int = 0  # rounds in which a committed peer's delta never arrived
    uncancelled_edges: int = 0
    last_uncancelled_norm: float = 0.0
    last_uncancelled_expected: float = 0.0  # √(d·Σ s_ij²) of that report


class PrivacyStage:
    """Sans-IO perturber of one node (the engine's ``perturber``).

    ``resolve`` maps the engine's peer names to ids (the node uses the peer id
    text; the simulator its own names). Instrumentation kept on purpose, read
    by tests and status: ``pairwise_sums[round]`` (the Σ of pairwise terms
    added, last :data:`KEPT_ROUNDS` rounds), ``active[round]``, and of the
    last round ``last_sent``, ``last_clipped``, ``last_noise`` (their
    difference) and ``last_local_std``.
    """

    def __init__(
        self,
        me: PeerId,
        plan: PrivacyPlan,
        secrets: Mapping[PeerId, Any],
        resolve: Callable[[str], PeerId] = PeerId.from_string,
        device: torch.device | str = "cpu",
    ) -> None:
        self.me = me
        self.plan = plan
        self.resolve = resolve
        self.device = torch.device(device)
        self._noise = PrivacyNoise(me, plan.noise, secrets, self.device) if plan.noise is not None else None
        self._local = torch.Generator(device=self.device)
        self._local.manual_seed(int.from_bytes(os.urandom(8), "big"))
        self.accountant: Accountant | None = None
        if plan.noise is not None:
            self.accountant = Accountant(plan.rdp_coef, plan.delta, plan.budget, plan.sampling_rate)
        self.counters = StageCounters()
        self.pairwise_sums: dict[int, torch.Tensor] = {}
        self.active: dict[int, tuple[PeerId, ...]] = {}
        self.last_noise: torch.Tensor | None = None
        self.last_clipped: torch.Tensor | None = None
        self.last_sent: torch.Tensor | None = None
        self.last_local_std = 0.0
        self.last_report: DropoutReport | None = None

    # -- Perturber

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        """The clipping :meth:`perturb` applies, alone (min(1, C/‖Δ‖)·Δ)."""
        return clip_to_norm(delta.detach().to(self.device, torch.float32), self.plan.clip).to(delta.device)

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        flat = delta.detach().to(self.device, torch.float32).reshape(-1)
        clipped = clip_to_norm(flat, self.plan.clip)
        self.counters.rounds_sent += 1
        self.last_clipped = clipped
        if self._noise is None:
            self.last_noise = torch.zeros_like(clipped)
            self.last_sent = clipped
            return clipped
        active = tuple(sorted(self.resolve(p) for p in committed))
        dim = clipped.numel()
        pairwise = self._noise.pairwise(round, active, dim)
        fallback = len(active) < self.plan.min_edges
        std = self.plan.sigma_ldp if fallback else self.plan.noise.sigma_cdp  # type: ignore[union-attr]
        if fallback:
            self.counters.fallback_rounds += 1
        local = torch.randn(dim, generator=self._local, dtype=torch.float32, device=self.device) * std
        noise = pairwise + local
        self._keep(round, active, pairwise)
        self.last_noise = noise
        self.last_local_std = std
        if self.accountant is not None:
            self.accountant.step()
        self.last_sent = clipped + noise
        return self.last_sent

    def _keep(self, round_: int, active: tuple[PeerId, ...], pairwise: torch.Tensor) -> None:
        self.pairwise_sums[round_] = pairwise
        self.active[round_] = active
        for old in sorted(self.pairwise_sums)[:-KEPT_ROUNDS]:
            del self.pairwise_sums[old]
            self.active.pop(old, None)

    # -- after the round

    def after_round(self, round_: int, committed: Sequence[str], missing: Sequence[str]) -> DropoutReport | None:
        """Report the pairwise noise of ``round_`` that cannot cancel: the terms
        of committed peers whose delta never arrived (they did not complete the
        round, so their −v_ij is not in the network either)."""
        if self._noise is None or not committed:
            return None
        active = [self.resolve(p) for p in committed]
        missing_ids = {self.resolve(p) for p in missing}
        delivered = [p for p in active if p not in missing_ids]
        dim = self.pairwise_sums[round_].numel() if round_ in self.pairwise_sums else 0
        if dim == 0 or len(delivered) == len(active):
            return None
        report = self._noise.uncancelled(round_, active, delivered, dim)
        self.last_report = report
        self.counters.uncancelled_rounds += 1
        self.counters.uncancelled_edges += len(report.missing)
        self.counters.last_uncancelled_norm = report.norm
        self.counters.last_uncancelled_expected = math.sqrt(report.variance)
        return report

    # -- accounting

    def epsilon_spent(self) -> float:
        return math.inf if self.accountant is None else self.accountant.epsilon_spent()

    def budget_exhausted(self) -> bool:
        return self.accountant is not None and self.accountant.budget_exhausted()


# --------------------------------------------------------------------------- on the network


def _merged(ledger: Sequence[Spent]) -> list[Spent]:
    """Consecutive entries of one calibration as one (restarts under an
    unchanged config keep the ledger one line long)."""
    out: list[Spent] = []
    for entry in ledger:
        if out and (out[-1].rdp_coef, out[-1].sampling_rate) == (entry.rdp_coef, entry.sampling_rate):
            out[-1] = Spent(entry.rdp_coef, entry.sampling_rate, out[-1].steps + entry.steps)
        elif entry.steps:
            out.append(entry)
    return out


class SeedView(Mapping[PeerId, EdgeSecret]):
    """Read-only mapping view of a :class:`PairwiseSeeds` (what PrivacyNoise reads):
    a secret derived after the stage was built is visible at once."""

    def __init__(self, seeds: PairwiseSeeds) -> None:
        self._seeds = seeds

    def __getitem__(self, peer: PeerId) -> EdgeSecret:
        return self._seeds.secret(peer)

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, PeerId) and self._seeds.has(peer)

    def __iter__(self) -> Iterator[PeerId]:
        return iter(self._seeds.peers())

    def __len__(self) -> int:
        return len(self._seeds.peers())


@dataclass
class _Commits:
    """Verified commits by round (bounded: KEPT_ROUNDS + MAX_FUTURE_ROUNDS rounds)."""

    by_round: dict[int, dict[PeerId, CommitData]] = field(default_factory=dict)

    def add(self, peer: PeerId, commit: CommitData) -> bool:
        bucket = self.by_round.setdefault(commit.round, {})
        old = bucket.get(peer)
        if old is not None:
            if old != commit:
                raise ReplayError(f"two different round commits for round {commit.round}")
            return False
        bucket[peer] = commit
        return True

    def get(self, round_: int) -> dict[PeerId, CommitData]:
        return self.by_round.get(round_, {})

    def prune(self, below: int) -> None:
        for r in [r for r in self.by_round if r < below]:
            del self.by_round[r]


class _PrivacyMetrics:
    """Privacy series in the node's own registry (created here, exported by /metrics)."""

    def __init__(self, registry: Any) -> None:
        self.uncancelled = Counter(
            "privacy_uncancelled_edges", "Committed edges whose partner's delta never arrived",
            namespace=_NAMESPACE, registry=registry,
        )
        self.uncancelled_norm = Gauge(
            "privacy_last_uncancelled_norm", "Norm of the last round's un-cancelled pairwise noise",
            namespace=_NAMESPACE, registry=registry,
        )
        self.fallback = Counter(
            "privacy_fallback_rounds", "Rounds sent with LDP-strength local noise (too few active edges)",
            namespace=_NAMESPACE, registry=registry,
        )
        self.share_timeouts = Counter(
            "privacy_share_timeouts", "Rounds whose wait for neighbours' key shares ran out its budget",
            namespace=_NAMESPACE, registry=registry,
        )
        self.active_edges = Gauge(
            "privacy_active_edges", "Edges that add pairwise noise this round", namespace=_NAMESPACE, registry=registry,
        )


class NodePrivacy:
    """A node's privacy layer on the network; the learner's ``privacy`` and the
    engine's ``perturber``.

    ``commit_listeners`` are awaited after this node's commit for a round is
    sent and before it waits for its neighbours' (instrumentation: a test
    uses it to kill a node at exactly that point).
    """

    def __init__(self, node: Node, stage: PrivacyStage, seeds: PairwiseSeeds, commit_wait_s: float,
                 noise_outlook: NoiseOutlook | None = None) -> None:
        self.node = node
        self.stage = stage
        self.outlook = noise_outlook  # None where the model's size was not known (no trainer)
        self._fallback_streak = 0  # rounds in a row sent with the fallback's noise
        self.seeds = seeds
        self.commit_wait_s = commit_wait_s
        self._commits = _Commits()
        self._shared: dict[PeerId, PeerSession] = {}  # the session our KeyShare went out on
        self._shared_round: dict[PeerId, int] = {}  # the round it went out in
        self._changed = asyncio.Condition()
        self._my_commits: dict[int, CommitData] = {}
        self._current = 0
        self.late_commits = 0
        self.share_timeouts = 0  # rounds whose wait for neighbours' KeyShares ran out
        self.commit_listeners: list[Callable[[int], Awaitable[None]]] = []
        self._closed_round = -1  # last round whose commit wait is over
        self._metrics = _PrivacyMetrics(node.metrics.registry)

    @classmethod
    def for_node(cls, node: Node, trainer: Any) -> NodePrivacy:
        """Calibrate from the node's config (see the module docstring) and build."""
        cfg = node.config
        section: PrivacySection = cfg.privacy
        learning = cfg.learning
        degree = section.assumed_degree or cfg.network.neighbours
        graph = assumed_graph(learning.num_nodes, degree, learning.seed)
        step = dp_sgd_step(trainer, learning.local_steps) if section.level is PrivacyLevel.EXAMPLE else None
        plan = calibrate(
            section.scheme, epsilon=section.epsilon, delta=section.delta, rounds=cfg.privacy_rounds,
            clip=section.clip, graph=graph, level=section.level,
            sampling_rate=step.sampling_rate if step else None, sensitivity=step.sensitivity if step else None,
            budget=section.effective_budget, min_edges=min(degree, learning.num_nodes - 1),
            objective=section.objective.resolve(section.level),
        )
        seeds = PairwiseSeeds(node.identity)
        stage = PrivacyStage(node.peer_id, plan, SeedView(seeds), device=getattr(trainer, "device", "cpu"))
        if stage.accountant is not None:  # what earlier runs of this node already spent
            try:
                stage.accountant.prior = tuple(Spent.from_json(e) for e in node.state.load_privacy_ledger())
            except (ValueError, TypeError) as exc:
                raise StateError(f"privacy ledger {node.state.privacy_path} is damaged ({exc}); "
                                 "refusing to start from epsilon 0") from None
        wait = min(COMMIT_WAIT_MAX_S, learning.round_deadline_s * COMMIT_WAIT_DEADLINE_FRACTION)
        noise = plan.noise
        log.info(
            "privacy calibrated",
            extra={"event": "privacy_plan", "scheme": plan.scheme.value, "level": plan.level.value,
                   "sigma_cdp": noise.sigma_cdp if noise else 0.0, "sigma_ldp": plan.sigma_ldp,
                   "rdp_coef": plan.rdp_coef, "objective": section.objective.resolve(section.level).value,
                   "min_edges": plan.min_edges, "residual_ratio": plan.residual_ratio,
                   "rounds": cfg.privacy_rounds},
        )
        seen = None
        if trainer is not None and noise is not None:
            bound = plan.clip if step is None else min(plan.clip, step.sensitivity * step.batch_size)
            seen = outlook(noise.sigma_cdp, plan.sigma_ldp, int(trainer.num_params()), bound,
                           learning.num_nodes, learning.rounds or cfg.privacy_rounds)
            _tell_outlook(seen, plan, cfg.privacy_rounds)
        return cls(node, stage, seeds, wait, seen)

    # -- learner hooks

    def handlers(self) -> Mapping[type, Handler]:
        return {KeyShare: self._on_keyshare, RoundCommit: self._on_commit}

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        return self.stage.clip(delta)

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        before = self.stage.counters.fallback_rounds
        sent = self.stage.perturb(delta, round, committed)
        accountant = self.stage.accountant
        if accountant is not None:  # on disk before the message leaves
            self.node.state.save_privacy_ledger([e.to_json() for e in _merged(accountant.ledger())])
        self._metrics.active_edges.set(len(committed))
        fallbacks = self.stage.counters.fallback_rounds
        if fallbacks > before:
            self._metrics.fallback.inc()
            self._fallback_streak += 1
            if self._fallback_streak % FALLBACK_WARN_EVERY == FALLBACK_STREAK:
                self._warn_fallback(round, len(committed), fallbacks)
        else:
            self._fallback_streak = 0
        return sent

    def _warn_fallback(self, round_: int, active: int, fallbacks: int) -> None:
        plan = self.stage.plan
        seen = self.outlook
        log.warning(
            f"round {round_} had {active} active noise edges, the privacy plan needs {plan.min_edges}: like the "
            f"{self._fallback_streak - 1} rounds before it, it used "
            f"noise private on its own ({plan.sigma_ldp:.3g} per coordinate instead of "
            f"{plan.noise.sigma_cdp if plan.noise else 0.0:.3g})"
            + (f", a noise-to-signal of {seen.fallback_rho:.2g} over the run instead of {seen.rho:.2g}" if seen else "")
            + ". A network smaller or sparser than the plan assumes does this every round: set learning.num_nodes"
            " and privacy.assumed_degree to its size and degree (fallback_rounds in `murmur status` counts them)",
            extra={"event": "privacy_fallback", "round": round_, "active_edges": active, "min_edges": plan.min_edges,
                   "fallback_rounds": fallbacks},
        )

    async def commit(self, round_: int, neighbours: Mapping[str, int]) -> list[str]:
        """Agree with the neighbours which edges add their pairwise term in ``round_``.

        1. send our KeyShare on every neighbour session that has not had it;
        2. wait (within the commit budget) for the neighbours' secrets;
        3. sign and send RoundCommit(round, peers we hold a secret for);
        4. wait (rest of the budget) for the commits of those peers;
        5. return the peers whose commit lists us (``edge_active``).
        """
        self._current = round_
        if not self.stage.plan.uses_edges:
            return []
        end = time.monotonic() + self.commit_wait_s
        peers = [PeerId.from_string(p) for p in neighbours]
        await asyncio.gather(*(self._share_with(p) for p in peers))
        awaited = [p for p in peers if self._shared_round.get(p, round_) >= round_ - SHARE_GRACE_ROUNDS]
        if not await self._wait(lambda: all(self.seeds.has(p) for p in awaited), end - self.commit_wait_s / 2):
            self.share_timeouts += 1
            self._metrics.share_timeouts.inc()
        mine = [p for p in peers if self.seeds.has(p)]
        my_commit = make_round_commit(self.node.identity, round_, mine)
        self._my_commits[round_] = my_commit
        wire = RoundCommit(round=round_, peers=tuple(PeerId.from_bytes(p) for p in my_commit.peers),
                           signature=my_commit.signature)
        await asyncio.gather(*(self._send(p, wire) for p in peers))
        for listener in list(self.commit_listeners):
            await listener(round_)
        await self._wait(lambda: all(p in self._commits.get(round_) for p in mine), end)
        self._closed_round = max(self._closed_round, round_)
        got = {p: c for p, c in self._commits.get(round_).items() if p in set(mine)}
        active = active_peers(self.node.peer_id, my_commit, got)
        log.debug(
            "round commit",
            extra={"event": "commit", "round": round_, "neighbours": len(peers), "committed": len(mine),
                   "commits_received": len(got), "active": len(active)},
        )
        return [str(p) for p in sorted(active)]

    def after_round(self, round_: int, committed: Sequence[str], missing: Sequence[str]) -> None:
        report = self.stage.after_round(round_, committed, missing)
        if report is not None:
            self._metrics.uncancelled.inc(len(report.missing))
            self._metrics.uncancelled_norm.set(report.norm)
            # Within the peer-caused log budget, keyed by who did not deliver:
            # with quorum < 1 a round may close before a slow neighbour's
            # delta every round (the default testnet wrote ~80 of these a run).
            self.node.peer_log.warning(
                log, tuple(report.missing), "un-cancelled pairwise noise: committed peers did not deliver",
                extra={"event": "uncancelled_noise", "round": round_, "peers": [str(p) for p in report.missing],
                       "norm": round(report.norm, 4), "expected_norm": round(math.sqrt(report.variance), 4)},
            )
        self._commits.prune(round_ + 1 - KEPT_ROUNDS)
        for r in [r for r in self._my_commits if r < round_ + 1 - KEPT_ROUNDS]:
            del self._my_commits[r]
        self._current = round_ + 1

    def epsilon_spent(self) -> float:
        return self.stage.epsilon_spent()

    def budget_exhausted(self) -> bool:
        return self.stage.budget_exhausted()

    def status(self) -> dict[str, Any]:
        c = self.stage.counters
        plan = self.stage.plan
        return {
            "scheme": plan.scheme.value,
            "level": plan.level.value,
            "sigma_cdp": plan.noise.sigma_cdp if plan.noise else 0.0,
            "sigma_ldp": plan.sigma_ldp,
            "rounds_sent": c.rounds_sent,
            "fallback_rounds": c.fallback_rounds,
            "uncancelled_rounds": c.uncancelled_rounds,
            "uncancelled_edges": c.uncancelled_edges,
            "last_uncancelled_norm": c.last_uncancelled_norm,
            "late_commits": self.late_commits,
            "share_timeouts": self.share_timeouts,
            "edges_with_secret": len(self.seeds.peers()),
            **({} if self.outlook is None else {
                "noise_to_signal": self.outlook.rho, "noise_to_signal_fallback": self.outlook.fallback_rho}),
        }

    # -- network

    async def _share_with(self, peer: PeerId) -> None:
        session = self.node.session(peer)
        if session is None or self._shared.get(peer) is session:
            return
        share = self.seeds.share_for(peer)
        self._shared[peer] = session
        self._shared_round[peer] = self._current
        if not await self._send(peer, KeyShare(x25519_pub=share.x25519_pub, signature=share.signature)):
            self._shared.pop(peer, None)
            self._shared_round.pop(peer, None)

    async def _send(self, peer: PeerId, msg: KeyShare | RoundCommit) -> bool:
        session = self.node.session(peer)
        if session is None:
            return False
        try:
            await session.send(msg)
        except ConnectionClosed:
            return False
        return True

    async def _wait(self, predicate: Callable[[], bool], until: float) -> bool:
        async with self._changed:
            left = until - time.monotonic()
            if predicate():
                return True
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), left)
            except TimeoutError:
                return False
            return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_keyshare(self, session: PeerSession, msg: KeyShare) -> None:
        """Verify the signed share (SignatureError / DecodeError otherwise),
        derive the edge secret, and answer with ours on this session once."""
        self.seeds.accept_share(session.peer, SignedKeyShare(msg.x25519_pub, msg.signature))
        await self._share_with(session.peer)
        await self._notify()

    async def _on_commit(self, session: PeerSession, msg: RoundCommit) -> None:
        if msg.round < self._current - KEPT_ROUNDS + 1 or msg.round > self._current + MAX_FUTURE_ROUNDS:
            return  # outside the window we keep: harmless, ignored
        data = CommitData(msg.round, tuple(p.raw for p in msg.peers), msg.signature)
        verify_round_commit(data, session.peer)  # SignatureError / DecodeError
        mine = self._my_commits.get(msg.round)
        if self._commits.add(session.peer, data) and mine is not None and msg.round <= self._closed_round:
            # The partner committed after our wait for this round was over.
            if session.peer.raw in mine.peers and self.node.peer_id.raw in data.peers:
                self.late_commits += 1
        await self._notify()


def _tell_outlook(seen: NoiseOutlook, plan: PrivacyPlan, rounds: int) -> None:
    """Log the plan's noise-to-signal (:mod:`murmur.learning.privacy.outlook`);
    a WARNING, with what to change, where the noise outweighs what the run could learn."""
    extra = {"event": "privacy_outlook", "noise_to_signal": seen.rho, "noise_to_signal_fallback": seen.fallback_rho,
             "noise_per_round": seen.per_round}
    if not seen.outweighs:
        log.info(f"privacy noise-to-signal over the run {seen.rho:.2g} (learning needs well under 1)", extra=extra)
        return
    advice = (
        'level = "user" protects each node\'s whole data set and needs many nodes: level = "example" (DP-SGD, '
        "see the config's comments) protects each example at a small part of the noise"
        if plan.level is PrivacyLevel.USER else
        "a larger privacy.epsilon or more nodes lower it, and so does privacy.rounds no larger than the rounds "
        "the node trains"
    )
    log.warning(
        f"privacy noise outweighs the learning: over the run it is {seen.rho:.2g} times the most all updates could "
        f"move the mean model (one round's noise is {seen.per_round:.3g} times an update; noise calibrated for "
        f"{rounds} rounds). Expect little of the model. {advice}",
        extra=extra,
    )


@dataclass(frozen=True)
class DpSgdStep:
    """What example-level accounting needs to know of the trainer's one step per round."""

    sampling_rate: float  # q = batch / local dataset size
    batch_size: int
    sensitivity: float  # lr · dp_clip / batch: one example's reach into the round delta


def dp_sgd_step(trainer: Any, local_steps: int) -> DpSgdStep:
    """Check that a round is exactly one DP-SGD step and return its accounting terms.

    Example-level ε holds only if the round delta is −lr·(mean of per-example
    clipped gradients): one local step (E steps would each be taken at a point
    that already depends on the data), momentum 0 (the buffer carries
    un-noised earlier gradients) and ``dp_clip`` > 0. Then one example moves
    the delta by at most lr·dp_clip/batch, and the delta clip C, a projection,
    cannot increase that. The engine must also train from the public model
    (:class:`~murmur.learning.rounds.TrainFrom`); the learner sees to that.
    """
    options = getattr(trainer, "options", None)
    batch = getattr(options, "batch_size", None)
    size = getattr(trainer, "train_size", None)
    if not isinstance(batch, int) or not isinstance(size, int) or size <= 0:
        raise ConfigError("example-level privacy needs a trainer with options.batch_size and train_size")
    steps = local_steps or getattr(options, "local_steps", 1)
    dp_clip = float(getattr(options, "dp_clip", 0.0) or 0.0)
    momentum = float(getattr(options, "momentum", 0.0) or 0.0)
    lr = float(getattr(options, "lr", 0.0) or 0.0)
    optimizer = getattr(options, "optimizer", "sgd")
    if steps != 1 or momentum != 0.0 or dp_clip <= 0.0 or lr <= 0.0 or optimizer != "sgd":
        raise ConfigError(
            'privacy.level = "example" needs one DP-SGD step per round: learning.local_steps = 1 and trainer '
            f'options optimizer = "sgd", momentum = 0, dp_clip > 0 (got local_steps={steps}, '
            f"optimizer={optimizer}, momentum={momentum}, dp_clip={dp_clip})"
        )
    return DpSgdStep(min(1.0, batch / size), batch, lr * dp_clip / batch)
