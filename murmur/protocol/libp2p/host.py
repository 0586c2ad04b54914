"""The node's libp2p host: listen and dial TCP, upgrade, admit, route streams by protocol id,
and speak identify, identify push and ping on every connection.

One host serves both paths (see :mod:`murmur.protocol.libp2p.wire`): murmur's
fast path, offered first, and ``/noise`` + ``/yamux/1.0.0`` for any libp2p
peer. What it does for the application:

* handlers are ``async def handler(stream)`` registered per protocol id
  (:meth:`Libp2pHost.set_handler`); inbound streams are negotiated with
  multistream-select against them (``ls`` lists them);
* ``on_connection(conn)`` is called once per upgraded connection, inbound and
  outbound, *before* any of its inbound streams is served (so the
  application can attach its state to it first); if it returns an
  awaitable, the host runs it as that connection's supervised task;
* peer faults go to ``on_fault(peer, fault)`` (the node's penalty table):
  ``peer`` is the proved peer id, or ``None`` for a fault before any identity
  was proved (those the host logs itself, rate-limited per subnet);
* dials leave from the listen port (SO_REUSEPORT, as libp2p's TCP
  transports): behind a NAT peers observe that port, which DCUtR's hole
  punches (:mod:`murmur.protocol.libp2p.dcutr`) dial from and to;
* identify runs on every connection (:attr:`Libp2pConnection.identify`,
  ``on_identified(conn)`` when it, or a push, arrives) and the addresses
  peers observed for us are counted in :attr:`Libp2pHost.observed_addrs`.

What it bounds, for every connection (:class:`~murmur.protocol.transport.TransportLimits`):
inbound slots overall and per subnet, counted from TCP accept, with eviction
of the connection worth least (:mod:`murmur.protocol.admission`) when a
newcomer finds them full or a peer waits for the node's byte pool; one
:class:`~murmur.protocol.budget.PeerBudget` per connection drawn from the
host's :class:`~murmur.protocol.budget.BytePool` (the fast path's buffered
messages and large records, yamux's windows); and the upgrade, idle, drain
and negotiation timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import inspect
import ipaddress
import itertools
import logging
import os
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from murmur import __version__
from murmur.errors import ConnectionClosed, DecodeError, LimitExceeded, PeerFault, TimeoutFault
from murmur.protocol import identify as idp
from murmur.protocol.admission import choose_victim
from murmur.protocol.cooloff import Cooloff
from murmur.protocol.budget import BytePool, RequestBudget
from murmur.protocol.framing import PlaintextScratch
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p.connection import Handler, Libp2pConnection, Stream
from murmur.protocol.libp2p.stream_transport import StreamTransport
from murmur.protocol.libp2p.wire import Wire
from murmur.protocol.multiaddr import AnyMultiaddr, Multiaddr, Proto
from murmur.protocol.subnets import SubnetKey, subnet_of
from murmur.protocol.transport import TransportLimits
from murmur.ratelog import LogBudget, RateLimitedLog
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_PING_STREAMS = 2  # per connection (ping spec: the listener SHOULD accept at most two)
PING_BURST = 16  # pings one ping stream may send back to back,
PING_REFILL_S = 0.1  # then one every this often (10 a second)
"""A ping stream's pings are echoed within a :class:`RequestBudget`; past it
the stream is reset and the peer gets a ``LimitExceeded``. Pings are for
liveness (a libp2p peer sends one every few seconds, ``ping(conn, n)`` a few
back to back): one stream writing 32-byte pings as fast as TCP took them had
30,000 a second echoed, 17% of the victim's core, with no fault to its score."""
MAX_HELD_SOCKETS = 16  # sockets kept open so their descriptor numbers are not reused (Libp2pHost._stale_descriptor)
MAX_OBSERVED_ADDRS = 32  # distinct addresses peers said they saw us at, tallied; further ones ignored
LOGGED_PROTOCOLS = 16  # of a peer's protocol ids, shown in its "peer identified" line
LOGGED_PROTOCOL_CHARS = 64  # of each (an id may be 1 KiB)
MAX_OBSERVERS = 1024  # peers whose latest observed-address vote the tally keeps (the oldest forgotten)

