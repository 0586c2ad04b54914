"""One authenticated connection to one peer, and the message dispatch for it.

murmur's messages travel on libp2p streams, one per protocol id
(:class:`~murmur.protocol.messages.MurmurProtocol`): each side sends on a
stream it opened for that protocol (negotiated with multistream-select on
first use, then kept) and reads the streams the peer opened. :meth:`PeerSession.send`
routes a message to its protocol's stream; :meth:`PeerSession.serve` is the
receive loop of one inbound stream. Every decoded message goes to the
handler registered for its class in a :class:`Dispatcher` (one table, filled
by the node's components at start). Every :class:`~murmur.errors.PeerFault`
raised while decoding or handling is caught here, in one place: the peer is
penalised, the fault is counted, and the connection is dropped when the
fault says so. Nothing a peer sends can take the node down.

Usefulness: the transport protects the inbound slots of connections the node
marks useful (:meth:`PeerSession.mark_useful`) from eviction by newcomers.
The session marks one whenever a message of a kind in :data:`USEFUL_MESSAGES`
was handled without a fault (a signed delta or model, verified, addressed to
us); a component that knows better (the learner, about the neighbours it
chose) may call ``mark_useful`` itself. Pings, ``Hello`` and ``Link`` cost a
stranger nothing and never count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from murmur.errors import NoCommonProtocol, PeerFault, SendTimeout
from murmur.node.links import LinkPacer
from murmur.node.metrics import Direction, NodeMetrics
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p import Libp2pConnection, Stream
from murmur.protocol.messages import (
    DeltaEnd,
    Encoded,
    Message,
    MurmurProtocol,
    SchemaError,
    decode,
    encode_parts,
    protocol_of,
    protocol_of_envelope,
)
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed

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


class ProtocolNotSupported(ConnectionClosed):
    """The peer does not speak the protocol a message travels on (it refused
    the stream): for the sender, the message was not delivered."""


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Mark a negotiation's outcome as seen: every caller that still waited
    got it, and one whose deadline came first no longer wants it."""
    if not task.cancelled():
        task.exception()


