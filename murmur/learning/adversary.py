"""Adaptive Sybil attackers: what one attacker makes each of its identities send.

The SybilWall paper's attacker (Werthenbach & Pouwelse 2023) sends its one
poisoned model under every identity, which similarity catches at once. An
attacker that read how it is caught does better; each :class:`Tactic` is one
such attacker, run by the simulator (:mod:`murmur.learning.simulate`) and by
the testnet's Sybils on real daemons (:mod:`murmur.testnet.sybil`, the same
:class:`SybilShaper` and :class:`Sleeper`), with the strength it reached when
tuned against SybilWall (``AttackPlan.tuned``; bench/sybil.py measures every
tactic against every aggregator):

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

import torch

from murmur.learning.compression import Compressed, Compressor
from murmur.learning.rounds import RoundEngine
from murmur.learning.tactics import TUNED, AttackPlan, Tactic, with_strength
from murmur.learning.trainers.base import Trainer
from murmur.learning.trainers.checked import checked

__all__ = ["TUNED", "AttackPlan", "Sleeper", "SybilShaper", "Tactic", "compressed_wire", "with_strength"]

SHAPER_STREAM = 0x5B11  # seed stream of the Sybils' offset directions


Wire = Callable[[str, torch.Tensor], torch.Tensor]
"""``wire(sybil, q)``: what receivers decode of ``q`` sent under that identity."""


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
        wire: Wire | None = None,
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

    def step(
        self, attacker: torch.Tensor, honest: Sequence[torch.Tensor], initial: torch.Tensor, wire: Wire | None = None,
    ) -> dict[str, torch.Tensor]:
        """One round: each Sybil's increment toward its :meth:`targets` (see
        :meth:`increments`). The simulator and the testnet's Sybils both call this."""
        return self.increments(self.targets(attacker, honest), initial, wire)

    def _direction(self, sybil: str, like: torch.Tensor) -> torch.Tensor:
        d = self._directions.get(sybil)
        if d is None:
            gen = torch.Generator().manual_seed(self._seed ^ SHAPER_STREAM ^ zlib.crc32(sybil.encode()))
            d = torch.randn(like.numel(), generator=gen).to(like.device)
            d = self._directions[sybil] = d / d.norm()
        return d


class Sleeper:
    """When the sleeper's attack starts: at its first round from
    ``sleep_rounds`` on, the attacker's engine trains on poisoned data (a
    fresh ``poisoned()`` trainer) from the model it holds. Any other plan is
    awake from round 0 (its engine was built on poisoned data)."""

    def __init__(self, plan: AttackPlan, poisoned: Callable[[], Trainer]) -> None:
        self.plan = plan
        self._poisoned = poisoned
        self.awake_round: int | None = None if plan.sleeping(0) else 0  # the round its attack started

    def on_round(self, round_: int, engine: RoundEngine) -> bool:
        """Call before the attacker trains round ``round_`` (between rounds:
        no training step may be running). True when the attack starts now."""
        if self.awake_round is not None or self.plan.sleeping(round_):
            return False
        awake = checked(self._poisoned())
        awake.set_flat(engine.trainer.get_flat())
        engine.trainer = awake
        self.awake_round = round_
        return True


def compressed_wire(compressors: Mapping[str, Compressor], round_: int,
                    sent: dict[str, Compressed] | None = None) -> Wire:
    """The wire of round ``round_`` when each Sybil compresses with its own
    :class:`~murmur.learning.compression.Compressor` (its own mask where masks
    are per sender): a shaped increment reaches the replicas only as its
    receivers decode it. ``sent`` collects each identity's compressed message
    (its wire bytes, which a daemon sends); a Sybil without a compressor
    sends exact fp32."""

    def wire(sybil: str, q: torch.Tensor) -> torch.Tensor:
        compressor = compressors.get(sybil)
        if compressor is None:
            return q
        compressed = compressor.compress(q, round_)
        if sent is not None:
            sent[sybil] = compressed
        return compressed.dense

    return wire
