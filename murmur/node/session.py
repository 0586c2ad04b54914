"""One authenticated connection to one peer, and the message dispatch for it.

A :class:`PeerSession` owns the receive loop of its connection. Every decoded
message goes to the handler registered for its class in a :class:`Dispatcher`
(one table, filled by the node's components at start). Every
:class:`~murmur.errors.PeerFault` raised while decoding or handling is caught
here, in one place: the peer is penalised, the fault is counted, and the
connection is dropped when the fault says so. Nothing a peer sends can take
the node down.

Usefulness: the transport protects the inbound slots of connections the node
marks useful (:meth:`PeerSession.mark_useful`) from eviction by newcomers.
The session marks one whenever a message of a kind in :data:`USEFUL_MESSAGES`
was handled without a fault (a signed delta or model, verified, addressed to
us); a component that knows better (the learner, about the neighbours it
chose) may call ``mark_useful`` itself. Pings, ``Hello`` and ``Link`` cost a
stranger nothing and never count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from murmur.errors import PeerFault
from murmur.node.links import LinkPacer
from murmur.node.metrics import Direction, NodeMetrics
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import DeltaEnd, Encoded, Message, decode, encode_parts
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed, SecureConnection

if TYPE_CHECKING:
    from murmur.protocol.messages import Hello, LearnerInfo

log = logging.getLogger(__name__)

Handler = Callable[["PeerSession", Any], Awaitable[None]]

USEFUL_MESSAGES: tuple[type[Message], ...] = (DeltaEnd,)
"""Kinds whose fault-free handling marks the connection useful: the end of
a delta transfer, which the assembler only completes once hash, signature,
recipient and replay window all checked out."""


class FaultSink(Protocol):
    """Where a session reports a misbehaving peer (the node's peer table),
    and the one place that logs what a peer caused, within a budget per peer
    (:mod:`murmur.ratelog`): a peer spraying bad messages must not write the
    node's log."""

    def on_fault(self, peer: PeerId, fault: PeerFault) -> bool:
        """Record ``fault``; True if the connection must close now: the fault
        says so, or the faults added up to a ban (small ``drop=False`` faults
        must not let a banned peer stay connected)."""
        ...

    def on_handler_failure(self, peer: PeerId, error: Exception) -> None:
        """A handler raised something that is not a :class:`PeerFault` (a bug,
        reached by what ``peer`` sent); the session closes the connection."""
        ...


class Dispatcher:
    """Message class → handler. Registering a class twice is a bug."""

    def __init__(self) -> None:
        self._handlers: dict[type, Handler] = {}

    def register(self, handlers: Mapping[type, Handler]) -> None:
        for cls, handler in handlers.items():
            if cls in self._handlers:
                raise RuntimeError(f"a handler for {cls.__name__} is already registered")
            self._handlers[cls] = handler

    def handler_for(self, msg: Message) -> Handler | None:
        return self._handlers.get(type(msg))


class PeerSession:
    """State we keep about a connected peer."""

    def __init__(self, conn: SecureConnection, dispatcher: Dispatcher, metrics: NodeMetrics, faults: FaultSink,
                 pacer: LinkPacer | None = None) -> None:
        self.conn = conn
        self._pacer = pacer  # emulated link rates of the node ([link]), shared by its sessions
        self.peer = conn.peer_id
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._faults = faults
        self.hello: Hello | None = None
        self.addrs: tuple[Multiaddr, ...] = ()  # its listen addresses, as observed (see Membership)
        self.link_in = False  # the peer asked for (or accepted) a learning edge with us
        self.link_out = False  # we asked for (or accepted) a learning edge with the peer
        self.chosen = False  # our link_out is our sampler's choice, not an accepted request
        self.said_goodbye = False  # it is leaving: evict at once, do not redial
        self.learner_info: LearnerInfo | None = None  # its LearnerInfo, once it proved a compatible model
        self.peer_degree = 1
        self.opened_at = time.monotonic()
        self.last_message_at = self.opened_at

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def linked(self) -> bool:
        """A learning edge: both sides asked for it (or accepted the other's request)."""
        return self.link_in and self.link_out

    async def send(self, msg: Message, deadline: float | None = None) -> None:
        """Encode and send one message; raises ConnectionClosed if the peer is
        gone, SendTimeout if it has not made room by ``deadline``
        (``time.monotonic()`` seconds; see ``SecureConnection.send``)."""
        await self.send_encoded(encode_parts(msg), type(msg).__name__, deadline)

    async def send_encoded(self, parts: Encoded, kind: str, deadline: float | None = None) -> None:
        nbytes = sum(memoryview(part).nbytes for part in parts)
        if self._pacer is not None:
            await self._pacer.before_send(nbytes)
        await self.conn.send(*parts, deadline=deadline)
        self._metrics.add_bytes(Direction.OUT, nbytes)
        self._metrics.message(Direction.OUT, kind)

    def mark_useful(self) -> None:
        """The peer just delivered something of value: its inbound slot is
        protected from eviction for ``transport.useful_ttl_s``."""
        self.conn.mark_useful()

    async def close(self) -> None:
        await self.conn.close()

    async def run(self) -> None:
        """Receive and dispatch until the connection closes or a fault drops it."""
        while True:
            try:
                data = await self.conn.recv()
            except ConnectionClosed:
                return
            except PeerFault as fault:  # the transport already closed the connection
                self._faults.on_fault(self.peer, fault)
                return
            self.last_message_at = time.monotonic()
            self._metrics.add_bytes(Direction.IN, len(data))
            if self._pacer is not None:  # hold this reader until the emulated download link carried it
                await self._pacer.after_receive(len(data))
            try:
                msg = decode(data)
                self._metrics.message(Direction.IN, type(msg).__name__)
                handler = self._dispatcher.handler_for(msg)
                if handler is None:
                    log.debug("no handler", extra={"peer": self.peer.short(), "kind": type(msg).__name__})
                    continue
                await handler(self, msg)
                if isinstance(msg, USEFUL_MESSAGES):
                    self.mark_useful()
            except PeerFault as fault:
                if self._faults.on_fault(self.peer, fault):
                    await self.close()
                    return
            except ConnectionClosed:
                return
            except Exception as error:
                # A bug in a handler must cost this connection, not the node.
                self._faults.on_handler_failure(self.peer, error)
                await self.close()
                return

    def __repr__(self) -> str:
        return f"<PeerSession {self.peer.short()} {'out' if self.conn.outbound else 'in'}>"
