"""A Sybil attacker for evaluation: s identities behind one poisoned learner.

Each identity is a full :class:`~murmur.node.daemon.Node` with its own key,
listener and connections: it bootstraps, shuffles and links to honest peers
like anyone else, which is how a real attacker gets its attack edges. One
:class:`~murmur.node.learner.NodeLearner` trains on poisoned data (the
``learning.attack`` of the first identity's config) and averages whatever its
identities receive (``mean``), so its model stays close enough to the honest
ones to be worth attacking with.

What each identity sends is the attacker's :class:`~murmur.learning.tactics.AttackPlan`:

* ``identical`` (the SybilWall paper's attacker, Werthenbach & Pouwelse 2023):
  the learner's one model delta under every identity, its update scaled by
  ``boost`` (:class:`BoostedUpdate`);
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
  record rules are what stops them;
* ``unscored``: honest-looking messages (the mean honest increment) every
  other round, each after a gap, so that every honest replica of the
  identity asks to be re-synced and gets the poisoned model it serves
  (without the honest node's serving budgets: an attacker serves what it likes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import blake3
import torch

from murmur.learning.adversary import Sleeper, SybilShaper, compressed_wire
from murmur.learning.compression import Compressed, Compressor
from murmur.learning.rounds import Message, RoundEngine
from murmur.learning.tactics import AttackPlan, Tactic
from murmur.learning.trainers.registry import create_trainer
from murmur.node.config import Attack, NodeConfig
from murmur.node.daemon import Node
from murmur.node.fronts import FrontMessage
from murmur.node.learner import NodeLearner
from murmur.node.startgate import StartGate
from murmur.node.records import Statement, describe, observe, sign_statement
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import HistoryRecord

ATTACKER_AGGREGATOR = "mean"
HELD_KEPT = 2
"""What replicas hold of an identity after each of its last this many
messages is kept (one model copy per message and identity): a message that
came late everywhere leaves them at the one before."""
UNSCORED_EVERY = 2
"""An ``unscored`` identity sends one round message in this many rounds: a
gap before each, so that every replica of it is re-synced from the model it
serves. More often is not possible: with a message every round no replica
has a gap."""


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
        # What a re-sync installs of each identity (its public model and the
        # round it reflects), and what its replicas hold after each of its last
        # HELD_KEPT messages (by round, oldest first): a message that reached
        # no neighbour before its rounds ended leaves replicas one message behind.
        self._states: dict[PeerId, tuple[torch.Tensor, int]] = {}
        self._held: dict[PeerId, dict[int, torch.Tensor]] = {}
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # unscored: honest replicas at the last round
        self._mimic: torch.Tensor | None = None  # unscored: the latest mean honest increment

    def shape(self, round_: int, engine: RoundEngine, neighbours: Sequence[str]) -> Mapping[PeerId, FrontMessage]:
        self._honest = list(neighbours)
        self._round = round_
        if self.shaper.plan.tactic is Tactic.UNSCORED:
            return self._unscored(round_, engine)
        honest = [replica[0] for peer in neighbours if (replica := engine.replica(peer)) is not None]
        sent: dict[str, Compressed] = {}
        increments = self.shaper.step(engine.public, honest, self._initial,
                                      compressed_wire(self._compressors, round_, sent))
        out = {}
        for front, name in self.names.items():
            public = self.shaper.publics[name]
            self._states[front] = (public, round_)
            self._hold(front, public, round_)
            out[front] = FrontMessage(Message(increments[name], sent.get(name)), public)
        return out

    def _unscored(self, round_: int, engine: RoundEngine) -> Mapping[PeerId, FrontMessage]:
        """``unscored``: every other round each identity skips its message,
        so that its next one, the mean honest increment, finds a gap in every
        replica of it; the receiver then asks for the identity's public model,
        and gets its shaped (poisoned) model less that increment. The shaper
        tracks what the replicas then hold: the served model plus the increment."""
        self._note_honest_increments(engine)
        if round_ % UNSCORED_EVERY != UNSCORED_EVERY - 1:
            return {front: FrontMessage(None, self._states.get(front, (self._initial, -1))[0]) for front in self.names}
        honest = [replica[0] for peer in self._honest if (replica := engine.replica(peer)) is not None]
        sent: dict[str, Compressed] = {}
        wire = compressed_wire(self._compressors, round_, sent)
        self.shaper.step(engine.public, honest, self._initial, wire)
        mimic = self._mimic if self._mimic is not None else torch.zeros_like(self._initial)
        out = {}
        for front, name in self.names.items():
            clean = wire(name, mimic)  # what its neighbours decode of the honest-looking increment
            served = self.shaper.publics[name] - clean  # the public model before it, served on re-sync
            public = self.shaper.publics[name] = served.clone().add_(clean)  # as every replica adds it
            self._states[front] = (served, round_ - 1)
            self._hold(front, public, round_)
            out[front] = FrontMessage(Message(clean, sent.get(name)), public)
        return out

    def _note_honest_increments(self, engine: RoundEngine) -> None:
        """The mean of the honest increments seen since the last round (replica differences)."""
        steps = []
        for peer in self._honest:
            replica = engine.replica(peer)
            if replica is None:
                continue
            before = self._seen.get(peer)
            if before is not None and replica[1] == before[1] + 1:
                steps.append(replica[0] - before[0])
            self._seen[peer] = (replica[0].clone(), replica[1])
        if steps:
            self._mimic = torch.stack(steps).mean(dim=0)

    def public_state(self, front: PeerId) -> tuple[torch.Tensor, int] | None:
        state = self._states.get(front)
        return None if state is None else (state[0].clone(), state[1])

    def _hold(self, front: PeerId, public: torch.Tensor, round_: int) -> None:
        held = self._held.setdefault(front, {})
        held[round_] = public
        while len(held) > HELD_KEPT:
            del held[min(held)]

    def replica_state(self, front: PeerId, round_: int | None = None) -> tuple[torch.Tensor, int] | None:
        """What every replica of ``front`` holds after its message of ``round_``
        (its last one by default; one of its last HELD_KEPT), and that round."""
        held = self._held.get(front)
        if not held:
            return None
        round_ = max(held) if round_ is None else round_
        return None if round_ not in held else (held[round_].clone(), round_)

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

    def __init__(self, configs: Sequence[NodeConfig], plan: AttackPlan = AttackPlan(), lead_rounds: int = 0,
                 *, start_gate: StartGate | None = None) -> None:
        if not configs:
            raise ValueError("a Sybil attacker needs at least one identity")
        if not 0 <= lead_rounds < configs[0].learning.rounds:
            raise ValueError("lead_rounds must be in [0, learning.rounds)")
        self.plan = plan
        self.lead_rounds = lead_rounds
        self.start_gate = start_gate  # holds the learner's first round (None: not held)
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
                front = Node(cfg, start_gate=self.start_gate)
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
