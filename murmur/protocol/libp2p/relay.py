"""Circuit relay v2 on the libp2p host: the relay service (``/hop``) and its client (``/stop``, dial).

A private peer *reserves* a slot on a relay (RESERVE on ``/hop``); another
peer asks the relay to CONNECT it to that peer; the relay opens ``/stop`` on
the reserved peer's connection, and once both said OK it copies bytes between
the two streams. Each end then upgrades its stream like a TCP connection
(:meth:`Libp2pHost.upgrade_stream`): the relay sees only ciphertext.

What a stranger can make the relay hold is bounded by :class:`RelayConfig`
(defaults as go-libp2p's for strangers): reservations in all, per peer (one,
refreshed in place) and per IP address; circuits in all and per peer, and of
one destination's circuits per source peer and per source IP; and each
circuit's duration and bytes (per direction; past either the circuit is
reset). The copy holds at most one read (``READ_BYTES``) per direction, and
what waits unread stays in the stream windows charged to each connection's
:class:`~murmur.protocol.budget.PeerBudget`. A circuit one end stops reading
from is cut after ``stall_timeout_s``: on murmur's fast path one receive budget
serves all streams of a connection, and the other end's whole connection to
the relay would stall with it.

Learning traffic: a murmur network may run its own relays, and a round's
deltas do not fit in go-libp2p's 2 minutes and 128 KiB. Peers the operator
counts as *members* (``learning_peers``, and with ``learning_greeted`` any peer
the node says greeted it, see :class:`RelayService`) form a second class with
its own, larger limits (``learning_*``): a circuit gets them when *both* ends
are members, so a member cannot lend them to a stranger. Members' reservations
and circuits are counted in pools of their own (``learning_max_reservations``,
``learning_max_circuits``), so a flood of strangers cannot crowd them out, nor
members take the strangers' room; per peer and per IP the limits are the same
for both, and counted in each class apart (a stranger holding every circuit a
member may have with strangers leaves its circuits with members free). Every limit stays bounded: a member that misbehaves (or a Sybil that
merely greeted, with ``learning_greeted``) costs at most the learning class's
pool. A cut circuit is redialled by its client (a neighbour gets a redial).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from murmur.errors import ConnectionClosed, DecodeError, MurmurError, PeerFault
from murmur.protocol import circuit
from murmur.protocol.circuit import HopMessage, HopType, Limit, PeerInfo, Reservation, Status, StopMessage, StopType
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.connection import Libp2pConnection, Stream
from murmur.protocol.libp2p.host import Libp2pHost
from murmur.protocol.multiaddr import AnyMultiaddr, Component, DialAddr, Multiaddr, Proto
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

READ_BYTES = 16 * 1024  # one read per direction of a circuit is all the relay holds itself
MIN_REFRESH_S = 0.5  # a client refreshes a reservation no more often than this
MAX_CIRCUITS_PER_PAIR = 4
"""Live circuits one source peer may hold to one destination (per class). A
peer needs one to reach another (two while a redial races the old one).
Counted per peer alone, one stranger held all 16 circuits a reserved
stranger may have, and everyone else dialling it was refused for the
circuits' whole duration."""
IP_PAIR_SHARE = 2
"""Live circuits the peers of one source IP may hold to one destination (per
class), unless configured: ``max_circuits_per_peer // IP_PAIR_SHARE`` (8 of
the default 16), and never fewer than ``max_circuits_per_pair``. Identities are free, an address is not, so half of a
destination's circuits stays for peers from other addresses, at whatever
``max_circuits_per_peer`` the operator chose (a fixed 8 held a raised one
back: 8 of 64 for a destination many peers behind one NAT reach)."""


class RelayRefused(MurmurError):
    """The relay (or the peer behind it) answered with a status other than OK."""

    def __init__(self, status: Status, what: str) -> None:
        super().__init__(f"{what} refused: {status.name}")
        self.status = status