OnConnection = Callable[[Libp2pConnection], Awaitable[None] | None]
OnFault = Callable[[PeerId | None, PeerFault], None]
MakeSocket = Callable[[int], socket.socket]  # address family -> a new TCP socket


@dataclass(frozen=True)
class HostConfig:
    """The connection bounds (``limits``, the node's ``[transport]``) and what identify says."""

    limits: TransportLimits = field(default_factory=TransportLimits)
    agent_version: str = f"murmur/{__version__}"
    protocol_version: str = PROTOCOL_VERSION
    identify_on_connect: bool = True


class Libp2pHost:
    def __init__(
        self,
        identity: Identity,
        config: HostConfig = HostConfig(),
        pool: BytePool | None = None,
        on_connection: OnConnection | None = None,
        on_fault: OnFault | None = None,
        on_identified: Callable[[Libp2pConnection], None] | None = None,
        make_socket: MakeSocket | None = None,
    ) -> None:
        self.identity = identity
        # Where sockets come from: the default namespace, unless the caller
        # makes them elsewhere (a host of the emulated internet, murmur/testnet/internet.py).
        self._make_socket = make_socket
        self.peer_id = identity.peer_id
        self.config = config
        limits = config.limits
        self.pool = pool if pool is not None else BytePool(limits.max_buffered_bytes)
        # Plaintext staging for every fast-path record sent (see PlaintextScratch):
        # one largest record per host instead of one per connection.
        self.plaintext_scratch = PlaintextScratch(limits.max_frame)
        self._on_connection = on_connection
        self._on_fault = on_fault
        self._on_identified = on_identified
        self._handlers: dict[str, Handler] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._reuse: dict[int, tuple[str, int]] = {}  # family -> the listen (address, port) our dials leave from
        self._held_sockets: deque[socket.socket] = deque(maxlen=MAX_HELD_SOCKETS)  # see _stale_descriptor
        # Hole punches under way: (address, port) we dial -> the peer and our
        # upgrade role there, for a SYN of theirs that our listener accepts.
        self._punch_roles: dict[tuple[str, int], tuple[PeerId, bool]] = {}
        self._wires: set[Wire] = set()
        self._conns: set[Libp2pConnection] = set()
        self._inbound_total = 0
        self._inbound_by_subnet: Counter[SubnetKey] = Counter()
        self._numbers = itertools.count(1)
        self._tasks = TaskManager(f"host {identity.peer_id.short()}")
        self._ping_streams: Counter[Libp2pConnection] = Counter()
        self._closing = False
        self.listen_addrs: list[Multiaddr] = []  # what identify tells peers (the node sets what it advertises)
        # and after them, where our relay reservations reach us now (read at each identify)
        self.circuit_addrs: Callable[[], Sequence[AnyMultiaddr]] = tuple
        # How peers saw us, by how many peers say so now: a bare tally for the
        # host's users (DCUtR's CONNECT lists it most common first); the node's
        # reachability votes go through ReachabilityTracker, which limits
        # Sybils. One vote per peer, its latest (a peer repeating a claim, as
        # identify push lets it, must not outvote the others), and bounded,
        # since any peer can claim any address.
        self.observed_addrs: Counter[AnyMultiaddr] = Counter()
        self._observed_by: OrderedDict[PeerId, AnyMultiaddr] = OrderedDict()
        self.faults: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()  # inbound connections evicted, by reason
        self.cooloff = Cooloff()  # addresses refused at accept for a while after repeated fault drops
        self._warnings = RateLimitedLog("transport warnings", log, LogBudget(
            per_key=limits.warnings_per_subnet, total=limits.warnings_per_interval,
            window_s=limits.warning_interval_s))
        self.set_handler(idp.IDENTIFY, self._serve_identify)
        self.set_handler(idp.IDENTIFY_PUSH, self._serve_identify_push)
        self.set_handler(idp.PING, self._serve_ping)

    # --- handlers -------------------------------------------------------------------

    def set_handler(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler

    def remove_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    def handles(self, protocol: str) -> bool:
        return protocol in self._handlers

    def handler_for(self, protocol: str) -> Handler | None:
        return self._handlers.get(protocol)

    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def connections(self) -> list[Libp2pConnection]:
        return [c for c in self._conns if not c.closed]

    @property
    def inbound(self) -> int:
        """Inbound TCP connections held now, half-open ones included."""
        return self._inbound_total

    @property
    def wires(self) -> int:
        """TCP connections held now, upgrading ones included, both directions."""
        return len(self._wires)

    # --- listen and dial ---------------------------------------------------------------

    async def listen(self, host: str, port: int) -> list[Multiaddr]:
        """Start accepting on ``host:port`` (0 = any free port); returns the bound addresses."""
        loop = asyncio.get_running_loop()

        def factory() -> Wire:
            return Wire(self, False, next(self._numbers))

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self._new_socket(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Bound first without SO_REUSEPORT, so that a port another listener
            # holds is refused (EADDRINUSE) as ever; SO_REUSEPORT afterwards
            # lets our own dials leave from this port (see _bind_for_dial).
            sock.bind((host, port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server = await loop.create_server(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        bound = sock.getsockname()
        self._reuse[family] = (str(bound[0]), int(bound[1]))
        if "warning-summaries" not in self._tasks:  # a flood that stopped is summarised too
            interval = self.config.limits.warning_interval_s
            self._tasks.periodic("warning-summaries", interval, self._flush_warnings, delay_s=interval)
        addrs = [Multiaddr(s.getsockname()[0], s.getsockname()[1], self.peer_id) for s in server.sockets]
        self.listen_addrs += addrs
        log.info("listening", extra={"event": "listen", "addrs": [str(a) for a in addrs]})
        return addrs

    async def dial(self, addr: Multiaddr, *, punch: bool | None = None) -> Libp2pConnection:
        """Connect, upgrade, prove ``addr.peer_id`` if set. Raises ``OSError``,
        :class:`~murmur.errors.TimeoutFault`, the upgrade's :class:`~murmur.errors.PeerFault`
        (:class:`~murmur.errors.IdentityMismatch` for another peer), or
        :class:`~murmur.errors.ConnectionClosed`.

        The connection leaves from our listen port when we listen (port reuse,
        as libp2p's TCP transports do): behind a NAT that keeps ports, peers
        then observe the address a hole punch must reach, and the punch's
        mapping is the one they saw. A port already joined to that destination
        (a connection from it is open) is dialled from an ephemeral one.

        ``punch`` (a hole punch's simultaneous open, DCUtR): dial from the
        listen port or not at all, and take the upgrade role it says (True:
        multistream dialer and Noise initiator; False: the responder's), since
        both ends dialled and neither accepted."""
        if self._closing:
            raise ConnectionClosed("host is closed")
        limits = self.config.limits
        role = True if punch is None else punch
        factory = functools.partial(Wire, self, role, next(self._numbers), addr.peer_id, True)
        try:
            _, wire = await asyncio.wait_for(self._connect(factory, addr, punch is not None), limits.connect_timeout_s)
        except TimeoutError:
            raise TimeoutFault(f"connect to {addr} timed out after {limits.connect_timeout_s}s") from None
        return await asyncio.shield(wire.ready)  # the wire's own timer bounds the upgrade

    def _new_socket(self, family: int) -> socket.socket:
        """A TCP socket of this host's network namespace (see ``make_socket``),
        with Nagle's algorithm off (accepted sockets inherit it from the
        listener). Set here, not left to the event loop: asyncio's loop sets
        ``TCP_NODELAY`` only on sockets made with ``proto=IPPROTO_TCP``, and
        ours are made with ``proto=0``, so on that loop every multistream
        round (two small writes, then a read) waited out the peer's delayed
        ACK: ~88 ms per stream opened on loopback instead of ~0.3 ms."""
        sock = self._make_socket(family) if self._make_socket is not None else socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _bind_for_dial(self, sock: socket.socket, family: int, dest: str) -> bool:
        """Bind ``sock`` to our listen address and port (SO_REUSEPORT, as the
        listener); False when we do not listen in that family, or on a
        loopback address for a destination elsewhere (or the other way round),
        whose packets would never come back."""
        local = self._reuse.get(family)
        if local is None:
            return False
        try:
            listen_ip, dest_ip = ipaddress.ip_address(local[0]), ipaddress.ip_address(dest)
        except ValueError:
            return False
        if not listen_ip.is_unspecified and listen_ip.is_loopback != dest_ip.is_loopback:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(local)
        return True

    async def _connect(self, factory: Callable[[], Wire], addr: Multiaddr,
                       punch: bool) -> tuple[asyncio.BaseTransport, Wire]:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if addr.family == "ip6" else socket.AF_INET
        for reuse in (True, False):
            sock = self._new_socket(family)
            try:
                sock.setblocking(False)
                bound = reuse and self._bind_for_dial(sock, family, addr.host)
                if punch and not bound:
                    raise OSError(errno.EADDRNOTAVAIL, "a hole punch must leave from the listen port")
                await loop.sock_connect(sock, (addr.host, addr.port))
            except RuntimeError as exc:
                raise self._stale_descriptor(sock, exc) from None
            except OSError as exc:
                sock.close()
                if reuse and not punch and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    continue  # that port is joined to this destination already: an ephemeral one
                raise
            except BaseException:
                sock.close()
                raise
            try:
                return await loop.create_connection(factory, sock=sock)
            except RuntimeError as exc:
                raise self._stale_descriptor(sock, exc) from None
        raise AssertionError("unreachable")

    def _stale_descriptor(self, sock: socket.socket, exc: RuntimeError) -> OSError:
        """uvloop refuses a socket whose descriptor number it still maps to a
        transport it never let go of ("File descriptor 19 is used by transport
        <TCPTransport closed=False ...>", a known uvloop defect: the number was
        closed under that transport and handed to our new socket). In a CI
        run this RuntimeError went up through a ``link-*`` task and ended the
        daemon (exit 1) while its peers were being killed around it. It is a
        failed dial: the socket is kept open (up to :data:`MAX_HELD_SOCKETS`,
        the oldest closed first) so that the next socket gets another number
        instead of failing on the same one for every dial."""
        self._held_sockets.append(sock)
        log.warning("dial failed: the event loop still maps this socket's descriptor to a closed transport",
                    extra={"event": "stale_descriptor", "fd": sock.fileno(), "error": str(exc)[:200]})
        return OSError(errno.EBADF, f"event loop refused the socket: {exc}")

    @contextlib.contextmanager
    def expecting_punch(self, peer: PeerId, addrs: Sequence[Multiaddr], initiator: bool) -> Iterator[None]:
        """While a hole punch dials ``addrs``: a connection our listener accepts
        from one of them (the peer's SYN reached it before ours left) is
        upgraded in the punch's role, authenticated as ``peer``, not as a plain
        inbound one. Both ends then agree on the roles whichever socket won
        (see murmur/protocol/libp2p/dcutr.py)."""
        keys = [(a.host, a.port) for a in addrs]
        for key in keys:
            self._punch_roles[key] = (peer, initiator)
        try:
            yield
        finally:
            for key in keys:
                if self._punch_roles.get(key) == (peer, initiator):
                    del self._punch_roles[key]

    def punch_role(self, remote: tuple[str, int]) -> tuple[PeerId, bool] | None:
        return self._punch_roles.get(remote)

    async def accepted_from(self, peer: PeerId, hosts: set[str]) -> Libp2pConnection | None:
        """A direct connection with ``peer`` that our listener accepted from one
        of ``hosts``, waiting for one still upgrading (bounded by its handshake
        timer): where a hole punch's SYN reached our listener before our own
        dial went out, the punch is that connection."""
        def ours(conn: Libp2pConnection | None) -> bool:
            return conn is not None and conn.peer_id == peer and conn.relay is None and not conn.closed

        wires = [w for w in self._wires if not w.dialled and w.relay is None and w.remote[0] in hosts]
        upgrading = [w.ready for w in wires if not w.ready.done()]
        if upgrading:
            await asyncio.wait(upgrading, timeout=self.config.limits.handshake_timeout_s)
        for wire in wires:
            if wire.ready.done() and not wire.ready.cancelled() and wire.ready.exception() is None \
                    and ours(wire.ready.result()):
                return wire.ready.result()
        return None

    async def upgrade_stream(self, stream: Stream, outbound: bool, expected: PeerId | None = None) -> Libp2pConnection:
        """Upgrade a relayed stream (circuit relay v2, after its CONNECT) into a
        connection, exactly as a TCP connection is upgraded: the same :class:`Wire`
        runs over a :class:`StreamTransport`, so security, muxer, admission (an
        inbound one counts under the relay's address), budgets and timeouts are
        the TCP path's. ``conn.relay`` names the relay. Raises what :meth:`dial` does."""
        if self._closing:
            raise ConnectionClosed("host is closed")
        wire = Wire(self, outbound, next(self._numbers), expected)
        wire.relay = stream.peer_id
        transport = StreamTransport(stream, wire, self._tasks, f"relayed-{wire.conn_no}",
                                    peername=stream.conn.remote, sockname=stream.conn.local)
        transport.start()
        return await asyncio.shield(wire.ready)  # the wire's own timer bounds the upgrade

    async def close(self) -> None:
        """Stop listening, close every connection (goodbye first), cancel every task."""
        self._closing = True
        for server in self._servers:
            server.close()
        for wire in list(self._wires):
            if wire.conn is None and wire.tr is not None:
                wire.tr.abort()
        await asyncio.gather(*(c.close() for c in list(self._conns)), return_exceptions=True)
        await self._tasks.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._warnings.close()
        while self._held_sockets:
            self._held_sockets.popleft().close()

    async def abort(self, timeout_s: float = 2.0) -> None:
        """Die like ``kill -9`` would: stop listening and dialling, reset every
        TCP connection (upgraded or not) with no goodbye, and wait (bounded)
        until the sockets are gone. For fault injection in tests and
        testnets; a daemon shuts down with :meth:`close`."""
        self._closing = True
        for server in self._servers:
            server.close()
        for wire in list(self._wires):
            if wire.tr is not None:
                wire.tr.abort()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._wires and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # connection_lost() runs on the next loop iterations

    async def _flush_warnings(self) -> None:
        self._warnings.flush()

    async def __aenter__(self) -> Libp2pHost:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- admission ---------------------------------------------------------------------

    def warn(self, host: str, msg: str, *, event: str, **fields: object) -> None:
        """A WARNING that ``host``, maybe a stranger, can cause: rate-limited
        per subnet and in all; the rest are counted in one summary line."""
        try:
            key: object = subnet_of(host)
        except ValueError:
            key = host
        self._warnings.warning(log, key, msg, extra={"event": event, **fields})

    def _admit(self, wire: Wire) -> bool:
        """Track every live TCP connection; give an inbound one a slot, evicting
        the one worth least when all are taken (see admission.py)."""
        if self._closing:
            return False
        limits = self.config.limits
        if not wire.dialled:
            try:
                subnet = subnet_of(wire.remote[0])
            except ValueError:  # not an IP peer (cannot happen on a TCP listener); nothing to count it under
                return False
            if self.cooloff.cooling(wire.remote[0]):  # refused before any crypto; counted, not logged
                return False
            reason = None
            if self._inbound_by_subnet[subnet] >= limits.max_inbound_per_subnet:
                reason = "max_inbound_per_subnet"
            elif self._inbound_total >= limits.max_inbound and not self._evict_for(subnet):
                reason = "max_inbound"
            if reason is not None:
                self.warn(wire.remote[0], "inbound connection refused", event="inbound_refused",
                          remote=f"{wire.remote[0]}:{wire.remote[1]}", subnet=str(subnet), limit=reason)
                return False
            wire.subnet = subnet
            self._inbound_total += 1
            self._inbound_by_subnet[subnet] += 1
        self._wires.add(wire)
        return True

    def _inbound_wires(self) -> list[Wire]:
        return [w for w in self._wires if w.subnet is not None]

    def _evict_for(self, subnet: SubnetKey) -> bool:
        """Free one inbound slot for a newcomer from ``subnet``; False if every
        connection is protected."""
        wires = {w.conn_no: w for w in self._inbound_wires()}
        victim = choose_victim((w.slot() for w in wires.values()), time.monotonic(),
                               self.config.limits.useful_ttl_s)
        if victim is None:
            return False
        self._evict(wires[victim.key], "admission", newcomer_subnet=str(subnet))
        return True

    def _shed_memory(self, starved: Libp2pConnection) -> None:
        """``starved`` waits for the node's pool: evict the inbound connection
        worth least among the others that hold pool bytes (never a useful one)."""
        if self._closing:
            return
        wires = {
            w.conn_no: w for w in self._inbound_wires()
            if w.conn is not None and w.conn is not starved and not w.conn.closed and w.conn.budget.pooled > 0
        }
        victim = choose_victim((w.slot() for w in wires.values()), time.monotonic(),
                               self.config.limits.useful_ttl_s)
        if victim is not None:
            self._evict(wires[victim.key], "memory", pool_used=self.pool.used)

    def _evict(self, wire: Wire, reason: str, **fields: object) -> None:
        self.evictions[reason] += 1
        self.warn(
            wire.remote[0], "inbound connection evicted", event="inbound_evicted", reason=reason,
            conn=f"conn-{wire.conn_no}", remote=f"{wire.remote[0]}:{wire.remote[1]}", subnet=str(wire.subnet),
            peer=str(wire.peer_id) if wire.peer_id is not None else None, **fields,
        )
        self._forget_wire(wire)  # the slot is free now, not when the socket is gone
        wire.evict()

    def _forget_wire(self, wire: Wire) -> None:
        if wire not in self._wires:
            return
        self._wires.discard(wire)
        if wire.subnet is not None:
            self._inbound_total -= 1
            self._inbound_by_subnet[wire.subnet] -= 1
            if not self._inbound_by_subnet[wire.subnet]:
                del self._inbound_by_subnet[wire.subnet]

    # --- connections -------------------------------------------------------------------

    def _connection_up(self, wire: Wire, conn: Libp2pConnection) -> None:
        """The wire finished its upgrade: before any stream of ``conn`` is served."""
        self._conns.add(conn)
        # INFO for the connections we dial; DEBUG for inbound ones, which any
        # stranger (or a stream of fresh identities) opens at will.
        log.log(logging.INFO if conn.outbound else logging.DEBUG, "connection open", extra={
            "event": "connected", "conn": conn.name, "peer": str(conn.peer_id),
            "remote": f"{conn.remote[0]}:{conn.remote[1]}", "outbound": conn.outbound,
            "security": conn.security, "muxer": conn.muxer})
        if self.config.identify_on_connect:
            conn.tasks.spawn("identify", lambda: self._identify(conn))
        if self._on_connection is None:
            return
        try:
            task = self._on_connection(conn)
        except Exception:  # a bug of the application's costs this connection, not the host
            log.exception("on_connection failed", extra={"event": "on_connection_failed", "conn": conn.name})
            conn._drop()
            return
        if inspect.isawaitable(task):
            self._tasks.spawn(f"on_connection-{conn.name}", lambda: task)  # type: ignore[arg-type,return-value]

    def _forget(self, conn: Libp2pConnection) -> None:
        self._conns.discard(conn)
        self._ping_streams.pop(conn, None)

    def _upgrade_failed(self, wire: Wire, fault: PeerFault) -> None:
        """A fault before the connection existed: blamed on the peer if it
        already proved who it is (its first authenticated bytes count), else
        logged, rate-limited, under its subnet."""
        self.faults[type(fault).__name__] += 1
        if wire.peer_id is not None:
            self._blame(wire.peer_id, None, fault, wire.remote)
            return
        self.warn(wire.remote[0], "handshake failed", event="handshake_failed", conn=f"conn-{wire.conn_no}",
                  remote=f"{wire.remote[0]}:{wire.remote[1]}", outbound=wire.outbound, phase=wire.phase.value,
                  fault=type(fault).__name__, detail=str(fault))
        if self._on_fault is not None:
            self._on_fault(None, fault)

    def _report(self, conn: Libp2pConnection, fault: PeerFault) -> None:
        """A fault of an upgraded connection's peer: counted and handed on."""
        self.faults[type(fault).__name__] += 1
        self._blame(conn.peer_id, conn, fault, conn.remote)

    def _blame(self, peer: PeerId, conn: Libp2pConnection | None, fault: PeerFault, remote: tuple[str, int]) -> None:
        if self._on_fault is not None:
            self._on_fault(peer, fault)  # the sink logs it, within its own budget
            return
        self.warn(remote[0], "peer fault", event="libp2p_fault", fault=type(fault).__name__, detail=str(fault),
                  conn=conn.name if conn is not None else None, peer=str(peer),
                  remote=f"{remote[0]}:{remote[1]}", drop=fault.drop)

    # --- identify ---------------------------------------------------------------------

    def identify_for(self, conn: Libp2pConnection) -> idp.IdentifyInfo:
        """What we tell ``conn``'s peer: our protocols, listen addresses, and its address as we see it."""
        host, port = conn.remote
        # Over a circuit the remote address is the relay's, not the peer's: nothing to tell it.
        observed = (None if conn.relay is not None
                    else AnyMultiaddr.of((Proto.IP6 if ":" in host else Proto.IP4, host), (Proto.TCP, port)))
        return idp.make_identify(
            self.peer_id.public_key_bytes, self.protocols(),
            [*(a.without_peer().to_any() for a in self.listen_addrs), *self.circuit_addrs()], observed,
            self.config.agent_version, self.config.protocol_version,
        )

    async def _serve_identify(self, stream: Stream) -> None:
        await stream.write(self.identify_for(stream.conn).encode())
        await stream.close_write()

    async def _read_identify(self, stream: Stream) -> idp.IdentifyInfo:
        prefix = bytearray()
        while (got := idp.identify_length(prefix)) is None:
            byte = await stream.read(1)
            if not byte:
                raise DecodeError("identify stream ended before its message")
            prefix += byte
        length, _ = got
        body = await stream.readexactly(length)
        return idp.decode_identify(body, expected=stream.peer_id)

    async def _identify(self, conn: Libp2pConnection) -> None:
        """Ask the peer who it is; keep the answer on the connection."""
        try:
            async with asyncio.timeout(self.config.limits.identify_timeout_s):
                stream = await conn.open_stream(idp.IDENTIFY)
                info = await self._read_identify(stream)
                await stream.close_write()
        except PeerFault as fault:
            conn._fault_on_stream(fault)
            conn.identified.set()
            return
        except (TimeoutError, ConnectionClosed, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("identify failed", extra={"event": "identify_failed", "conn": conn.name, "error": repr(exc)})
            conn.identified.set()
            return
        self._learn(conn, info)

    def _learn(self, conn: Libp2pConnection, info: idp.IdentifyInfo) -> None:
        if conn.relay is not None and info.observed_addr is not None:
            # A peer behind a circuit saw the relay, not us: its claim is no vote on our address.
            info = dataclasses.replace(info, observed_addr=None)
        first = conn.identify is None
        conn.identify = info if first else conn.identify.merged(info)
        if info.observed_addr is not None:
            self._observed(conn.peer_id, info.observed_addr)
        conn.identified.set()
        # INFO once for a connection we dialled; DEBUG for inbound ones and for
        # pushes, which a peer sends at will (one stream each): at INFO a push
        # flood wrote ~580 lines (12 KiB each) a second and rotated the node's
        # whole log file budget away in seconds.
        log.log(logging.INFO if first and conn.outbound else logging.DEBUG, "peer identified", extra={
            "event": "identified", "conn": conn.name, "peer": str(conn.peer_id), "push": not first,
            "agent": conn.identify.agent_version,
            "protocols": [p[:LOGGED_PROTOCOL_CHARS] for p in conn.identify.protocols[:LOGGED_PROTOCOLS]],
            "observed": str(info.observed_addr) if info.observed_addr else None})
        if self._on_identified is not None:
            self._on_identified(conn)

    def _observed(self, peer: PeerId, addr: AnyMultiaddr) -> None:
        """Count ``peer``'s vote for ``addr`` in :attr:`observed_addrs`, in
        place of its previous one; an address past :data:`MAX_OBSERVED_ADDRS`
        distinct ones is not counted (the peer's previous vote is withdrawn)."""
        self._withdraw(self._observed_by.pop(peer, None))
        if addr in self.observed_addrs or len(self.observed_addrs) < MAX_OBSERVED_ADDRS:
            self.observed_addrs[addr] += 1
            self._observed_by[peer] = addr
        while len(self._observed_by) > MAX_OBSERVERS:
            self._withdraw(self._observed_by.popitem(last=False)[1])

    def _withdraw(self, addr: AnyMultiaddr | None) -> None:
        if addr is None:
            return
        self.observed_addrs[addr] -= 1
        if self.observed_addrs[addr] <= 0:
            del self.observed_addrs[addr]

    async def _serve_identify_push(self, stream: Stream) -> None:
        """Read one push and close our side too: the pusher only writes, so
        a stream left open here would stay live in both muxers for the
        connection's lifetime, one more per push, until the pusher could
        open no stream at all (``max_streams``)."""
        async with asyncio.timeout(self.config.limits.identify_timeout_s):
            info = await self._read_identify(stream)
        await stream.close_write()
        self._learn(stream.conn, info)

    async def push_identify(self, conn: Libp2pConnection) -> None:
        """Tell the peer our current identify data (``/ipfs/id/push/1.0.0``)."""
        stream = await conn.open_stream(idp.IDENTIFY_PUSH)
        await stream.write(self.identify_for(conn).encode())
        await stream.close_write()

    # --- ping ------------------------------------------------------------------------

    async def _serve_ping(self, stream: Stream) -> None:
        conn = stream.conn
        if self._ping_streams[conn] >= MAX_PING_STREAMS:
            stream.reset()
            return
        self._ping_streams[conn] += 1
        budget = RequestBudget(PING_BURST, PING_REFILL_S)
        try:
            while True:
                try:
                    payload = await stream.readexactly(idp.PING_SIZE)
                except asyncio.IncompleteReadError:
                    break
                if not budget.take():
                    raise LimitExceeded(f"pings faster than one every {PING_REFILL_S} s")
                await stream.write(payload)
            await stream.close_write()
        finally:
            self._ping_streams[conn] -= 1
            if not self._ping_streams[conn]:
                del self._ping_streams[conn]

    async def ping(self, conn: Libp2pConnection, count: int = 1) -> list[float]:
        """Round trips (seconds) of ``count`` libp2p pings on one stream."""
        stream = await conn.open_stream(idp.PING)
        rtts = []
        try:
            for _ in range(count):
                payload = os.urandom(idp.PING_SIZE)
                start = time.perf_counter()
                await stream.write(payload)
                echoed = await stream.readexactly(idp.PING_SIZE)
                rtts.append(time.perf_counter() - start)
                if echoed != payload:
                    raise DecodeError("ping answer differs from the payload")
        finally:
            await stream.close_write()
        return rtts


async def echo_handler(stream: Stream) -> None:
    """Writes back everything it reads until the peer's FIN, then FIN (for tests and interop)."""
    while data := await stream.read():
        await stream.write(data)
    await stream.close_write()
