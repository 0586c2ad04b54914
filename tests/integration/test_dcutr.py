"""DCUtR on loopback: two peers connected through a relay upgrade to a direct
connection by a hole punch (the TCP simultaneous open crossing NATs is on the
emulated internet, test_internet_dcutr.py); and what a peer sends on
``/libp2p/dcutr`` that it should not is a typed fault, at bounded cost.

On loopback there is no NAT, so one punch SYN reaches the other side's
listener: that side upgrades it in the role DCUtR gave it, not as a plain
inbound connection, or both ends would wait as responders."""

from __future__ import annotations

import asyncio
import errno

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from murmur.errors import ConnectionClosed, DecodeError, LimitExceeded, PeerFault, UnexpectedProtocol
from murmur.protocol import dcutr, uvarint
from murmur.protocol.dcutr import HolePunchType
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost
from murmur.protocol.libp2p.connection import Stream, StreamResetError
from murmur.protocol.libp2p.dcutr import DcutrConfig, HolePuncher
from murmur.protocol.libp2p.host import HostConfig
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayService
from murmur.protocol.multiaddr import DialAddr, Multiaddr
from murmur.protocol.transport import TransportLimits
from tests.integration.cluster import wait_until

CONFIG = DcutrConfig(allow_loopback=True, message_timeout_s=2.0)


@dataclass
class Peer:
    host: Libp2pHost
    relay: RelayClient
    punch: HolePuncher
    faults: list[tuple[PeerId | None, PeerFault]] = field(default_factory=list)


def _peer(config: DcutrConfig = CONFIG) -> Peer:
    faults: list[tuple[PeerId | None, PeerFault]] = []
    host = Libp2pHost(Identity.generate(), HostConfig(limits=TransportLimits(connect_timeout_s=2.0)),
                      on_fault=lambda peer, fault: faults.append((peer, fault)))
    return Peer(host, RelayClient(host), HolePuncher(host, config), faults)


@dataclass
class Pair:
    relay: Libp2pHost
    a: Peer  # dials b through the relay
    b: Peer  # holds a reservation; the inbound side, which drives the upgrade

    async def relayed(self) -> tuple[Libp2pConnection, Libp2pConnection]:
        """A fresh relayed connection a -> b: (a's, b's)."""
        (relay_addr,) = self.relay.listen_addrs
        circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{self.b.host.peer_id}")
        a_conn = await self.a.relay.dial_addr(circuit)
        await wait_until(lambda: any(c.relay is not None and c.peer_id == self.a.host.peer_id
                                     for c in self.b.host.connections), 5, "b has the relayed connection")
        b_conn = next(c for c in self.b.host.connections if c.relay is not None and c.peer_id == self.a.host.peer_id)
        return a_conn, b_conn


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    relay = Libp2pHost(Identity.generate())
    RelayService(relay, RelayConfig())
    a, b = _peer(), _peer()
    try:
        (relay_addr,) = await relay.listen("127.0.0.1", 0)
        for peer in (a, b):
            await peer.host.listen("127.0.0.1", 0)
            await peer.host.dial(relay_addr)  # from its listen port: the relay observes that one
        await b.relay.reserve(next(c for c in b.host.connections if c.peer_id == relay.peer_id))
        yield Pair(relay, a, b)
    finally:
        for peer in (a, b):
            await peer.punch.close()
            await peer.relay.close()
        for host in (a.host, b.host, relay):
            await host.close()


def _direct(host: Libp2pHost, peer: PeerId) -> list[Libp2pConnection]:
    return [c for c in host.connections if c.peer_id == peer and c.relay is None]


