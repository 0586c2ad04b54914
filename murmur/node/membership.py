"""Membership: bootstrap, peer exchange, Cyclon shuffles, neighbour links, failures.

Drives the sans-IO :class:`~murmur.protocol.sampling.CyclonSampler` with real
connections. The node's *learning neighbours* are the sessions linked both
ways (see :class:`~murmur.protocol.messages.Link`): we ask the k peers our
sampler picked, and accept a peer that asks us only while we have room
(``max_links``, and ``links_per_subnet`` per /24 or /48), so a stranger's
``Link`` alone never makes it a neighbour, and a flood of them cannot take
more than the room we keep. A refused or withdrawn request is answered with
``Link(active=0)``; whoever chose a peer that refused picks another.

Failure policy: a neighbour whose connection drops is redialled once; if that
fails it is reported to the sampler, which replaces it at once from its view.
A peer that cannot be dialled for a shuffle is reported the same way. So a
killed node is evicted by its neighbours within one redial timeout, and by
everyone else the next time its descriptor (the oldest in a view) is shuffled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from murmur.errors import DecodeError, LimitExceeded, PeerFault, SendTimeout
from murmur.node.ratelimit import RequestBudget
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import (
    Hello,
    Link,
    PeerExchangeRequest,
    PeerExchangeResponse,
    ShuffleRequest,
    ShuffleResponse,
)
from murmur.protocol.discovery import resolve
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, CircuitAddr, DialAddr, Multiaddr, PeerAddr, parse_peer_addr
from murmur.protocol.peertable import PeerTable, parse_peer_entry
from murmur.protocol.sampling import CyclonSampler, Descriptor
from murmur.protocol.subnets import is_loopback, subnet_of
from murmur.protocol.transport import ConnectionClosed
from murmur.tasks import TaskManager

if TYPE_CHECKING:
    from murmur.node.session import Handler, PeerSession

log = logging.getLogger(__name__)

BOOTSTRAP_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
LINK_FAN_IN = 3
"""Learning neighbours per configured k, at most: the k we chose plus up to
2k that chose us. Everyone choosing k gives each node k requests on average,
but Cyclon's choices are not uniform: with room for only k, the most chosen
refused links that then had to be re-chosen, and 8 nodes took more than 10 s to
mesh again after 3 of them crashed. Strangers that take the room are muted
and unlinked (node/silence.py) and never hold a round (probation)."""
MAX_COOLDOWNS = 4096  # peers remembered as not to be re-linked for a while
PEX_MAX_PEERS = 32
PEX_BURST = 2
"""Peer-exchange requests one peer may make of us at once; one more per
shuffle interval; past that it is answered with no peers. An honest node asks
once per connection it bootstraps or reseeds from. Each request was answered
with up to 32 entries of the view, unbudgeted: one peer sent 20,000 requests
(300 KB) in 3 s and had 5.6 MB sent back (a view of 5 entries; a full view
of 20 makes each answer four times that)."""
MAX_CONCURRENT_DIALS = 8
MAX_PENDING_SHUFFLES = 4  # unanswered shuffles kept per peer; past that the oldest is forgotten
SHUFFLE_BURST = 3
"""Shuffle requests one peer may make of us at once; one more per shuffle
interval. An honest node starts one shuffle per interval, with one peer
(its oldest entry), so it never comes near; one attacker identity sent 20
requests a second, each replacing up to l view entries with records it made
up, and held 15 of a victim's 19 view slots within 4 s."""
SHUFFLE_SEND_TIMEOUT_S = 2.0
"""How long our shuffle request may wait for its stream (the target's
answer to multistream-select) and for room on the connection. Shuffles run
one after another; without a deadline a target that took the connection and
then answered nothing held that shuffle, and every later one, for the
transport's negotiate_timeout_s (10.0 s measured), and one that read
nothing until the drain watch cut it (20 s). Its negotiation goes on in the
background and costs it a :class:`~murmur.errors.TimeoutFault` when that
runs out; the shuffle loop moves on now (Cyclon already took the target
out of the view)."""
LINK_SEND_TIMEOUT_S = 2.0
"""How long a Link or Unlink of ours may wait for room on the peer's
connection. :meth:`Membership.maintain` sends them one after another, and
the round loop unlinks silent neighbours: a send to a neighbour whose
connection held more than the write buffer's mark (a big round message
queued to a peer that stopped reading, or to a slow one) held maintenance,
or the rounds, until it drained or the drain watch cut it (22.2 s measured
with an 8 MB model). Not sent by then, the change is undone, as if never
asked: a later :meth:`Membership.maintain` asks again, once the peer's
connection has room (until then it skips the peer at no cost: a deadline
each tick made every tick 2 s longer per such peer), and a slow peer is not
dropped for being slow."""


