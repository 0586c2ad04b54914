"""History records on the wire, and the replica checks they rest on.

Every round message carries its sender's signed statement of its public
model (:mod:`murmur.node.records`). This unit keeps those statements, and:

* under SybilWall, sends each neighbour one history record a round (the
  aggregator picks whose: a first-hand one, observed from our bit-exact
  replica and signed by us, or a relayed one we hold), and takes the
  records neighbours send, within the sender's budget, checked before the
  aggregator scores them;
* whatever the aggregator, checks one neighbour's replica a round against
  its statement. A replica is bit-exact by construction; a check is what
  shows one that is not (a start we did not share replayed every round on
  the wrong base, unnoticed for whole runs). A replica found off, here or
  when observing it for a record, is fetched again (at most every
  ``REPLICA_REFETCH_S`` a peer).

Every engine or aggregator touch goes through the learner's
:class:`~murmur.node.engineguard.EngineGuard`: a round's close, in its
worker thread, rewrites the replicas and the aggregator's history.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from murmur.errors import LimitExceeded
from murmur.learning.aggregators.base import Aggregator
from murmur.learning.aggregators.sybilwall import HistoryRecordData, RecordVerdict, SybilWallAggregator
from murmur.learning.rounds import RoundEngine, RoundReport
from murmur.node.decoding import OffLoopDecoder
from murmur.node.engineguard import EngineGuard
from murmur.node.records import HeldRecord, RecordBook, Statement, check_record, observe, states_model
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import HistoryRecord
from murmur.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from murmur.node.daemon import Node
    from murmur.node.session import PeerSession

log = logging.getLogger(__name__)

REPLICA_REFETCH_S = 30.0
"""A replica that disagrees with its owner's signed statement is fetched again
at most this often (well inside what a neighbour serves us:
``MODEL_SERVE_REFILL_S``, murmur.node.modelexchange)."""


class RecordGossip:
    """One learner's statements, history records and replica checks.

    ``resync`` asks a peer for its public model (the learner's re-sync, whose
    answer replaces our replica of it)."""

    def __init__(self, engine: RoundEngine, aggregator: Aggregator, guard: EngineGuard, decoder: OffLoopDecoder,
                 own_ids: frozenset[PeerId], peer_log: RateLimitedLog,
                 resync: Callable[[PeerSession], Awaitable[None]]) -> None:
        self._engine = engine
        self._aggregator = aggregator
        self._guard = guard
        self._decoder = decoder
        self._own_ids = own_ids  # our identities (an attacker's fronts): never a record's subject to us
        self._peer_log = peer_log
        self._resync = resync
        # Records carry a digest and a sketch, never the model: any size gossips them.
        self.gossips = isinstance(aggregator, SybilWallAggregator)
        self.book = RecordBook()
        self._refetched: dict[PeerId, float] = {}  # when a replica found off its owner's statement was last fetched

    # -- peers ---------------------------------------------------------------------------

    def note_statement(self, peer: PeerId, statement: Statement) -> None:
        """``peer``'s statement of its public model, from its round message."""
        self.book.note_statement(peer, statement)

    def session_closed(self, peer: PeerId) -> None:
        """One session to ``peer`` closed: its refetch bound starts again with the next."""
        self._refetched.pop(peer, None)

    def forget(self, peer: PeerId) -> None:
        """``peer`` is no longer a neighbour of any of our identities."""
        self.book.forget(peer)

    # -- sending ---------------------------------------------------------------------------

    async def record_for(self, front: Node, peer: PeerId) -> HistoryRecord | None:
        """The record ``front`` sends ``peer`` this round, if the aggregator
        picks one we can vouch for. Chosen with the engine idle: the
        aggregator's history is what a round's close, in its thread, rewrites."""
        if not self.gossips:
            return None
        assert isinstance(self._aggregator, SybilWallAggregator)
        choice = await self._guard.run(partial(self._aggregator.records_to_send, str(peer)))
        if choice is None:
            return None
        if choice.distance == 1:
            return await self.observed(front, choice.subject)
        held = self.book.record(choice.subject)
        return None if held is None else HistoryRecord(
            subject=held.subject, observer=held.observer, round=held.round, distance=choice.distance,
            digest=held.digest, sketch=held.sketch, subject_sig=held.subject_sig, observer_sig=held.observer_sig)

    def _replica_copy(self, subject_text: str) -> tuple[np.ndarray, int] | None:
        """A copy of our replica of ``subject_text`` and the round it holds
        (the replica itself moves with the subject's next message)."""
        replica = self._engine.replica(subject_text)
        if replica is None:
            return None
        model, round_ = replica
        return model.detach().to("cpu", torch.float32).numpy().copy(), round_

    async def observed(self, front: Node, subject_text: str) -> HistoryRecord | None:
        """A first-hand record of a neighbour: our replica of its public
        model, its own statement of that model, our signature as the
        observer. The replica's digest and sketch (a quarter of a second at
        10 M parameters) are made off the loop, from a copy."""
        replica = await self._guard.run(partial(self._replica_copy, subject_text))
        if replica is None:
            return None
        model, round_ = replica
        subject = PeerId.from_string(subject_text)
        statement = self.book.statement(subject, round_)
        if statement is None:
            return None
        record = await self._decoder.run(partial(observe, front.identity, subject, round_, model, statement))
        if record is None:
            self.book.forget(subject)  # what it sent is not what it states: nothing to vouch for
            await self._refetch(front, subject, round_)
        return record

    # -- checking replicas -------------------------------------------------------------------

    async def check_a_replica(self, front: Node, report: RoundReport) -> None:
        """One neighbour a round, in turn (those the round mixed): our replica
        of its public model against the statement it signed of that model,
        whatever the aggregator (the records check the ones they vouch for
        as well): a digest a round (~15 ms at 10 M parameters), hashed in
        place in a worker thread while the engine is held (no model-sized
        copy, nothing on the loop)."""
        peers = sorted(p for p in report.weights if p != "self")
        if not peers:
            return
        subject_text = peers[report.round % len(peers)]
        subject = PeerId.from_string(subject_text)
        held = await self._guard.run(partial(self._engine.replica, subject_text))
        statement = None if held is None else self.book.statement(subject, held[1])
        if statement is None:
            return

        def agrees() -> bool | None:
            now = self._engine.replica(subject_text)
            if now is None or now[1] != statement.round:
                return None  # it moved on meanwhile: next time
            return states_model(subject, statement.round, now[0].detach().to("cpu").numpy(), statement)

        if await self._guard.off_loop(agrees) is False:
            self.book.forget(subject)
            await self._refetch(front, subject, statement.round)

    async def _refetch(self, front: Node, peer: PeerId, round_: int) -> None:
        """Our replica of ``peer`` is not the model ``peer`` signed for
        ``round_``: either it stated something else than it sent, or our
        replica went off. Fetch its model again, at most every
        REPLICA_REFETCH_S: a replica is only ever right again by a fetch,
        and a peer that lies pays the upload."""
        session = front.session(peer)
        now = time.monotonic()
        if session is None or now - self._refetched.get(peer, -math.inf) < REPLICA_REFETCH_S:
            return
        self._refetched[peer] = now
        self._peer_log.warning(
            log, peer, "our replica of a neighbour is not the model it signed: fetching its model",
            extra={"event": "replica_disagrees", "peer": str(peer), "round": round_})
        await self._resync(session)

    # -- receiving ---------------------------------------------------------------------------

    async def receive(self, session: PeerSession, msg: HistoryRecord) -> None:
        """Check a record's signatures, score it against our reference of its
        round (the aggregator's rules decide whether it counts), keep it to relay."""
        if not self.gossips:
            return
        if not session.linked:
            log.debug("history record from a non-neighbour ignored", extra={"peer": str(session.peer)})
            return
        assert isinstance(self._aggregator, SybilWallAggregator)
        # Its budget first, then its signatures (a flood is refused before it costs a verify); the
        # aggregator's round moves only as a round opens, on the round loop, never while it closes.
        if not self.book.take_intake(session.peer, self._aggregator.round):
            log.debug("history record over the sender's budget ignored", extra={"peer": str(session.peer)})
            return
        sketch = check_record(msg)
        await self._guard.run(partial(self._take, session, msg, sketch))

    def _take(self, session: PeerSession, msg: HistoryRecord, sketch: np.ndarray) -> None:
        """Score a checked record and keep it to relay: with the engine idle
        (the reference sketches and the aggregator's history are what a
        round's close, in its thread, rewrites)."""
        assert isinstance(self._aggregator, SybilWallAggregator)
        if msg.subject in self._own_ids:
            return
        offset = self._engine.relative_sketch(torch.from_numpy(sketch.copy()), msg.round)
        if offset is None:
            return  # a round we hold no reference for (ahead of us, or too old to compare)
        verdict = self._aggregator.receive_record(
            str(session.peer),
            HistoryRecordData(subject=str(msg.subject), round=msg.round, offset=offset, observer=str(msg.observer),
                              distance=msg.distance),
        )
        if verdict.misbehaviour:
            raise LimitExceeded(f"history record refused: {verdict.value}")
        if verdict is RecordVerdict.KEPT:
            self.book.keep(HeldRecord(msg.subject, msg.observer, msg.round, msg.digest, sketch.copy(),
                                      msg.subject_sig, msg.observer_sig))
        self.book.prune(set(self._aggregator.known_peers()))