async def test_a_relayed_connection_is_punched_to_a_direct_one(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # each sees itself at its listen port: the dials to the relay left from it (port reuse)
    for peer in (a, b):
        (observed,) = peer.host.observed_addrs
        assert observed.to_tcp() == peer.host.listen_addrs[0].without_peer()
        assert peer.punch.addresses() == [peer.host.listen_addrs[0].without_peer()]
    _, b_conn = await pair.relayed()
    direct = await b.punch.upgrade(b_conn)
    assert direct is not None and direct.relay is None and direct.punched
    assert direct.peer_id == a.host.peer_id
    # the roles DCUtR gave out: b (who drove it) dialer and initiator, a the responder
    assert direct.outbound
    await wait_until(lambda: any(c.punched for c in _direct(a.host, b.host.peer_id)), 5, "a has it too")
    (a_side,) = _direct(a.host, b.host.peer_id)
    assert not a_side.outbound
    assert {direct.local[1], direct.remote[1]} == {a.host.listen_addrs[0].port, b.host.listen_addrs[0].port}
    rtts = await b.host.ping(direct)  # it carries streams
    assert len(rtts) == 1
    assert b.punch.stats["attempts"] == 1 and b.punch.stats["successes"] == 1
    assert a.punch.stats["attempts"] == 1 and a.punch.stats["successes"] == 1
    assert not a.faults and not b.faults


async def test_a_failed_punch_is_retried_twice_on_the_same_stream_then_given_up(pair: Pair) -> None:
    """Nobody answers at the addresses either side gives (as if both had
    moved): three rounds, then a failure on both sides, the relayed connection kept."""
    a, b = pair.a, pair.b
    for peer in (a, b):
        peer.punch.own_addrs = lambda: [Multiaddr("127.0.0.1", 9)]  # discard: refused at once
        peer.host.observed_addrs.clear()
    _, b_conn = await pair.relayed()
    assert await b.punch.upgrade(b_conn) is None
    assert b.punch.stats["attempts"] == 3 and b.punch.stats["failures"] == 1
    await wait_until(lambda: a.punch.stats["failures"] == 1, 5, "a gave up too")
    assert a.punch.stats["attempts"] == 3
    assert not b_conn.closed and not _direct(b.host, a.host.peer_id)


# --- a peer that sends what it should not ---------------------------------------------


def _frame(body: bytes) -> bytes:
    return uvarint.encode(len(body)) + body


async def _drive(pair: Pair, *messages: bytes, on_direct: bool = False) -> None:
    """b (hand-driven) opens /libp2p/dcutr on a's side and sends ``messages``
    (a may reset the stream at any point: what it charged b with is the test's)."""
    a, b = pair.a, pair.b
    if on_direct:
        conn = await b.host.dial(a.host.listen_addrs[0])
    else:
        _, conn = await pair.relayed()
    try:
        stream = await conn.open_stream(dcutr.PROTOCOL)
        for message in messages:
            await stream.write(message)
    except (StreamResetError, ConnectionClosed):
        pass


async def _faults_of(pair: Pair, kind: type[PeerFault]) -> list[PeerFault]:
    await wait_until(lambda: any(isinstance(f, kind) for p, f in pair.a.faults if p == pair.b.host.peer_id),
                     5, f"a charged b with {kind.__name__}")
    return [f for p, f in pair.a.faults if p == pair.b.host.peer_id]


async def test_dcutr_on_a_direct_connection_is_refused_with_a_penalty(pair: Pair) -> None:
    await _drive(pair, dcutr.connect([Multiaddr("127.0.0.1", 1)]).encode(), on_direct=True)
    (fault,) = await _faults_of(pair, UnexpectedProtocol)
    assert not fault.drop and fault.penalty > 0
    assert pair.a.punch.stats["refused"] == 1 and pair.a.punch.stats["attempts"] == 0


@pytest.mark.parametrize(("body", "why"), [
    (b"\xff\xff\xff", "garbage"),
    (bytes([0x08, 0xC8, 0x01]), "unknown type 200"),
    (bytes([0x12, 0x01, 0x00]), "no type"),
])
async def test_garbage_is_a_decode_error_and_nothing_is_dialled(pair: Pair, body: bytes, why: str) -> None:
    await _drive(pair, _frame(body))
    faults = await _faults_of(pair, DecodeError)
    assert len(faults) == 1, why
    assert pair.a.punch.stats["attempts"] == 0


async def test_an_oversized_message_is_refused_before_its_body_is_read(pair: Pair) -> None:
    await _drive(pair, uvarint.encode(dcutr.MAX_MESSAGE + 1))  # the prefix alone: no body follows
    (fault,) = await _faults_of(pair, DecodeError)
    assert "exceeds" in str(fault)


async def test_too_many_addresses_is_a_decode_error(pair: Pair) -> None:
    from murmur.protocol import pb

    msg = pb.HolePunch(type=int(HolePunchType.CONNECT))
    msg.ObsAddrs.extend(Multiaddr("198.51.100.1", 1000 + i).to_bytes() for i in range(dcutr.MAX_ADDRS + 1))
    await _drive(pair, _frame(pb.serialize(msg)))
    (fault,) = await _faults_of(pair, DecodeError)
    assert "more than" in str(fault)


async def test_repeated_connects_past_the_attempts_are_a_limit(pair: Pair) -> None:
    """Each round's punch goes only to the addresses given (here nobody
    listens there: each fails at once); a fourth CONNECT is over the limit."""
    target = Multiaddr("127.0.0.1", 9)
    connect, sync = dcutr.connect([target]).encode(), dcutr.SYNC.encode()
    await _drive(pair, *([connect, sync] * (CONFIG.attempts + 1)))
    (fault,) = await _faults_of(pair, LimitExceeded)
    assert not fault.drop
    assert pair.a.punch.stats["attempts"] == CONFIG.attempts


async def test_connects_on_one_relayed_connection_are_bounded_across_its_streams(pair: Pair) -> None:
    """Streams are cheap: a peer closing each DCUtR stream after its
    ``attempts`` rounds and opening the next made a dial its addresses four
    times a round without end (1200-2600 dials a second, no fault). All
    streams of one relayed connection together get ``connection_rounds``
    (an upgrade and its retries); the round past them is a limit, undialled."""
    a = pair.a
    target = Multiaddr("127.0.0.1", 9)
    connect, sync = dcutr.connect([target]).encode(), dcutr.SYNC.encode()
    _, conn = await pair.relayed()
    rounds = CONFIG.attempts * (1 + len(CONFIG.retry_delays_s))  # what our own driver may take: the default
    streams = -(-rounds // CONFIG.attempts) + 1
    for _ in range(streams):
        try:
            stream = await conn.open_stream(dcutr.PROTOCOL)
            for _ in range(CONFIG.attempts):
                await stream.write(connect)
                await stream.write(sync)
            await stream.close_write()
            while await stream.read():  # a's answers, then its FIN: a is done with this stream
                pass
        except (StreamResetError, ConnectionClosed):
            break
    (fault,) = await _faults_of(pair, LimitExceeded)
    assert "relayed connection" in str(fault) and not fault.drop
    assert a.punch.stats["attempts"] == rounds


async def test_a_sync_out_of_turn_is_a_decode_error(pair: Pair) -> None:
    await _drive(pair, dcutr.SYNC.encode())
    (fault,) = await _faults_of(pair, DecodeError)
    assert "SYNC where a CONNECT" in str(fault)


# --- port reuse ----------------------------------------------------------------------------


async def test_dials_leave_from_the_listen_port_and_another_listener_is_still_refused_it() -> None:
    a, b, other = (Libp2pHost(Identity.generate()) for _ in range(3))
    try:
        (a_addr,) = await a.listen("127.0.0.1", 0)
        (b_addr,) = await b.listen("127.0.0.1", 0)
        first = await a.dial(b_addr)
        assert first.local == (a_addr.host, a_addr.port)
        second = await a.dial(b_addr)  # that 4-tuple is taken: an ephemeral port instead
        assert second.local[1] != a_addr.port
        with pytest.raises(OSError) as refused:  # SO_REUSEPORT does not open the port to another listener
            await other.listen("127.0.0.1", a_addr.port)
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        for host in (a, b, other):
            await host.close()


# --- what silent peers can hold -----------------------------------------------------------


def _exchanges(punch: HolePuncher) -> int:
    """Peers with a DCUtR exchange running (``_active`` before the fix, which were sessions too)."""
    return len(getattr(punch, "_exchanging", getattr(punch, "_active", ())))


async def _upgrade_is_punched(victim: Peer, honest: Peer, circuit: DialAddr) -> None:
    """``honest`` dials ``victim`` at ``circuit``; the victim's upgrade of that
    relayed connection is refused nothing and punched to a direct one."""
    await honest.relay.dial_addr(circuit)
    await wait_until(lambda: any(c.relay is not None and c.peer_id == honest.host.peer_id
                                 for c in victim.host.connections), 5, "the victim has the relayed connection")
    inbound = next(c for c in victim.host.connections if c.relay is not None and c.peer_id == honest.host.peer_id)
    direct = await victim.punch.upgrade(inbound)
    assert victim.punch.stats["refused"] == 0
    assert direct is not None and direct.punched and direct.peer_id == honest.host.peer_id


async def test_peers_silent_on_dcutr_hold_no_session_and_our_own_upgrade_runs() -> None:
    """A peer we dialled through a relay may open ``/libp2p/dcutr`` and say
    nothing. Each such stream took one of ``max_sessions`` (8, both roles
    together) for ``message_timeout_s`` (10 s), and re-opened when it timed
    out: eight of them refused every upgrade of ours (``refused`` counted, the
    honest peer left relayed). Waiting for the first CONNECT now holds no
    session (one exchange per peer); the upgrade runs at once."""
    config = DcutrConfig(allow_loopback=True)  # the defaults: 8 sessions, 10 s per message
    relay = Libp2pHost(Identity.generate())
    RelayService(relay, RelayConfig(max_reservations_per_ip=32))
    victim, honest = _peer(config), _peer(config)
    silent = [_peer(config) for _ in range(config.max_sessions)]
    try:
        (relay_addr,) = await relay.listen("127.0.0.1", 0)
        for peer in (victim, honest, *silent):
            await peer.host.listen("127.0.0.1", 0)
            relay_conn = await peer.host.dial(relay_addr)
            if peer is not honest:
                await peer.relay.reserve(relay_conn)
        streams = []
        for peer in silent:  # the victim dials them through the relay; each opens DCUtR and stays silent
            await victim.relay.dial_addr(DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{peer.host.peer_id}"))
            await wait_until(lambda p=peer: any(c.relay is not None for c in p.host.connections), 5, "relayed")
            conn = next(c for c in peer.host.connections if c.relay is not None)
            streams.append(await conn.open_stream(dcutr.PROTOCOL))
        punch = victim.punch
        await wait_until(lambda: _exchanges(punch) == len(silent), 5, "the victim serves every silent stream")

        await _upgrade_is_punched(victim, honest, DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{victim.host.peer_id}"))
        assert _exchanges(punch) == len(silent)  # the silent peers still hold their streams, and no session

        # one waiting stream per peer: a second one from a silent peer is refused at once
        relayed = next(c for c in silent[0].host.connections if c.relay is not None)
        with pytest.raises((StreamResetError, ConnectionClosed)):
            second = await relayed.open_stream(dcutr.PROTOCOL)
            await second.readexactly(1)
        assert punch.stats["refused"] == 1
        for stream in streams:
            stream.reset()
    finally:
        for peer in (victim, honest, *silent):
            await peer.punch.close()
            await peer.relay.close()
        for host in (victim.host, honest.host, relay, *(p.host for p in silent)):
            await host.close()


async def test_strangers_silent_on_our_dcutr_stream_hold_no_session() -> None:
    """The other role: anyone may dial us through a relay, and we open
    ``/libp2p/dcutr`` to drive the upgrade. A peer that accepts the stream
    and never answers our CONNECT held a session for ``message_timeout_s``
    (10 s), each relayed connection again: eight strangers refused every
    other upgrade, ours and the ones we answer. Sessions now bound the
    dialling phases only; waiting for a peer's message holds none."""
    config = DcutrConfig(allow_loopback=True)  # the defaults: 8 sessions, 10 s per message
    relay = Libp2pHost(Identity.generate())
    RelayService(relay, RelayConfig(max_reservations_per_ip=32, max_circuits_per_ip_pair=32))  # all on 127.0.0.1
    victim, honest = _peer(config), _peer(config)
    strangers = [Libp2pHost(Identity.generate()) for _ in range(config.max_sessions)]
    held: list[Stream] = []

    async def silent(stream: Stream) -> None:  # accepts DCUtR, reads our CONNECT, never answers
        held.append(stream)
        while await stream.read():
            pass

    upgrades = []
    try:
        (relay_addr,) = await relay.listen("127.0.0.1", 0)
        for host in (victim.host, honest.host, *strangers):
            await host.listen("127.0.0.1", 0)
            relay_conn = await host.dial(relay_addr)
            if host is victim.host:
                await victim.relay.reserve(relay_conn)
        circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{victim.host.peer_id}")
        for host in strangers:
            host.set_handler(dcutr.PROTOCOL, silent)
            await RelayClient(host).dial_addr(circuit)
        await wait_until(lambda: sum(c.relay is not None for c in victim.host.connections) == len(strangers), 5,
                         "the strangers' relayed connections")
        punch = victim.punch
        upgrades = [asyncio.ensure_future(punch.upgrade(c)) for c in victim.host.connections if c.relay is not None]
        await wait_until(lambda: len(held) == len(strangers), 5, "every stranger holds our DCUtR stream")

        await _upgrade_is_punched(victim, honest, circuit)
        assert not any(u.done() for u in upgrades)  # the strangers' upgrades still wait for their answers
    finally:
        for upgrade in upgrades:
            upgrade.cancel()
        await asyncio.gather(*upgrades, return_exceptions=True)
        for peer in (victim, honest):
            await peer.punch.close()
            await peer.relay.close()
        for host in (victim.host, honest.host, relay, *strangers):
            await host.close()