@dataclass(frozen=True)
class RelayConfig:
    """The relay service's bounds; defaults are go-libp2p's ``DefaultResources``
    for strangers, and bounded larger ones for the learning class (members)."""

    reservation_ttl_s: int = 3600
    max_reservations: int = 128  # strangers' reservations in all
    max_reservations_per_ip: int = 8  # per class
    max_circuits: int = 256  # strangers' live circuits in all
    max_circuits_per_peer: int = 16  # live circuits per peer, as source or destination
    max_circuits_per_pair: int = MAX_CIRCUITS_PER_PAIR  # of one destination's, one source peer's
    max_circuits_per_ip_pair: int | None = None  # of one destination's, one source IP's (None: see IP_PAIR_SHARE)
    circuit_duration_s: int = 120  # per circuit, for strangers
    circuit_data_bytes: int = 128 * 1024  # per circuit and direction, for strangers
    message_timeout_s: float = 10.0  # reading one hop/stop message, the STOP round trip
    # One end took nothing for this long: cut the circuit. On the fast path a
    # connection has one receive budget for all its streams, so the other end's
    # connection to the relay would otherwise stall with the circuit (members' too).
    stall_timeout_s: float = 10.0
    # The learning class: circuits between two members (see the module docstring).
    learning_peers: frozenset[PeerId] = field(default_factory=frozenset)
    learning_greeted: bool = False  # peers the node says greeted it (murmur Hello) are members too
    learning_max_reservations: int = 128
    learning_max_circuits: int = 256
    learning_circuit_duration_s: int = 3600
    learning_circuit_data_bytes: int = 1 << 30

    def ip_pair_limit(self) -> int:
        """Circuits the peers of one source IP may hold to one destination."""
        if self.max_circuits_per_ip_pair is not None:
            return self.max_circuits_per_ip_pair
        # never below one peer's own share: one peer is one address
        return max(self.max_circuits_per_pair, self.max_circuits_per_peer // IP_PAIR_SHARE)

    def stranger_limit(self) -> Limit:
        return Limit(self.circuit_duration_s, self.circuit_data_bytes)

    def learning_limit(self) -> Limit:
        return Limit(self.learning_circuit_duration_s, self.learning_circuit_data_bytes)


async def read_message(stream: Stream, timeout_s: float,
                       length_of: Callable[[bytearray], tuple[int, int] | None] = circuit.message_length,
                       what: str = "circuit") -> bytes:
    """One uvarint-length-prefixed message's body: a circuit message by
    default (at most ``MAX_MESSAGE`` bytes), or what ``length_of`` bounds
    (the protocol's own ``message_length``, which refuses an oversized length
    before its body is read)."""
    async with asyncio.timeout(timeout_s):
        prefix = bytearray()
        while (got := length_of(prefix)) is None:
            byte = await stream.read(1)
            if not byte:
                raise DecodeError(f"{what} stream ended before its message")
            prefix += byte
        try:
            return await stream.readexactly(got[0])
        except asyncio.IncompleteReadError:
            raise DecodeError(f"{what} stream ended inside its message") from None


@dataclass
class _Reservation:
    conn: Libp2pConnection
    ip: str
    expires_at: float  # time.time()
    learning: bool  # in the members' pool


def stat_names() -> list[str]:
    """Every counter a :class:`RelayService` may count (for exporters that list them up front)."""
    refused = [f"refused_{s.name.lower()}" for s in Status if s is not Status.OK]
    return ["reservations_total", "circuits_total", "learning_reservations_total", "learning_circuits_total",
            "bytes_relayed", "learning_bytes_relayed", *refused, "cut_data", "cut_duration", "cut_stalled"]


class RelayService:
    """Serves ``/hop`` on ``host``: RESERVE and CONNECT, within :class:`RelayConfig`.

    ``greeted(peer)``: whether ``peer`` greeted the node over a direct
    connection (murmur's Hello); with ``learning_greeted`` such peers are
    members. The node answers it: this module speaks no murmur."""

    def __init__(self, host: Libp2pHost, config: RelayConfig = RelayConfig(),
                 greeted: Callable[[PeerId], bool] | None = None) -> None:
        self.host = host
        self.config = config
        self.greeted = greeted
        self._reservations: dict[PeerId, _Reservation] = {}
        # Live circuits per (peer, class), as source or destination: a member's
        # circuits with members are counted apart from its circuits with
        # strangers, or one stranger holding max_circuits_per_peer circuits to a
        # member would cut it off from every other member too.
        self._circuits_by_peer: Counter[tuple[PeerId, bool]] = Counter()
        # Of those, a destination's circuits per source peer and per source IP
        # (see MAX_CIRCUITS_PER_PAIR): one source cannot take all of them.
        self._circuits_by_pair: Counter[tuple[PeerId | str, PeerId, bool]] = Counter()
        self.circuits = 0  # live now, both classes
        self.learning_circuits = 0  # of which between members
        # reservations_total, circuits_total, bytes_relayed (all), learning_<those> (the members' part),
        # refused_<status>, cut_{data,duration,stalled}
        self.stats: Counter[str] = Counter()
        host.set_handler(circuit.HOP, self._serve_hop)

    def member(self, peer: PeerId) -> bool:
        """Whether ``peer`` is in the learning class (see the module docstring)."""
        cfg = self.config
        return peer in cfg.learning_peers or (cfg.learning_greeted and self.greeted is not None
                                              and self.greeted(peer))

    def serving(self, peer: PeerId) -> bool:
        """Whether ``peer`` holds a live reservation here or is an end of a live circuit."""
        self._prune(time.time())
        return peer in self._reservations or any(self._circuits_by_peer[peer, c] > 0 for c in (False, True))

    @property
    def reservations(self) -> dict[PeerId, float]:
        """Live reservations: peer -> expiry (Unix seconds)."""
        self._prune(time.time())
        return {peer: r.expires_at for peer, r in self._reservations.items()}

    async def _reply(self, stream: Stream, status: Status, **fields: object) -> None:
        if status is not Status.OK:
            self.stats[f"refused_{status.name.lower()}"] += 1
        await stream.write(HopMessage(HopType.STATUS, status=status, **fields).encode())  # type: ignore[arg-type]

    async def _serve_hop(self, stream: Stream) -> None:
        try:
            await self._hop(stream)
        except (ConnectionClosed, OSError):  # the client went away mid-answer: nothing to serve
            stream.reset()

    async def _hop(self, stream: Stream) -> None:
        try:
            msg = circuit.decode_hop(await read_message(stream, self.config.message_timeout_s))
        except DecodeError as exc:
            await self._reply(stream, Status.MALFORMED_MESSAGE)
            await stream.close_write()
            self.host._report(stream.conn, exc)
            return
        except (TimeoutError, ConnectionClosed):
            stream.reset()
            return
        if msg.type is HopType.RESERVE:
            await self._reserve(stream)
        elif msg.type is HopType.CONNECT:
            await self._connect(stream, msg)
        else:
            await self._reply(stream, Status.UNEXPECTED_MESSAGE)
        await stream.close_write()

    # --- RESERVE ------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        for peer in [p for p, r in self._reservations.items() if r.expires_at <= now or r.conn.closed]:
            del self._reservations[peer]

    async def _reserve(self, stream: Stream) -> None:
        conn, cfg, now = stream.conn, self.config, time.time()
        if conn.relay is not None:  # a reservation must rest on a direct connection (spec)
            await self._reply(stream, Status.PERMISSION_DENIED)
            return
        self._prune(now)
        peer, ip = conn.peer_id, conn.remote[0]
        learning = self.member(peer)
        held = self._reservations.get(peer)
        if held is None or held.learning != learning:  # a refresh in its class replaces the peer's one reservation
            pool = [r for p, r in self._reservations.items() if r.learning == learning and p != peer]
            most = cfg.learning_max_reservations if learning else cfg.max_reservations
            if len(pool) >= most or sum(1 for r in pool if r.ip == ip) >= cfg.max_reservations_per_ip:
                await self._reply(stream, Status.RESERVATION_REFUSED)
                return
        expires = int(now) + cfg.reservation_ttl_s
        self._reservations[peer] = _Reservation(conn, ip, float(expires), learning)
        self.stats["reservations_total"] += 1
        self.stats["learning_reservations_total"] += learning
        addrs = tuple(a.with_peer(self.host.peer_id).to_any() for a in self.host.listen_addrs)
        # what a circuit to it gets from a stranger (a member's own circuits may get more)
        await self._reply(stream, Status.OK, reservation=Reservation(expires, addrs), limit=cfg.stranger_limit())
        log.info("relay reservation", extra={"event": "relay_reserved", "peer": str(peer), "ip": ip,
                                             "expires": expires, "learning": learning})

    # --- CONNECT ------------------------------------------------------------------------

    async def _connect(self, stream: Stream, msg: HopMessage) -> None:
        cfg, src = self.config, stream.conn.peer_id
        if msg.peer is None:
            await self._reply(stream, Status.MALFORMED_MESSAGE)
            return
        dst = msg.peer.peer_id
        if stream.conn.relay is not None:  # no circuits over circuits
            await self._reply(stream, Status.PERMISSION_DENIED)
            return
        self._prune(time.time())
        reservation = self._reservations.get(dst)
        if reservation is None or dst == src:
            await self._reply(stream, Status.NO_RESERVATION)
            return
        learning = self.member(src) and self.member(dst)
        live = self.learning_circuits if learning else self.circuits - self.learning_circuits
        pairs = [(src, dst, learning), (stream.conn.remote[0], dst, learning)]
        if (live >= (cfg.learning_max_circuits if learning else cfg.max_circuits)
                or self._circuits_by_peer[src, learning] >= cfg.max_circuits_per_peer
                or self._circuits_by_peer[dst, learning] >= cfg.max_circuits_per_peer
                or self._circuits_by_pair[pairs[0]] >= cfg.max_circuits_per_pair
                or self._circuits_by_pair[pairs[1]] >= cfg.ip_pair_limit()):
            await self._reply(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        limit = cfg.learning_limit() if learning else cfg.stranger_limit()
        self.circuits += 1
        self.learning_circuits += learning
        self._circuits_by_peer[src, learning] += 1
        self._circuits_by_peer[dst, learning] += 1
        self._circuits_by_pair.update(pairs)
        stop: Stream | None = None
        try:
            try:
                async with asyncio.timeout(cfg.message_timeout_s):
                    stop = await reservation.conn.open_stream(circuit.STOP)
                    await stop.write(StopMessage(StopType.CONNECT, peer=PeerInfo(src), limit=limit).encode())
                    answer = circuit.decode_stop(await read_message(stop, cfg.message_timeout_s))
            except (TimeoutError, ConnectionClosed, PeerFault, OSError) as exc:
                if stop is not None:
                    stop.reset()
                log.info("relay stop failed", extra={"event": "relay_stop_failed", "dst": str(dst),
                                                     "error": repr(exc)})
                await self._reply(stream, Status.CONNECTION_FAILED)
                return
            if answer.type is not StopType.STATUS or answer.status is not Status.OK:
                stop.reset()
                await self._reply(stream, Status.CONNECTION_FAILED)
                return
            await self._reply(stream, Status.OK, limit=limit)
            self.stats["circuits_total"] += 1
            self.stats["learning_circuits_total"] += learning
            log.info("relay circuit", extra={"event": "relay_circuit", "src": str(src), "dst": str(dst),
                                             "learning": learning})
            await self._bridge(stream, stop, limit, learning)
        finally:
            self.circuits -= 1
            self.learning_circuits -= learning
            for peer in (src, dst):
                self._circuits_by_peer[peer, learning] -= 1
                if not self._circuits_by_peer[peer, learning]:
                    del self._circuits_by_peer[peer, learning]
            for pair in pairs:
                self._circuits_by_pair[pair] -= 1
                if not self._circuits_by_pair[pair]:
                    del self._circuits_by_pair[pair]

    async def _bridge(self, a: Stream, b: Stream, limit: Limit, learning: bool) -> None:
        """Copy both ways until both sides closed; reset both when a limit is reached or either resets."""
        data_limit, duration = limit.data_bytes, limit.duration_s

        async def pump(src: Stream, dst: Stream) -> None:
            sent = 0
            while True:
                # At the limit one more byte is read: a FIN there ends the circuit cleanly, a byte cuts it.
                want = READ_BYTES if data_limit is None else max(1, min(READ_BYTES, data_limit - sent))
                data = await src.read(want)
                if not data:
                    await dst.close_write()
                    return
                if data_limit is not None and sent >= data_limit:
                    self.stats["cut_data"] += 1
                    raise _CircuitCut("data limit")
                try:
                    async with asyncio.timeout(self.config.stall_timeout_s):
                        await dst.write(data)
                except TimeoutError:
                    self.stats["cut_stalled"] += 1
                    raise _CircuitCut("stalled") from None
                sent += len(data)
                self.stats["bytes_relayed"] += len(data)
                self.stats["learning_bytes_relayed"] += len(data) if learning else 0

        # Two tasks scoped to this handler (awaited or cancelled below, never left behind).
        pumps = [asyncio.create_task(pump(a, b), name=f"relay {a.peer_id.short()}->{b.peer_id.short()}"),
                 asyncio.create_task(pump(b, a), name=f"relay {b.peer_id.short()}->{a.peer_id.short()}")]
        try:
            async with asyncio.timeout(duration):
                await asyncio.gather(*pumps)
        except TimeoutError:
            self.stats["cut_duration"] += 1
            a.reset()
            b.reset()
        except (_CircuitCut, ConnectionClosed, PeerFault, OSError):
            a.reset()
            b.reset()
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


class _CircuitCut(Exception):
    """A circuit reached its byte limit: both streams are reset."""


class RelayClient:
    """The client side: reserve on relays, accept their STOPs as inbound
    connections, and dial peers through a relay. Installs the ``/stop`` handler.

    ``stats["circuits_cut"]`` counts relayed connections (dialled or accepted)
    whose circuit the other side reset: the relay cut it at a limit (its
    duration, its bytes, a stall) or went away. Whoever needs the peer dials
    it again (a node redials a learning neighbour); ``last_cut`` says when and
    at which limit the circuit ran."""

    def __init__(self, host: Libp2pHost, timeout_s: float = 10.0) -> None:
        self.host = host
        self.timeout_s = timeout_s
        self.reservations: dict[PeerId, Reservation] = {}  # relay -> our reservation on it
        self._relays: dict[PeerId, Libp2pConnection] = {}  # the connection each reservation rests on
        self.stats: Counter[str] = Counter()  # reservations, dialled, accepted, circuits_cut
        self.last_cut: dict[str, object] | None = None
        self._tasks = TaskManager(f"relay client {host.peer_id.short()}")
        host.set_handler(circuit.STOP, self._serve_stop)

    def keep(self, relay: Libp2pConnection) -> None:
        """Hold a reservation on ``relay``: reserve now and again each time half
        of what is left of it has passed (a refused or failed refresh, or the
        connection closing, ends it and its circuit addresses)."""
        self._tasks.spawn(f"keep-{relay.peer_id.short()}", lambda: self._keep(relay), replace=True)

    def keeping(self, relay: PeerId) -> bool:
        """Whether a reservation on ``relay`` is being held (or being made) now."""
        return f"keep-{relay.short()}" in self._tasks

    async def _keep(self, relay: Libp2pConnection) -> None:
        try:
            while not relay.closed:
                reservation = await self.reserve(relay)
                wait_s = max(MIN_REFRESH_S, (reservation.expire - time.time()) / 2)
                closed = asyncio.ensure_future(relay.wait_closed())
                try:
                    await asyncio.wait([closed], timeout=wait_s)
                finally:
                    closed.cancel()
        except (RelayRefused, ConnectionClosed, PeerFault, TimeoutError, OSError) as exc:
            log.info("relay reservation lost", extra={"event": "relay_reservation_lost",
                                                      "relay": str(relay.peer_id), "error": repr(exc)})
        self._forget(relay)

    def _forget(self, relay: Libp2pConnection) -> None:
        if self._relays.get(relay.peer_id) is relay:
            del self._relays[relay.peer_id]
            self.reservations.pop(relay.peer_id, None)

    async def close(self) -> None:
        """Stop keeping reservations (the host's connections are the host's to close)."""
        await self._tasks.shutdown()

    async def _hop(self, conn: Libp2pConnection, msg: HopMessage, what: str) -> tuple[Stream, HopMessage]:
        stream = await conn.open_stream(circuit.HOP, timeout_s=self.timeout_s)
        try:
            await stream.write(msg.encode())
            answer = circuit.decode_hop(await read_message(stream, self.timeout_s))
        except BaseException:
            stream.reset()
            raise
        if answer.type is not HopType.STATUS or answer.status is None:
            stream.reset()
            raise DecodeError(f"relay answered a {what} with {answer.type.name}, not a STATUS")
        if answer.status is not Status.OK:
            stream.reset()
            raise RelayRefused(answer.status, what)
        return stream, answer

    async def reserve(self, relay: Libp2pConnection) -> Reservation:
        """A reservation (or its refresh) on ``relay``; :class:`RelayRefused` if refused."""
        stream, answer = await self._hop(relay, HopMessage(HopType.RESERVE), "reservation")
        await stream.close_write()
        stream.close_read()
        if answer.reservation is None:
            raise DecodeError("relay said OK to a reservation without one")
        self.reservations[relay.peer_id] = answer.reservation
        self._relays[relay.peer_id] = relay
        self.stats["reservations"] += 1
        return answer.reservation

    async def dial(self, relay: Libp2pConnection, target: PeerId) -> Libp2pConnection:
        """A connection to ``target`` through ``relay`` (``…/p2p/<relay>/p2p-circuit/p2p/<target>``),
        upgraded and authenticated as ``target``."""
        stream, answer = await self._hop(relay, HopMessage(HopType.CONNECT, peer=PeerInfo(target)), "circuit")
        self.stats["dialled"] += 1
        conn = await self.host.upgrade_stream(stream, outbound=True, expected=target)
        self._tasks.spawn(f"circuit-{conn.name}", lambda: self._watch(conn, stream, answer.limit))
        return conn

    async def _watch(self, conn: Libp2pConnection, stream: Stream, limit: Limit | None) -> None:
        """Count the relayed connection's end if the relay cut it (see the class docstring)."""
        opened = time.monotonic()
        await conn.wait_closed()
        if not stream.reset_by_peer:
            return  # closed by either end (a FIN), or reset here
        self.stats["circuits_cut"] += 1
        lasted = time.monotonic() - opened
        self.last_cut = {"peer": str(conn.peer_id), "relay": str(stream.peer_id), "lasted_s": round(lasted, 1),
                         "limit_duration_s": limit.duration_s if limit is not None else None,
                         "limit_data_bytes": limit.data_bytes if limit is not None else None}
        log.info("relayed connection cut", extra={"event": "relay_circuit_cut", **self.last_cut})

    async def dial_addr(self, addr: DialAddr) -> Libp2pConnection:
        """Dial ``/ip4|ip6/…/tcp/…/p2p/<relay>/p2p-circuit/p2p/<target>``: through a live
        direct connection to the relay if there is one, else over a new one to that address."""
        relay, target = addr.relay, addr.peer_id
        if relay is None or target is None:
            raise ValueError(f"{addr} is not a circuit to a named peer (…/p2p/<relay>/p2p-circuit/p2p/<id>)")
        if addr.dns:
            raise ValueError(f"{addr}: resolve the relay's DNS name first (discovery.resolve)")
        conn = next((c for c in self.host.connections if c.peer_id == relay and c.relay is None), None)
        if conn is None:
            conn = await self.host.dial(Multiaddr(addr.host, addr.port, relay))
        return await self.dial(conn, target)

    def circuit_addrs(self) -> list[AnyMultiaddr]:
        """Where others reach us through our live reservations: each relay address
        the reservation named, ``/p2p-circuit/p2p/<us>`` appended (what a private node advertises)."""
        now, own = time.time(), Component(Proto.P2P, self.host.peer_id.raw)
        out: list[AnyMultiaddr] = []
        for relay, res in self.reservations.items():
            conn = self._relays.get(relay)
            if res.expire <= now or conn is None or conn.closed:
                continue
            for addr in res.addrs:
                if addr.peer_id == relay and not addr.is_circuit:
                    out.append(AnyMultiaddr(addr.components + (Component(Proto.P2P_CIRCUIT), own)))
        return out

    async def _serve_stop(self, stream: Stream) -> None:
        try:
            msg = circuit.decode_stop(await read_message(stream, self.timeout_s))
        except DecodeError as exc:
            await stream.write(StopMessage(StopType.STATUS, status=Status.MALFORMED_MESSAGE).encode())
            await stream.close_write()
            self.host._report(stream.conn, exc)
            return
        except (TimeoutError, ConnectionClosed):
            stream.reset()
            return
        if msg.type is not StopType.CONNECT or msg.peer is None:
            await stream.write(StopMessage(StopType.STATUS, status=Status.UNEXPECTED_MESSAGE).encode())
            await stream.close_write()
            return
        if stream.peer_id not in self.reservations:  # only relays we asked may send us strangers
            await stream.write(StopMessage(StopType.STATUS, status=Status.PERMISSION_DENIED).encode())
            await stream.close_write()
            return
        await stream.write(StopMessage(StopType.STATUS, status=Status.OK).encode())
        try:
            conn = await self.host.upgrade_stream(stream, outbound=False, expected=msg.peer.peer_id)
        except (PeerFault, ConnectionClosed, OSError):
            return
        self.stats["accepted"] += 1
        await self._watch(conn, stream, msg.limit)  # the stream is the connection: this handler holds it open