@dataclass(frozen=True)
class MembershipConfig:
    neighbours: int = 4
    max_links: int = 0  # learning neighbours at most, chosen and accepted; 0: LINK_FAN_IN (3) x neighbours
    links_per_subnet: int = 0  # learning neighbours per /24 (IPv4) or /48 (IPv6); 0: no limit
    link_cooldown_s: float = 60.0  # a peer we unlinked for silence is not accepted again for this long
    shuffle_interval_s: float = 10.0
    maintain_interval_s: float = 1.0
    transient_ttl_s: float = 15.0  # unlinked connections (shuffles, PEX) close after this
    save_interval_s: float = 30.0
    bootstrap: tuple[DialAddr, ...] = ()


class MembershipHost(Protocol):
    """What membership needs from the node."""

    peer_id: PeerId
    addrs: list[Multiaddr]

    def session(self, peer: PeerId) -> PeerSession | None: ...
    def sessions(self) -> list[PeerSession]: ...
    async def connect(self, addrs: Sequence[PeerAddr], peer: PeerId | None = None) -> PeerSession: ...
    def save_peers(self) -> None: ...


SessionPredicate = Callable[["PeerSession"], bool]
LinkListener = Callable[["PeerSession"], Awaitable[None]]


async def _no_listener(session: PeerSession) -> None:
    return None


