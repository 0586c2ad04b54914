"""Public models asked for and served between learning neighbours.

A ``ModelRequest`` (a few bytes) is answered with the whole public model, as
a signed ``MODEL`` transfer (:mod:`murmur.protocol.delta`). Two kinds of ask:

* a **re-sync**: our replica of a neighbour has a gap (its message named a
  round we hold no base for, it started from another model, or our replica
  was found off its statement); the answer is installed as our replica of
  it, and the message that needed it is filed;
* a **catch-up**: the learner asks several neighbours ahead at once and
  adopts from what arrives within a round deadline (:meth:`fetch`).

Only a model we asked for is taken (a transfer nobody asked for is a fault),
one request in flight per peer. Serving is bounded three ways, since the
answer costs a model's upload: never to a non-neighbour, at most one
transfer in flight per peer, and a per-peer and a node-wide rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING

import torch

from murmur.errors import DecodeError, LimitExceeded, SendTimeout
from murmur.learning.adoption import PublicModel
from murmur.learning.rounds import RoundEngine
from murmur.node.engineguard import EngineGuard
from murmur.node.outbox import Outbox
from murmur.node.ratelimit import RequestBudget
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.delta import CompletedDelta, DeltaSender
from murmur.protocol.identity import PeerId
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.messages import DeltaStart, ModelRequest
from murmur.protocol.transport import ConnectionClosed

if TYPE_CHECKING:
    from murmur.node.daemon import Node
    from murmur.node.session import PeerSession

log = logging.getLogger(__name__)

MODEL_SERVE_BURST = 3  # public models served to one peer before rate limiting
MODEL_SERVE_REFILL_S = 2.0  # one more allowed per this many seconds
MODEL_SERVE_NODE_BURST = 8  # public models served to all peers together before the node-wide limit
MODEL_SERVE_NODE_RATE = 2.0  # per second, all peers together: a flood of requesters cannot multiply our upload
MODEL_REQUEST_TIMEOUT_S = 5.0  # an unanswered re-sync request may be repeated after this


class ModelExchange:
    """One learner's model requests, both ways.

    ``served_state(front)`` is the public model (a copy) and its round that
    ``front`` serves; ``budgeted()`` says whether serving is rate limited
    (an evaluation attacker whose identities ask to be re-synced serves them
    beyond the budgets); ``on_replica()`` is called once a re-sync's model is
    installed (it may complete the open round)."""

    def __init__(self, engine: RoundEngine, guard: EngineGuard, layout: TransferLayout, outbox: Outbox,
                 served_state: Callable[[Node], tuple[torch.Tensor, int]], budgeted: Callable[[], bool],
                 on_replica: Callable[[], None]) -> None:
        self._engine = engine
        self._guard = guard
        self._layout = layout
        self._outbox = outbox
        self._served_state = served_state
        self._budgeted = budgeted
        self._on_replica = on_replica
        # Requests in flight: peer -> future for a catch-up we await, or None
        # for a re-sync installed on arrival.
        self._requests: dict[PeerId, asyncio.Future[CompletedDelta] | None] = {}
        self._resync_sent: dict[PeerId, float] = {}  # when we last asked for a re-sync
        self._budgets: dict[PeerId, RequestBudget] = {}
        self._serving = RequestBudget(MODEL_SERVE_NODE_BURST, 1.0 / MODEL_SERVE_NODE_RATE)

    def asked(self, peer: PeerId) -> bool:
        """Whether a model request of ours to ``peer`` is in flight."""
        return peer in self._requests

    def solicited(self, start: DeltaStart) -> bool:
        """A model transfer from a peer we asked for one (see DeltaAssembler's
        ``solicited``): asked twice while its model stands still, a peer
        answers twice with the same signed bytes, which the replay guard
        would take for a replay, dropping and penalising an honest peer.
        :meth:`on_model` refuses model transfers nobody asked for."""
        return self._layout.kind_of(start.meta) is TransferKind.MODEL and start.sender in self._requests

    def session_closed(self, peer: PeerId) -> None:
        """``peer``'s session closed: a request to it will not be answered on
        it. A catch-up's :meth:`fetch` stops waiting for it (it waited out
        its whole deadline for a neighbour that had left)."""
        waiting = self._requests.pop(peer, None)
        if waiting is not None:
            waiting.cancel()
        self._budgets.pop(peer, None)
        self._resync_sent.pop(peer, None)

    # -- asking ------------------------------------------------------------------------------

    async def resync(self, session: PeerSession) -> None:
        """Ask ``session.peer`` for its public model (our replica of it has a gap).
        One request in flight per peer; an unanswered one is repeated after a timeout."""
        peer = session.peer
        now = time.monotonic()
        if peer in self._requests and now - self._resync_sent.get(peer, 0.0) < MODEL_REQUEST_TIMEOUT_S:
            return
        if self._requests.get(peer) is not None:
            return  # a catch-up from this peer is in flight; it installs the replica too
        self._requests[peer] = None
        self._resync_sent[peer] = now
        try:
            await session.send(ModelRequest(round=self._engine.round))
        except ConnectionClosed:
            self._requests.pop(peer, None)

    async def fetch(self, sessions: Mapping[PeerId, PeerSession], timeout_s: float) -> dict[PeerId, PublicModel]:
        """Ask each peer of ``sessions`` for its public model at once; those
        that arrived within ``timeout_s``, valid and ahead of our round, in
        the order of ``sessions``. A peer that answers with a model we cannot
        use is left out (the others decide)."""
        loop = asyncio.get_running_loop()
        waiting: dict[PeerId, asyncio.Future[CompletedDelta]] = {}
        for peer in sessions:
            waiting[peer] = self._requests[peer] = loop.create_future()
        try:
            deadline = time.monotonic() + timeout_s
            sent = await asyncio.gather(*(self._ask(session, deadline) for session in sessions.values()))
            asked = {peer for peer, ok in zip(waiting, sent, strict=True) if ok}
            if asked:
                await asyncio.wait([waiting[peer] for peer in asked], timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for peer, fut in waiting.items():
                if self._requests.get(peer) is fut:  # else its session closed meanwhile
                    del self._requests[peer]
        arrived: dict[PeerId, PublicModel] = {}
        for peer, fut in waiting.items():
            if not fut.done() or fut.cancelled():
                continue
            try:
                model, state_round = self._public_model(fut.result())
            except DecodeError as exc:
                log.info("catch-up: unusable model", extra={"peer": str(peer), "error": str(exc)})
                continue
            if state_round < self._engine.round:
                # It claimed a round ahead of ours; adopted, a model of our
                # round or before would move us nowhere or back (rounds run,
                # and their noise spent, again), and the others decide.
                log.info("catch-up: model not ahead of us", extra={"peer": str(peer), "state_round": state_round,
                                                                   "round": self._engine.round})
                continue
            arrived[peer] = PublicModel(model, state_round)
        return arrived

    async def _ask(self, session: PeerSession, deadline: float) -> bool:
        """Send ``session``'s peer a model request; False when it could not go out."""
        try:
            await session.send(ModelRequest(round=self._engine.round), deadline)
        except (ConnectionClosed, SendTimeout):
            return False
        return True

    def _public_model(self, done: CompletedDelta) -> tuple[torch.Tensor, int]:
        state_round = done.meta.get("state_round")
        if not isinstance(state_round, int) or state_round < -1 or done.array.shape != (self._engine.num_params,):
            raise DecodeError("model transfer without a valid state_round or of the wrong shape")
        array = done.array if done.array.flags.writeable else done.array.copy()
        return torch.from_numpy(array), state_round

    async def on_model(self, sender: PeerId, done: CompletedDelta) -> None:
        """A model transfer arrived: a catch-up's (handed to the waiting
        :meth:`fetch`) or a re-sync's (installed as our replica of ``sender``)."""
        if sender not in self._requests:
            raise LimitExceeded("unsolicited model transfer")
        waiting = self._requests[sender]
        if waiting is not None:  # a catch-up: fetch() hands it over
            if not waiting.done():
                waiting.set_result(done)
            return
        del self._requests[sender]
        model, state_round = self._public_model(done)
        try:  # files the message that needed it
            await self._guard.run(partial(self._engine.set_replica, str(sender), model, state_round))
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        self._on_replica()

    # -- serving -----------------------------------------------------------------------------

    async def on_request(self, front: Node, session: PeerSession, msg: ModelRequest) -> None:
        """Serve our public model to a learning neighbour (a re-sync, a
        catch-up): never to strangers (a request is a few bytes, the answer
        the whole model), at most one transfer in flight per peer, under a
        per-peer and a node-wide rate. A request over the node-wide rate is
        dropped without penalty: the asker retries after its timeout."""
        if not session.linked or session.learner_info is None:
            log.debug("model request from a non-neighbour ignored", extra={"peer": str(session.peer)})
            return
        budgeted = self._budgeted()
        budget = self._budgets.setdefault(session.peer, RequestBudget(MODEL_SERVE_BURST, MODEL_SERVE_REFILL_S))
        if budgeted and not budget.take():
            raise LimitExceeded("public model requested too often")
        key = (front.peer_id, session.peer, TransferKind.MODEL)
        if self._outbox.busy(key) or (budgeted and not self._serving.take()):
            return
        self._outbox.start(key, self._serve(front, session))

    async def _serve(self, front: Node, session: PeerSession) -> None:
        # The public model only: it is built from what we already sent (noisy
        # updates and consensus steps), so serving it reveals nothing new.
        public, state_round = await self._guard.run(partial(self._served_state, front))
        model = public.detach().to("cpu").numpy()
        self._layout.check_outgoing(TransferKind.MODEL, model.shape)
        meta = self._layout.meta(TransferKind.MODEL, state_round=state_round)
        sender = DeltaSender(front.identity, session.peer, max(state_round, 0), model, DeltaCodec.FP32, meta=meta)
        with contextlib.suppress(ConnectionClosed):
            for data in sender:
                await session.send_encoded(data, "Model")
