"""SecLDP accounting for pairwise-correlated noise (DECOR, Allouah et al., ICML 2024).

Threat model: honest-but-curious peers that may collude (Sybils included); a
coalition knows its own noise and the seeds of every edge touching one of its
members, nothing else. For the honest nodes H the noise the adversary cannot
remove has covariance (per coordinate)

    Σ_H = σ_cdp² I + σ_cor² L_H,   L_H = Laplacian of the honest–honest edges

(edges to a colluder add noise the adversary can subtract, so they count for
nothing; their degree contribution is dropped too). One round is then an
(α, α·ρ)-RDP mechanism with ρ = 2C²·max_{i∈H} [Σ_H⁻¹]_ii (sensitivity 2C of
replacing one user's clipped delta). Over T rounds, converting RDP to
(ε, δ)-DP at the best order gives the user-level

    ε = Tρ + 2√(Tρ ln(1/δ)),   and inversely   ρ = ε₁ = (√(ln(1/δ)+ε) − √(ln(1/δ)))² / T.

LDP baseline: Σ = σ² I gives σ_ldp = C√(2/ε₁); central DP σ_ldp/√n.

Example level: each round applies the same Gaussian mechanism to a Poisson
subsample (rate q = batch / local dataset size) with per-example sensitivity;
the effective noise multiplier is z = 1/√(2ρ) and the subsampled RDP is
composed and converted with ``dp_accounting``'s RdpAccountant (orders
optimised there).

Calibration objective (documented choice): the reference code selects among
(σ_cdp, σ_cor) pairs by *measured training loss* on a coarse grid and accepts
pairs whose ε overshoots the target (its anchors ring σ_cor=94/σ_cdp=22.97 and
complete σ_cor=32/σ_cdp=17.83 are ε = 10.46 and 10.80, not 10; this module's
exact accountant reproduces those values). An analytic replacement is needed
in a node, so :func:`calibrate_decor` sweeps σ_cor, sets σ_cdp so the privacy
constraint binds exactly, and minimises the noise left after one
Metropolis–Hastings mixing step, tr(WΣWᵀ)/n — the same residual CorN
minimises (Rodio, Chen, Larsson 2025), so DECOR and CorN are compared on one scale.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.optimize import brentq, minimize_scalar

from murmur.learning.privacy.collusion import CollusionBound, hidden_laplacian, strips_a_node
from murmur.learning.topology import Graph, laplacian, metropolis_hastings

SENSITIVITY_FACTOR = 2.0  # replace-one sensitivity 2C → RDP coefficient 2C²·[Σ⁻¹]_ii
_SIGMA_COR_GRID_POINTS = 120
_SIGMA_COR_MAX_FACTOR = 10.0  # sweep σ_cor up to 10·σ_ldp
_BUDGET_RTOL = 1e-9  # a budget calibrated for exactly T rounds must allow T rounds despite rounding


# --------------------------------------------------------------------------- (ε, δ) ↔ ρ


def log_inv_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    return math.log(1.0 / delta)


def epsilon_from_rdp_coef(rdp_coef: float, steps: int, delta: float) -> float:
    """User-level ε after ``steps`` rounds of an (α, α·ρ)-RDP mechanism."""
    if steps <= 0 or rdp_coef <= 0:
        return 0.0
    total = steps * rdp_coef
    return total + 2.0 * math.sqrt(total * log_inv_delta(delta))


def rdp_coef_from_epsilon(epsilon: float, steps: int, delta: float) -> float:
    """ε₁: the per-round RDP coefficient that spends exactly ``epsilon`` in ``steps``."""
    if epsilon <= 0 or steps <= 0:
        raise ValueError("epsilon and steps must be positive")
    ld = log_inv_delta(delta)
    return (math.sqrt(ld + epsilon) - math.sqrt(ld)) ** 2 / steps


def sigma_ldp(epsilon: float, delta: float, steps: int, clip: float) -> float:
    return clip * math.sqrt(2.0 / rdp_coef_from_epsilon(epsilon, steps, delta))


def sigma_central(epsilon: float, delta: float, steps: int, clip: float, n: int) -> float:
    return sigma_ldp(epsilon, delta, steps, clip) / math.sqrt(n)


# --------------------------------------------------------------------------- covariance


@dataclass(frozen=True)
class TrustAssumption:
    """Indices of colluding (or Sybil) nodes; they know the seeds of all their edges."""

    colluders: frozenset[int] = frozenset()

    @classmethod
    def of(cls, colluders: Iterable[int] = ()) -> TrustAssumption:
        return cls(frozenset(colluders))

    def honest(self, n: int) -> list[int]:
        return [i for i in range(n) if i not in self.colluders]


def secret_edge_laplacian(graph: Graph, trust: TrustAssumption = TrustAssumption()) -> np.ndarray:
    """Laplacian (over honest nodes only) of the edges whose seeds the adversary lacks."""
    return hidden_laplacian(laplacian(graph), trust.colluders)


def decor_covariance(
    graph: Graph, sigma_cdp: float, sigma_cor: float, trust: TrustAssumption = TrustAssumption()
) -> np.ndarray:
    lap = secret_edge_laplacian(graph, trust)
    return sigma_cdp**2 * np.eye(lap.shape[0]) + sigma_cor**2 * lap


def rdp_coef_of_covariance(sigma: np.ndarray, clip: float) -> float:
    """ρ = 2C²·max_i [Σ⁻¹]_ii (per-round RDP at order α is α·ρ)."""
    if sigma.size == 0:
        return 0.0
    inv = np.linalg.inv(sigma)
    return SENSITIVITY_FACTOR * clip**2 * float(np.max(np.diag(inv)))


def decor_rdp_coef(
    sigma_cdp: float, sigma_cor: float, clip: float, graph: Graph, trust: TrustAssumption = TrustAssumption()
) -> float:
    return rdp_coef_of_covariance(decor_covariance(graph, sigma_cdp, sigma_cor, trust), clip)


def decor_epsilon(
    sigma_cdp: float,
    sigma_cor: float,
    clip: float,
    graph: Graph,
    steps: int,
    delta: float,
    trust: TrustAssumption = TrustAssumption(),
) -> float:
    return epsilon_from_rdp_coef(decor_rdp_coef(sigma_cdp, sigma_cor, clip, graph, trust), steps, delta)


def decor_sigma_cdp(
    sigma_cor: float, rdp_coef: float, clip: float, graph: Graph, trust: TrustAssumption = TrustAssumption()
) -> float:
    """Smallest σ_cdp with decor_rdp_coef(σ_cdp, σ_cor) ≤ ``rdp_coef`` (binds it).

    ρ is strictly decreasing in σ_cdp and σ_cdp = C√(2/ρ) (LDP) always suffices.
    """
    upper = clip * math.sqrt(SENSITIVITY_FACTOR / rdp_coef)

    def gap(log_s: float) -> float:
        return math.log(decor_rdp_coef(math.exp(log_s), sigma_cor, clip, graph, trust)) - math.log(rdp_coef)

    lower = upper * 1e-6
    if gap(math.log(lower)) <= 0:  # correlated noise alone already suffices
        return lower
    return math.exp(brentq(gap, math.log(lower), math.log(upper) + 1e-9, xtol=1e-12, rtol=1e-10))


def residual_noise(sigma: np.ndarray, mixing: np.ndarray) -> float:
    """tr(WΣWᵀ)/n: per-node noise variance left after one mixing step."""
    return float(np.trace(mixing @ sigma @ mixing.T)) / sigma.shape[0]


@dataclass(frozen=True)
class DecorCalibration:
    sigma_cdp: float
    sigma_cor: float
    sigma_ldp: float
    sigma_central: float
    rdp_coef: float
    residual: float  # tr(WΣWᵀ)/n of the chosen pair
    residual_ldp: float  # same for σ_ldp² I

    @property
    def residual_ratio(self) -> float:
        return self.residual / self.residual_ldp


def calibrate_decor(
    epsilon: float,
    delta: float,
    steps: int,
    clip: float,
    graph: Graph,
    trust: TrustAssumption = TrustAssumption(),
    sigma_cor_max: float | None = None,
    colluders: int = 0,
) -> DecorCalibration:
    """Choose (σ_cdp, σ_cor) for a user-level (ε, δ) budget over ``steps`` rounds.

    Sweeps σ_cor on a log grid in (0, σ_cor_max] (default 10·σ_ldp), binds the
    constraint with σ_cdp, minimises tr(WΣWᵀ)/n with W = Metropolis–Hastings
    and Σ the noise actually injected (all n nodes, full Laplacian), then
    refines around the best grid point. On a complete graph the residual keeps
    falling as σ_cor grows (W = J/n cancels all pairwise noise), so the result
    sits at the cap with σ_cdp → σ_central. ``colluders`` > 0 binds σ_cdp
    against the worst coalition of that many nodes instead (see
    :mod:`murmur.learning.privacy.collusion`; ``trust`` names one fixed set).
    """
    n = len(graph)
    rho = rdp_coef_from_epsilon(epsilon, steps, delta)
    s_ldp = sigma_ldp(epsilon, delta, steps, clip)
    cap = sigma_cor_max if sigma_cor_max is not None else _SIGMA_COR_MAX_FACTOR * s_ldp
    mixing = metropolis_hastings(graph)
    full_lap = laplacian(graph)
    eye = np.eye(n)
    ldp_resid = residual_noise(s_ldp**2 * eye, mixing)
    ldp = DecorCalibration(s_ldp, 0.0, s_ldp, s_ldp / math.sqrt(n), rho, ldp_resid, ldp_resid)
    if strips_a_node(graph, colluders):  # no pairwise noise can help
        return ldp
    bound = CollusionBound(graph, full_lap, colluders) if colluders else None

    def objective(log_cor: float) -> tuple[float, float]:
        s_cor = math.exp(log_cor)
        if bound is None:
            s_cdp = decor_sigma_cdp(s_cor, rho, clip, graph, trust)
        else:
            s_cdp = bound.bind_local_std(rho / (SENSITIVITY_FACTOR * clip**2), s_ldp, s_cor**2)
        return residual_noise(s_cdp**2 * eye + s_cor**2 * full_lap, mixing), s_cdp

    grid = np.linspace(math.log(cap) - math.log(1e4), math.log(cap), _SIGMA_COR_GRID_POINTS)
    values = [objective(g)[0] for g in grid]
    k = int(np.argmin(values))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    best_log = float(grid[k])
    if hi > lo:
        res = minimize_scalar(lambda g: objective(g)[0], bounds=(lo, hi), method="bounded")
        if res.success and res.fun <= values[k]:
            best_log = float(res.x)
    resid, s_cdp = objective(best_log)
    # LDP (σ_cor = 0) is always admissible; never return worse than it.
    if ldp_resid <= resid:
        return ldp
    return DecorCalibration(s_cdp, math.exp(best_log), s_ldp, s_ldp / math.sqrt(n), rho, resid, ldp_resid)


# --------------------------------------------------------------------------- example level


RDP_ORDERS = tuple(sorted(
    (1.75, 2.25, 2.5, 2.75, 3.25, 3.5, 4.5, 5.5, 6.5, 7.5) + tuple(range(2, 65)) + (80, 96, 128, 256, 512)
))
"""The Rényi orders of the example-level accountant. dp_accounting's default
list starts at 1.1 in steps of 0.1: at sampling rates near 0.2 each of those
fractional orders below 1.75 runs its series 1000 terms, fails to converge
and is dropped with a warning, which made one ε cost ~0.3 s and a node's
start-up calibration (a bisection of ~30 of them) ~10 s. These orders give ε
within 3 % of the default list (sometimes below it: 80 and 96 are not in it)
over q in [0.017, 0.74], at 3-6x less cost."""


_RDP_ORDERS_ARRAY = np.array(RDP_ORDERS)
_ONE_STEP_CACHE = 1024  # distinct (ρ, q): a calibration's root finding needs ~20, a process's nodes share them


@functools.lru_cache(maxsize=_ONE_STEP_CACHE)
def _one_step_rdp(rdp_coef: float, sampling_rate: float | None) -> np.ndarray:
    """RDP at :data:`RDP_ORDERS` of one round (Poisson-subsampled at
    ``sampling_rate``; None or 1: not subsampled) whose unsampled per-round RDP is α·ρ.

    Why cached: RDP composes by adding, so T rounds are T times this vector
    and only it needs dp_accounting's series (~30 ms at q ≈ 0.2). Without
    the cache each round's budget check recomputed it, and every node of a
    process repeated the same root finding at start. Read-only: callers scale
    a copy."""
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    event: Any = dp_accounting.GaussianDpEvent(1.0 / math.sqrt(2.0 * rdp_coef))
    if sampling_rate is not None and sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    acc.compose(event, 1)
    rdp = acc.rdp.copy()
    rdp.flags.writeable = False
    return rdp


def _epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    epsilon, _ = compute_epsilon(_RDP_ORDERS_ARRAY, rdp, delta)
    return float(epsilon)


def example_level_epsilon(rdp_coef: float, sampling_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled rounds whose unsampled per-round RDP is α·ρ.

    ρ must be computed with the per-example sensitivity (clip C_ex / batch).
    The equivalent Gaussian noise multiplier is z = 1/√(2ρ).
    """
    if steps <= 0:
        return 0.0
    if not 0 < sampling_rate <= 1:
        raise ValueError("sampling rate must be in (0, 1]")
    return _epsilon_of_rdp(steps * _one_step_rdp(rdp_coef, sampling_rate), delta)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Spent:
    """Rounds already charged under one calibration: a ledger entry that
    outlives the process (see :attr:`Accountant.prior`)."""

    rdp_coef: float
    sampling_rate: float | None
    steps: int

    def to_json(self) -> list[Any]:
        return [self.rdp_coef, self.sampling_rate, self.steps]

    @classmethod
    def from_json(cls, raw: Any) -> Spent:
        rdp_coef, sampling_rate, steps = raw
        if not (isinstance(rdp_coef, (int, float)) and rdp_coef >= 0 and isinstance(steps, int) and steps >= 0
                and (sampling_rate is None or (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1))):
            raise ValueError(f"bad ledger entry {raw!r}")
        return cls(float(rdp_coef), None if sampling_rate is None else float(sampling_rate), steps)