class Membership:
    """``learning_peer`` says whether a session may be a learning edge at all
    (a learning node: the peer told it a compatible model); ``on_linked``
    runs each time a session becomes a learning edge (the learner brings a
    new neighbour into its open round), ``on_unlinked`` when it stops being one.
    ``pinned`` says whether an unlinked session must stay open all the same
    (the node's relay layer uses its connection: a reservation, circuits).
    ``extra_choices`` says how many more neighbours to choose than the
    configured k, up to k more: chosen neighbours the learner cannot use
    for what it needs k of (with privacy on, a neighbour that never sent a
    key share carries no noise edge)."""

    def __init__(
        self,
        host: MembershipHost,
        sampler: CyclonSampler,
        table: PeerTable,
        config: MembershipConfig,
        tasks: TaskManager,
        rng: random.Random | None = None,
        learning_peer: SessionPredicate = lambda session: True,
        pinned: SessionPredicate = lambda session: False,
        on_linked: LinkListener = _no_listener,
        on_unlinked: LinkListener = _no_listener,
        extra_choices: Callable[[], int] = lambda: 0,
    ) -> None:
        self.host = host
        self.extra_choices = extra_choices
        self.learning_peer = learning_peer
        self.pinned = pinned
        self.on_linked = on_linked
        self.on_unlinked = on_unlinked
        self.sampler = sampler
        self.table = table
        self.config = config
        self._tasks = tasks
        self._rng = rng or random.Random()
        # What each shuffle sent, per peer, oldest first, until its ShuffleResponse:
        # a peer re-learnt from a third node's shuffle can be chosen again before
        # it answered (a node busy with a big model answers late), and answers
        # come in order on one connection.
        self._shuffles: dict[PeerId, deque[tuple[Descriptor, list[Descriptor]]]] = {}
        self._pex_asked: set[PeerId] = set()
        self._shuffle_budgets: dict[PeerId, RequestBudget] = {}  # per connected peer
        self._pex_budgets: dict[PeerId, RequestBudget] = {}  # per connected peer
        self._dialling: set[PeerId] = set()
        self._dial_slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self.evictions = 0
        self.links_refused = 0  # inbound link requests we had no room for
        self._cooldown: dict[PeerId, float] = {}  # peer -> refuse its link requests until (monotonic)
        self._loopback_hinted = False  # the allow_loopback hint is said once a run

    # -- wiring ------------------------------------------------------------------

    def handlers(self) -> Mapping[type, Handler]:
        return {
            Hello: self._on_hello,
            Link: self._on_link,
            ShuffleRequest: self._on_shuffle_request,
            ShuffleResponse: self._on_shuffle_response,
            PeerExchangeRequest: self._on_pex_request,
            PeerExchangeResponse: self._on_pex_response,
        }

    def start(self) -> None:
        unresolvable = [a for a in self.config.bootstrap if a.is_circuit and a.dns]
        if unresolvable:
            log.info("bootstrap circuits through a DNS name are not dialled", extra={
                "event": "bootstrap_circuits", "addrs": [str(a) for a in unresolvable]})
        self._tasks.spawn("bootstrap", self._bootstrap)
        self._tasks.periodic("maintain-neighbours", self.config.maintain_interval_s, self.maintain)
        self._tasks.periodic(
            "shuffle", self.config.shuffle_interval_s, self.shuffle, delay_s=self.config.shuffle_interval_s * self._rng.random()
        )
        self._tasks.periodic("save-peers", self.config.save_interval_s, self._save, delay_s=self.config.save_interval_s)

    async def _save(self) -> None:
        self.host.save_peers()

    # -- neighbours --------------------------------------------------------------

    @property
    def max_links(self) -> int:
        return self.config.max_links or LINK_FAN_IN * self.config.neighbours

    def learning_neighbours(self) -> list[PeerSession]:
        """Connected peers on a learning edge (linked both ways)."""
        return [s for s in self.host.sessions() if s.linked and not s.closed and self.learning_peer(s)]

    def _room_for(self, session: PeerSession) -> bool:
        """Whether we accept ``session``'s link request: a learning peer, not
        cooling off, within the link budget and its subnet's share of it."""
        if not self.learning_peer(session) or self._cooldown.get(session.peer, 0.0) > time.monotonic():
            return False
        linked = [s for s in self.learning_neighbours() if s is not session]
        # Our own k choices keep their slots: accepted requests fill the rest.
        if sum(1 for s in linked if not s.chosen) >= self.max_links - self.chosen_target():
            return False
        limit = self.config.links_per_subnet
        if limit and not self._subnet_exempt(session):
            subnet = subnet_of(session.conn.remote[0])
            if sum(1 for s in linked if subnet_of(s.conn.remote[0]) == subnet) >= limit:
                self._hint_loopback(session, "refused a learning edge from a node on this machine")
                return False
        return True

    def _subnet_exempt(self, session: PeerSession) -> bool:
        return self.sampler.config.allow_loopback_flood and is_loopback(session.conn.remote[0])

    def _hint_loopback(self, session: PeerSession, what: str) -> None:
        """Say once why nodes on one machine do not all link. Four daemons
        started on one machine without allow_loopback: one of them had every
        learning edge refused (the others were full of 127.0.0.0/24), gave up
        on each for the sampler's failure memory, and trained alone for the
        whole run, with nothing in its log to say why."""
        if self._loopback_hinted or self._subnet_exempt(session) or not is_loopback(session.conn.remote[0]):
            return
        self._loopback_hinted = True
        log.warning(f"{what}: the Sybil limits count all of 127.0.0.0/24 as one operator "
                    "(network.subnet_bucket_size); nodes on one machine need network.allow_loopback = true",
                    extra={"event": "loopback_hint", "peer": str(session.peer)})

    async def unlink(self, session: PeerSession, cooldown_s: float | None = None, reason: str = "") -> None:
        """End a learning edge from our side (a neighbour that sends nothing
        usable); with ``cooldown_s`` its requests are refused for that long."""
        if cooldown_s:
            self._cooldown[session.peer] = time.monotonic() + cooldown_s
            while len(self._cooldown) > MAX_COOLDOWNS:
                del self._cooldown[next(iter(self._cooldown))]
            if session.chosen:
                self.sampler.on_failure(session.peer)  # the sampler picks someone else
        log.info("unlinked", extra={"event": "unlinked", "peer": str(session.peer), "reason": reason})
        await self._set_link(session, False)

    def chosen_target(self) -> int:
        """How many neighbours we choose: k, plus those of our choices that do
        not count (``extra_choices``), at most 2k."""
        k = self.config.neighbours
        return k + max(0, min(k, self.extra_choices()))

    def degree(self) -> int:
        return len(self.learning_neighbours())

    async def maintain(self) -> None:
        """Keep a link to each of the sampler's k neighbours; drop stale links
        and idle transient connections."""
        targets = self.sampler.neighbours(self.chosen_target())
        target_set = set(targets)
        for peer in targets:
            session = self.host.session(peer)
            if session is None:
                desc = self.sampler.descriptor(peer) or self._neighbour_descriptor(peer)
                if desc is not None and peer not in self._dialling:
                    self._tasks.spawn(f"link-{peer.short()}", lambda d=desc: self._dial_neighbour(d), replace=True)
            elif not session.link_out and session.greeted and session.conn.has_write_room:
                # (else our greeting is still on its way, or the peer has not read what we sent: next tick)
                await self._set_link(session, True, chosen=True)
        now = time.monotonic()
        for session in self.host.sessions():
            if (session.link_out and session.chosen and session.peer not in target_set
                    and session.conn.has_write_room):  # else a later tick, see LINK_SEND_TIMEOUT_S
                await self._set_link(session, False)  # the sampler moved on (a link we accepted stays)
            idle = now - session.last_message_at
            if (not session.linked and session.peer not in self._shuffles and idle > self.config.transient_ttl_s
                    and not self.pinned(session)):
                await session.close()

    def _neighbour_descriptor(self, peer: PeerId) -> Descriptor | None:
        for desc in self.sampler.neighbour_descriptors():
            if desc.peer == peer:
                return desc
        return None

    async def _set_link(self, session: PeerSession, active: bool, chosen: bool = False) -> None:
        """Ask for (or accept) a learning edge, or end or refuse one.

        The state changes at once, with the caller's room check (no await in
        between: two requests cannot both take the last slot). A request or an
        acceptance goes on the wire only after our greeting (Hello, then
        LearnerInfo, on the same stream): the peer judges a Link by our
        LearnerInfo, and one that overtook it was refused, and the peer's
        sampler shunned us for ``failed_memory_s``."""
        was, was_out, was_chosen = session.linked, session.link_out, session.chosen
        session.link_out = active
        session.chosen = active and chosen
        if active and not session.greeted:
            if not await session.speaks_murmur():
                return  # the connection ended (or it speaks no murmur) before our greeting went
            if not session.link_out:
                return  # withdrawn meanwhile: that Link(active=0) already went
        try:
            await session.send(Link(active=int(active), degree=self.degree()), time.monotonic() + LINK_SEND_TIMEOUT_S)
        except ConnectionClosed:
            return
        except SendTimeout as exc:
            # Not sent: undone, unless changed meanwhile (LINK_SEND_TIMEOUT_S).
            if session.link_out is active and session.chosen is (active and chosen):
                session.link_out, session.chosen = was_out, was_chosen
            log.debug("link change not sent by its deadline", extra={"peer": str(session.peer), "active": active,
                                                                      "error": str(exc)})
            return
        await self._notify(session, was)

    async def _dial_neighbour(self, desc: Descriptor) -> None:
        self._dialling.add(desc.peer)
        try:
            session = await self._dial(desc.addrs, desc.peer)
            if session is not None:
                await self._set_link(session, True, chosen=True)
        finally:
            self._dialling.discard(desc.peer)

    async def _dial(self, addrs: Sequence[PeerAddr], peer: PeerId) -> PeerSession | None:
        """Dial ``peer``; on failure report it to the sampler and the table."""
        async with self._dial_slots:
            try:
                return await self.host.connect(addrs, peer)
            except (OSError, PeerFault, ConnectionClosed) as exc:
                self.report_failure(peer, reason=f"{type(exc).__name__}: {exc}")
                return None

    def report_failure(self, peer: PeerId, reason: str, penalise: bool = True) -> None:
        """``peer`` is gone: out of the view and the neighbours (replaced at
        once), and, with ``penalise``, a failure on its score (a dial or a
        request that failed; not a peer that said goodbye)."""
        neighbour = any(desc.peer == peer for desc in self.sampler.neighbour_descriptors())
        replacements = self.sampler.on_failure(peer)
        if penalise:
            self.table.mark_failure(peer)
        self.evictions += 1
        # INFO only for a neighbour of ours: any stranger, or a stream of fresh
        # identities saying goodbye, caused one line each (300 in a second).
        log.log(
            logging.INFO if neighbour else logging.DEBUG,
            "peer evicted",
            extra={"event": "evicted", "peer": str(peer), "reason": reason, "replacements": [str(p) for p in replacements]},
        )

    async def on_session_closed(self, session: PeerSession) -> None:
        """A connection ended. A neighbour gets one redial before it is evicted."""
        self._shuffles.pop(session.peer, None)
        self._shuffle_budgets.pop(session.peer, None)
        self._pex_budgets.pop(session.peer, None)
        if not session.link_out:
            return
        desc = self._neighbour_descriptor(session.peer) or self.sampler.descriptor(session.peer)
        addrs = desc.addrs if desc is not None else session.addrs
        if not addrs:
            self.report_failure(session.peer, reason="connection lost, no address to redial")
            return
        self._tasks.spawn(f"link-{session.peer.short()}", lambda: self._dial_neighbour_addrs(session.peer, addrs), replace=True)

    async def _dial_neighbour_addrs(self, peer: PeerId, addrs: Sequence[PeerAddr]) -> None:
        await self._dial_neighbour(Descriptor(peer, tuple(addrs)))

    # -- hello / link ------------------------------------------------------------

    def observed_addrs(self, session: PeerSession, claimed: Iterable[str]) -> tuple[PeerAddr, ...]:
        """The peer's listen addresses, rewritten to the host we actually see it
        connect from (libp2p's "observed address"): a peer cannot make us file
        it under another subnet than the one it really talks from.

        Relay circuits it names (at most :data:`MAX_CIRCUIT_ADDRS`) are kept as
        they are: they are how a private peer is reached. Over a relayed
        connection the host we see is the relay's, so the peer's direct
        addresses cannot be checked (nor filed under the relay's IP): only its
        circuits are kept."""
        host = session.conn.remote[0]
        relayed = session.conn.relay is not None
        out: list[PeerAddr] = []
        circuits = 0
        for text in claimed:
            try:
                addr = parse_peer_addr(text)
            except ValueError as exc:
                raise DecodeError(f"bad listen address in Hello: {exc}") from None
            if addr.port == 0:
                continue
            fixed: PeerAddr
            if isinstance(addr, CircuitAddr):
                if addr.relay.peer_id == session.peer or addr.peer_id not in (None, session.peer):
                    raise DecodeError(f"Hello names a circuit through the peer itself or to another: {text}")
                circuits += 1
                if circuits > MAX_CIRCUIT_ADDRS:
                    raise LimitExceeded(f"Hello names more than {MAX_CIRCUIT_ADDRS} relay circuits")
                fixed = addr.without_peer()
            elif relayed:
                continue
            else:
                fixed = Multiaddr(host, addr.port)
            if fixed not in out:
                out.append(fixed)
        return tuple(out)

    async def _on_hello(self, session: PeerSession, msg: Hello) -> None:
        if session.hello is not None:
            raise DecodeError("second Hello on one connection")
        session.hello = msg
        session.peer_degree = max(1, msg.degree)
        addrs = self.observed_addrs(session, msg.listen_addrs)
        session.addrs = addrs
        self.sampler.on_alive(session.peer)
        self.sampler.on_contact(session.peer, addrs)
        self.table.observe(session.peer, addrs)
        self.table.mark_alive(session.peer)
        if addrs and not self.sampler.add(session.peer, addrs) and len(self.sampler) < self.sampler.config.view_size:
            self._hint_loopback(session, "a node on this machine was left out of the peer view")

    async def _on_link(self, session: PeerSession, msg: Link) -> None:
        """A request (or its acceptance) when ``active``, else a refusal or a
        withdrawal. Only an edge both sides asked for counts."""
        was = session.linked
        session.peer_degree = max(1, msg.degree)
        if msg.active:
            session.link_in = True
            if not session.link_out:
                if self._room_for(session):
                    await self._set_link(session, True)  # accept: the edge is mutual from here
                else:
                    self.links_refused += 1
                    await self._set_link(session, False)  # refuse, once per request
                return
        else:
            session.link_in = False
            if session.link_out and session.chosen:
                # It refused our request or left the edge: the sampler picks
                # someone else for a while (no penalty: a full node is no fault).
                self.sampler.on_refused(session.peer)
                if not was:  # a refusal of our request, not an edge it left
                    self._hint_loopback(session, "a node on this machine refused our learning edge")
            session.link_out = session.chosen = False
        await self._notify(session, was)

    async def _notify(self, session: PeerSession, was: bool) -> None:
        if session.linked and not was:
            await self.on_linked(session)
        elif was and not session.linked:
            await self.on_unlinked(session)

    # -- bootstrap and peer exchange ----------------------------------------------

    async def _bootstrap(self) -> None:
        """Dial bootstrap peers (with back-off) until we know somebody. DNS
        names are resolved on every try; a relay circuit is dialled through its
        relay (one whose relay is a DNS name is kept but not dialled: resolve it
        in the config)."""
        dialable = self._dialable_bootstrap()
        if not dialable:
            return
        attempt = 0
        while True:
            for addr in dialable:
                try:
                    if addr.is_circuit:
                        targets: Sequence[PeerAddr] = [CircuitAddr.parse(str(addr)).without_peer()]
                    else:
                        targets = [t.without_peer() for t in await resolve(addr)]
                    session = await self.host.connect(targets, addr.peer_id)
                except (OSError, PeerFault, ConnectionClosed) as exc:
                    log.info("bootstrap dial failed", extra={"addr": str(addr), "error": str(exc)})
                    continue
                try:
                    await self.request_peers(session)
                except (PeerFault, ConnectionClosed) as exc:
                    # The session went between the dial and the request (the
                    # peer was killed, or closed this connection as the
                    # duplicate of one it dialled us on): unhandled, it ended the
                    # bootstrap task as a crash, and the daemon with exit 1.
                    log.info("bootstrap peer exchange failed", extra={"addr": str(addr), "error": str(exc)})
            if len(self.sampler) > 0 or self.host.sessions():
                return
            await asyncio.sleep(BOOTSTRAP_BACKOFF_S[min(attempt, len(BOOTSTRAP_BACKOFF_S) - 1)])
            attempt += 1

    def _dialable_bootstrap(self) -> list[DialAddr]:
        return [a for a in self.config.bootstrap if not (a.is_circuit and a.dns) and a.peer_id != self.host.peer_id
                and not (a.is_circuit and a.peer_id is None)]  # CONNECT must name its target

    async def request_peers(self, session: PeerSession) -> None:
        """Ask ``session``'s peer for peers; raises ConnectionClosed (and
        expects no answer) when the request could not be sent."""
        self._pex_asked.add(session.peer)
        try:
            await session.send(PeerExchangeRequest(max_peers=PEX_MAX_PEERS))
        except ConnectionClosed:
            # Not asked: the peer's other connection (the duplicate that was
            # kept) must not look as if an answer were coming (_reseed waits).
            self._pex_asked.discard(session.peer)
            raise

    async def _on_pex_request(self, session: PeerSession, msg: PeerExchangeRequest) -> None:
        budget = self._pex_budgets.get(session.peer)
        if budget is None:
            budget = self._pex_budgets[session.peer] = RequestBudget(PEX_BURST, self.config.shuffle_interval_s)
        if not budget.take():
            # Answered (its sender waits for one answer per request), with nobody: no fault,
            # as for shuffles over budget (an honest node reseeding twice in a row may ask early).
            await session.send(PeerExchangeResponse(peers=()))
            return
        view = [d for d in self.sampler.view() if d.peer != session.peer]
        chosen = self._rng.sample(view, min(msg.max_peers, len(view)))
        peers = [(d.peer, tuple(str(a) for a in d.addrs)) for d in chosen]
        await session.send(PeerExchangeResponse(peers=tuple(peers)))

    async def _on_pex_response(self, session: PeerSession, msg: PeerExchangeResponse) -> None:
        if session.peer not in self._pex_asked:
            raise LimitExceeded("unsolicited peer exchange response")
        self._pex_asked.discard(session.peer)
        for peer, addr_texts in msg.peers:
            peer_id, addrs = parse_peer_entry(peer.raw, list(addr_texts), self.sampler.config.max_entry_addrs)
            if peer_id == self.host.peer_id or self.table.is_banned(peer_id):
                continue
            self.table.add(peer_id, addrs)
            self.sampler.add(peer_id, addrs)

    # -- Cyclon shuffles -----------------------------------------------------------

    async def shuffle(self) -> None:
        started = self.sampler.start_shuffle()
        if started is None:
            await self._reseed()
            return
        target, entries = started
        session = self.host.session(target.peer) or await self._dial(target.addrs, target.peer)
        if session is None:
            return
        pending = self._shuffles.setdefault(target.peer, deque(maxlen=MAX_PENDING_SHUFFLES))
        pending.append((target, entries))
        try:
            await session.send(ShuffleRequest(entries=tuple(self._wire(entries))),
                               time.monotonic() + SHUFFLE_SEND_TIMEOUT_S)
        except ConnectionClosed:
            self._shuffles.pop(target.peer, None)
            self.report_failure(target.peer, reason="closed during shuffle")
        except SendTimeout as exc:
            # Not sent: no answer is coming. No failure report: a slow link (a
            # big delta in its send buffer) is no dead peer, and a neighbour
            # must not be replaced for it; a silent one pays its own timeout.
            self._forget_shuffle(target.peer, pending)
            log.debug("shuffle request not sent by its deadline", extra={"peer": str(target.peer), "error": str(exc)})

    def _forget_shuffle(self, peer: PeerId, pending: deque[tuple[Descriptor, list[Descriptor]]]) -> None:
        """Drop the newest pending shuffle of ``peer`` (one that never went out)."""
        if pending:
            pending.pop()
        if not pending and self._shuffles.get(peer) is pending:
            del self._shuffles[peer]

    async def _reseed(self) -> None:
        """An empty view (every peer it knew failed: say, a node behind NAT that
        dialled its peers' routers before their circuits were known) would never
        shuffle again and be forgotten: put the peers we are connected to back
        in it, and ask one of them for peers (peer exchange)."""
        sessions = [s for s in self.host.sessions() if not s.closed and s.hello is not None]
        if not sessions:
            self._rebootstrap()
            return
        for session in sessions:
            self.sampler.on_alive(session.peer)
            if session.addrs:
                self.sampler.add(session.peer, session.addrs)
        if sessions and not any(s.peer in self._pex_asked for s in sessions):
            try:
                await self.request_peers(self._rng.choice(sessions))
            except ConnectionClosed:
                pass

    def _rebootstrap(self) -> None:
        """Nobody left (the peers we knew left or failed, say the one public
        node a NATed node dialled restarted): dial the bootstrap peers again,
        with their back-off, until somebody answers. The peers cannot dial a
        node they never learnt, or one behind a NAT: without this it stayed
        alone for good."""
        if "bootstrap" in self._tasks or not self._dialable_bootstrap():
            return
        log.info("no peers left; dialling the bootstrap peers again", extra={"event": "rebootstrap"})
        self._tasks.spawn("bootstrap", self._bootstrap)

    @staticmethod
    def _wire(entries: Iterable[Descriptor]) -> list[tuple[PeerId, tuple[str, ...], int]]:
        return [(d.peer, tuple(str(a) for a in d.addrs), d.age) for d in entries]

    def _descriptors(self, entries: Sequence[tuple[PeerId, tuple[str, ...], int]]) -> list[Descriptor]:
        """The first ``shuffle_length`` entries (a shuffle carries l, the
        sender's own first): the 64 a message may hold filled a view's free
        slots with one stranger's records at once."""
        out: dict[PeerId, Descriptor] = {}
        for peer, addr_texts, age in entries[: self.sampler.config.shuffle_length]:
            peer_id, addrs = parse_peer_entry(peer.raw, list(addr_texts), self.sampler.config.max_entry_addrs)
            out.setdefault(peer_id, Descriptor(peer_id, addrs, age))
        return list(out.values())

    def _shuffle_budget(self, peer: PeerId) -> RequestBudget:
        budget = self._shuffle_budgets.get(peer)
        if budget is None:
            budget = self._shuffle_budgets[peer] = RequestBudget(SHUFFLE_BURST, self.config.shuffle_interval_s)
        return budget

    async def _on_shuffle_request(self, session: PeerSession, msg: ShuffleRequest) -> None:
        if not self._shuffle_budget(session.peer).take():
            # Over its budget: answered (its sender waits for one answer per request), nothing merged.
            log.debug("shuffle request over the sender's budget ignored", extra={"peer": str(session.peer)})
            await session.send(ShuffleResponse(entries=()))
            return
        received = self._descriptors(msg.entries)
        reply = self.sampler.on_shuffle_request(session.peer, received, self._source_key(session))
        await session.send(ShuffleResponse(entries=tuple(self._wire(reply))))

    async def _on_shuffle_response(self, session: PeerSession, msg: ShuffleResponse) -> None:
        pending = self._shuffles.get(session.peer)
        if not pending:
            raise LimitExceeded("unsolicited shuffle response")
        target, sent = pending.popleft()
        if not pending:
            del self._shuffles[session.peer]
        self.sampler.on_shuffle_response(sent, self._descriptors(msg.entries), target, self._source_key(session))

    def _source_key(self, session: PeerSession) -> Hashable:
        """Whose word a shuffle's records are, for the sampler's share per
        source (``max_per_source``): the /24 (/48) the peer talks from, as
        the subnet buckets count, so identities one host mints share one
        share; the peer itself over a relay (the address is the relay's) or
        where loopback is exempted (a local testnet: every node is 127.0.0.1)."""
        if session.conn.relay is not None or self._subnet_exempt(session):
            return session.peer
        return subnet_of(session.conn.remote[0])

    def status(self) -> dict[str, Any]:
        return {
            "view": len(self.sampler),
            "neighbours": [str(s.peer) for s in self.learning_neighbours()],
            "evictions": self.evictions,
            "links_refused": self.links_refused,
        }
