"""A Sybil attacker for evaluation: s identities behind one poisoned learner.

Each identity is a full :class:`~murmur.node.daemon.Node` with its own key,
listener and connections: it bootstraps, shuffles and links to honest peers
like anyone else, which is how a real attacker gets its attack edges. One
:class:`~murmur.node.learner.NodeLearner` trains on poisoned data (the
``learning.attack`` of the first identity's config) and averages whatever its
identities receive (``mean``), so its model stays close enough to the honest
ones to be worth attacking with.

What each identity sends is the attacker's :class:`~murmur.learning.tactics.AttackPlan`:

* ``identical`` (SPECS §2): the learner's one model delta under every
  identity, its update scaled by ``boost`` (:class:`BoostedUpdate`);
* ``diversified``, ``forged_records`` and ``sleeper``: each identity its own
  round message, built by the simulator's
  :class:`~murmur.learning.adversary.SybilShaper` from the attacker's model
  and the honest public models it receives (:class:`ShapedFronts`); the
  sleeper trains on clean data for ``sleep_rounds`` rounds, then on its
  poisoned data; with ``forged_records`` each identity also tells each
  honest neighbour, every round, of made-up identities ("twins") whose
  public models are copies of honest peers' (their statements signed with
  the twins' own keys, the records as first-hand observations of the
  identity), through the node's real history-record path: the receivers'
  record rules are what stops them.

``unscored`` runs in the simulator only (:mod:`murmur.learning.simulate`,
bench/sybil.py): a daemon attacker that chooses it is refused with one line
(:data:`~murmur.learning.tactics.DAEMON_TACTICS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import blake3
import torch

from murmur.errors import ConfigError
from murmur.learning.adversary import Sleeper, SybilShaper, compressed_wire
from murmur.learning.compression import Compressed, Compressor
from murmur.learning.rounds import Message, RoundEngine
from murmur.learning.tactics import DAEMON_TACTICS, AttackPlan, Tactic
from murmur.learning.trainers.registry import create_trainer
from murmur.node.config import Attack, NodeConfig
from murmur.node.daemon import Node
from murmur.node.fronts import FrontMessage
from murmur.node.learner import NodeLearner
from murmur.node.records import Statement, describe, observe, sign_statement
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import HistoryRecord

ATTACKER_AGGREGATOR = "mean"


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


class ShapedFronts:
    """Each identity's own round message (:class:`~murmur.node.fronts.FrontShaping`).

    The shaper tracks each identity's public model exactly as its
    neighbours' replicas hold it (the same float32 additions of the same
    decoded increments); with a lossy wire format each identity compresses
    with a compressor of its own (its own mask where masks are per sender),
    and what it rounds away stays in its next round's ``target - public``."""

    def __init__(self, plan: AttackPlan, fronts: Sequence[PeerId], initial: torch.Tensor, seed: int,
                 compressor: Compressor | None = None) -> None:
        self.names = {front: str(front) for front in fronts}
        self.shaper = SybilShaper(plan, list(self.names.values()), seed)
        self._initial = initial.clone()
        self._compressors = {} if compressor is None else {
            name: Compressor(compressor.format, compressor.codec, front.raw, compressor.rounding)
            for front, name in self.names.items()}
        self._round = -1  # the round of the last messages shaped
        self._honest: list[str] = []  # the round's honest neighbours (their replicas are what it copies)
        self._twins: dict[tuple[PeerId, str], Identity] = {}

    def shape(self, round_: int, engine: RoundEngine, neighbours: Sequence[str]) -> Mapping[PeerId, FrontMessage]:
        self._honest = list(neighbours)
        honest = [replica[0] for peer in neighbours if (replica := engine.replica(peer)) is not None]
        sent: dict[str, Compressed] = {}
        increments = self.shaper.step(engine.public, honest, self._initial,
                                      compressed_wire(self._compressors, round_, sent))
        self._round = round_
        return {front: FrontMessage(Message(increments[name], sent.get(name)), self.shaper.publics[name])
                for front, name in self.names.items()}

    def public_state(self, front: PeerId) -> tuple[torch.Tensor, int] | None:
        public = self.shaper.publics.get(self.names.get(front, ""))
        return None if public is None else (public.clone(), self._round)

    def records(self, front: Identity, peer: PeerId, engine: RoundEngine) -> Sequence[HistoryRecord]:
        """``forged_records``: ``forged_per_round`` first-hand records of
        twins of the honest peers the attacker holds replicas of (but
        ``peer``), drawn in turn, as the simulator's attacker tells them."""
        plan = self.shaper.plan
        copies = [h for h in self._honest if h != str(peer)]
        if plan.tactic is not Tactic.FORGED_RECORDS or not copies:
            return ()
        out = []
        for k in range(plan.forged_per_round):
            original = copies[(self._round * plan.forged_per_round + k) % len(copies)]
            replica = engine.replica(original)
            if replica is None:
                continue
            model = replica[0].detach().to("cpu", torch.float32).numpy().copy()
            twin = self._twin(front.peer_id, original)
            digest, sketch = describe(model)
            statement = Statement(replica[1], sign_statement(twin, replica[1], digest, sketch), sketch)
            record = observe(front, twin.peer_id, replica[1], model, statement)
            if record is not None:
                out.append(record)
        return out

    def _twin(self, front: PeerId, original: str) -> Identity:
        """The made-up identity whose model copies ``original``'s (one per front and original)."""
        twin = self._twins.get((front, original))
        if twin is None:
            seed = blake3.blake3(b"murmur-sybil-twin" + front.raw + original.encode()).digest()
            twin = self._twins[(front, original)] = Identity.from_seed(seed)
        return twin