class PeerSession:
    """State we keep about a connected peer."""

    def __init__(self, conn: Libp2pConnection, dispatcher: Dispatcher, metrics: NodeMetrics, faults: FaultSink,
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
        self._out: dict[MurmurProtocol, Stream] = {}  # the stream we send each protocol's messages on
        self._opening: dict[MurmurProtocol, asyncio.Task[Stream]] = {}  # negotiations under way (stream)
        self._murmur: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.foreign = False  # the peer refused murmur's hello protocol: a plain libp2p peer

    def murmur_peer(self, speaks: bool) -> None:
        """Settle :meth:`speaks_murmur` (once): the peer took our greeting on
        murmur's hello protocol, or refused it (or the connection ended first)."""
        if not self._murmur.done():
            self._murmur.set_result(speaks)

    async def speaks_murmur(self) -> bool:
        """Whether the peer speaks murmur's protocols: known once our greeting
        (``Hello``, and a learner's ``LearnerInfo``) is on its way."""
        return await asyncio.shield(self._murmur)

    @property
    def greeted(self) -> bool:
        """Our greeting is on its way and the peer took it (see :meth:`speaks_murmur`)."""
        return self._murmur.done() and self._murmur.result()

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def linked(self) -> bool:
        """A learning edge: both sides asked for it (or accepted the other's request)."""
        return self.link_in and self.link_out

    async def send(self, msg: Message, deadline: float | None = None) -> None:
        """Encode and send one message; raises ConnectionClosed if the peer is
        gone (or refuses the message's protocol: :class:`ProtocolNotSupported`),
        SendTimeout if it has not made room by ``deadline``
        (``time.monotonic()`` seconds; see ``Stream.send_message``)."""
        await self.send_encoded(encode_parts(msg), type(msg).__name__, deadline)

    async def send_encoded(self, parts: Encoded, kind: str, deadline: float | None = None) -> None:
        protocol = protocol_of_envelope(parts[0])
        stream = await self.stream(protocol, deadline)
        nbytes = sum(memoryview(part).nbytes for part in parts)
        if self._pacer is not None:
            await self._pacer.before_send(nbytes)
        try:
            await stream.send_message(*parts, deadline=deadline)
        except ConnectionClosed:
            self._out.pop(protocol, None)  # reset by the peer: the next message opens a new one
            raise
        self._metrics.add_bytes(Direction.OUT, nbytes)
        self._metrics.message(Direction.OUT, kind)

    async def stream(self, protocol: MurmurProtocol, deadline: float | None = None) -> Stream:
        """Our stream for ``protocol``'s messages, opened (and negotiated) on first use.

        A peer that refuses the protocol is :class:`ProtocolNotSupported`.
        The negotiation runs as a task of its own with the transport's
        ``negotiate_timeout_s``, not the caller's ``deadline``: a caller whose
        deadline comes first gets :class:`SendTimeout` and the negotiation
        goes on. Bounded by each round's deadline, a linked peer that never
        answered was asked again every round and held every round's sends to
        the deadline, unpunished; now it is asked once, and when the transport's
        timeout runs out it is a :class:`~murmur.errors.TimeoutFault` for its
        score (and the connection is closed)."""
        stream = self._out.get(protocol)
        if stream is not None and not stream.is_reset:
            return stream
        opening = self._opening.get(protocol)
        if opening is None or opening.done():
            opening = asyncio.get_running_loop().create_task(
                self._open(protocol), name=f"open-{protocol}-{self.peer.short()}")
            opening.add_done_callback(_retrieved)
            self._opening[protocol] = opening
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise SendTimeout(f"no {protocol} stream to {self.peer.short()} by the deadline")
        try:
            return await asyncio.wait_for(asyncio.shield(opening), timeout)
        except TimeoutError:
            raise SendTimeout(f"{self.peer.short()} did not negotiate {protocol} by the deadline") from None

    async def _open(self, protocol: MurmurProtocol) -> Stream:
        try:
            stream = await self.conn.open_stream(protocol)
        except NoCommonProtocol:
            raise ProtocolNotSupported(f"{self.peer.short()} does not speak {protocol}") from None
        except PeerFault as fault:  # TimeoutFault included: no answer within negotiate_timeout_s
            if self._faults.on_fault(self.peer, fault):
                await self.close()
            raise ConnectionClosed(f"negotiating {protocol} with {self.peer.short()} failed") from fault
        stream.close_read()  # ours to send on: the peer answers on its own streams
        self._out[protocol] = stream
        return stream

    def mark_useful(self) -> None:
        """The peer just delivered something of value: its inbound slot is
        protected from eviction for ``transport.useful_ttl_s``."""
        self.conn.mark_useful()

    async def close(self) -> None:
        await self.conn.close()
        for opening in self._opening.values():  # they end with the connection; no task outlives it
            if opening is not asyncio.current_task():  # (a negotiation that failed closes us itself)
                opening.cancel()

    async def serve(self, stream: Stream) -> None:
        """Receive and dispatch ``stream``'s messages until it ends or a fault drops the peer."""
        protocol = stream.protocol
        while True:
            try:
                parts = await stream.recv_parts()  # a chunk's payload stays sealed until it lands
            except ConnectionClosed:
                return
            except PeerFault as fault:  # the stream's framing: a message too large, cut short
                stream.reset()
                if self._faults.on_fault(self.peer, fault):
                    await self.close()
                return
            if parts is None:
                return
            head, tail = parts
            size = len(head) + (0 if tail is None else tail.nbytes)
            self.last_message_at = time.monotonic()
            self._metrics.add_bytes(Direction.IN, size)
            if self._pacer is not None:  # hold this reader until the emulated download link carried it
                await self._pacer.after_receive(size)
            try:
                msg = decode(head, tail)
                self._metrics.message(Direction.IN, type(msg).__name__)
                if protocol_of(type(msg)) != protocol:
                    raise SchemaError(f"{type(msg).__name__} on a {protocol} stream")
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
                if self.closed:
                    return
                # else a reply the handler sent found its stream refused or reset: not this stream's end
            except Exception as error:
                # A bug in a handler must cost this connection, not the node.
                self._faults.on_handler_failure(self.peer, error)
                await self.close()
                return

    def __repr__(self) -> str:
        return f"<PeerSession {self.peer.short()} {'out' if self.conn.outbound else 'in'}>"
