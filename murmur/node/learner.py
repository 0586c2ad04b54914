"""Learning inside the daemon: D-SGD rounds over the node's learning neighbours.

:class:`NodeLearner` drives the sans-IO :class:`~murmur.learning.rounds.RoundEngine`
with real connections:

* heavy work (local training, evaluation) runs in a worker thread; every
  touch of the engine's round state happens on the event loop, so deltas that
  arrive while we train are filed safely (buffered for the round they name);
  closing a round (aggregation, the new model: O(model size), over a second
  at 10 M parameters) runs in a worker thread too, and every engine call the
  loop makes meanwhile waits until it is done (:class:`EngineGuard`);
* each delta goes out as a signed, chunked stream (:mod:`murmur.protocol.delta`)
  to each neighbour; what arrives is verified and offered to the engine;
* a round closes once a quorum of this round's neighbours delivered, or at
  the deadline; absent peers never stall it, and a round without any
  neighbour lasts its deadline;
* a node behind its neighbours (late join, restart) asks up to five of
  them for their models and adopts from what arrives (catch-up: the rules
  over neighbours' round claims in :mod:`murmur.node.catchup`, the requests
  in :mod:`murmur.node.modelexchange`, which also serves our model and
  re-syncs a replica with a gap);
* every round message carries a signed statement of our public model (its
  digest and sketch), and SybilWall history records (a neighbour's digest
  and sketch, its statement and our signature as its observer; never a
  model) are gossiped one per neighbour per round
  (:mod:`murmur.node.recordgossip`, which also checks a neighbour's replica
  against its statement each round);
* model, round and aggregator histories (and with compression the
  residuals, with an outer optimizer its momentum) are checkpointed
  atomically every ``learning.checkpoint_every_rounds`` rounds or
  ``checkpoint_every_s`` seconds and at shutdown, and restored at start
  (:mod:`murmur.node.checkpoints`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from murmur.errors import (
    ConfigError,
    DecodeError,
    LimitExceeded,
    PeerFault,
    SendTimeout,
    TrainerError,
)
from murmur.learning.adoption import adoption
from murmur.learning.heap import release_free_heap
from murmur.learning.aggregators.base import get_aggregator
from murmur.learning.compression import Compressor
from murmur.learning.fingerprint import ModelFingerprint
from murmur.learning.outer import OuterConfig, OuterOptimizer
from murmur.learning.rounds import (
    GossipModel,
    LocalUpdate,
    Message,
    Offer,
    RoundConfig,
    RoundEngine,
    RoundReport,
    TrainFrom,
)
from murmur.learning.trainers.base import OPTIMIZER_SUPPORT, Metric, TorchTrainer, import_optimizer_support
from murmur.node.preflight import build_trainer
from murmur.node.trainercalls import TrainerCalls
from murmur.node.catchup import (
    BEHIND_LIVE_DEADLINES,
    CATCH_UP_GAP,
    MIN_CHOSEN_VOTERS,
    NeighbourRounds,
    ahead_of_network,
    catch_up_sources,
    catch_up_target,
    claims_ahead,
    lagging_neighbour,
    out_of_step,
    voters,
)
from murmur.node.checkpoints import LearnerCheckpoints
from murmur.node.startgate import StartGate
from murmur.node.recordgossip import RecordGossip
from murmur.node.modelexchange import ModelExchange
from murmur.node.config import Attack, LearningMode, OuterName, OuterSection, PrivacyLevel
from murmur.node.membership import LINK_FAN_IN
from murmur.node.metrics import Split
from murmur.node.outbox import Outbox
from murmur.node.progress import ROUNDS_TASK
from murmur.node.records import (
    SKETCH_META_KEY,
    STATEMENT_META_KEY,
    describe,
    read_statement,
    sign_statement,
    sketch_bytes,
)
from murmur.node.silence import SilenceTracker
from murmur.node.stalls import HELD_BACK_STREAK, HELD_BACK_WARN_EVERY, StallMonitor
from murmur.ratelog import Streak
from murmur.protocol.codecs import DeltaCodec
from murmur.node.decoding import OffLoopDecoder
from murmur.node.engineguard import EngineGuard
from murmur.protocol.delta import AssemblerLimits, CompletedDelta, DeltaAssembler, DeltaSender, PreparedDelta
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import RoundFormat
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import (
    NO_MORE_ROUNDS,
    DeltaChunk,
    DeltaEnd,
    DeltaStart,
    HistoryRecord,
    LearnerInfo,
    ModelRequest,
)
from murmur.protocol.transport import ConnectionClosed

if TYPE_CHECKING:
    from murmur.node.daemon import Node
    from murmur.node.fronts import FrontShaping
    from murmur.node.session import Handler, PeerSession

log = logging.getLogger(__name__)
T = TypeVar("T")

FAR_AHEAD_SLACK = 1
"""Rounds past what the engine buffers (``max_future_rounds``) that a
neighbour's round message may claim and still be decoded as urgent: our own
round may close while it waits. Further ahead, it is decoded after every
urgent job (murmur/node/decoding.py)."""
SPENT_MIXING_ROUNDS = 10
"""Rounds a node whose privacy budget ran out before its last training round
still mixes (then its ``mixing_rounds``, then it stops): enough for the
rounds a restart re-ran from its checkpoint (``checkpoint_every_rounds``, 10
by default), which spend the budget a little early. Not the long stretch
left by a ``privacy.rounds`` far below ``learning.rounds`` (a testnet bounded
by seconds): there nothing honest trains back what Sybils push, and a
testnet's attack rate went from 0.02-0.18 to 0.85-0.90 over 145 such rounds."""
GOSSIP_INBOX_MAX = 16  # models waiting to be merged; more in one period are dropped
ANNOUNCE_TIMEOUT_S = 2.0
OPTIMIZER_IMPORT_TASK = "optimizer-import"  # see _import_optimizer_support
"""How long telling every peer our progress (after a catch-up, at the end)
may take, all peers at once. It went to one session after another without a
deadline: one peer that never answered the stream's negotiation held the
announcement, and after a catch-up the round loop with it, for the
transport's negotiate_timeout_s (9.5 s measured), once per such peer."""


