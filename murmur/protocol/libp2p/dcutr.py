"""Hole punching with DCUtR (``/libp2p/dcutr``) on the libp2p host: a relayed
connection upgraded to a direct one over TCP.

Roles, as the spec names them: ``A`` dialled ``B`` through a relay, so ``B``
holds the *inbound* relayed connection and drives the upgrade
(:meth:`HolePuncher.upgrade`):

1. *unilateral*: if ``A``'s identify lists public TCP addresses, ``B`` just
   dials them (``A`` may be reachable; nothing to punch);
2. otherwise, or when that failed, ``B`` opens ``/libp2p/dcutr`` on the
   relayed connection, sends ``CONNECT`` with its own public addresses and
   times the round trip until ``A``'s ``CONNECT`` (with ``A``'s) comes back;
   it sends ``SYNC`` and dials ``A``'s addresses half a round trip later,
   while ``A`` dials ``B``'s as soon as the ``SYNC`` arrives: both SYNs
   cross, each NAT takes the other's as the answer to its own (TCP
   simultaneous open);
3. on failure, again on the same stream: three attempts in all;
4. when all three failed and the relayed connection lives on, the whole
   upgrade is tried again later (:data:`RETRY_DELAYS_S`, growing: 30 s,
   60 s, 120 s, then never), as go-libp2p's hole puncher retries a failed
   upgrade: a NAT whose mapping was busy, a router that was rebooting or a
   lost SYN need not leave a pair relayed for the connection's lifetime.

Every dial leaves from the listen port (:meth:`Libp2pHost.dial`, port
reuse), so an endpoint-independent NAT maps it to the address peers
observed. A simultaneous open leaves both ends with a *dialled* socket and
nobody to accept it, so the upgrade's roles are given out, as go-libp2p
does: ``B``, who drives the upgrade, is the multistream dialer and Noise
initiator, ``A`` the responder. (The multistream-select
``/libp2p/simultaneous-connect`` extension, which negotiated roles with
nonces, was dropped from the specs.) Where one SYN reaches the other side's
listener instead (a public ``A`` that had not dialled yet), that side
accepts it as a plain inbound connection, in the role it would have had
anyway, and its own dial fails at once on the taken 4-tuple: the punch
still counts as a success there.

The direct connection that results is marked ``punched`` (or not, for the
unilateral upgrade) and handed to ``on_direct``; moving traffic onto it and
closing the relayed one is the application's (the node's session table does
it, see node/daemon.py).

What a peer can make us do is bounded: one DCUtR exchange per peer at a
time (more streams are reset), ``max_sessions`` exchanges *dialling* at
once (a unilateral upgrade's dials, a punch; past it the exchange is
refused), at most
``attempts`` CONNECT rounds per stream and ``connection_rounds`` per relayed
connection, all its streams together (a further CONNECT is a
:class:`~murmur.errors.LimitExceeded`), at most ``max_dial_addrs`` dials per
round, and only to the IPs and ports of the addresses the peer gave (checked
by :func:`murmur.protocol.dcutr.dialable`: public, shared or private IPv4/6
TCP, never loopback or a wildcard). DCUtR on a connection that is not
relayed, garbage, or a message out of turn is a typed fault for the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from murmur.errors import ConnectionClosed, DecodeError, LimitExceeded, PeerFault, UnexpectedProtocol
from murmur.protocol import dcutr
from murmur.protocol.addresses import Scope, scope
from murmur.protocol.dcutr import HolePunch, HolePunchType
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.connection import Libp2pConnection, Stream
from murmur.protocol.libp2p.host import Libp2pHost
from murmur.protocol.multiaddr import Multiaddr
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

MAX_OWN_ADDRS = 8  # addresses we put in our CONNECT
# After a failed upgrade (its attempts all failed), wait this long and try the
# whole upgrade again while the relayed connection lives; one retry per delay.
RETRY_DELAYS_S = (30.0, 60.0, 120.0)
# CONNECT rounds we answer on one relayed connection, all its DCUtR streams
# together: what a driver like us needs (an upgrade and its retries, three
# rounds each). Past it a peer could make us dial any address it names, four
# per round, stream after stream (measured: 1200-2600 dials a second).
CONNECTION_ROUNDS = 3 * (1 + len(RETRY_DELAYS_S))


@dataclass(frozen=True)
class DcutrConfig:
    attempts: int = 3  # CONNECT/SYNC rounds per upgrade (the spec: B retries twice)
    max_dial_addrs: int = 4  # of the peer's addresses, dialled per round
    max_sessions: int = 8  # DCUtR exchanges dialling at once, both roles together (waiting for the peer: none)
    message_timeout_s: float = 10.0  # waiting for the peer's next message
    unilateral: bool = True  # dial a peer's public listen addresses before punching
    allow_loopback: bool = False  # punch to loopback addresses (nodes sharing one machine, in tests)
    retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S  # before each retry of a failed upgrade; () never retries
    connection_rounds: int = CONNECTION_ROUNDS  # CONNECTs we answer per relayed connection, all streams together

    def __post_init__(self) -> None:
        if min(self.attempts, self.max_dial_addrs, self.max_sessions, self.connection_rounds) < 1 \
                or not self.message_timeout_s > 0:
            raise ValueError(f"invalid DCUtR config {self}")
        if any(not d > 0 for d in self.retry_delays_s):
            raise ValueError(f"invalid DCUtR retry delays {self.retry_delays_s}")


def stat_names() -> list[str]:
    """Every counter a :class:`HolePuncher` may count (for exporters that list them up front).

    ``attempts``: CONNECT/SYNC rounds this node took part in; ``successes``
    and ``failures``: upgrades that ended with a punched connection or
    without one; ``unilateral``: upgrades by a plain dial to the peer's
    public address; ``refused``: DCUtR streams reset (busy, not relayed,
    one already running for that peer); ``retries``: upgrades tried again
    after a failed one on the same relayed connection."""
    return ["attempts", "successes", "failures", "unilateral", "refused", "retries"]


OnDirect = Callable[[Libp2pConnection, Libp2pConnection], None]


class HolePuncher:
    """Serves ``/libp2p/dcutr`` on ``host`` and upgrades inbound relayed
    connections (see the module docstring). ``own_addrs``: the addresses we
    believe others can reach us at, best first (the node's confirmed observed
    addresses); the host's tally of observed addresses and its public listen
    addresses follow them."""

    def __init__(self, host: Libp2pHost, config: DcutrConfig = DcutrConfig(),
                 own_addrs: Callable[[], Sequence[Multiaddr]] = tuple,
                 on_direct: OnDirect | None = None) -> None:
        self.host = host
        self.config = config
        self.own_addrs = own_addrs
        self.on_direct = on_direct
        self.stats: Counter[str] = Counter()
        self._exchanging: set[PeerId] = set()  # a DCUtR exchange runs with them, either role: one per peer
        # Exchanges dialling now (at most max_sessions). A session held for a
        # whole exchange was held by a peer that stayed silent for
        # message_timeout_s, and again on its next stream or relayed
        # connection: eight peers that opened /libp2p/dcutr (or dialled us
        # through a relay) and never answered refused every upgrade, ours and
        # the ones we answer, for as long as they liked. A peer's silence now
        # holds its own exchange only; a session is dials, bounded by their timeouts.
        self._dialling = 0
        self._answered: dict[Libp2pConnection, int] = {}  # CONNECT rounds answered per relayed connection
        self._tasks = TaskManager(f"dcutr {host.peer_id.short()}")
        host.set_handler(dcutr.PROTOCOL, self._serve)

    async def close(self) -> None:
        await self._tasks.shutdown()

    # --- what we tell the peer ------------------------------------------------------------

    def addresses(self) -> list[Multiaddr]:
        """Our CONNECT's addresses: ``own_addrs``, then what peers observed us
        at (most often said first), then our public listen addresses."""
        out: list[Multiaddr] = []
        candidates = [*self.own_addrs(),
                      *(a.to_tcp() for a, _ in self.host.observed_addrs.most_common()),
                      *(a for a in self.host.listen_addrs if _public(a.host))]
        for addr in candidates:
            if addr is None:
                continue
            addr = dcutr.dialable(addr.without_peer().to_bytes(), self.config.allow_loopback)
            if addr is not None and addr not in out:
                out.append(addr)
            if len(out) == MAX_OWN_ADDRS:
                break
        return out

    # --- B: the inbound side of the relayed connection drives ------------------------------

    def on_relayed(self, conn: Libp2pConnection) -> None:
        """Start upgrading ``conn`` in the background if we are its inbound
        side; a failed upgrade is retried after each of ``retry_delays_s``
        while ``conn`` stays open and no direct connection to its peer exists."""
        if conn.relay is not None and not conn.outbound:
            self._tasks.spawn(f"upgrade-{conn.name}", lambda: self._upgrade_with_retries(conn), replace=True)

    async def _upgrade_with_retries(self, conn: Libp2pConnection) -> None:
        if await self._upgrade_quietly(conn):
            return
        for retry, delay in enumerate(self.config.retry_delays_s, 1):
            try:  # the relayed connection ending ends the retries
                await asyncio.wait_for(conn.wait_closed(), delay)
                return
            except TimeoutError:
                pass
            if conn.closed or self._direct(conn.peer_id) is not None:
                return
            self.stats["retries"] += 1
            log.info("hole punch retried", extra={"event": "dcutr_retry", "peer": str(conn.peer_id),
                                                  "retry": retry, "after_s": delay})
            if await self._upgrade_quietly(conn):
                return

    async def _upgrade_quietly(self, conn: Libp2pConnection) -> bool:
        """One upgrade; whether it is over for ``conn`` (upgraded, or the peer
        at fault: no retry for a peer that broke the protocol)."""
        try:
            return await self.upgrade(conn) is not None
        except PeerFault as exc:
            log.info("hole punch ended", extra={"event": "dcutr_ended", "peer": str(conn.peer_id),
                                                "error": repr(exc)})
            return True
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            log.info("hole punch ended", extra={"event": "dcutr_ended", "peer": str(conn.peer_id),
                                                "error": repr(exc)})
            return conn.closed

    async def upgrade(self, conn: Libp2pConnection) -> Libp2pConnection | None:
        """A direct connection to ``conn``'s peer (unilateral dial, then up
        to ``attempts`` punches), or None. ``conn`` must be relayed and ours
        inbound. Raises the peer's fault (also reported to the host)."""
        if conn.relay is None or conn.outbound:
            raise ValueError("only the inbound side of a relayed connection drives DCUtR")
        peer = conn.peer_id
        direct = self._direct(peer)
        if direct is not None:
            return direct
        if peer in self._exchanging:
            self.stats["refused"] += 1
            return None
        self._exchanging.add(peer)
        try:
            return await self._upgrade(conn)
        finally:
            self._exchanging.discard(peer)

    @contextlib.contextmanager
    def _session(self) -> Iterator[bool]:
        """One of ``max_sessions`` for a dialling phase, if one is free (False: refused, counted)."""
        if self._dialling >= self.config.max_sessions:
            self.stats["refused"] += 1
            yield False
            return
        self._dialling += 1
        try:
            yield True
        finally:
            self._dialling -= 1

    async def _upgrade(self, conn: Libp2pConnection) -> Libp2pConnection | None:
        cfg, peer = self.config, conn.peer_id
        try:
            await asyncio.wait_for(conn.identified.wait(), self.host.config.limits.identify_timeout_s)
        except TimeoutError:
            pass
        if cfg.unilateral and conn.identify is not None:
            public = [a.to_tcp() for a in conn.identify.listen_addrs if not a.is_circuit]
            addrs = [a for a in public if a is not None and _public(a.host)][: cfg.max_dial_addrs]
            direct = await self._unilateral(addrs, peer) if addrs else None
            if direct is not None:
                self.stats["unilateral"] += 1
                return self._done(conn, direct, punched=False)
        stream = await conn.open_stream(dcutr.PROTOCOL, timeout_s=cfg.message_timeout_s)
        try:
            for attempt in range(1, cfg.attempts + 1):
                own = self.addresses()
                if not own:
                    log.info("no address to punch from", extra={"event": "dcutr_no_addrs", "peer": str(peer)})
                    break
                started = time.monotonic()
                await stream.write(dcutr.connect(own).encode())
                answer = await self._read(stream, conn)
                if answer is None:
                    break
                if answer.type is not HolePunchType.CONNECT:
                    raise self._fault(conn, DecodeError(f"DCUtR: {answer.type.name} where a CONNECT was due"))
                rtt = time.monotonic() - started
                targets = self._targets(answer)
                with self._session() as free, self.host.expecting_punch(peer, targets, initiator=True):
                    if not free:  # (expecting before A may dial)
                        break
                    await stream.write(dcutr.SYNC.encode())
                    self.stats["attempts"] += 1
                    await asyncio.sleep(rtt / 2)  # the spec's timer: A dials as our SYNC reaches it
                    direct = await self._punch(targets, peer, initiator=True)
                log.info("hole punch attempt", extra={"event": "dcutr_attempt", "peer": str(peer),
                                                      "attempt": attempt, "rtt_ms": round(rtt * 1000, 1),
                                                      "addrs": [str(a) for a in answer.addrs],
                                                      "ok": direct is not None})
                if direct is not None:
                    self.stats["successes"] += 1
                    return self._done(conn, direct, punched=True)
                existing = self._direct(peer)
                if existing is not None:  # made meanwhile: the peer's punch reached our listener late, or a dial
                    punched = existing.remote[0] in {a.host for a in targets}
                    self.stats["successes" if punched else "unilateral"] += 1
                    return self._done(conn, existing, punched=punched)
        finally:
            await _close(stream)
        self.stats["failures"] += 1
        return None

    async def _unilateral(self, addrs: Sequence[Multiaddr], peer: PeerId) -> Libp2pConnection | None:
        """The first of ``addrs`` (the peer's public listen addresses) that a plain dial reaches, in a session."""
        with self._session() as free:
            if not free:
                return None
            for addr in addrs:
                try:
                    return await self.host.dial(Multiaddr(addr.host, addr.port, peer))
                except (OSError, PeerFault, ConnectionClosed) as exc:
                    log.debug("unilateral upgrade failed", extra={"event": "dcutr_unilateral_failed",
                                                                  "peer": str(peer), "addr": str(addr),
                                                                  "error": repr(exc)})
        return None

    # --- A: the outbound side answers ---------------------------------------------------

    async def _serve(self, stream: Stream) -> None:
        conn, peer = stream.conn, stream.peer_id
        if conn.relay is None:
            stream.reset()
            self.stats["refused"] += 1
            self.host._report(conn, UnexpectedProtocol("DCUtR on a direct connection"))
            return
        if conn.outbound is False or peer in self._exchanging:
            # the peer dialled us through the relay: the upgrade is ours to drive; or one runs already
            stream.reset()
            self.stats["refused"] += 1
            return
        self._exchanging.add(peer)
        try:
            await self._answer(stream, conn)
        except (ConnectionClosed, OSError, TimeoutError, PeerFault):
            stream.reset()
        finally:
            self._exchanging.discard(peer)

    async def _answer(self, stream: Stream, conn: Libp2pConnection) -> None:
        peer, rounds = conn.peer_id, 0
        while True:
            msg = await self._read(stream, conn)
            if msg is None:  # B gave up (or is done)
                break
            if msg.type is not HolePunchType.CONNECT:
                raise self._fault(conn, DecodeError(f"DCUtR: {msg.type.name} where a CONNECT was due"))
            rounds += 1
            if rounds > self.config.attempts:
                raise self._fault(conn, LimitExceeded(f"DCUtR: CONNECT number {rounds}, more than "
                                                      f"{self.config.attempts} attempts"))
            if not self._answer_round(conn):
                raise self._fault(conn, LimitExceeded(f"DCUtR: more than {self.config.connection_rounds} "
                                                      "CONNECTs on one relayed connection"))
            targets = self._targets(msg)
            with self.host.expecting_punch(peer, targets, initiator=False):  # before B may dial
                await stream.write(dcutr.connect(self.addresses()).encode())
                sync = await self._read(stream, conn)
                if sync is None:
                    break
                if sync.type is not HolePunchType.SYNC:
                    raise self._fault(conn, DecodeError(f"DCUtR: {sync.type.name} where a SYNC was due"))
                with self._session() as free:
                    if not free:  # B punches alone
                        stream.reset()
                        return
                    self.stats["attempts"] += 1
                    direct = await self._punch(targets, peer, initiator=False)
            if direct is not None:
                self.stats["successes"] += 1
                self._done(conn, direct, punched=True)
                await _close(stream)
                return
        if rounds:
            self.stats["failures"] += 1
        await _close(stream)

    def _answer_round(self, conn: Libp2pConnection) -> bool:
        """Count one CONNECT round on ``conn``; False past ``connection_rounds``
        (streams are cheap: the per-stream bound alone bounds nothing)."""
        for closed in [c for c in self._answered if c.closed]:
            del self._answered[closed]
        self._answered[conn] = self._answered.get(conn, 0) + 1
        return self._answered[conn] <= self.config.connection_rounds

    # --- both ------------------------------------------------------------------------

    async def _read(self, stream: Stream, conn: Libp2pConnection) -> HolePunch | None:
        """The peer's next message; None at the end of its stream."""
        try:
            async with asyncio.timeout(self.config.message_timeout_s):
                prefix = bytearray()
                while (got := dcutr.message_length(prefix)) is None:
                    byte = await stream.read(1)
                    if not byte:
                        if prefix:
                            raise DecodeError("DCUtR stream ended inside a length prefix")
                        return None
                    prefix += byte
                try:
                    body = await stream.readexactly(got[0])
                except asyncio.IncompleteReadError:
                    raise DecodeError("DCUtR stream ended inside its message") from None
                return dcutr.decode(body, self.config.allow_loopback)
        except DecodeError as fault:
            raise self._fault(conn, fault) from None

    def _fault(self, conn: Libp2pConnection, fault: PeerFault) -> PeerFault:
        self.host._report(conn, fault)
        return fault

    def _direct(self, peer: PeerId) -> Libp2pConnection | None:
        return next((c for c in self.host.connections if c.peer_id == peer and c.relay is None), None)

    def _targets(self, msg: HolePunch) -> list[Multiaddr]:
        """What a punch dials of the peer's CONNECT: its first ``max_dial_addrs`` addresses."""
        return list(msg.addrs)[: self.config.max_dial_addrs]

    async def _punch(self, targets: Sequence[Multiaddr], peer: PeerId, initiator: bool) -> Libp2pConnection | None:
        """Dial ``targets`` at once from our listen port in the given upgrade
        role (the caller holds ``expecting_punch`` for them since before the
        peer may dial); the first connection wins, the others are closed. When
        every dial failed, a connection from one of those IPs that our
        listener accepted meanwhile (the peer's SYN came first) is it."""
        if not targets:
            return None
        won: Libp2pConnection | None = None
        dials = [asyncio.ensure_future(self.host.dial(Multiaddr(a.host, a.port, peer), punch=initiator))
                 for a in targets]
        for next_done in asyncio.as_completed(dials):
            try:
                conn = await next_done
            except (OSError, PeerFault, ConnectionClosed, TimeoutError):
                continue
            if won is None:
                won = conn
            else:
                await conn.close()
        if won is None:
            won = await self.host.accepted_from(peer, {a.host for a in targets})
        return won

    def _done(self, relayed: Libp2pConnection, direct: Libp2pConnection, punched: bool) -> Libp2pConnection:
        direct.punched = punched
        log.info("relayed connection upgraded", extra={
            "event": "dcutr_upgraded", "peer": str(direct.peer_id), "punched": punched,
            "remote": f"{direct.remote[0]}:{direct.remote[1]}", "relay": str(relayed.relay)})
        if self.on_direct is not None:
            self.on_direct(relayed, direct)
        return direct


async def _close(stream: Stream) -> None:
    try:
        await stream.close_write()
    except (ConnectionClosed, OSError):
        pass


def _public(host: str) -> bool:
    try:
        return scope(host) is Scope.PUBLIC
    except ValueError:
        return False
