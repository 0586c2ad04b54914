"""The privacy stage: a node's sans-IO perturber (the round engine's
``perturber``). It clips, adds the pairwise terms of the edges active this
round and local noise of the plan's std (σ_cdp, or σ_ldp when too few edges
are active), steps the accountant, and reports the pairwise noise that
cannot cancel after a round. :class:`murmur.node.privacy.NodePrivacy` puts
it on the network; the in-process simulator (bench/privacy.py) uses it
directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from murmur.learning.privacy.accountant import Accountant
from murmur.learning.privacy.calibration import PrivacyPlan
from murmur.learning.privacy.noise import DropoutReport, PrivacyNoise, clip_to_norm, fresh_generator
from murmur.protocol.identity import PeerId

KEPT_ROUNDS = 4
"""Rounds whose pairwise sums and commits are kept (inspection, late arrivals)."""


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
        self._local = fresh_generator(self.device)
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