class PhaseTimer:
    """Wall time per phase of one round, for the metrics row (bench/scale.py
    derives communication + aggregation as a share of round time from it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None  # the phase running now (the stall reason names it)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.current = name
        try:
            yield
        finally:
            self.current = None
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 5) for k, v in self.seconds.items()}


class NodeLearner:
    """Learning for one node, or for one attacker behind several identities.

    ``node`` owns the state dir, metrics and tasks. ``fronts`` are the nodes
    (identities) whose connections carry this learner's deltas: just ``node``
    for an honest peer; every Sybil identity for an attacker, which then sends
    its one model under each identity to each identity's neighbours, or, with
    a :attr:`shaping` (:mod:`murmur.node.fronts`), each identity's own.
    """

    def __init__(self, node: Node, fronts: Sequence[Node] | None = None) -> None:
        self.node = node
        self.fronts = list(fronts) if fronts else [node]
        self._front_ids = {front.peer_id for front in self.fronts}
        cfg = node.config.learning
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.trainer = build_trainer(cfg)  # the same build `murmur config check` runs
        self.aggregator = get_aggregator(cfg.aggregator, self_id=str(node.peer_id), **dict(cfg.aggregator_options))
        self.codec: DeltaCodec = cfg.codec.wire()
        self.privacy: Any = None  # murmur.node.privacy.NodePrivacy when privacy is on
        if node.config.privacy.enabled and len(self.fronts) == 1:  # an attacker does not privatise
            from murmur.node.privacy import NodePrivacy

            self.privacy = NodePrivacy.for_node(node, self.trainer)
        # Example-level DP-SGD is accounted for gradients at the public model only (see TrainFrom).
        example_level = self.privacy is not None and node.config.privacy.level is PrivacyLevel.EXAMPLE
        comp = node.config.compression
        self.round_format = RoundFormat(comp.sparsifier.wire(), comp.ratio if comp.compresses else 1.0,
                                        comp.mask.wire(), seed=cfg.seed)
        # Any lossy wire format goes through the compressor: it encodes each
        # message once, the sender advances its public model by exactly what
        # that payload decodes to, and keeps what it rounded away (error feedback).
        self.compressor: Compressor | None = None
        if comp.compresses or self.codec is not DeltaCodec.FP32:
            self.compressor = Compressor(self.round_format, self.codec, node.peer_id.raw, comp.rounding.wire())
        self.engine = RoundEngine(
            self.trainer,
            self.aggregator,
            RoundConfig(local_steps=cfg.local_steps or None, quorum=cfg.quorum,
                        train_from=TrainFrom.PUBLIC if example_level else TrainFrom.PRIVATE,
                        consensus_step=comp.consensus_step),
            perturber=self.privacy,
            compressor=self.compressor,
            outer=outer_optimizer(node.config.outer),
        )
        # What every transfer of ours looks like, for this model: what we send
        # is built from it and what we accept is checked and sized by it.
        self.layout = TransferLayout.for_model(self.engine.num_params, Message.ROWS, self.round_format)
        limits = AssemblerLimits.for_layout(self.layout, peers=LINK_FAN_IN * node.config.network.neighbours + 1)
        self.stalls = StallMonitor()
        self._starting = False  # in the wait for the first neighbours (learning.start_wait_s)
        self.start_gate: StartGate | None = node.start_gate  # holds the first round (a testnet's)
        self.silence = SilenceTracker()
        self.outbox = Outbox()
        wire_format = self.compressor.describe() if self.compressor is not None else cfg.codec.value
        self.fingerprint = ModelFingerprint(cfg.trainer, self.trainer.param_shapes(), wire_format)
        self._finished = False  # our rounds are over: we send no more round messages
        # An attacker whose identities each send a message of their own (set before start()).
        self.shaping: FrontShaping | None = None
        self._open: _OpenRound | None = None  # the open round's message, for neighbours linked mid-round
        self._closing: int | None = None  # the round closing in a worker thread (see .round)
        self._sends: list[tuple[PeerId, asyncio.Task[None] | None]] = []  # its transfers, for the round loop to wait on
        self._timer: PhaseTimer | None = None  # the open round's, for the stall reason
        # neighbour key -> (front, peer) for every front linked to it: an
        # attacker may reach one honest peer through several identities.
        self._routes: dict[str, list[tuple[Node, PeerId]]] = {}
        self._stopped = False
        self._training: asyncio.Future[Any] | None = None  # the worker thread's training, see _train_in_thread
        self.trainer_failure: TrainerError | None = None  # what ended the rounds, see _call_trainer
        self._trainer_calls = TrainerCalls(cfg.trainer, type(getattr(self.trainer, "inner", self.trainer)))
        self._arrived = asyncio.Event()
        self._decoder = OffLoopDecoder()  # received payloads, decoded in a worker thread
        # Every engine (and aggregator) call made from the loop goes through it:
        # while the round's close runs in a worker thread, they wait for it.
        self._guard = EngineGuard()
        self.neighbour_rounds = NeighbourRounds()  # their claims, and the weight we last gave each
        self._pacing = False  # the last round waited for neighbours behind (logged once a run)
        self.rounds_paced = 0  # rounds that waited for neighbours behind (ahead_of_network, lagging_neighbour)
        # An attacker's identities asking it to re-sync them (the unscored tactic) are served beyond the budgets.
        self.models = ModelExchange(self.engine, self._guard, self.layout, self.outbox, self._served_state,
                                    budgeted=lambda: self.shaping is None, on_replica=self._arrived.set)
        self._assemblers = {
            front.peer_id: DeltaAssembler(front.peer_id, limits, solicited=self.models.solicited, layout=self.layout)
            for front in self.fronts
        }
        self.records = RecordGossip(self.engine, self.aggregator, self._guard, self._decoder,
                                    frozenset(self._front_ids), node.peer_log, self.models.resync)
        self.last_report: RoundReport | None = None
        self.last_eval: tuple[float, float] | None = None  # (loss, accuracy)
        self.attack_rate: float | None = None
        self.catch_ups = 0
        self._held_back = Streak(HELD_BACK_STREAK, HELD_BACK_WARN_EVERY)  # neighbours ahead we may not adopt from
        self._told_edgeless: frozenset[PeerId] = frozenset()  # chosen neighbours without a noise edge, last told
        # Called with the new round each time ours moves (a round closed, a
        # catch-up): the testnet worker pushes node rounds to its controller
        # from here, so churn events fire at the round they name.
        self._round_listeners: list[Callable[[int], None]] = []
        self.gossip: GossipModel | None = None
        self._gossip_inbox: list[tuple[str, torch.Tensor, int]] = []
        self._cycle = 0
        self.gossip_merges = 0
        if cfg.mode is LearningMode.GOSSIP:
            if node.config.privacy.enabled:
                raise ConfigError(
                    'privacy needs learning.mode = "dsgd": gossip learning sends whole models, '
                    "which pairwise noise on deltas does not protect"
                )
            self.gossip = GossipModel(self.trainer)
        self.checkpoints = LearnerCheckpoints(node.state, cfg, self.trainer, self.engine, self.aggregator)
        self.checkpoints.restore()

    # -- wiring --------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The round this node is in. While a round closes in its worker
        thread (the engine's own counter moves there, before the close is
        done), still the closing round: it moves when the close is done on
        the loop (:meth:`_round_closed`), with the round listeners and the
        privacy stage's report of the round, never before them."""
        if self.gossip is not None:
            return self._cycle
        return self._closing if self._closing is not None else self.engine.round

    def add_round_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(round)`` on the event loop each time :attr:`round` moves."""
        if listener not in self._round_listeners:
            self._round_listeners.append(listener)

    def _round_moved(self) -> None:
        for listener in self._round_listeners:
            listener(self.round)

    def handlers_for(self, front: Node) -> Mapping[type, Handler]:
        """The message handlers for one front, bound to it."""

        async def on_delta(session: PeerSession, msg: DeltaStart | DeltaChunk | DeltaEnd) -> None:
            try:
                await self._on_delta_message(front, session, msg)
            except PeerFault as fault:  # penalised by the session; remembered for the stall reason
                self.stalls.on_refused(session.peer.short(), fault)
                raise

        async def on_model_request(session: PeerSession, msg: ModelRequest) -> None:
            await self.models.on_request(front, session, msg)

        async def on_record(session: PeerSession, msg: HistoryRecord) -> None:
            await self.records.receive(session, msg)

        async def on_info(session: PeerSession, msg: LearnerInfo) -> None:
            self._on_learner_info(front, session, msg)

        handlers: dict[type, Handler] = {DeltaStart: on_delta, DeltaChunk: on_delta, DeltaEnd: on_delta,
                                         ModelRequest: on_model_request, HistoryRecord: on_record,
                                         LearnerInfo: on_info}
        if self.privacy is not None and front is self.node:
            handlers.update(self.privacy.handlers())
        return handlers

    async def start(self) -> None:
        # a restored node with no rounds left is over at once: its last row is on disk
        self._finished = not (self.cfg.trains_in(self._cycle) if self.gossip is not None
                              else self.cfg.runs_round(self.engine.round))
        # (behind its CheckedTrainer: a TorchTrainer builds a torch.optim optimizer at its first step)
        if isinstance(getattr(self.trainer, "inner", self.trainer), TorchTrainer) and OPTIMIZER_SUPPORT not in sys.modules:
            self.node.tasks.spawn(OPTIMIZER_IMPORT_TASK, self._import_optimizer_support)
        self.node.tasks.spawn(ROUNDS_TASK, self._rounds)
        self.node.tasks.periodic("expire-transfers", 10.0, self._expire)
        self.node.tasks.periodic("stall-watch", max(1.0, self.cfg.round_deadline_s / 2), self._watch_stalls)

    async def _import_optimizer_support(self) -> None:
        """Import what the trainer's optimizer needs on its first step (1.9-2.3 s
        of CPU, see :func:`import_optimizer_support`) in a thread, while the
        node links to its first neighbours and waits for them
        (``learning.start_wait_s``), rather than in round 0's first step,
        which would otherwise wait for it. Started once the node's own
        imports are done (a node is built before it starts). A failure is the
        first step's to report, where it names the trainer."""
        try:
            await asyncio.to_thread(import_optimizer_support)
        except Exception:  # the first train step imports it again and reports it
            log.debug("importing the optimizer's support ahead failed", exc_info=True)

    async def stop(self) -> None:
        if self._stopped:  # every front of an attacker calls this
            return
        self._stopped = True
        self.node.tasks.cancel(ROUNDS_TASK)
        interrupt = getattr(self.trainer, "interrupt", None)  # TorchTrainer's; a plug-in may have none
        if callable(interrupt):
            interrupt()
        # A round being opened or closed in a worker thread is finished (a
        # thread cannot be stopped), and what waited for it run: the
        # checkpoint below must not hold half a round, and whatever that
        # started (the round's transfers) is cancelled with the others.
        await self._guard.settled()
        await self.outbox.close()
        await self._training_ended()
        try:
            await self.checkpoints.save()
        except TrainerError as exc:
            # The trainer broke its contract (what usually stopped the node): its
            # model is not written over the last good checkpoint, and the error,
            # already reported once with its traceback, is not told again as one.
            log.warning("no checkpoint at stop: the trainer broke its contract; the last checkpoint is kept",
                        extra={"event": "checkpoint_skipped", "error": str(exc)})

    async def _call_trainer(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried once more if the trainer's code raised
        (:class:`~murmur.node.trainercalls.TrainerCalls`). A failure that
        ends the rounds (it raised again, or the trainer broke its contract)
        is kept in :attr:`trainer_failure`, from which the daemon takes its
        exit code."""
        try:
            return await self._trainer_calls.call(method, self.round, call)  # gossip: its cycle
        except TrainerError as exc:
            self.trainer_failure = exc
            raise

    async def _train_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (training: it changes the model) in a worker thread
        that :meth:`stop` can wait for. Cancelling the round does not stop a
        thread: the final checkpoint was taken from a model the thread was
        still changing (or rewinding), and the process could not exit until
        the round's local steps were all done."""
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._training = work
        return await asyncio.shield(work)

    async def _training_ended(self) -> None:
        """Wait for the training thread of a round that stop() cancelled
        (interrupted, it ends at its next step; the round is abandoned)."""
        work = self._training
        if work is None or work.done():
            return
        try:
            await work
        except Exception:
            log.debug("the cancelled round's training failed", exc_info=True)

    async def _expire(self) -> None:
        for assembler in self._assemblers.values():
            assembler.expire()

    async def _watch_stalls(self) -> None:
        if self.gossip is None and not self._finished and not self._starting:  # over or not begun: no stall
            phase = self._timer.current if self._timer is not None else None
            self.stalls.watch(self.cfg.round_deadline_s, len(self._sessions()), phase)
            self._export_stalls()

    def _export_stalls(self) -> None:
        self.node.metrics.rounds_stalled.set(self.stalls.rounds_stalled)
        self.node.metrics.learning_stalled.set(int(self.stalls.stalled))

    # -- learner info: fingerprint and progress --------------------------------------

    def _info(self) -> LearnerInfo:
        return LearnerInfo(
            fingerprint=self.fingerprint.digest,
            model=self.fingerprint.describe(),
            next_round=NO_MORE_ROUNDS if self._finished else self.engine.round,
            initial=self.engine.initial_digest,
        )

    async def greet(self, front: Node, session: PeerSession) -> None:
        """Our model and progress, first thing on every connection."""
        with contextlib.suppress(ConnectionClosed):
            await session.send(self._info())

    def _on_learner_info(self, front: Node, session: PeerSession, msg: LearnerInfo) -> None:
        if msg.fingerprint != self.fingerprint.digest:
            session.learner_info = None
            front.refuse_learning(session.peer, f"theirs: {msg.model}; ours: {self.fingerprint.describe()}")
            return
        told = session.learner_info
        session.learner_info = msg
        if msg.initial != self.engine.initial_digest and (told is None or told.initial != msg.initial):
            # Before the link is accepted: no round message of it is filed yet.
            self._guard.call(partial(self.engine.started_elsewhere, str(session.peer)))
            self.node.peer_log.warning(
                log, session.peer, "neighbour started from another initial model (another learning.seed, or "
                "another torch): its model is fetched, not replayed from ours",
                extra={"event": "initial_model_differs", "peer": str(session.peer)})
        front.accept_learning(session.peer)
        self._guard.call(partial(self.engine.note_next_round, str(session.peer), msg.next_round))
        self._arrived.set()  # may complete the open round's quorum

    async def on_linked(self, front: Node, session: PeerSession) -> None:
        """``session`` became a learning edge. Tell it from which round on we
        send it our messages and, if our round is open, add it to the round
        and send it the round's message now: the link counts from this
        round at both ends, and neither end waits for a message the other
        will never send."""
        if session.learner_info is None or self.gossip is not None:
            return
        with contextlib.suppress(ConnectionClosed):
            await session.send(self._info())
        if session.peer in self._front_ids or self.silence.muted(str(session.peer)):
            return
        # One call, so that a link made while the round opens or closes in its thread joins the round
        # (and gets its message) as if it were made right after: never added without the message.
        self._guard.call(partial(self._join_round, front, session))
        self._arrived.set()
        if self.privacy is not None:  # after the round's message: that must not wait for a key share
            await self.privacy.on_linked(session.peer)

    def _join_round(self, front: Node, session: PeerSession) -> None:
        """Add a new neighbour to our open round and send it the round's message."""
        self.engine.add_neighbour(str(session.peer), max(1, session.peer_degree))
        opened = self._open
        if (opened is not None and opened.round == self.engine.round and front.peer_id not in opened.silent
                and (front.peer_id, session.peer) not in opened.sent):
            opened.sent.add((front.peer_id, session.peer))
            self.outbox.start((front.peer_id, session.peer, TransferKind.ROUND),
                              self._send_delta(front, session.peer, opened.round, opened.delta_for(front),
                                               opened.metas[front.peer_id]))

    def on_unlinked(self, front: Node, session: PeerSession) -> None:
        """``session`` is no longer a learning edge: the open round stops waiting for it."""
        if not any(s.peer == session.peer for f in self.fronts for s in f.membership.learning_neighbours()):
            self._guard.call(partial(self.engine.drop_neighbour, str(session.peer)))
            self._arrived.set()

    def extra_choices(self) -> int:
        """How many more neighbours membership should choose: those of our
        choices that carry no noise edge (privacy on, and they never answered
        our key share). The privacy plan needs ``min_edges`` active edges a
        round, and with a Sybil that runs no privacy among a node's k choices
        that node sent with the fallback's noise every round (two of eight
        nodes in the default testnet, 16% of its rounds); the neighbour is
        kept, it only stops counting towards k."""
        if self.privacy is None:
            return 0
        choices = self._choices()
        chosen = [s.peer for s in self.node.membership.learning_neighbours() if s.peer in choices]
        edgeless = frozenset(self.privacy.edgeless(chosen))
        if edgeless - self._told_edgeless:
            log.info(
                f"{len(edgeless)} of the {len(chosen)} neighbours this node chose run no privacy protocol (no key "
                "share): no pairwise noise on their edges, so they do not count towards network.neighbours and it "
                f"chooses {len(edgeless)} more",
                extra={"event": "edgeless_neighbours", "peers": sorted(str(p) for p in edgeless)},
            )
        self._told_edgeless = edgeless
        return len(edgeless)

    def _choices(self) -> frozenset[PeerId]:
        """The peer sampler's current choices of neighbours (``network.neighbours``
        of them, and more while some cannot be used): a peer that linked to
        us first shows as accepted even once we chose it too
        (``PeerSession.chosen``), so the sampler, not the session, says."""
        return frozenset(d.peer for d in self.node.sampler.neighbour_descriptors())

    async def _announce_finished(self) -> None:
        """Our rounds are over: neighbours still in theirs must not wait for us."""
        self._finished = True
        await self._announce_progress()

    async def _announce_progress(self) -> None:
        """Tell every peer from which round on we send (after a jump: a
        catch-up skipped rounds neighbours may be waiting in, or the end)."""
        info = self._info()
        deadline = time.monotonic() + ANNOUNCE_TIMEOUT_S
        await asyncio.gather(*(self._tell(session, info, deadline)
                               for front in self.fronts for session in front.sessions()))

    @staticmethod
    async def _tell(session: PeerSession, info: LearnerInfo, deadline: float) -> None:
        """One peer's copy of the announcement; a peer gone, or without room
        by ``deadline``, misses it (and is the transport's to cut)."""
        with contextlib.suppress(ConnectionClosed, SendTimeout):
            await session.send(info, deadline)

    def on_session_closed(self, front: Node, session: PeerSession) -> None:
        self._assemblers[front.peer_id].abandon_peer(session.peer)
        self.models.session_closed(session.peer)
        self.records.session_closed(session.peer)
        if not any(f.session(session.peer) for f in self.fronts):
            self._guard.call(partial(self.engine.forget, str(session.peer)))  # a returning peer re-syncs its replica
            self.records.forget(session.peer)
            self.silence.forget(str(session.peer))
            if self.privacy is not None:
                self.privacy.forget(session.peer)
            self._arrived.set()  # the open round no longer waits for it

    # -- the round loop ------------------------------------------------------------

    def _neighbours(self) -> dict[str, int]:
        out: dict[str, int] = {}
        routes: dict[str, list[tuple[Node, PeerId]]] = {}
        for front in self.fronts:
            for session in front.membership.learning_neighbours():
                if session.peer in self._front_ids:
                    continue  # an attacker's identities do not learn from each other
                key = str(session.peer)
                if self.silence.muted(key):
                    continue  # silent: not waited for, not sent to, until it sends again
                routes.setdefault(key, []).append((front, session.peer))
                out[key] = max(1, session.peer_degree)
        self._routes = routes
        return out

    def _sessions(self, muted: bool = False) -> list[PeerSession]:
        """Learning neighbours (not our own fronts), muted ones only if asked."""
        return [s for front in self.fronts for s in front.membership.learning_neighbours()
                if s.peer not in self._front_ids and (muted or not self.silence.muted(str(s.peer)))]

    def epsilon_spent(self) -> float | None:
        """ε spent by this node over all its runs (its privacy ledger); None without privacy."""
        return self.privacy.epsilon_spent() if self.privacy is not None else None

    def _budget_spent(self) -> bool:
        return self.privacy is not None and self.privacy.budget_exhausted()

    async def _rounds(self) -> None:
        """The round loop (gossip learning's cycles), once started.

        Let the first links form before the first round, so that nodes
        started together begin together (a link made later still joins the
        open round, see on_linked, but a node that trains a round alone
        meanwhile can get ahead of the others). A node restored mid-run does
        not wait: its network is running, and it catches up with it (2 s of
        waiting left a restarted node of a fast testnet to find the run
        over). Behind a start gate (:mod:`murmur.node.startgate`) the node
        arrives once linked (or done waiting), and begins when every learner
        the gate holds has: once, not a second start wait after it."""
        gate = self.start_gate
        first = self.gossip is None and self.engine.round == 0
        self._starting = True  # waiting for neighbours, or held at the gate, is no stall
        if first:
            wanted = self._wanted_neighbours()
            await self._wait_for(lambda: len(self._neighbours()) >= wanted, self.cfg.start_wait_s)
        if gate is not None:
            await gate.passed()
        self._starting = False
        if self.gossip is not None:
            await self._run_gossip()
            return
        if first:
            self.stalls.rounds_begin()
        await self._run()
        await self._announce_finished()

    async def _run(self) -> None:
        deadline_s = self.cfg.round_deadline_s
        mixing_until: int | None = None  # once the budget ran out early: the round the node stops at
        while self.cfg.runs_round(self.engine.round):  # learning.rounds = 0: until stopped
            if mixing_until is not None and self.engine.round >= mixing_until:
                log.warning("privacy budget spent: mixed as long as a spent node may, stopping",
                            extra={"event": "budget_mixing_over", "round": self.engine.round})
                return
            if self.cfg.trains_in(self.engine.round) and self._budget_spent():
                if self.cfg.until_stopped:
                    log.warning(
                        "privacy budget spent; no longer sending deltas",
                        extra={"event": "budget_exhausted", "epsilon": self.privacy.epsilon_spent()},  # type: ignore[union-attr]
                    )
                    return
                if mixing_until is None:
                    mixing_until = self.engine.round + SPENT_MIXING_ROUNDS + self.cfg.mixing_rounds
                    log.warning(
                        f"privacy budget spent before round {self.engine.round} of {self.cfg.rounds}: the node "
                        f"mixes until round {min(mixing_until, self.cfg.rounds + self.cfg.mixing_rounds)}, then "
                        "stops (privacy.rounds is below learning.rounds, or rounds re-run after a restart were "
                        "spent twice)",
                        extra={"event": "budget_exhausted", "epsilon": self.privacy.epsilon_spent(),  # type: ignore[union-attr]
                               "round": self.engine.round},
                    )
            if await self._maybe_catch_up() and not self.cfg.runs_round(self.engine.round):
                return  # the adopted model already finished: nothing left to run
            # A node whose budget ran out before its last training round (it
            # re-ran rounds from its checkpoint after a restart, and the noise
            # is calibrated for exactly learning.rounds) mixes through to the
            # end like the mixing rounds after training: no update, no noise,
            # no epsilon, and its neighbours keep it. Ending the loop instead
            # dropped it from the last rounds' averages and mixing rounds.
            # Only for SPENT_MIXING_ROUNDS, though (see there).
            training = self.cfg.trains_in(self.engine.round) and not self._budget_spent()
            timer = self._timer = PhaseTimer()
            started = time.monotonic()
            with timer.phase("train_s"):
                update: LocalUpdate = (
                    await self._call_trainer("train", lambda: self._train_in_thread(self.engine.local_update))
                    if training else LocalUpdate.mixing_only(self.engine.num_params, self.engine.public.device)
                )
            neighbours = self._neighbours()
            round_ = self.engine.round
            if self.compressor is not None:  # its random-k mask, drawn off the loop (open_round takes it)
                await self._decoder.run(partial(self.compressor.prepare_mask, round_, self.engine.num_params))
            committed = None
            with timer.phase("commit_s"):
                if training and self.privacy is not None:  # a zero update adds no noise: nothing to commit
                    committed = await self.privacy.commit(round_, neighbours,
                                                          out_of_step(self._claimed_rounds(), round_))
            with timer.phase("send_s"):
                sent = self.engine.open_round(neighbours, update, committed)
                # Our statement of the public model the message makes (its digest and sketch: ~0.25 s
                # at 10 M parameters) is made in a thread; the round is published (its message kept for
                # neighbours that link meanwhile) before any engine call that waited for it.
                await self._guard.off_loop(self._describe_public, partial(self._publish_round, round_, sent, neighbours))
                await self._send_round(started + deadline_s)
            with timer.phase("wait_s"):
                remaining = deadline_s - (time.monotonic() - started)
                # Alone, a round takes its whole deadline: the network's pace is
                # set by the neighbours, and a node without any (isolated,
                # or an attacker up before everyone) must not race to the last
                # round, where nodes catching up would then find it.
                # A catch-up that became due (a restarted node learning how far
                # ahead its neighbours are) ends the wait: no message of theirs
                # can still come for this round, the next one adopts a model.
                # Most neighbours behind us: the deadline, for them to come level (ahead_of_network).
                await self._wait_for(lambda: (self.engine.has_neighbours() and self.engine.quorum_reached()
                                              and not self._ahead_of_network())
                                     or self._catch_up_target() is not None, max(0.0, remaining))
                # Some neighbour behind, still sending: half our pace (lagging_neighbour).
                lagging = [] if self._ahead_of_network() else self._lagging()
                half = bool(lagging)
                if half:
                    elapsed = time.monotonic() - started
                    await self._wait_for(lambda: self._catch_up_target() is not None,
                                         max(0.0, min(elapsed, deadline_s - elapsed)))
                self._note_paced(round_, lagging)
            missing = self.engine.missing()
            # Closed from here on: a neighbour linked meanwhile gets the next round's message.
            self._open = None
            with timer.phase("aggregate_s"):
                self._closing = round_  # what .round says until _round_closed
                try:
                    report = await self._guard.off_loop(
                        self.engine.finish_round, lambda _: self._round_closed(round_, training, committed, missing))
                except Exception:  # the close failed: no then-step will clear it
                    self._closing = None
                    raise
            await self._after_round(report, timer)

    def _round_closed(self, round_: int, training: bool, committed: Sequence[str] | None, missing: Sequence[str]) -> None:
        """On the loop, right after the engine closed ``round_`` and before
        any engine call that waited for it: even when the round loop was
        cancelled (stopping) while the close ran in its thread."""
        self._closing = None
        self._round_moved()
        if training and self.privacy is not None:
            self.privacy.after_round(round_, committed or [], missing)

    async def _run_gossip(self) -> None:
        """Asynchronous gossip learning (Ormándi, Hegedűs, Jelasity 2013): every
        period, merge what arrived (age-weighted), train, and push the model to
        one peer drawn uniformly from the Cyclon view. No rounds to agree on, no quorum."""
        assert self.gossip is not None
        rng = random.Random()
        while self.cfg.trains_in(self._cycle):
            started = time.monotonic()
            timer = PhaseTimer()
            inbox, self._gossip_inbox = self._gossip_inbox, []
            weights: dict[str, float] = {}
            with timer.phase("aggregate_s"):
                for peer, model, age in inbox:
                    total = self.gossip.age + age
                    weights[peer] = age / total if total else 0.5  # the share merge() gives it
                    self.gossip.merge(peer, model, age)
                    self.gossip_merges += 1
            with timer.phase("train_s"):
                loss = await self._call_trainer(
                    "train", lambda: self._train_in_thread(self.gossip.step, self.cfg.local_steps or None))
            with timer.phase("send_s"):
                for peer in self.node.sampler.sample(1, rng):
                    await self._gossip_to(peer)
            report = RoundReport(
                round=self._cycle, train_loss=loss, received=len(inbox), neighbours=len(inbox),
                late_dropped=0, weights=weights, delta_norm=0.0, consensus_norm=0.0,
            )
            self._cycle += 1
            self._round_moved()
            await self._after_round(report, timer)
            await asyncio.sleep(max(0.0, self.cfg.round_deadline_s - (time.monotonic() - started)))
        self._finished = True

    async def _gossip_to(self, peer: PeerId) -> None:
        assert self.gossip is not None
        desc = self.node.sampler.descriptor(peer)
        try:
            session = self.node.session(peer) or await self.node.connect(desc.addrs if desc else (), peer)
        except (OSError, PeerFault, ConnectionClosed) as exc:
            self.node.membership.report_failure(peer, reason=f"gossip dial: {exc}")
            return
        model = self.trainer.get_flat().detach().to("cpu").numpy()
        meta = self.layout.meta(TransferKind.GOSSIP, age=self.gossip.age)
        try:
            for data in DeltaSender(self.node.identity, peer, self._cycle, model, self.codec, meta=meta):
                await session.send_encoded(data, "GossipModel")
        except ConnectionClosed:
            pass

    def _on_gossip_model(self, sender: PeerId, done: CompletedDelta) -> None:
        if self.gossip is None:
            raise LimitExceeded("gossip-learning model sent to a D-SGD node")
        age = done.meta.get("age")
        if not isinstance(age, int) or age < 0 or done.array.shape != (self.engine.num_params,):
            raise DecodeError("gossip model without a valid age or of the wrong shape")
        array = done.array if done.array.flags.writeable else done.array.copy()
        if not np.isfinite(array).all():
            raise DecodeError("gossip model with non-finite values")
        if len(self._gossip_inbox) < GOSSIP_INBOX_MAX:  # merged on the loop between training steps
            self._gossip_inbox.append((str(sender), torch.from_numpy(array), age))
        self._arrived.set()

    async def _wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until ``predicate()`` or timeout; woken by every arriving delta."""
        end = time.monotonic() + timeout_s
        while not predicate():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return True

    def _describe_public(self) -> tuple[bytes, np.ndarray]:
        """Our public model's digest and sketch, in a worker thread while the
        engine is busy (nothing moves the public model meanwhile)."""
        return describe(self.engine.public.detach().to("cpu").numpy())

    def _publish_round(self, round_: int, sent: Message, neighbours: Mapping[str, int],
                       own: tuple[bytes, np.ndarray]) -> None:
        """Start sending the round's message to every neighbour, each transfer
        its own task (:class:`Outbox`), and keep it for neighbours that link
        while the round is open. ``own``: our public model's digest and sketch."""
        shape = (Message.ROWS, self.engine.num_params)
        self.layout.check_outgoing(TransferKind.ROUND, shape)
        # Each identity states (signs) the public model this message makes,
        # for its neighbours to vouch for in history records (node/records.py).
        shaped = self.shaping.shape(round_, self.engine, list(neighbours)) if self.shaping is not None else {}
        metas = {}
        for front in self.fronts:
            mine = shaped.get(front.peer_id)
            digest, sketch = own if mine is None else describe(mine.public.detach().to("cpu").numpy())
            metas[front.peer_id] = self.layout.meta(TransferKind.ROUND, degree=len(neighbours), **{
                STATEMENT_META_KEY: sign_statement(front.identity, round_, digest, sketch),
                SKETCH_META_KEY: sketch_bytes(sketch)})
        silent = frozenset(front for front, mine in shaped.items() if mine.message is None)
        routes = [route for p in neighbours for route in self._routes.get(p, ()) if route[0].peer_id not in silent]
        # Kept while the round is open: a neighbour that links meanwhile gets it too (on_linked).
        # Encoded and hashed once (per front), signed per neighbour.
        self._open = opened = _OpenRound(round_, sent, metas, {(front.peer_id, peer) for front, peer in routes},
                                         self.node.peer_id, self.compressor,
                                         {front: mine.message for front, mine in shaped.items() if mine.message is not None},
                                         silent)
        self._sends = [(peer, self.outbox.start((front.peer_id, peer, TransferKind.ROUND),
                                                self._send_to(front, peer, round_, opened.delta_for(front),
                                                              metas[front.peer_id])))
                       for front, peer in routes]

    async def _send_round(self, deadline: float) -> None:
        """Wait for the round's transfers :meth:`_publish_round` started only
        until ``deadline``: a neighbour that reads slowly delays only its own copy."""
        sends, self._sends = self._sends, []
        if not sends:
            return
        # A neighbour on probation never holds a round with its message
        # (RoundEngine): nor with ours. A stranger that linked and answers
        # nothing (not even a stream's negotiation) held each round to its
        # deadline until muted; ours to proven neighbours pace the round.
        proven = [task for peer, task in sends if self.engine.proven(str(peer))]
        await self.outbox.wait(proven or [task for _, task in sends], deadline - time.monotonic())

    async def _send_to(self, front: Node, peer: PeerId, round_: int, delta: PreparedDelta, meta: Mapping[str, Any]) -> None:
        await self._send_delta(front, peer, round_, delta, meta)
        await self._send_record(front, peer)

    async def _send_delta(self, front: Node, peer: PeerId, round_: int, delta: PreparedDelta, meta: Mapping[str, Any]) -> None:
        session = front.session(peer)
        if session is None:
            return
        try:
            for data in DeltaSender(front.identity, peer, round_, delta, meta=meta):
                await session.send_encoded(data, "Delta")
        except ConnectionClosed:
            pass

    async def _after_round(self, report: RoundReport, timer: PhaseTimer) -> None:
        self.last_report = report
        if self.gossip is None:
            self.stalls.on_round(report.round, report.neighbours, report.received)
            self._export_stalls()
            await self._track_silence(report)
        current = {session.peer for session in self._sessions(muted=True)}
        self.neighbour_rounds.weighed(report.weights, current)
        if self.gossip is None and self.shaping is None:
            await self.records.check_a_replica(self.fronts[0], report)
        with timer.phase("eval_s"):
            loss, accuracy = await self._call_trainer("evaluate", lambda: asyncio.to_thread(self._evaluate))
        self.last_eval = (loss, accuracy)
        if self.gossip is not None:
            # A round's close hands the heap's free pages back (RoundEngine.finish_round);
            # gossip learning's merges free model-sized temporaries as well (learning/heap.py).
            await asyncio.to_thread(release_free_heap)
        metrics = self.node.metrics
        metrics.round.set(self.engine.round)
        metrics.set_eval(Split.TRAIN, loss=report.train_loss, accuracy=float("nan"))
        perplexity = self._perplexity(loss)
        metrics.set_eval(Split.TEST, loss=loss, accuracy=accuracy, perplexity=perplexity)
        metrics.set_aggregation_weights(report.weights)
        epsilon = self.privacy.epsilon_spent() if self.privacy is not None else 0.0
        metrics.epsilon_spent.set(epsilon)
        # Checkpoint first: a kill -9 between the two then loses this round's
        # row, never records the round twice (a restart resumes after it).
        # Between checkpoints a restart resumes from the last one and runs
        # (and records) the rounds since again.
        if self.checkpoints.due():
            await self.checkpoints.save()
        bytes_in, bytes_out = self.node.traffic()
        self.node.state.append_metrics(
            {
                "ts": time.time(),
                "round": report.round,
                "accuracy": accuracy,
                "metric": self.trainer.metric.value,  # what this trainer is judged by (accuracy or perplexity)
                "perplexity": perplexity,
                "loss": loss,
                "train_loss": report.train_loss,
                "attack_rate": self.attack_rate,
                "weights": report.weights,
                "neighbours": sorted(k for k in report.weights if k != "self"),
                "neighbour_count": report.neighbours,  # the round's neighbours, whether they delivered or not
                "received": report.received,
                "missed": report.missed,  # neighbours still expected at the deadline
                "excused": report.excused,  # neighbours that said they send nothing for this round
                "late_dropped": report.late_dropped,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "epsilon": epsilon,
                **timer.rounded(),
            }
        )
        metrics.observe_round(timer.seconds)
        log.info(
            "round done",
            extra={"event": "round", "round": report.round, "accuracy": round(accuracy, 4),
                   "received": report.received, "neighbours": report.neighbours},
        )

    async def _track_silence(self, report: RoundReport) -> None:
        delivered = [p for p in report.weights if p != "self"]
        for peer in self.silence.on_round(delivered, report.absent):
            log.info("neighbour muted: nothing usable from it for several rounds",
                     extra={"event": "muted", "peer": peer, "round": report.round})
        for peer in self.silence.to_evict():
            self.silence.forget(peer)
            for front, target in self._routes_to(peer):
                session = front.session(target)
                if session is not None:
                    await front.membership.unlink(session, front.membership.config.link_cooldown_s, reason="silent")

    def _routes_to(self, key: str) -> list[tuple[Node, PeerId]]:
        return [(front, s.peer) for front in self.fronts for s in front.membership.learning_neighbours()
                if str(s.peer) == key]

    def _perplexity(self, loss: float) -> float | None:
        """exp(test loss) when the trainer's metric is perplexity, else None."""
        if self.trainer.metric is not Metric.PERPLEXITY:
            return None
        return self.trainer.metric.from_loss_and_accuracy(loss, 0.0)

    def _evaluate(self) -> tuple[float, float]:
        stats = self.trainer.evaluate()
        if self.cfg.eval_attack is not Attack.NONE:
            self.attack_rate = self.trainer.attack_success_rate(self.cfg.eval_attack.value)
        return stats.loss, stats.accuracy

    # -- receiving deltas ------------------------------------------------------------

    async def _on_delta_message(self, front: Node, session: PeerSession, msg: DeltaStart | DeltaChunk | DeltaEnd) -> None:
        assembler = self._assemblers[front.peer_id]
        if isinstance(msg, DeltaStart) and not self._may_send_deltas(session, msg):
            # Strangers (connected, never linked) held the whole assembly budget
            # with stalled transfers, so every neighbour's next message was refused.
            assembler.refuse(session.peer, msg.transfer_id)
            raise LimitExceeded("delta from a peer that is not a learning neighbour")
        verified = assembler.feed_verified(session.peer, msg)
        if verified is None:
            return
        start = verified.start
        kind = self.layout.kind_of(start.meta)  # the assembler checked its shape against our layout
        # (A read the engine allows while a round closes in its thread: a close never moves a replica.)
        if kind is TransferKind.ROUND and self.engine.holds(str(session.peer), start.round):
            # Our replica of it already holds that round: offer() would find a
            # duplicate whatever the bytes. Distinct bytes for a round are not
            # a replay, and a random-k decode draws the sender's mask (~1 s of
            # CPU at 10M parameters, ratio 0.5), so a neighbour resending old
            # rounds had us decode each, honest messages queued behind them.
            assembler.accept(verified)
            outcome = Offer.DUPLICATE
        else:
            # Off the loop when it costs anything; one further ahead than the engine buffers
            # waits for every urgent decode (our round's messages, our own mask) to go first.
            far_ahead = kind is TransferKind.ROUND and self.engine.beyond_buffer(start.round, FAR_AHEAD_SLACK)
            done = await self._decoder.decode(verified, urgent=not far_ahead)
            assembler.accept(verified)
            if kind is TransferKind.MODEL:
                await self.models.on_model(session.peer, done)
                return
            if kind is TransferKind.GOSSIP:
                self._on_gossip_model(session.peer, done)
                return
            array = done.array if done.array.flags.writeable else done.array.copy()
            outcome = await self._guard.run(
                partial(self.engine.offer, str(session.peer), start.round, torch.from_numpy(array)[0]))
        degree = start.meta.get("degree")
        if isinstance(degree, int) and degree > 0:
            session.peer_degree = degree
        statement = read_statement(start.round, start.meta.get(STATEMENT_META_KEY), start.meta.get(SKETCH_META_KEY))
        if statement is not None and outcome is not Offer.BAD_SHAPE:
            self.records.note_statement(session.peer, statement)
        if outcome is not Offer.BAD_SHAPE and self.silence.on_usable(str(session.peer)):
            log.info("neighbour unmuted: it sends again", extra={"event": "unmuted", "peer": str(session.peer)})
        log.debug("round message", extra={"event": "offer", "peer": str(session.peer), "round": start.round,
                                           "outcome": outcome.value, "own_round": self.engine.round})
        if outcome is Offer.BAD_SHAPE:
            raise DecodeError(f"round message with non-finite values for round {start.round}")
        self.neighbour_rounds.heard(session.peer, start.round)
        if outcome is Offer.NEEDS_SYNC:
            await self.models.resync(session)
        self._arrived.set()

    # -- catch-up --------------------------------------------------------------------

    def _claimed_rounds(self) -> dict[PeerId, int]:
        return self.neighbour_rounds.claimed(
            {s.peer: s.hello.round if s.hello is not None else -1 for s in self._sessions(muted=True)})

    def _catch_up_target(self) -> PeerId | None:
        return catch_up_target(self._claimed_rounds(), self.engine.round, self.neighbour_rounds.trust, self._choices(),
                               self._min_voters())

    def _live(self) -> set[PeerId]:
        """Neighbours we heard a round message from within BEHIND_LIVE_DEADLINES deadlines."""
        return self.neighbour_rounds.live(BEHIND_LIVE_DEADLINES * self.cfg.round_deadline_s)

    def _ahead_of_network(self) -> bool:
        return ahead_of_network(self._claimed_rounds(), self.engine.round, self._live(), self._choices())

    def _lagging(self) -> list[int]:
        return lagging_neighbour(self._claimed_rounds(), self.engine.round, self._live())

    def _note_paced(self, round_: int, lagging: Sequence[int]) -> None:
        """Count a round that waited for neighbours behind (its deadline, or
        as long again as it took at half pace: ``lagging``, their rounds when
        it decided), and say so when a run of them begins. The half-pace line
        names the rounds it decided on: read after the wait, a neighbour
        that came level meanwhile made it say "rounds 21-21, ours 21"."""
        half = bool(lagging)
        most = not half and self._ahead_of_network()
        if not (half or most):
            self._pacing = False
            return
        self.rounds_paced += 1
        if self._pacing:
            return
        self._pacing = True
        if most:
            claimed = voters(self._claimed_rounds(), self._choices())
            behind = sorted(r for r in claimed.values() if r + CATCH_UP_GAP < round_) or [round_]
        else:
            behind = list(lagging)
        what = ("most neighbours are behind", "rounds wait their deadline") if most else \
            ("a neighbour is behind", "rounds run at half pace")
        log.info(f"{what[0]} (rounds {behind[0]}-{behind[-1]}, ours {round_}): {what[1]} for them to come level",
                 extra={"event": "pacing", "round": round_, "behind": len(behind), "half": half})

    def _wanted_neighbours(self) -> int:
        """The learning neighbours this node looks for (a network of
        num_nodes learners offers at most num_nodes - 1)."""
        return min(self.node.config.network.neighbours, max(1, self.cfg.num_nodes - 1))

    def _min_voters(self) -> int:
        """Neighbours that must claim a round before most of them can move
        us to theirs (see :func:`catch_up_target`); one in a network of two."""
        return min(MIN_CHOSEN_VOTERS, self._wanted_neighbours())

    async def _maybe_catch_up(self) -> bool:
        """Adopt a model from the neighbours far ahead of us; True iff we did.

        Up to CATCH_UP_SOURCES of those catch-up allows (:func:`catch_up_sources`,
        the most trusted first) are asked at once, and what arrived within a
        round deadline decides (:func:`murmur.learning.adoption.adoption`):
        from three models on their coordinate-wise median, from one or two
        the most trusted one's, as before. Every neighbour whose model
        arrived gets it as our replica of it, at its own round, so its next
        messages apply to exactly what it holds."""
        claimed, choices = self._claimed_rounds(), self._choices()
        peers = catch_up_sources(claimed, self.engine.round, self.neighbour_rounds.trust, choices, self._min_voters())
        if not peers:
            self._note_held_back(voters(claimed, choices))
            return False
        self._held_back.reset()
        sessions = {peer: session for peer in peers if (session := self._session_to(peer)) is not None}
        arrived = await self.models.fetch(sessions, self.cfg.round_deadline_s)
        if not arrived:
            log.info("catch-up failed", extra={"peers": [str(p) for p in peers]})
            return False
        # Off the loop: a median of five large models is seconds of CPU (1.3 s at 11M parameters).
        chosen = await self._decoder.run(partial(adoption, list(arrived.values()),
                                                 claims_ahead(claimed, self.engine.round, choices)))
        # The chosen model reflects message ``state_round``: we run the next round.
        self.engine.adopt(chosen.model, chosen.state_round + 1)
        for peer, public in arrived.items():
            self.engine.set_replica(str(peer), public.model, public.state_round)
        self.catch_ups += 1
        self._round_moved()
        await self._announce_progress()  # neighbours in the rounds we skipped stop waiting for us
        # /status must describe the model we now hold, not the one we dropped
        # (no metrics row: we did not run the rounds we skipped).
        self.last_eval = await self._call_trainer("evaluate", lambda: asyncio.to_thread(self._evaluate))
        # A jump of many rounds at once: checkpointed only after the next round
        # ran, a node killed before that (a slow round) resumed rounds behind,
        # ran them again (spending ε again) and caught up again.
        if self.checkpoints.due():
            await self.checkpoints.save()
        log.info("caught up", extra={"event": "catch_up", "peer": str(next(iter(arrived))), "round": chosen.state_round + 1,
                                     "sources": len(arrived), "asked": len(peers),
                                     "accuracy": round(self.last_eval[1], 4)})
        return True

    def _session_to(self, peer: PeerId) -> PeerSession | None:
        """The session a request to ``peer`` goes on (the first route to it)."""
        routes = self._routes.get(str(peer)) or [(self.node, peer)]
        return routes[0][0].session(peer)

    def _note_held_back(self, claimed: Mapping[PeerId, int]) -> None:
        """Count the rounds we stay behind neighbours we may not adopt from
        (``claimed``: each neighbour's round, as catch-up read them), and say
        so (HELD_BACK_STREAK): the node keeps learning with the neighbours at
        its round, and those ahead stop hearing from it."""
        own = self.engine.round
        ahead = sorted(r for r in claimed.values() if r > own + CATCH_UP_GAP)
        if not ahead:
            self._held_back.reset()
            return
        if not self._held_back.hit():
            return
        log.warning(
            f"{len(ahead)} of {len(claimed)} neighbours are ahead (rounds {ahead[0]}-{ahead[-1]}, ours {own}) and "
            "this node never gave them weight: it adopts the model of a neighbour it has no trust in only when more "
            "than two thirds of its neighbours are ahead (a Sybil claims rounds ahead too). Until then it learns with "
            "the neighbours at its round. Start nodes within learning.start_wait_s of each other, or one after another",
            extra={"event": "held_back", "round": own, "ahead": len(ahead), "rounds_held_back": self._held_back.count},
        )

    def _may_send_deltas(self, session: PeerSession, start: DeltaStart) -> bool:
        """Whether ``session`` may start this transfer: a round message from a
        peer we asked for a learning edge or that asked us for one (its
        acceptance and its first round message travel on different streams,
        so the edge need not be mutual yet here), a model we asked it for, or,
        in gossip learning, a model from any peer (each node sends to a peer
        its sampler draws)."""
        kind = self.layout.kind_of(start.meta)
        if kind is TransferKind.MODEL:
            return self.models.asked(session.peer)
        if kind is TransferKind.GOSSIP:
            return self.gossip is not None
        return session.link_out or session.link_in

    def _served_state(self, front: Node) -> tuple[torch.Tensor, int]:
        """The public model (a copy) and its round that ``front`` serves."""
        mine = self.shaping.public_state(front.peer_id) if self.shaping is not None else None
        return self.engine.public_state() if mine is None else mine

    # -- history records ---------------------------------------------------------------

    async def _send_record(self, front: Node, peer: PeerId) -> None:
        """An attacker's shaping's records for ``peer`` (made with the engine
        idle), then our own record for it this round, if there is one."""
        session = front.session(peer)
        if session is None:
            return
        shaping = self.shaping
        forged = [] if shaping is None else await self._guard.run(
            lambda: list(shaping.records(front.identity, peer, self.engine)))
        record = await self.records.record_for(front, peer)
        for message in [*forged, *([record] if record is not None else [])]:
            with contextlib.suppress(ConnectionClosed):
                await session.send(message)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        loss, accuracy = self.last_eval if self.last_eval is not None else (None, None)
        return {
            "mode": self.cfg.mode.value,
            "aggregator": self.cfg.aggregator,
            "round": self.round,
            "accuracy": accuracy,
            "loss": loss,
            "metric": self.trainer.metric.value,
            "perplexity": self._perplexity(loss) if loss is not None else None,
            "compression": self.compressor.describe() if self.compressor is not None else None,
            "attack_rate": self.attack_rate,
            "weights": dict(self.last_report.weights) if self.last_report else {},
            "epsilon": self.privacy.epsilon_spent() if self.privacy is not None else 0.0,
            "budget_exhausted": bool(self.privacy is not None and self.privacy.budget_exhausted()),
            "privacy": self.privacy.status() if self.privacy is not None else None,
            "role": "attacker" if self.cfg.attack is not Attack.NONE else "honest",
            # the round loop ended, its last row on disk ("round" moves as a round's aggregate is
            # taken, before that round is evaluated and recorded)
            "finished": self._finished,
            "catch_ups": self.catch_ups,
            "rounds_held_back": self._held_back.count,
            "rounds_paced": self.rounds_paced,  # rounds that waited for neighbours behind (deadline or half pace)
            # training rounds in a row whose local step was non-finite and skipped: the node then
            # only averages its neighbours' models, while its evaluation still looks plausible
            "rounds_diverged": self.engine.diverged_streak,
            "late_dropped": self.engine.late_dropped,
            # neighbours' messages refused because the node's assembly budget was full (no one's fault)
            "deltas_refused_for_room": sum(a.refused_for_room for a in self._assemblers.values()),
            **self.stalls.status(),
        }


def outer_optimizer(section: OuterSection) -> OuterOptimizer | None:
    """The ``[outer]`` section's optimizer, or None for ``optimizer = "none"``."""
    if section.optimizer is OuterName.NONE:
        return None
    return OuterOptimizer(OuterConfig(lr=section.lr, momentum=section.momentum,
                                      nesterov=section.optimizer is OuterName.NESTEROV))


@dataclass
class _OpenRound:
    """The message of the round we have open, kept until it closes so that a
    neighbour linked meanwhile gets it too (signed for it, same bytes)."""

    round: int
    message: Message
    metas: Mapping[PeerId, Mapping[str, Any]]  # per front: its statement of the public model
    sent: set[tuple[PeerId, PeerId]]  # (front, neighbour) it went to
    own: PeerId  # the identity the engine compressed for
    compressor: Compressor | None
    shaped: Mapping[PeerId, Message] = field(default_factory=dict)  # an attacker's identities' own messages
    silent: frozenset[PeerId] = frozenset()  # an attacker's identities that send nothing this round
    prepared: dict[PeerId, PreparedDelta] = field(default_factory=dict)

    def delta_for(self, front: Node) -> PreparedDelta:
        """The message encoded and hashed for ``front`` (once per front): its
        own shaped message, the compressor's own payload, or for an
        attacker's other identities with per-sender masks, the same values
        at that identity's mask."""
        mine = self.shaped.get(front.peer_id)
        key = (front.peer_id if mine is not None or (self.compressor is not None and self.compressor.per_sender)
               else self.own)
        prepared = self.prepared.get(key)
        if prepared is not None:
            return prepared
        message = mine if mine is not None else self.message
        compressed = message.compressed
        shape = tuple(message.stacked().shape)
        if compressed is None:
            array = message.stacked().detach().to("cpu", torch.float32).contiguous().numpy()
            prepared = PreparedDelta.prepare(array, DeltaCodec.FP32)
        elif mine is not None or key == self.own or self.compressor is None:
            prepared = PreparedDelta.of_payload(compressed.payload, compressed.codec, shape)
        else:
            payload = self.compressor.payload_as(self.message.increment, self.round, key.raw)
            prepared = PreparedDelta.of_payload(payload, compressed.codec, shape)
        self.prepared[key] = prepared
        return prepared