@dataclass
class Accountant:
    """A node's running privacy ledger: one ``step()`` per round it sent noised deltas.

    ``sampling_rate`` None → user-level (closed form); otherwise example-level
    through dp_accounting. ``prior`` holds what earlier runs of the node
    spent (restored from its state dir): ε never starts again from zero when a
    node restarts, also under another calibration (RDP composes: the rounds
    of every entry are charged together).
    """

    rdp_coef: float
    delta: float
    budget: float
    sampling_rate: float | None = None
    steps: int = 0
    prior: tuple[Spent, ...] = ()
    _cache: dict[int, float] = field(default_factory=dict, repr=False)

    def step(self, rounds: int = 1) -> None:
        if rounds < 0:
            raise ValueError("rounds must be non-negative")
        self.steps += rounds

    def ledger(self) -> list[Spent]:
        """Everything charged so far, the current calibration's rounds last."""
        return [*self.prior, Spent(self.rdp_coef, self.sampling_rate, self.steps)]

    def epsilon_at(self, steps: int) -> float:
        """ε after ``steps`` rounds under the current calibration, on top of ``prior``."""
        if steps not in self._cache:
            self._cache[steps] = ledger_epsilon([*self.prior, Spent(self.rdp_coef, self.sampling_rate, steps)],
                                                self.delta)
        return self._cache[steps]

    def epsilon_spent(self) -> float:
        return self.epsilon_at(self.steps)

    def budget_exhausted(self) -> bool:
        """True once one more round would exceed the budget."""
        return self.epsilon_at(self.steps + 1) > self.budget * (1.0 + _BUDGET_RTOL)


def ledger_epsilon(entries: Sequence[Spent], delta: float) -> float:
    """ε of every entry's rounds composed. User-level entries alone add up in
    closed form (their RDP coefficients sum); any example-level entry
    composes everything through dp_accounting's RDP accountant."""
    entries = [e for e in entries if e.steps > 0 and e.rdp_coef > 0]
    if not entries:
        return 0.0
    if all(e.sampling_rate is None for e in entries):
        return epsilon_from_rdp_coef(sum(e.rdp_coef * e.steps for e in entries), 1, delta)
    if len(entries) == 1:
        only = entries[0]
        return example_level_epsilon(only.rdp_coef, only.sampling_rate or 1.0, only.steps, delta)
    rdp = np.zeros_like(_RDP_ORDERS_ARRAY, dtype=np.float64)
    for e in entries:
        rdp += e.steps * _one_step_rdp(e.rdp_coef, e.sampling_rate)
    return _epsilon_of_rdp(rdp, delta)
