"""A Sybil attacker for evaluation: s identities, one poisoned model.

Each identity is a full :class:`~murmur.node.daemon.Node` with its own key,
listener and connections: it bootstraps, shuffles and links to honest peers
like anyone else, which is how a real attacker gets its attack edges. One
:class:`~murmur.node.learner.NodeLearner` trains on poisoned data (the
``learning.attack`` of the first identity's config) and sends the same model
delta under every identity (SPECS §2: all Sybils of one attacker send the same
model). It averages whatever its identities receive (``mean``), so its model
stays close enough to the honest ones to be worth attacking with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from murmur.node.config import NodeConfig
from murmur.node.daemon import Node
from murmur.node.learner import NodeLearner

ATTACKER_AGGREGATOR = "mean"
DEFAULT_BOOST = 1.0


class BoostedUpdate:
    """The attacker's "privacy stage": it scales its update instead of noising
    it (model-poisoning boosting, Bhagoji et al. 2019), so that its one model
    weighs more in every honest average it reaches."""

    def __init__(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError("boost factor must be positive")
        self.factor = factor

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        return delta * self.factor

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        """No clipping: a compressed round carries nothing of the sent coordinates over."""
        return delta


class SybilAttacker:
    """``async with SybilAttacker(configs) as attacker:`` one identity per config."""

    def __init__(self, configs: Sequence[NodeConfig], boost: float = DEFAULT_BOOST, lead_rounds: int = 0) -> None:
        if not configs:
            raise ValueError("a Sybil attacker needs at least one identity")
        if not 0 <= lead_rounds < configs[0].learning.rounds:
            raise ValueError("lead_rounds must be in [0, learning.rounds)")
        self.boost = boost
        self.lead_rounds = lead_rounds
        self.configs = [self._front_config(cfg) for cfg in configs]
        self.fronts: list[Node] = []
        self.learner: NodeLearner | None = None

    @staticmethod
    def _front_config(cfg: NodeConfig) -> NodeConfig:
        # The identities must not build learners of their own: they share one.
        learning = dataclasses.replace(cfg.learning, enabled=False, aggregator=ATTACKER_AGGREGATOR, aggregator_options={})
        return dataclasses.replace(cfg, learning=learning)

    async def __aenter__(self) -> SybilAttacker:
        try:
            for cfg in self.configs:
                front = Node(cfg)
                await front.start()
                self.fronts.append(front)
            self.learner = NodeLearner(self.fronts[0], fronts=self.fronts)
            if self.boost != 1.0:
                self.learner.engine.perturber = BoostedUpdate(self.boost)
            if self.lead_rounds:
                # A racing attacker: it claims (hello, round numbers of its
                # deltas) to be far ahead, so that nodes catching up adopt its model.
                self.learner.engine.adopt(self.learner.engine.public.clone(), self.lead_rounds)
            for front in self.fronts:
                front.attach_learner(self.learner)
            await self.learner.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for front in reversed(self.fronts):
            await front.stop()
        self.fronts.clear()

    @property
    def peer_ids(self) -> list[str]:
        return [str(front.peer_id) for front in self.fronts]