class SybilAttacker:
    """``async with SybilAttacker(configs, plan) as attacker:`` one identity per config."""

    def __init__(self, configs: Sequence[NodeConfig], plan: AttackPlan = AttackPlan(), lead_rounds: int = 0) -> None:
        if not configs:
            raise ValueError("a Sybil attacker needs at least one identity")
        if not 0 <= lead_rounds < configs[0].learning.rounds:
            raise ValueError("lead_rounds must be in [0, learning.rounds)")
        if plan.tactic not in DAEMON_TACTICS:
            raise ConfigError(f"attacker tactic {plan.tactic.value!r} runs in the simulator only (bench/sybil.py); "
                              f"a testnet attacker runs {', '.join(t.value for t in Tactic if t in DAEMON_TACTICS)}")
        self.plan = plan
        self.lead_rounds = lead_rounds
        self._poisoned = configs[0].learning  # what the attacker trains on once awake
        self.configs = [self._front_config(cfg, asleep=plan.sleeping(0)) for cfg in configs]
        self.fronts: list[Node] = []
        self.learner: NodeLearner | None = None
        self.sleeper = Sleeper(plan, lambda: create_trainer(self._poisoned.trainer, self._poisoned.trainer_context()))

    @staticmethod
    def _front_config(cfg: NodeConfig, asleep: bool) -> NodeConfig:
        # The identities must not build learners of their own: they share one.
        # A sleeper's learner starts on clean data (the same partition).
        learning = dataclasses.replace(cfg.learning, enabled=False, aggregator=ATTACKER_AGGREGATOR,
                                       aggregator_options={}, attack=Attack.NONE if asleep else cfg.learning.attack)
        return dataclasses.replace(cfg, learning=learning)

    async def __aenter__(self) -> SybilAttacker:
        try:
            for cfg in self.configs:
                front = Node(cfg)
                await front.start()
                self.fronts.append(front)
            learner = self.learner = NodeLearner(self.fronts[0], fronts=self.fronts)
            if self.plan.tactic is Tactic.IDENTICAL:
                if self.plan.boost != 1.0:
                    learner.engine.perturber = BoostedUpdate(self.plan.boost)
            else:
                learner.shaping = ShapedFronts(self.plan, [f.peer_id for f in self.fronts], learner.engine.public,
                                               self._poisoned.seed, learner.compressor)
            if self.sleeper.awake_round is None:
                learner.add_round_listener(self._wake)
            if self.lead_rounds:
                # A racing attacker: it claims (hello, round numbers of its
                # deltas) to be far ahead, so that nodes catching up adopt its model.
                learner.engine.adopt(learner.engine.public.clone(), self.lead_rounds)
            for front in self.fronts:
                front.attach_learner(learner)
            await learner.start()
        except BaseException:
            await self.close()
            raise
        return self

    def _wake(self, round_: int) -> None:
        """A round listener (on the event loop between rounds, when no
        training step runs): the sleeper's attack starts at ``sleep_rounds``."""
        learner = self.learner
        if learner is not None and self.sleeper.on_round(round_, learner.engine):
            learner.trainer = learner.engine.trainer  # evaluation and checkpoints follow the new trainer

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for front in reversed(self.fronts):
            await front.stop()
        self.fronts.clear()

    @property
    def peer_ids(self) -> list[str]:
        return [str(front.peer_id) for front in self.fronts]
