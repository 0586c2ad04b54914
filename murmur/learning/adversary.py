"""Adaptive Sybil attackers: what one attacker makes each of its identities send.

SPECS section 2's attacker sends its one poisoned model under every identity,
which similarity catches at once. An attacker that read how it is caught does
better; each :class:`Tactic` is one such attacker, run by the simulator
(:mod:`murmur.learning.simulate`) and by the testnet's Sybils
(:mod:`murmur.testnet.sybil`), with the strength it reached when tuned
against SybilWall (``AttackPlan.tuned``; bench/sybil.py measures every tactic
against every aggregator):

* ``identical``: every Sybil's public model is the attacker's (the baseline).
* ``diversified``: each Sybil's model is the attacker's plus a fixed offset of
  its own (``diversify`` times the honest spread, the median distance of the
  honest models it sees from their mean) and a fresh one each round
  (``fresh``), so that Sybils look no more alike than honest peers.
* ``unscored``: honest-looking increments (the mean of the honest ones it
  receives) while the poisoned model reaches the replicas by re-sync (a
  skipped message makes the receiver fetch the public model, and the
  attacker serves whatever it likes): poison outside the messages.
* ``forged_records``: diversified, and each Sybil tells its honest neighbours
  of made-up identities whose models copy those of their honest neighbours,
  to make honest peers look like clones.
* ``sleeper``: diversified, trains on clean data and behaves for
  ``sleep_rounds`` rounds, earning trust, then attacks.

``boost`` scales the attacker's own offset from the honest mean in every
tactic (model-poisoning boosting, Bhagoji et al. 2019).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from murmur.enums import ParsedEnum

SHAPER_STREAM = 0x5B11  # seed stream of the Sybils' offset directions


class Tactic(ParsedEnum):
    IDENTICAL = "identical"
    DIVERSIFIED = "diversified"
    UNSCORED = "unscored"
    FORGED_RECORDS = "forged_records"
    SLEEPER = "sleeper"

    @property
    def diversifies(self) -> bool:
        return self is not Tactic.IDENTICAL


@dataclass(frozen=True)
class AttackPlan:
    """One adaptive attacker's tactic and strength."""

    tactic: Tactic = Tactic.IDENTICAL
    boost: float = 1.0  # the attacker's offset from the honest mean, scaled
    diversify: float = 0.0  # each Sybil's fixed offset, in honest spreads
    fresh: float = 0.0  # each Sybil's fresh offset every round, in honest spreads
    sleep_rounds: int = 0  # sleeper: rounds of good behaviour before the attack
    forged_per_round: int = 1  # forged_records: made-up twins a Sybil tells each neighbour of, a round

    def __post_init__(self) -> None:
        if not self.boost > 0 or self.diversify < 0 or self.fresh < 0 or self.sleep_rounds < 0:
            raise ValueError("attack plan: boost must be > 0, diversify, fresh and sleep_rounds >= 0")

    @classmethod
    def tuned(cls, tactic: Tactic | str) -> AttackPlan:
        """The strongest setting found for ``tactic`` against SybilWall (see bench/sybil.py --tune)."""
        tactic = Tactic.parse(tactic)
        return TUNED[tactic]

    def sleeping(self, round_: int) -> bool:
        return self.tactic is Tactic.SLEEPER and round_ < self.sleep_rounds


TUNED: Mapping[Tactic, AttackPlan] = {
    Tactic.IDENTICAL: AttackPlan(),
    Tactic.DIVERSIFIED: AttackPlan(Tactic.DIVERSIFIED, boost=0.5, diversify=4.0, fresh=1.0),
    Tactic.UNSCORED: AttackPlan(Tactic.UNSCORED, boost=1.0, diversify=1.0),
    Tactic.FORGED_RECORDS: AttackPlan(Tactic.FORGED_RECORDS, boost=1.0, diversify=1.0),
    Tactic.SLEEPER: AttackPlan(Tactic.SLEEPER, boost=0.5, diversify=4.0, fresh=1.0, sleep_rounds=3),
}


class SybilShaper:
    """Each Sybil's public model for a round, from the attacker's model and
    the honest models it sees; and the increment that moves the Sybil's
    public model (as its neighbours' replicas hold it) there."""

    def __init__(self, plan: AttackPlan, sybils: Sequence[str], seed: int) -> None:
        self.plan = plan
        self.sybils = list(sybils)
        self._seed = seed
        self._directions: dict[str, torch.Tensor] = {}
        self._fresh = torch.Generator().manual_seed(seed ^ SHAPER_STREAM)
        self.publics: dict[str, torch.Tensor] = {}  # each Sybil's public model as its neighbours hold it

    def targets(self, attacker: torch.Tensor, honest: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Where each Sybil's public model should be this round."""
        if not honest:
            return {s: attacker.clone() for s in self.sybils}
        stack = torch.stack([h.to(attacker.device) for h in honest])
        mean = stack.mean(dim=0)
        spread = float(torch.linalg.vector_norm(stack - mean, dim=1).median()) if len(honest) > 1 else 0.0
        if spread == 0.0:
            spread = float(torch.linalg.vector_norm(attacker - mean))
        base = mean + self.plan.boost * (attacker - mean)
        out = {}
        for s in self.sybils:
            target = base.clone()
            if self.plan.tactic.diversifies and self.plan.diversify > 0:
                target.add_(self._direction(s, attacker), alpha=self.plan.diversify * spread)
            if self.plan.tactic.diversifies and self.plan.fresh > 0:
                noise = torch.randn(attacker.numel(), generator=self._fresh).to(attacker.device)
                target.add_(noise / noise.norm(), alpha=self.plan.fresh * spread)
            out[s] = target
        return out

    def increments(
        self, targets: Mapping[str, torch.Tensor], initial: torch.Tensor,
        wire: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The increment each Sybil sends, advancing its tracked public model by it.

        ``wire(sybil, q)``: what receivers decode of ``q`` sent under that
        identity (compressed gossip). What it drops is still in the next
        round's ``target - public``: the Sybil's own error feedback."""
        out = {}
        for s, target in targets.items():
            public = self.publics.setdefault(s, initial.clone())
            q = target - public
            if wire is not None:
                q = wire(s, q)
            public.add_(q)  # the same float32 addition as every replica of it
            out[s] = q
        return out

    def _direction(self, sybil: str, like: torch.Tensor) -> torch.Tensor:
        d = self._directions.get(sybil)
        if d is None:
            gen = torch.Generator().manual_seed(self._seed ^ SHAPER_STREAM ^ zlib.crc32(sybil.encode()))
            d = torch.randn(like.numel(), generator=gen).to(like.device)
            d = self._directions[sybil] = d / d.norm()
        return d


def with_strength(plan: AttackPlan, **changes: float | int) -> AttackPlan:
    """``plan`` with other strength settings (tuning sweeps)."""
    return replace(plan, **changes)  # type: ignore[arg-type]
