"""The murmur node daemon: wires the libp2p host, membership, gossip, learning and the API.

Lifetime is explicit: ``async with Node(config) as node:`` starts everything
(state-dir lock, identity, listeners, API, background tasks) and, on exit,
stops it in reverse order within a few seconds: the learner persists its
checkpoint, peers get a Goodbye, connections close, the peer table is saved
and the state-dir lock is released. :func:`run_node` wraps that for the CLI
with SIGINT/SIGTERM handling.

Health: a supervised task of the node (the learner's rounds, membership's
maintenance, ...) that crashes makes :meth:`Node.health` report it, so
``GET /healthz`` answers 503 and ``/status`` carries the error; the daemon
then shuts down and exits 1 (:meth:`Node.serve_until`), unless
``node.keep_serving_after_crash``. Per-connection tasks (transport, sessions)
are not part of it: what a remote peer sends may cost its connection, never
the node's health.

Connections: the node's :class:`~murmur.protocol.libp2p.Libp2pHost` speaks
murmur's fast path to murmur nodes and ``/noise`` + ``/yamux/1.0.0`` to any
libp2p peer; every connection runs identify and ping. A peer that speaks
murmur's protocols (it accepts ``/murmur/hello/1.0.0``) gets a
:class:`~murmur.node.session.PeerSession`; one that does not is kept as a
plain libp2p connection (identify, ping; later relaying), never a learning
neighbour and out of the sampler's view (:meth:`Node.refuse_learning`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from murmur import __version__
from murmur.errors import LimitExceeded, OptionError, PeerFault, SendTimeout, TaskCrashed, TrainerCrashed
from murmur.node.startgate import StartGate
from murmur.node.api import StatusApi
from murmur.node.autonat import AutoNATProber
from murmur.node.autorelay import AutoRelay
from murmur.node.config import AUTO, NodeConfig, compression_advice
from murmur.node.dialrace import CIRCUIT_DIAL_DELAY_S, Lane, first_of
from murmur.node.links import LinkPacer
from murmur.node.membership import Membership, MembershipConfig
from murmur.node.metrics import NodeMetrics
from murmur.node.outbox import Outbox
from murmur.node.preflight import bind_problem
from murmur.node.progress import ROUNDS_TASK, progress, resumed_eval
from murmur.node.ratelimit import RequestBudget
from murmur.node.session import Dispatcher, PeerSession, ProtocolNotSupported
from murmur.node.state import ApiInfo, StateDir
from murmur.protocol.addresses import advertised
from murmur.protocol.discovery import MdnsConfig, MdnsDiscovery
from murmur.protocol.gossip import FloodGossip, GossipMessage
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p import HostConfig, Libp2pConnection, Libp2pHost, Stream
from murmur.protocol.messages import Gossip, Goodbye, Hello, MurmurProtocol
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, AnyMultiaddr, CircuitAddr, Multiaddr, PeerAddr
from murmur.protocol.peertable import PeerTable, PeerTableConfig
from murmur.protocol.libp2p.autonat import AutoNATClient, AutoNATServer
from murmur.protocol.dcutr import PROTOCOL as DCUTR
from murmur.protocol.libp2p.dcutr import DcutrConfig, HolePuncher
from murmur.protocol.libp2p.dcutr import stat_names as dcutr_stat_names
from murmur.protocol.libp2p.relay import RelayClient, RelayRefused, RelayService
from murmur.protocol.libp2p.relay import stat_names as relay_stat_names
from murmur.protocol.reachability import Reachability, ReachabilityTracker
from murmur.protocol.sampling import CyclonSampler
from murmur.protocol.transport import ConnectionClosed, tune_allocator
from murmur.ratelog import LogBudget, RateLimitedLog
from murmur.tasks import TaskFailure, TaskManager

log = logging.getLogger(__name__)

AGENT = f"murmur/{__version__}"
GOODBYE_TIMEOUT_S = 1.0
# What a failed dial of one address raises: the next address (or lane) is tried.
DIAL_FAILURES = (OSError, PeerFault, ConnectionClosed, RelayRefused, TimeoutError)


class CircuitRefused(ConnectionClosed):
    """Every address of a dial failed, the last one a relay circuit the relay
    refused (say NO_RESERVATION: the peer behind it was killed). For the
    caller the peer is unreachable like any other: ``RelayRefused`` is no
    ``OSError``, ``PeerFault`` or ``ConnectionClosed``, and escaped from
    :meth:`Node.connect` past membership's handlers, which ended the
    ``bootstrap`` or a ``link-*`` task as a crash, and the daemon with exit 1."""
AUTONAT_FIRST_CHECK_S = 5.0  # the first dial-back check: peers connected and identified by then

MAX_INCOMPATIBLE_PEERS = 4096  # peers remembered as running another model
NO_MURMUR = "speaks no murmur protocol"  # why a libp2p peer is no learning neighbour (see _keep_foreign)
LEARNING_OFF = "learning.enabled = false: this node only relays (membership, gossip) and trains nothing"
"""Why a node has no learner, in its WARNING at start and in its status."""

PEER_LOG_BUDGET = LogBudget(per_key=3, total=30, window_s=60.0)
"""Lines a peer's faults and the handler failures it causes may write (per
peer, and all peers together, per minute); the rest are counted, and one
summary line per minute says how many and from whom."""

GOSSIP_UNIT_BYTES = 16 * 1024  # a gossip message costs 1 + payload // this
GOSSIP_BURST = 64  # units a peer may send at once: four messages of the largest payload
GOSSIP_REFILL_S = 0.05  # then one unit every this often: 20 a second, ~320 KiB/s of payload
GOSSIP_OUT_BURST = GOSSIP_BURST // 2
GOSSIP_OUT_REFILL_S = GOSSIP_REFILL_S * 2
# What we send one peer (our own and what we forward), at most: half of what
# it takes from us before it charges us. Forwarding is the sum of everybody's
# gossip, not our own doing: two peers publishing 12 messages a second each
# (well within their budgets) through a node had it banned by its other
# neighbour in 14 s, for traffic it only passed on. The half left over
# absorbs messages that arrive bunched (a stalled connection, then all at once).
GOSSIP_SEND_TIMEOUT_S = 2.0
"""How long one forward to one peer may take, its stream's negotiation
included. Forwards went to one target after another without a deadline: a
neighbour that never answered multistream-select held every forward, and the
stream of the peer the gossip came from, until negotiate_timeout_s gave up
on it (three messages reached the other neighbours after 10.0 s)."""
GOSSIP_WAIT_S = 0.25
"""How long a forward waits for its per-peer sends (each its own task, see
:class:`~murmur.node.outbox.Outbox`) before it moves on; a send still running
then finishes alone, and its peer skips the messages forwarded meanwhile
(flood gossip: it hears them from others). Honest sends are done in
microseconds, so a burst keeps its order to every peer that keeps up."""

GossipSubscriber = Callable[[PeerId, bytes], None]


class Node:
    """One murmur peer."""

    def __init__(self, config: NodeConfig, *, start_gate: StartGate | None = None) -> None:
        self.config = config
        self.start_gate = start_gate  # holds the learner's first round (a testnet's; None: not held)
        self.state = StateDir(config.node.data_dir)
        self.metrics = NodeMetrics()
        # Emulated link rates ([link]): every session paces through these node-wide buckets.
        self.link_pacer = LinkPacer(config.link.upload_bytes_s, config.link.download_bytes_s)
        self.tasks = TaskManager("node", on_crash=self._on_task_crash)
        self._crashed = asyncio.Event()
        self.metrics.healthy.set_function(lambda: float(self.healthy()))
        self.metrics.failed_tasks.set_function(lambda: float(len(self._failed_tasks())))
        self.dispatcher = Dispatcher()
        self.addrs: list[Multiaddr] = []
        self.reachability = ReachabilityTracker()  # fed by identify's observed addresses and AutoNAT's dial-backs
        self.metrics.bind_reachability(lambda: self.reachability.reachability(time.monotonic()))
        self.started_at = time.monotonic()
        self._sessions: dict[PeerId, PeerSession] = {}
        self._by_conn: dict[Libp2pConnection, PeerSession] = {}
        self._foreign: dict[PeerId, Libp2pConnection] = {}  # peers that speak no murmur protocol
        self._dials: dict[PeerId, asyncio.Future[PeerSession]] = {}
        self._subscribers: dict[str, list[GossipSubscriber]] = {}
        self._gossip_budgets: dict[PeerId, RequestBudget] = {}  # per session: what it may make us forward
        self._gossip_out: dict[PeerId, RequestBudget] = {}  # per session: what we may send it
        self.gossip_held_back = 0  # sends skipped: over a peer's GOSSIP_OUT budget, or its last send still running
        self._gossip_sends = Outbox()  # one forward at a time per peer, none waiting on another (GOSSIP_SEND_TIMEOUT_S)
        self._faults: dict[str, int] = {}
        self.peer_log = RateLimitedLog("peer faults", log, PEER_LOG_BUDGET)
        self._api: StatusApi | None = None
        self._mdns: MdnsDiscovery | None = None
        self.learner: Any = None  # murmur.node.learner.NodeLearner when learning is on
        self.relay: RelayService | None = None  # [relay] service
        self._started = False
        self._announced = False  # "node started" was logged: a start that failed says only why
        self._reachable: frozenset[PeerId] | None = None  # None: no partition (see set_partition)
        # Peers that run another model (see refuse_learning), oldest first, bounded.
        self._incompatible: dict[PeerId, str] = {}
        # Peers we WARNed of as incompatible, oldest first, bounded: one that
        # switches models back and forth (each Hello) is told of once.
        self._warned_incompatible: dict[PeerId, None] = {}
        self._resumed: dict[str, Any] | None = None  # the last metrics row before this start (see status)

    # -- lifetime ------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = self.config
        self.state.acquire()
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, cfg: NodeConfig) -> None:
        self._started = True
        self.identity: Identity = self.state.identity()
        self.peer_id = self.identity.peer_id
        # learning.node_index = "auto": this node's data share, from its (persistent) peer id
        self.config = cfg = dataclasses.replace(cfg, learning=cfg.learning.for_peer(self.peer_id))
        # network.allow_loopback: nodes sharing 127.0.0.1 are not one subnet here either
        self.table = PeerTable(PeerTableConfig(exempt_loopback=cfg.network.allow_loopback), self_id=self.peer_id)
        problem = self.table.load(self.state.peers_path)
        if problem is not None:
            log.warning("peer table unreadable; starting empty", extra={"error": str(problem)})
        if cfg.learning.enabled:
            # Before any port is bound: a trainer that cannot load its data, a
            # privacy setting it cannot meet, fail while nobody can connect yet.
            from murmur.node.learner import NodeLearner  # torch is only loaded by learning nodes

            # Off the loop: loading the trainer and calibrating the privacy
            # noise are up to seconds of CPU (the calibration 0.35-0.45 s at
            # the default testnet's example level, 1.8 s a node in a worker
            # starting four before its RDP series were cached), and the nodes
            # already up in this process (a testnet worker) must go on
            # answering their peers meanwhile. On
            # the loop, a worker's first node could not complete a handshake
            # until its last was built; the node that dialled it linked only
            # to a Sybil up before everyone, and ran its first rounds with it.
            self.attach_learner(await asyncio.to_thread(NodeLearner, self))
            self._resumed = self.state.last_metrics()
            self.metrics.resume(self._resumed, self.learner.epsilon_spent())
        self.host = Libp2pHost(
            self.identity, HostConfig(limits=cfg.transport.limits(), agent_version=AGENT),
            on_connection=self._on_connection, on_fault=self._on_host_fault, on_identified=self._on_identified,
        )
        for protocol in MurmurProtocol:
            self.host.set_handler(protocol, self._serve_stream)
        # Relaying for others is the operator's choice ([relay] service); the node
        # itself takes no relayed connections until it reserves on a relay.
        if cfg.relay.service:
            relay = self.relay = RelayService(self.host, cfg.relay.relay_config(), greeted=self._greeted_directly)
            self.metrics.bind_relay(lambda: len(relay.reservations), lambda: relay.circuits, relay.stats,
                                    relay_stat_names())
        # The client side: dial circuits, and (AutoRelay) reserve on relays to be
        # reachable behind NAT. Its /stop handler takes circuits only from relays
        # we reserved on.
        self.relay_client = RelayClient(self.host, cfg.relay.message_timeout_s)
        self.autorelay = AutoRelay(self, self.relay_client, cfg.relay.use, cfg.relay.auto, cfg.relay.max_relays,
                                   private=lambda: self.reachability.reachability(time.monotonic())
                                   is Reachability.PRIVATE)
        self.host.circuit_addrs = lambda: [AnyMultiaddr.parse(str(a)) for a in self.autorelay.circuit_addrs()]
        # AutoNAT: peers dial us back (what makes reachability a measurement); we do it for them.
        autonat_cfg = cfg.autonat.autonat_config()
        self.autonat_server = AutoNATServer(self.host, autonat_cfg) if cfg.autonat.server else None
        self.autonat = AutoNATProber(self, AutoNATClient(self.host, autonat_cfg), self.reachability,
                                     servers_per_check=cfg.autonat.servers_per_check,
                                     allow_private=cfg.autonat.allow_private)
        # DCUtR: a relayed connection we accepted is upgraded to a direct one
        # (unilateral dial or hole punch); the session table then moves the
        # peer onto it and closes the relayed one (see _register).
        self.punch = HolePuncher(self.host, DcutrConfig(allow_loopback=cfg.network.allow_loopback),
                                 own_addrs=lambda: self.reachability.confirmed(time.monotonic()))
        if not cfg.network.hole_punching:
            self.host.remove_handler(DCUTR)
        self.metrics.bind_dcutr(self.punch.stats, dcutr_stat_names())
        self.metrics.bind_connections(
            lambda: Counter(connection_type(s.conn) for s in self.sessions()), lambda: len(self.autorelay.live()))
        for listen in cfg.node.listen:
            try:
                bound = await self.host.listen(listen.host, listen.port)
            except OSError as exc:
                raise OptionError("node.listen", f"cannot listen on {listen}: {bind_problem(exc, listen.port)}") from None
            for addr in bound:  # a wildcard: the interfaces' addresses, never loopback to other machines
                self.addrs.extend(advertised(Multiaddr(addr.host, addr.port, self.peer_id)))
        self.host.listen_addrs = list(self.addrs)  # what identify tells peers: the advertised addresses
        self.reachability.set_local(self.addrs)
        net = cfg.network
        self.sampler = CyclonSampler(
            self.peer_id,
            self.addrs,
            net.sampler_config(),
            is_blocked=lambda peer: (self.table.is_banned(peer) or self.partitioned_off(peer)
                                     or self._incompatible.get(peer) == NO_MURMUR),
            may_neighbour=lambda peer: peer not in self._incompatible,
        )
        for record in self.table.usable():  # what we knew before a restart
            if record.addrs:
                self.sampler.add(record.peer_id, record.addrs, age=1)
        self.gossip = FloodGossip(self.peer_id)
        self.membership = Membership(
            self,
            self.sampler,
            self.table,
            MembershipConfig(
                neighbours=net.neighbours,
                links_per_subnet=net.subnet_bucket_size,
                shuffle_interval_s=net.shuffle_interval_s,
                bootstrap=tuple(a for a in net.bootstrap if a.peer_id != self.peer_id),
            ),
            self.tasks,
            rng=random.Random(),
            pinned=self._relay_uses,
        )
        self.dispatcher.register(self.membership.handlers())
        self.dispatcher.register({Gossip: self._on_gossip, Goodbye: self._on_goodbye})
        if self.learner is not None:
            self._wire_learner()
        api = StatusApi(self, self.metrics, cfg.api.host, cfg.api.port)
        try:
            await api.__aenter__()
        except OSError as exc:
            raise OptionError("api.port", f"cannot listen on {cfg.api.host}:{cfg.api.port}: "
                                          f"{bind_problem(exc, cfg.api.port)}") from None
        self._api = api
        self.state.write_api_info(ApiInfo(cfg.api.host, self._api.port, _pid(), str(self.peer_id)))
        self.membership.start()
        self.tasks.periodic("autorelay", cfg.relay.check_interval_s, self._check_relays)
        if cfg.autonat.client:  # the first pass once some peers identified, then every interval
            self.tasks.periodic("autonat", cfg.autonat.check_interval_s, self.autonat.check,
                                delay_s=min(AUTONAT_FIRST_CHECK_S, cfg.autonat.check_interval_s))
        self.tasks.periodic("log-summary", PEER_LOG_BUDGET.window_s, self._summarise_peer_log,
                            delay_s=PEER_LOG_BUDGET.window_s)
        if net.mdns:
            self._mdns = MdnsDiscovery(self.peer_id, self.addrs, self._on_mdns_found, MdnsConfig(enabled=True))
            await self._mdns.__aenter__()
        if self.learner is not None:
            await self.learner.start()
        self._announced = True
        log.info(
            "node started",
            extra={"event": "started", "peer": str(self.peer_id), "addrs": [str(a) for a in self.addrs], "api": self._api.url},
        )

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. A crashed supervised task ends it
        early with :class:`TaskCrashed` (the caller's ``async with`` then
        stops the node gracefully, and the CLI exits 1): a daemon whose round
        loop died must not sit there looking alive. Rounds ended by the
        trainer (:mod:`murmur.node.trainercalls`) are a
        :class:`TrainerCrashed` (exit 3: not restarted). With
        ``node.keep_serving_after_crash`` it serves on, unhealthy."""
        if self.config.node.keep_serving_after_crash:
            await stop.wait()
            return
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._crashed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        crashes = self.tasks.crashes()
        failure = getattr(self.learner, "trainer_failure", None)
        if failure is not None:  # the user's code: a restart fails the same way (exit 3, see cli.py)
            raise TrainerCrashed(f"{failure}; node stopped (node.keep_serving_after_crash = true keeps it "
                                 "serving)")
        if crashes:
            more = f" (and {len(crashes) - 1} more)" if len(crashes) > 1 else ""
            raise TaskCrashed(
                f"task {crashes[0].task!r} crashed: {crashes[0].error}{more}; node stopped "
                "(node.keep_serving_after_crash = true keeps it serving)"
            )

    def _on_task_crash(self, failure: TaskFailure) -> None:
        log.error(
            "node unhealthy: a supervised task crashed",
            extra={"event": "unhealthy", "task": failure.task, "error": failure.error},
        )
        self._crashed.set()

    def attach_learner(self, learner: Any) -> None:
        """Route learning messages to ``learner``. A Sybil attacker attaches one
        learner to several nodes (its identities); see murmur.testnet.sybil.
        From then on only peers that told the learner a compatible model
        (``LearnerInfo``) are learning neighbours."""
        self.learner = learner
        self.dispatcher.register(learner.handlers_for(self))
        if hasattr(self, "membership"):  # else _start wires it when it builds membership
            self._wire_learner()

    def _wire_learner(self) -> None:
        learner = self.learner
        self.membership.learning_peer = lambda session: session.learner_info is not None

        async def on_linked(session: PeerSession) -> None:
            await learner.on_linked(self, session)

        async def on_unlinked(session: PeerSession) -> None:
            learner.on_unlinked(self, session)

        self.membership.on_linked = on_linked
        self.membership.on_unlinked = on_unlinked
        self.membership.extra_choices = learner.extra_choices

    def refuse_learning(self, peer: PeerId, reason: str) -> None:
        """``peer`` runs another model: never a learning neighbour (the
        sampler does not pick it, so it is not refused again and again),
        though still a member of the network that shuffles hand on. Not a
        fault: nobody is penalised for running a different model."""
        if self._not_learning(peer, reason) and peer not in self._warned_incompatible:
            self._warned_incompatible[peer] = None
            while len(self._warned_incompatible) > MAX_INCOMPATIBLE_PEERS:
                del self._warned_incompatible[next(iter(self._warned_incompatible))]
            log.warning("peer runs a different model; not learning with it",
                        extra={"event": "incompatible_peer", "peer": str(peer), "reason": reason})

    def accept_learning(self, peer: PeerId) -> None:
        """``peer`` now runs our model (restarted with its config fixed): a
        learning candidate again, and no longer reported as incompatible."""
        self._incompatible.pop(peer, None)

    def _incompatible_status(self) -> dict[str, Any] | None:
        """How many peers this node does not learn with, and the latest one's
        reason (another model, or no murmur protocol): what tells a user
        whose node trains alone why, in ``murmur status``. Null when none."""
        if not self._incompatible:
            return None
        peer, reason = next(reversed(self._incompatible.items()))
        return {"peers": len(self._incompatible), "peer": str(peer), "reason": reason}

    def _not_learning(self, peer: PeerId, reason: str) -> bool:
        """Keep ``peer`` out of learning; False if it already was. A peer
        that speaks no murmur protocol leaves the sampler's view too (it
        cannot shuffle); one that runs another model stays in it, so that
        the view hands it on to peers that may run its model."""
        if peer in self._incompatible:
            return False
        self._incompatible[peer] = reason
        while len(self._incompatible) > MAX_INCOMPATIBLE_PEERS:
            del self._incompatible[next(iter(self._incompatible))]
        if reason == NO_MURMUR:
            self.sampler.on_failure(peer)
        else:
            self.sampler.drop_neighbour(peer)
        return True

    async def stop(self) -> None:
        """Graceful shutdown; safe to call twice and after a failed start."""
        if not self._started:
            self.state.release()
            return
        self._started = False
        if self.learner is not None:
            try:
                await self.learner.stop()
            except Exception:
                log.exception("learner did not stop cleanly")
        await self.tasks.shutdown()
        await self._gossip_sends.close()
        if hasattr(self, "relay_client"):
            await self.relay_client.close()
        if getattr(self, "autonat_server", None) is not None:
            await self.autonat_server.close()
        if hasattr(self, "punch"):
            await self.punch.close()
        sessions = list(self._sessions.values())
        await asyncio.gather(*(self._say_goodbye(s) for s in sessions), return_exceptions=True)
        host = getattr(self, "host", None)
        if host is not None:
            await host.close()
        if self._mdns is not None:
            await self._mdns.__aexit__(None, None, None)
            self._mdns = None
        if self._api is not None:
            await self._api.__aexit__(None, None, None)
            self._api = None
        if hasattr(self, "table"):
            self.save_peers()
        self.state.release()
        self.peer_log.close()
        if self._announced:
            self._announced = False
            log.info("node stopped", extra={"event": "stopped"})

    async def _say_goodbye(self, session: PeerSession) -> None:
        try:
            await asyncio.wait_for(session.send(Goodbye(reason="shutdown")), GOODBYE_TIMEOUT_S)
        except (ConnectionClosed, TimeoutError):
            pass

    def advertised_addrs(self) -> list[PeerAddr]:
        """What we tell peers (Hello, shuffles): our listen addresses, then the
        circuits through the relays we hold reservations on."""
        return [*self.addrs, *self.autorelay.circuit_addrs()]

    def peer_protocols(self, peer: PeerId) -> Sequence[str]:
        """The protocols ``peer``'s identify listed (empty if unknown)."""
        record = self.table.get(peer)
        return record.protocols if record is not None else ()

    async def _check_relays(self) -> None:
        """AutoRelay's pass, then what shuffles tell about us follows the reservations."""
        await self.autorelay.check()
        circuits = self.autorelay.circuit_addrs()  # kept when the interfaces fill the entry: they reach us from anywhere
        room = self.sampler.config.max_entry_addrs - len(circuits)
        own = tuple(a.without_peer() for a in [*self.addrs[: max(0, room)], *circuits])
        if own != self.sampler.self_addrs:
            self.sampler.self_addrs = own
            # Peers that greeted us before have our old addresses: identify push tells them.
            await asyncio.gather(*(self._push_identify(c) for c in self.host.connections))
            log.info("advertised addresses changed", extra={"event": "addrs_changed", "addrs": [str(a) for a in own]})

    async def _push_identify(self, conn: Libp2pConnection) -> None:
        try:
            async with asyncio.timeout(self.config.relay.message_timeout_s):
                await self.host.push_identify(conn)
        except (ConnectionClosed, PeerFault, OSError, TimeoutError):
            pass  # that peer learns them from shuffles

    def save_peers(self) -> None:
        try:
            self.table.save(self.state.peers_path)
        except OSError as exc:
            log.error("could not save peer table", extra={"error": str(exc)})

    # -- sessions ------------------------------------------------------------------

    def session(self, peer: PeerId) -> PeerSession | None:
        session = self._sessions.get(peer)
        return session if session is not None and not session.closed else None

    def sessions(self) -> list[PeerSession]:
        return [s for s in self._sessions.values() if not s.closed]

    async def connect(self, addrs: Sequence[PeerAddr], peer: PeerId | None = None) -> PeerSession:
        """A session with ``peer`` (at one of ``addrs``), dialling if needed.
        Concurrent calls for one peer share one dial; a banned peer is never dialled.
        A failed dial raises ``OSError``, a :class:`~murmur.errors.PeerFault` or a
        :class:`ConnectionClosed` (:class:`CircuitRefused` for a refused circuit)."""
        if peer is not None and self.table.is_banned(peer):
            raise ConnectionClosed(f"{peer.short()} is banned")
        if peer is not None and self.partitioned_off(peer):
            raise ConnectionClosed(f"{peer.short()} is on the other side of a partition")
        if peer is not None:
            existing = self.session(peer)
            if existing is not None:
                return existing
            foreign = self._foreign.get(peer)
            if foreign is not None and not foreign.closed:
                raise ProtocolNotSupported(f"{peer.short()} speaks no murmur protocol")
            pending = self._dials.get(peer)
            if pending is not None:
                return await asyncio.shield(pending)
        fut: asyncio.Future[PeerSession] = asyncio.get_running_loop().create_future()
        if peer is not None:
            self._dials[peer] = fut
        try:
            session = await self._dial_any(addrs, peer)
            fut.set_result(session)
            return session
        except asyncio.CancelledError:
            # Only this caller was cancelled: the others sharing the dial get an
            # ordinary failure, not a CancelledError that would end their own
            # (periodic) tasks for good.
            fut.set_exception(ConnectionClosed(f"dial to {peer} was cancelled"))
            fut.exception()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning if nobody else waits
            raise
        finally:
            if peer is not None and self._dials.get(peer) is fut:
                del self._dials[peer]

    async def _dial_any(self, addrs: Sequence[PeerAddr], peer: PeerId | None) -> PeerSession:
        """Direct addresses first, one after another; a peer's relay circuits
        (a circuit costs the relay and has its limits) in a second lane that
        starts ``CIRCUIT_DIAL_DELAY_S`` later, or as soon as every direct
        address failed: the first connection up wins (see dialrace.py). A
        NATed peer's router drops our SYN and would hold us for the whole
        connect timeout before its circuit were tried."""
        direct = [a for a in addrs if not a.is_circuit]
        # a circuit's CONNECT must name its target
        circuits = [a for a in addrs if isinstance(a, CircuitAddr)] if peer is not None else []
        if not direct and not circuits:
            raise ConnectionClosed(f"no address for {peer}")
        lanes: list[Lane[Libp2pConnection]] = [
            Lane([functools.partial(self.host.dial, Multiaddr(a.host, a.port, peer)) for a in direct]),
            Lane([functools.partial(self._dial_circuit, a, peer) for a in circuits], CIRCUIT_DIAL_DELAY_S),
        ]
        try:
            conn = await first_of(lanes, DIAL_FAILURES)
        except RelayRefused as exc:
            raise CircuitRefused(str(exc)) from exc
        _raise_if_cancelling()
        return await self._greeted(conn)

    async def _dial_circuit(self, addr: CircuitAddr, peer: PeerId) -> Libp2pConnection:
        """Through the relay's connection we hold (a session, so one dial to the
        relay is shared with AutoRelay's and everyone's), made if needed."""
        relay = addr.relay.peer_id
        assert relay is not None
        if relay == peer or relay == self.peer_id:
            raise ConnectionClosed(f"{addr} leads through the peer itself or through us")
        conn = await self.relay_connection([addr.relay.without_peer()], relay)
        return await self.relay_client.dial(conn, peer)

    async def relay_connection(self, addrs: Sequence[Multiaddr], relay: PeerId) -> Libp2pConnection:
        """A direct connection to ``relay``: our session's (one dial, shared with
        everyone's), or a plain libp2p relay's, which speaks no murmur."""
        try:
            conn = (await self.connect(addrs, relay)).conn
        except ProtocolNotSupported:  # its connection is held all the same
            foreign = self._foreign.get(relay)
            if foreign is None or foreign.closed:
                raise
            conn = foreign
        if conn.relay is not None:
            raise ConnectionClosed(f"the relay {relay.short()} is itself reached through a relay")
        return conn

    async def _greeted(self, conn: Libp2pConnection) -> PeerSession:
        """The murmur session a dial ended with, once our greeting is on it:
        ``conn``'s, or the one that took its place (a simultaneous dial the
        other way won, see :meth:`_register`)."""
        session = self._by_conn.get(conn)
        for _ in range(2):
            if session is None:  # refused on arrival (banned, partitioned, ourselves)
                break
            if await session.speaks_murmur() and not session.closed:
                return session
            if session.foreign:
                raise ProtocolNotSupported(f"{conn.peer_id.short()} speaks no murmur protocol")
            replacement = self.session(conn.peer_id)
            session = replacement if replacement is not session else None
        raise ConnectionClosed(f"connection to {conn.peer_id.short()} closed at once")

    def _register(self, conn: Libp2pConnection) -> PeerSession:
        """The session for ``conn``; resolves simultaneous dials deterministically:
        of two connections between the same pair, both ends keep the one dialled
        by the smaller peer id (a redial by the same side replaces the old one).
        A direct connection always replaces a relayed one (DCUtR's upgrade: the
        relayed one closes, the peer's traffic moves over), and a relayed one
        never replaces a direct one; both ends decide alike."""
        session = self._by_conn.get(conn)
        if session is not None:
            return session
        peer = conn.peer_id
        old = self.session(peer)
        if old is not None:
            old_dialer = self.peer_id if old.conn.outbound else peer
            new_dialer = self.peer_id if conn.outbound else peer
            relayed_old, relayed_new = old.conn.relay is not None, conn.relay is not None
            keep_old = (relayed_new and not relayed_old) if relayed_old != relayed_new else (
                old_dialer != new_dialer and new_dialer != min(self.peer_id, peer))
            if keep_old:
                self.host._tasks.spawn(f"close-dup-{conn.name}", conn.close)
                self._by_conn[conn] = old
                return old
        session = PeerSession(conn, self.dispatcher, self.metrics, self, self.link_pacer)
        if old is not None:
            # Edge state carries over; the Hello does not: the peer sends one on
            # every connection, and the new one must not read as a second Hello.
            # Links are not inherited: the peer may have seen our Link only on
            # the connection being replaced. maintain() re-announces on this one
            # within a second, and so does the peer.
            session.addrs, session.peer_degree = old.addrs, old.peer_degree
            self._sessions[peer] = session
            self.host._tasks.spawn(f"close-old-{old.conn.name}", old.close)
        self._sessions[peer] = session
        self._by_conn[conn] = session
        self.metrics.peers_connected.set(len(self.sessions()))
        return session

    def _on_connection(self, conn: Libp2pConnection) -> Awaitable[None] | None:
        """Host callback, once per upgraded connection and before any of its
        streams is served: the session exists before its first message. The
        coroutine returned is the connection's task (the host runs it)."""
        if conn.peer_id == self.peer_id or self.table.is_banned(conn.peer_id) or self.partitioned_off(conn.peer_id):
            return conn.close()
        session = self._register(conn)
        if session.conn is not conn:
            return None  # a duplicate, being closed
        if self.config.network.hole_punching:
            self.punch.on_relayed(conn)  # ours inbound through a relay: upgrade it (DCUtR)
        if self.table.is_reputed(conn.peer_id):
            # Earned over hours: a flood of fresh identities cannot evict it.
            session.mark_useful()
        return self._run_session(session)

    async def _run_session(self, session: PeerSession) -> None:
        """Greet the peer on its hello stream, then hold the session until the
        connection ends. A peer that refuses murmur's hello protocol is a plain
        libp2p peer: its connection stays (identify, ping), its session goes."""
        conn = session.conn
        try:
            await session.send(
                Hello(
                    listen_addrs=tuple(str(a.without_peer()) for a in self.advertised_addrs()),
                    agent=AGENT,
                    round=self.learner.round if self.learner is not None else 0,
                    degree=self.membership.degree(),
                )
            )
            if self.learner is not None:
                await self.learner.greet(self, session)
            session.murmur_peer(True)  # from here a dialler may send: Link comes after Hello and LearnerInfo
            await conn.wait_closed()
        except ProtocolNotSupported:
            session.foreign = True
            session.murmur_peer(False)
            self._forget_session(session)
            await self._keep_foreign(conn)
            return
        except ConnectionClosed:
            pass
        finally:
            session.murmur_peer(False)  # whoever still waits: not (or no longer) a murmur session
        await session.close()
        self._by_conn.pop(conn, None)
        if self._forget_session(session):
            if self.learner is not None:
                self.learner.on_session_closed(self, session)
            if self._started:
                if session.said_goodbye:
                    # Leaving is no fault: an honest node stopped and started again 26
                    # times (a config being tuned) had fallen to -104 and was banned.
                    self.membership.report_failure(session.peer, reason="left (goodbye)", penalise=False)
                else:
                    await self.membership.on_session_closed(session)

    def _forget_session(self, session: PeerSession) -> bool:
        """Drop ``session`` from the sessions by peer; False if another took its place."""
        self._by_conn.pop(session.conn, None)
        if self._sessions.get(session.peer) is not session:
            return False
        del self._sessions[session.peer]
        self._gossip_budgets.pop(session.peer, None)
        self._gossip_out.pop(session.peer, None)
        self.metrics.peers_connected.set(len(self.sessions()))
        return True

    async def _keep_foreign(self, conn: Libp2pConnection) -> None:
        """A libp2p peer that speaks none of murmur's protocols: useful to the
        network layer (identify, ping, later relaying), never a learning
        neighbour. Its connection stays until either side ends it."""
        peer = conn.peer_id
        if self._not_learning(peer, NO_MURMUR):
            log.info("peer speaks no murmur protocol; kept for identify and ping",
                     extra={"event": "foreign_peer", "peer": str(peer),
                            "agent": conn.identify.agent_version if conn.identify else None})
        self._foreign[peer] = conn
        try:
            await conn.wait_closed()
        finally:
            if self._foreign.get(peer) is conn:
                del self._foreign[peer]

    async def _serve_stream(self, stream: Stream) -> None:
        """Host handler of every murmur protocol: the stream's messages go to its session."""
        session = self._by_conn.get(stream.conn)
        if session is None or session.conn is not stream.conn:
            stream.reset()  # a duplicate connection being closed, or a refused one
            return
        await session.serve(stream)

    def _on_host_fault(self, peer: PeerId | None, fault: PeerFault) -> None:
        """The host's fault sink: a proved peer pays for what its connection
        did (from its first authenticated byte); an unproved one has no
        identity to blame (the host logged it)."""
        if peer is None:
            return
        if self.on_fault(peer, fault) and not fault.drop:
            for conn in self.host.connections:  # banned by adding up: no connection stays
                if conn.peer_id == peer:
                    self.host._tasks.spawn(f"close-banned-{conn.name}", conn.close, replace=True)

    def _on_identified(self, conn: Libp2pConnection) -> None:
        """Keep what identify told us about the peer in the peer table, and
        count the address it saw us at as its vote for our reachability (one
        vote per peer; the tracker wants several subnets to agree)."""
        info = conn.identify
        if info is None or self.table.is_banned(conn.peer_id):
            return
        self.table.identified(
            conn.peer_id, info.agent_version or "", info.protocols, [str(a) for a in info.listen_addrs],
            str(info.observed_addr) if info.observed_addr is not None else "",
        )
        circuits = circuits_of(conn.peer_id, info.listen_addrs)
        if circuits:  # a private peer's way in, perhaps new since its Hello (identify push)
            self.table.add(conn.peer_id, circuits)
            self.sampler.learn_addrs(conn.peer_id, circuits)
        observed = info.observed_addr.to_tcp() if info.observed_addr is not None else None
        if observed is not None:
            self.reachability.observe(observed, conn.peer_id, conn.remote[0], time.monotonic())

    # -- partitions (testnet) ---------------------------------------------------------

    def partitioned_off(self, peer: PeerId) -> bool:
        return self._reachable is not None and peer not in self._reachable

    async def set_partition(self, reachable: Iterable[PeerId] | None) -> None:
        """An application-level network partition, for the loopback testnet
        (where nodes share one interface and cannot be cut apart with routes).

        With a set, only those peers are reachable: connections to everyone
        else are closed without a redial and new ones, in and out, refused.
        A partition is not a fault: nobody is penalised or banned, so once
        healed (``None``) the peers we knew are put back in the sampler's view
        and Cyclon mixes the two sides again.
        """
        self._reachable = None if reachable is None else frozenset(reachable)
        if self._reachable is None:
            for record in self.table.usable():
                self.sampler.on_alive(record.peer_id)
                self.sampler.add(record.peer_id, record.addrs, age=1)
            return
        for desc in [*self.sampler.view(), *self.sampler.neighbour_descriptors()]:
            if self.partitioned_off(desc.peer):
                self.sampler.on_failure(desc.peer)
        cut = [s for s in self.sessions() if self.partitioned_off(s.peer)]
        for session in cut:
            session.link_out = False  # no redial: the close is ours, not the peer's failure
        await asyncio.gather(*(s.close() for s in cut), return_exceptions=True)

    def _on_mdns_found(self, peer: PeerId, addrs: Sequence[Multiaddr]) -> None:
        """A murmur node announced itself on the LAN. mDNS is unauthenticated:
        the entry only becomes a connection after a Noise handshake proves
        the peer id, and it competes for view slots under the subnet limit."""
        if peer == self.peer_id or self.table.is_banned(peer) or not addrs:
            return
        self.table.add(peer, addrs)
        self.sampler.add(peer, addrs)

    # -- faults (FaultSink) ----------------------------------------------------------

    def on_fault(self, peer: PeerId, fault: PeerFault) -> bool:
        name = type(fault).__name__
        self._faults[name] = self._faults.get(name, 0) + 1
        self.metrics.fault(fault)
        banned = self.table.penalise(peer, fault.penalty)
        self.peer_log.warning(
            log, peer, "peer fault",
            extra={"event": "fault", "peer": str(peer), "fault": name, "detail": str(fault), "banned": banned},
        )
        if banned:
            self.sampler.on_failure(peer)  # out of the view and the neighbour set, replaced at once
        drop = fault.drop or banned
        if drop:
            self._offence(peer)
        return drop

    def _offence(self, peer: PeerId) -> None:
        """An inbound connection of ``peer`` is dropped for a fault: its
        address counts an offence (protocol/cooloff.py; a new identity from
        the same address is refused at accept once they add up)."""
        session = self.session(peer)
        conn = session.conn if session is not None else None
        if conn is not None and not conn.outbound and conn.relay is None:
            self.host.cooloff.offence(conn.remote[0])

    def on_handler_failure(self, peer: PeerId, error: Exception) -> None:
        self.peer_log.log(log, logging.ERROR, peer, "handler failed; closing connection",
                          extra={"event": "handler_failed", "peer": str(peer)}, exc_info=error)

    async def _summarise_peer_log(self) -> None:
        self.peer_log.flush()

    # -- gossip ----------------------------------------------------------------------

    def subscribe(self, topic: str, callback: GossipSubscriber) -> None:
        self._subscribers.setdefault(topic, []).append(callback)

    async def publish(self, topic: str, payload: bytes) -> int:
        """Flood ``payload`` to the network; returns the number of first-hop sends."""
        action = self.gossip.publish(topic, payload, [s.peer for s in self.sessions()])
        return await self._forward(action.forward, action.targets)

    async def _forward(self, msg: GossipMessage | None, targets: Sequence[PeerId]) -> int:
        if msg is None:
            return 0
        wire = Gossip(msg_id=msg.msg_id, origin=msg.origin, ttl=msg.ttl, topic=msg.topic, payload=msg.payload)
        cost = 1 + len(msg.payload) // GOSSIP_UNIT_BYTES
        deadline = time.monotonic() + GOSSIP_SEND_TIMEOUT_S
        delivered: list[PeerId] = []
        sends = []
        for peer in targets:
            session = self.session(peer)
            if session is None:
                continue
            out = self._gossip_out.setdefault(peer, RequestBudget(GOSSIP_OUT_BURST, GOSSIP_OUT_REFILL_S))
            if self._gossip_sends.busy(peer) or not out.take(cost):
                self.gossip_held_back += 1  # flood gossip: the peer hears it from others, or it was too much
                continue
            sends.append(self._gossip_sends.start(peer, self._send_gossip(session, wire, deadline, delivered)))
        await Outbox.wait(sends, GOSSIP_WAIT_S)
        return len(delivered)

    @staticmethod
    async def _send_gossip(session: PeerSession, wire: Gossip, deadline: float, delivered: list[PeerId]) -> None:
        """One forward, by ``deadline``; a peer that is gone or had no room
        misses it (a stalled one is cut by the transport's drain timeout, one
        that never negotiates by its negotiate timeout, each with its fault)."""
        try:
            await session.send(wire, deadline)
        except (ConnectionClosed, SendTimeout):
            return
        delivered.append(session.peer)

    async def _on_gossip(self, session: PeerSession, msg: Gossip) -> None:
        # What we forward goes to every session: unmetered, one peer's 19 MiB
        # of fresh ids made 324 MiB across five nodes, at no cost to it.
        budget = self._gossip_budgets.setdefault(session.peer, RequestBudget(GOSSIP_BURST, GOSSIP_REFILL_S))
        if not budget.take(1 + len(msg.payload) // GOSSIP_UNIT_BYTES):
            raise LimitExceeded("gossip faster than its budget")
        gm = GossipMessage(msg.msg_id, msg.origin, msg.ttl, msg.topic, msg.payload)
        action = self.gossip.on_message(gm, session.peer, [s.peer for s in self.sessions()])
        if action.deliver:
            for callback in self._subscribers.get(msg.topic, ()):
                try:
                    callback(msg.origin, msg.payload)
                except Exception:
                    log.exception("gossip subscriber failed", extra={"topic": msg.topic})
        await self._forward(action.forward, action.targets)

    async def _on_goodbye(self, session: PeerSession, msg: Goodbye) -> None:
        session.said_goodbye = True
        # DEBUG: any peer, or a stream of fresh identities, causes one (with a reason of its choosing)
        log.debug("peer said goodbye", extra={"peer": str(session.peer), "reason": msg.reason})
        await session.close()

    # -- status (NodeStatusSource) ------------------------------------------------------

    def status(self) -> Mapping[str, Any]:
        sessions = self.sessions()
        traffic = self.traffic()
        return {
            "peer_id": str(self.peer_id),
            "addrs": [str(a) for a in self.addrs],
            "reachability": self.reachability.snapshot(time.monotonic()),
            "agent": AGENT,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "connections": len(sessions),
            "libp2p_connections": len(self.host.connections),
            "neighbours": [str(s.peer) for s in self.membership.learning_neighbours()],
            "view": len(self.sampler),
            "evictions": self.membership.evictions,
            "bytes_in": traffic[0],
            "bytes_out": traffic[1],
            "link": self.link_pacer.describe(),  # None, or the emulated rates (labelled as emulated)
            "faults": dict(self._faults),
            "health": self.health(),
            "learning": self._learning_status(),
            "learning_off": self.learning_off,
            "incompatible": self._incompatible_status(),
            "relay": self._relay_status(),
            "relay_client": self.autorelay.status(),
            "autonat": self.autonat.status() | (
                {"server": dict(self.autonat_server.stats)} if self.autonat_server is not None else {}),
            "connection_types": {str(s.peer): connection_type(s.conn) for s in sessions},
            "dcutr": {name: self.punch.stats[name] for name in dcutr_stat_names()},
        }

    def _relay_status(self) -> dict[str, Any] | None:
        """The relay service's live reservations and circuits and its counters; null when off."""
        if self.relay is None:
            return None
        return {"reservations": len(self.relay.reservations), "circuits": self.relay.circuits,
                "learning_circuits": self.relay.learning_circuits, **dict(sorted(self.relay.stats.items()))}

    def _relay_uses(self, session: PeerSession) -> bool:
        """Whether circuit relay needs ``session``'s connection open although it
        carries no learning: our reservation on the peer, circuits through it,
        or (as its relay) its reservation or circuits. Idle as murmur sees it,
        it would be closed as transient, and the reservation or circuits with it."""
        peer = session.peer
        if self.relay_client.keeping(peer) or any(c.relay == peer for c in self.host.connections):
            return True
        return self.relay is not None and self.relay.serving(peer)

    def _greeted_directly(self, peer: PeerId) -> bool:
        """For the relay's ``learning_greeted``: ``peer`` said murmur's Hello on a direct connection."""
        session = self.session(peer)
        return session is not None and session.hello is not None and session.conn.relay is None

    def _learning_status(self) -> dict[str, Any] | None:
        """The learner's snapshot, plus where its rounds stand (target, done,
        ε against the budget) and, until a round back has evaluated the
        restored model, the accuracy recorded before a restart."""
        if self.learner is None:
            return None
        learning = dict(self.learner.status())
        learning |= resumed_eval(learning, self._resumed)
        learning["last_round_s"] = dict(self.metrics.last_phases)  # phase -> seconds of the last round
        return learning | progress(learning, self.config.learning, self.config.privacy, self._rounds_stopped())

    def _rounds_stopped(self) -> str | None:
        """Why the learner's rounds ended early (the task crashed; the node
        serves on with ``node.keep_serving_after_crash``), None while they run:
        the trainer's failure in the words of its exit-3 line (the user's file
        and line), else the crash's error."""
        crash = next((f for f in self.tasks.crashes() if f.task == ROUNDS_TASK), None)
        if crash is None:
            return None
        failure = getattr(self.learner, "trainer_failure", None)
        return str(failure) if failure is not None else crash.error

    def _failed_tasks(self) -> list[dict[str, Any]]:
        return [
            {"task": f.task, "state": state, "error": f.error, "since": round(f.since, 3), "errors": f.errors}
            for state, failures in (("crashed", self.tasks.crashes()), ("failing", self.tasks.failing()))
            for f in failures
        ]

    def healthy(self) -> bool:
        return not self.tasks.crashes() and not self.tasks.failing()

    def health(self) -> Mapping[str, Any]:
        """``{"ok", "failed_tasks", "task_errors"}`` (ARCHITECTURE.md, status
        contract): not ok while a supervised task has crashed (ended with an
        exception, not restarted) or a periodic one keeps failing."""
        failed = self._failed_tasks()
        return {"ok": not failed, "failed_tasks": failed, "task_errors": self.tasks.error_count}

    @property
    def learning_off(self) -> str | None:
        """Why this node trains nothing (None when it learns)."""
        return LEARNING_OFF if self.learner is None else None

    def traffic(self) -> tuple[int, int]:
        """(bytes in, bytes out) of messages over all sessions since start, as
        counted by the sessions (closed ones included)."""
        received = self.metrics.value("murmur_bytes_total", direction="in") or 0.0
        sent = self.metrics.value("murmur_bytes_total", direction="out") or 0.0
        return int(received), int(sent)

    def peers(self) -> Sequence[Mapping[str, Any]]:
        """Every peer of the table: what we know of it, and what its identify said
        (``agent``, ``protocols``, ``listen_addrs``, and ``observed``: the address
        it saw us at)."""
        connected = {s.peer: s for s in self.sessions()}
        libp2p = {c.peer_id for c in self.host.connections}
        out = []
        for record in self.table:
            session = connected.get(record.peer_id)
            out.append(
                {
                    "peer_id": str(record.peer_id),
                    "addrs": [str(a) for a in record.addrs],
                    "score": round(self.table.score(record.peer_id), 3),
                    # A banned peer is refused and never dialled: without this a user
                    # saw only a low score and "no" under connected, whatever it did.
                    "banned_for_s": round(max(0.0, record.banned_until - time.time()), 1),
                    "connected": record.peer_id in libp2p,
                    "murmur": session is not None if record.peer_id in libp2p else None,
                    "neighbour": bool(session and session.linked),
                    "connection": connection_type(session.conn) if session is not None else None,
                    "agent": record.agent,
                    "protocols": list(record.protocols),
                    "listen_addrs": list(record.listen),
                    "observed": record.observed,
                }
            )
        return out


def circuits_of(peer: PeerId, addrs: Iterable[AnyMultiaddr]) -> list[CircuitAddr]:
    """The relay circuits to ``peer`` (not through itself) among what its identify listed (at most
    ``MAX_CIRCUIT_ADDRS``; others and malformed ones are skipped: identify is
    every libp2p peer's, and a peer's other addresses are not ours to judge here).
    Circuits through us are kept: a relay hands its reservers' circuits on in
    shuffles (it is how peers behind NAT find one another), as Hello's are."""
    out: list[CircuitAddr] = []
    for addr in addrs:
        if not addr.is_circuit:
            continue
        try:
            circuit = CircuitAddr.parse(str(addr))
        except ValueError:
            continue
        if circuit.relay.peer_id != peer and circuit.peer_id in (None, peer) and circuit.port:
            out.append(circuit.without_peer())
        if len(out) == MAX_CIRCUIT_ADDRS:
            break
    return out


def connection_type(conn: Libp2pConnection) -> str:
    """``direct``, ``punched`` (direct, made by a DCUtR hole punch) or ``relayed``
    (through circuit relay v2), as status reports a peer's connection."""
    if conn.relay is not None:
        return "relayed"
    return "punched" if conn.punched else "direct"


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation that Python 3.11's ``asyncio.wait_for`` swallowed.

    ``Libp2pHost.dial`` awaits ``wait_for``; in 3.11, when the task is cancelled
    in the same loop iteration as the dial completes, ``wait_for`` returns the
    result and the cancel request is lost (fixed in 3.12). A periodic task
    (shuffle, neighbour maintenance) then keeps running through
    ``Node.stop()`` until the task manager's shutdown timeout: seen as a daemon
    taking 5 s instead of 0.4 s to exit on SIGTERM. The request is still
    counted by ``Task.cancelling()``, so honour it here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _pid() -> int:
    import os

    return os.getpid()


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Run one node until ``stop`` is set (or SIGINT/SIGTERM)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Node(config) as node:
            if node.learning_off:
                log.warning(f"learning is off ({node.learning_off})", extra={"event": "learning_off"})
            else:
                learning, auto = node.config.learning, config.learning.node_index == AUTO
                log.info(
                    f"learning {learning.trainer} on data share {learning.node_index} of {learning.num_nodes}"
                    + (" (node_index auto: from the peer id)" if auto else "")
                    + f", aggregating with {learning.aggregator}",
                    extra={"event": "learning", "trainer": learning.trainer, "node_index": learning.node_index,
                           "num_nodes": learning.num_nodes, "auto_index": auto, "aggregator": learning.aggregator},
                )
                for advice in compression_advice(node.config):
                    log.warning(advice, extra={"event": "compression_advice"})
            await node.serve_until(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_node(config: NodeConfig) -> int:
    """CLI entry: run the daemon in the foreground on uvloop; 0 after a clean stop.
    Errors propagate: the CLI prints them as one line (exit 2 for a
    :class:`~murmur.errors.ConfigError`, such as a port in use)."""
    import uvloop

    tune_allocator()  # process-wide, so the entry point's call (see its docstring)
    uvloop.run(serve(config))  # a MurmurError is the CLI's to report: one line on stderr, exit 2 or 1
    return 0
