"""Circuit relay v2 on loopback: a relay, a private peer holding a
reservation, and a dialler reaching it through ``/p2p-circuit``; the relayed
stream is upgraded like TCP (both paths), and the relay's limits hold against
floods while well-behaved peers stay served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from murmur.errors import ConnectionClosed
from murmur.protocol import circuit, multistream
from murmur.protocol.circuit import HopMessage, HopType, PeerInfo, Status
from murmur.protocol.framing import DEFAULT_SCRATCH_BYTES
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import (
    FastConnection,
    Libp2pConnection,
    Libp2pHost,
    Stream,
    StreamResetError,
    YamuxConnection,
    echo_handler,
)
from murmur.protocol.libp2p.host import HostConfig
from murmur.protocol.multiaddr import DialAddr
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayRefused, RelayService, read_message
from murmur.protocol.framing import SPLIT_MIN_TAIL
from murmur.protocol.transport import TransportLimits
from murmur.node.config import load_config_with_source
from tests.integration.cluster import wait_until

ECHO = "/murmur-test/echo/1.0.0"
PARTS = "/murmur-test/parts/1.0.0"
PATHS = {"fast": FastConnection, "standard": YamuxConnection}


class Trio:
    """A relay, a private peer with a reservation on it, and a dialler."""

    def __init__(self, relay_config: RelayConfig, path: str, **limits: int) -> None:
        cfg = HostConfig(limits=TransportLimits(fast_path=path == "fast", **limits))
        self.relay_host = Libp2pHost(Identity.generate(), cfg)
        self.relay = RelayService(self.relay_host, relay_config)
        self.private = Libp2pHost(Identity.generate(), cfg)
        self.private.set_handler(ECHO, echo_handler)
        self.private_client = RelayClient(self.private)
        self.dialler = Libp2pHost(Identity.generate(), cfg)
        self.dialler_client = RelayClient(self.dialler)
        self.hosts = [self.relay_host, self.private, self.dialler]

    async def start(self) -> None:
        (self.relay_addr,) = await self.relay_host.listen("127.0.0.1", 0)
        self.private_to_relay = await self.private.dial(self.relay_addr)
        self.dialler_to_relay = await self.dialler.dial(self.relay_addr)

    async def close(self) -> None:
        for host in self.hosts:
            await host.close()


async def _echo(conn: Libp2pConnection, data: bytes) -> bytes:
    stream = await conn.open_stream(ECHO)

    async def send() -> None:
        await stream.write(data)
        await stream.close_write()

    sender = asyncio.create_task(send())
    got = await stream.read_all(len(data) + 1)
    await sender
    return got


async def _until_ended(stream: Stream) -> bytes:
    """What ``stream`` still delivers before it ends (EOF or reset)."""
    got = b""
    with contextlib.suppress(StreamResetError):
        while data := await stream.read():
            got += data
    return got


@pytest.fixture
async def trios():  # type: ignore[no-untyped-def]
    made: list[Trio] = []

    async def make(relay_config: RelayConfig = RelayConfig(), path: str = "fast", **limits: int) -> Trio:
        trio = Trio(relay_config, path, **limits)
        made.append(trio)
        await trio.start()
        return trio

    yield make
    for trio in made:
        await trio.close()


@pytest.mark.parametrize("path", list(PATHS))
async def test_echo_through_the_relay(trios, path: str) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(path=path)
    reservation = await trio.private_client.reserve(trio.private_to_relay)
    assert reservation.expire > 0 and reservation.addrs
    assert all(a.peer_id == trio.relay_host.peer_id for a in reservation.addrs)
    assert trio.private.peer_id in trio.relay.reservations

    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert type(conn) is PATHS[path]  # upgraded like TCP: security and muxer negotiated over the circuit
    assert conn.peer_id == trio.private.peer_id and conn.relay == trio.relay_host.peer_id
    data = os.urandom(20_000)
    assert await _echo(conn, data) == data
    # the private peer sees an inbound connection from the dialler, through the relay
    await wait_until(lambda: any(c.peer_id == trio.dialler.peer_id and c.relay is not None
                                 for c in trio.private.connections), 5, "inbound relayed connection")
    assert trio.relay.stats["circuits_total"] == 1 and trio.relay.stats["bytes_relayed"] > len(data)
    await asyncio.wait_for(conn.identified.wait(), 5)
    assert conn.identify is not None and ECHO in conn.identify.protocols
    await conn.close()
    await wait_until(lambda: trio.relay.circuits == 0, 5, "circuit released")


async def test_split_messages_cross_the_relay_with_their_tails_sealed(trios) -> None:  # type: ignore[no-untyped-def]
    """The fast path over a members' circuit (what learning neighbours get): a
    delta chunk's split frame goes through the relay's streams as bytes and
    reaches the reader still sealed, whether its tail fits the frame reader's
    scratch or gets a buffer of its own."""
    trio = await trios()
    trio.relay.config = RelayConfig(learning_peers=frozenset({trio.private.peer_id, trio.dialler.peer_id}),
                                    learning_circuit_data_bytes=4 << 20)
    got: asyncio.Queue[object] = asyncio.Queue()

    async def parts(stream) -> None:  # type: ignore[no-untyped-def]
        while (message := await stream.recv_parts()) is not None:
            got.put_nowait(message)

    trio.private.set_handler(PARTS, parts)
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert type(conn) is FastConnection and conn.relay == trio.relay_host.peer_id
    stream = await conn.open_stream(PARTS)
    for size in (SPLIT_MIN_TAIL + 1000, DEFAULT_SCRATCH_BYTES + 50_000):
        tail = os.urandom(size)
        await stream.send_message(b"envelope", tail)
        head, sealed = await asyncio.wait_for(got.get(), 5)  # type: ignore[misc]
        opened = bytearray(size)
        sealed.open_into(memoryview(opened))
        assert bytes(head) == b"envelope" and opened == tail
    assert trio.relay.stats["cut_data"] == 0 and not conn.closed


async def test_no_reservation_is_refused(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    with pytest.raises(RelayRefused) as refused:
        await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert refused.value.status is Status.NO_RESERVATION


async def test_circuit_byte_limit_cuts_the_circuit(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(circuit_data_bytes=64 * 1024))
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    small = os.urandom(1000)
    assert await _echo(conn, small) == small  # under the limit: served
    with pytest.raises((ConnectionClosed, asyncio.IncompleteReadError, ValueError)):
        await asyncio.wait_for(_echo(conn, os.urandom(256 * 1024)), 10)
    await wait_until(lambda: conn.closed, 5, "relayed connection closed")
    assert trio.relay.stats["cut_data"] >= 1
    await wait_until(lambda: trio.relay.circuits == 0, 5, "circuit released")
    # the relay still serves: a new circuit works
    conn2 = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(conn2, small) == small


async def test_circuit_duration_limit_cuts_the_circuit(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(circuit_duration_s=1))
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    await wait_until(lambda: conn.closed, 5, "relayed connection cut at its duration")
    assert trio.relay.stats["cut_duration"] == 1


async def test_members_get_the_learning_limits_and_strangers_keep_theirs(trios) -> None:  # type: ignore[no-untyped-def]
    """Both ends members: the learning class's bytes (here 1 MiB) carry what a
    stranger's 16 KiB would cut. A stranger dialling a member gets the
    strangers' limit, is cut past it, and its client counts the cut."""
    trio = await trios()
    members = frozenset({trio.private.peer_id, trio.dialler.peer_id})
    trio.relay.config = RelayConfig(circuit_data_bytes=16 * 1024, learning_peers=members,
                                    learning_circuit_data_bytes=1 << 20)
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    data = os.urandom(200 * 1024)
    assert await _echo(conn, data) == data
    assert trio.relay.stats["cut_data"] == 0 and trio.relay.learning_circuits == 1
    assert trio.relay.stats["learning_circuits_total"] == 1
    assert trio.relay.stats["learning_bytes_relayed"] == trio.relay.stats["bytes_relayed"] > 2 * len(data)

    stranger = Libp2pHost(Identity.generate())
    trio.hosts.append(stranger)
    stranger_client = RelayClient(stranger)
    cut = await stranger_client.dial(await stranger.dial(trio.relay_addr), trio.private.peer_id)
    assert trio.relay.learning_circuits == 1 and trio.relay.circuits == 2  # the stranger's is not a member's
    with pytest.raises((ConnectionClosed, asyncio.IncompleteReadError, ValueError)):
        await asyncio.wait_for(_echo(cut, os.urandom(64 * 1024)), 10)
    await wait_until(lambda: cut.closed, 5, "the stranger's circuit cut")
    assert trio.relay.stats["cut_data"] == 1
    # both ends of the cut circuit count it; the members' circuit is untouched and not counted
    await wait_until(lambda: stranger_client.stats["circuits_cut"] == 1 and
                     trio.private_client.stats["circuits_cut"] == 1, 5, "the cut counted at both ends")
    assert stranger_client.last_cut is not None and stranger_client.last_cut["limit_data_bytes"] == 16 * 1024
    assert not conn.closed and await _echo(conn, b"still here") == b"still here"
    await conn.close()
    await wait_until(lambda: trio.relay.circuits == 0, 5, "circuits released")
    assert trio.dialler_client.stats["circuits_cut"] == 0  # closed by its end: not a cut


async def test_a_members_circuit_cut_at_its_duration_is_counted_and_redialled(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    trio.relay.config = RelayConfig(learning_peers=frozenset({trio.private.peer_id, trio.dialler.peer_id}),
                                    learning_circuit_duration_s=1)
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    await wait_until(lambda: conn.closed, 5, "the circuit cut at its duration")
    assert trio.relay.stats["cut_duration"] == 1
    await wait_until(lambda: trio.dialler_client.stats["circuits_cut"] == 1, 5, "the cut counted")
    assert trio.dialler_client.last_cut is not None and trio.dialler_client.last_cut["limit_duration_s"] == 1
    again = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(again, b"again") == b"again"


async def test_greeted_peers_are_members_only_when_the_operator_says_so(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    greeted = {trio.private.peer_id, trio.dialler.peer_id}
    trio.relay.greeted = greeted.__contains__
    assert not trio.relay.member(trio.private.peer_id)  # learning_greeted is off by default
    trio.relay.config = RelayConfig(learning_greeted=True)
    assert trio.relay.member(trio.private.peer_id) and not trio.relay.member(Identity.generate().peer_id)
    await trio.private_client.reserve(trio.private_to_relay)
    await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert trio.relay.learning_circuits == 1 and trio.relay.stats["learning_reservations_total"] == 1


async def test_stranger_floods_leave_the_members_their_room(trios) -> None:  # type: ignore[no-untyped-def]
    """Strangers fill every reservation and circuit they may hold: members
    still reserve, dial and are served, from pools of their own; and a
    members' flood is bounded by its own pool in turn."""
    trio = await trios()
    members = frozenset({trio.private.peer_id, trio.dialler.peer_id})
    trio.relay.config = RelayConfig(max_reservations=2, max_circuits=1, max_reservations_per_ip=8,
                                    learning_peers=members, learning_max_circuits=2)
    strangers = [Libp2pHost(Identity.generate()) for _ in range(4)]
    trio.hosts += strangers
    clients = [RelayClient(s) for s in strangers]
    links = [await s.dial(trio.relay_addr) for s in strangers]
    outcomes = []
    for client, link in zip(clients, links, strict=True):
        try:
            await client.reserve(link)
            outcomes.append(Status.OK)
        except RelayRefused as exc:
            outcomes.append(exc.status)
    assert outcomes == [Status.OK, Status.OK, Status.RESERVATION_REFUSED, Status.RESERVATION_REFUSED]
    # strangers' circuits: one in all, then refused
    await clients[2].dial(links[2], strangers[0].peer_id)
    with pytest.raises(RelayRefused) as refused:
        await clients[3].dial(links[3], strangers[1].peer_id)
    assert refused.value.status is Status.RESOURCE_LIMIT_EXCEEDED
    # members are served all the same
    await trio.private_client.reserve(trio.private_to_relay)
    conns = [await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id) for _ in range(2)]
    assert await _echo(conns[0], b"served") == b"served"
    assert trio.relay.learning_circuits == 2 and trio.relay.circuits == 3
    with pytest.raises(RelayRefused) as refused:  # the members' pool is bounded too
        await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert refused.value.status is Status.RESOURCE_LIMIT_EXCEEDED
    # a stranger dialling a member counts among the strangers' circuits: refused while theirs is full
    with pytest.raises(RelayRefused) as refused:
        await clients[3].dial(links[3], trio.private.peer_id)
    assert refused.value.status is Status.RESOURCE_LIMIT_EXCEEDED


async def test_a_flood_of_greeted_sybils_is_bounded_by_the_members_pool(trios) -> None:  # type: ignore[no-untyped-def]
    """With ``learning_greeted`` anyone who said Hello is a member, Sybils
    too: they fill at most the members' pool (and its per-IP share), the
    strangers' pool stays open, and a member already holding a reservation
    keeps refreshing it."""
    trio = await trios()
    sybils = [Libp2pHost(Identity.generate()) for _ in range(5)]
    stranger = Libp2pHost(Identity.generate())
    trio.hosts += [*sybils, stranger]
    greeted = {trio.private.peer_id, *(s.peer_id for s in sybils)}
    trio.relay.greeted = greeted.__contains__
    trio.relay.config = RelayConfig(learning_greeted=True, learning_max_reservations=3, max_reservations_per_ip=8)
    await trio.private_client.reserve(trio.private_to_relay)
    outcomes = []
    for sybil in sybils:
        try:
            await RelayClient(sybil).reserve(await sybil.dial(trio.relay_addr))
            outcomes.append(Status.OK)
        except RelayRefused as exc:
            outcomes.append(exc.status)
    assert outcomes == [Status.OK, Status.OK] + [Status.RESERVATION_REFUSED] * 3
    await RelayClient(stranger).reserve(await stranger.dial(trio.relay_addr))  # the strangers' pool is untouched
    await trio.private_client.reserve(trio.private_to_relay)  # a refresh is no new reservation
    assert len(trio.relay.reservations) == 4 and trio.relay.stats["learning_reservations_total"] == 4
    trio.relay.config = RelayConfig(learning_greeted=True, max_reservations_per_ip=1)  # per IP, members too
    late = Libp2pHost(Identity.generate())
    trio.hosts.append(late)
    greeted.add(late.peer_id)
    with pytest.raises(RelayRefused):
        await RelayClient(late).reserve(await late.dial(trio.relay_addr))


async def test_reservation_floods_refused_and_good_peers_served(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(max_reservations_per_ip=3))
    # one peer reserving over and over holds one reservation
    for _ in range(20):
        await trio.private_client.reserve(trio.private_to_relay)
    assert list(trio.relay.reservations) == [trio.private.peer_id]
    # many identities from one IP: past the per-IP limit, refused
    sybils = [Libp2pHost(Identity.generate()) for _ in range(4)]
    trio.hosts += sybils
    refused = 0
    for sybil in sybils:
        conn = await sybil.dial(trio.relay_addr)
        try:
            await RelayClient(sybil).reserve(conn)
        except RelayRefused as exc:
            assert exc.status is Status.RESERVATION_REFUSED
            refused += 1
    assert refused == 2  # 127.0.0.1 already holds the private peer's; 2 more fit
    assert len(trio.relay.reservations) == 3
    # the well-behaved peer is still reachable, and still refreshes
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(conn, b"still served") == b"still served"
    await trio.private_client.reserve(trio.private_to_relay)


async def test_circuit_flood_from_one_peer_is_bounded(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(max_circuits_per_peer=2))
    await trio.private_client.reserve(trio.private_to_relay)
    conns = [await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id) for _ in range(2)]
    with pytest.raises(RelayRefused) as refused:
        await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert refused.value.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert trio.relay.circuits == 2
    await conns[0].close()
    await wait_until(lambda: trio.relay.circuits == 1, 5, "a circuit released")
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(conn, b"x") == b"x"


async def test_a_stranger_holding_a_members_circuits_leaves_the_members_theirs(trios) -> None:  # type: ignore[no-untyped-def]
    """One stranger, one connection, took every circuit a reserved member may
    have (``max_circuits_per_peer``, in 0.08 s at the default 16) and held it
    for the circuit's duration, again and again: every member dialling that
    member was refused. The per-peer bound is counted in each class apart."""
    trio = await trios()
    members = frozenset({trio.private.peer_id, trio.dialler.peer_id})
    trio.relay.config = RelayConfig(max_circuits_per_peer=2, learning_peers=members)
    await trio.private_client.reserve(trio.private_to_relay)
    stranger = Libp2pHost(Identity.generate())
    trio.hosts.append(stranger)
    stranger_client = RelayClient(stranger)
    link = await stranger.dial(trio.relay_addr)
    held = [await stranger_client.dial(link, trio.private.peer_id) for _ in range(2)]
    with pytest.raises(RelayRefused) as refused:  # the stranger's share of the member is bounded
        await stranger_client.dial(link, trio.private.peer_id)
    assert refused.value.status is Status.RESOURCE_LIMIT_EXCEEDED
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)  # a member still gets in
    assert await _echo(conn, b"member") == b"member"
    assert trio.relay.learning_circuits == 1 and trio.relay.circuits == len(held) + 1


async def _dial_until_refused(client: RelayClient, link: Libp2pConnection, dst: Libp2pHost,
                              most: int) -> list[Libp2pConnection]:
    held = []
    for _ in range(most):
        try:
            held.append(await client.dial(link, dst.peer_id))
        except RelayRefused as exc:
            assert exc.status is Status.RESOURCE_LIMIT_EXCEEDED
            break
    return held


@pytest.mark.parametrize(("overrides", "per_pair", "per_ip_pair"), [
    ({}, 4, 8),
    # an operator who raises max_circuits_per_peer: the IP's share follows (it stayed 8), and the
    # pair limit is the operator's to set (it was a constant, 4, whatever the config said)
    ({"relay.max_circuits_per_peer": 24, "relay.max_circuits_per_pair": 5}, 5, 12),
])
async def test_one_source_cannot_take_every_circuit_of_a_reserved_stranger(
        trios, overrides: dict[str, int], per_pair: int, per_ip_pair: int) -> None:  # type: ignore[no-untyped-def]
    """Per-peer circuits are counted per class, but strangers share one:
    one stranger took all max_circuits_per_peer (16) circuits of a reserved
    stranger, and everyone else dialling it was refused for the circuits'
    duration. A source peer now holds at most max_circuits_per_pair of one
    destination's circuits, and a source IP max_circuits_per_ip_pair; both
    from the node's ``[relay]`` config, as the daemon builds it."""
    cfg = load_config_with_source(None, overrides)[0].relay.relay_config()
    trio = await trios(cfg)
    assert (cfg.max_circuits_per_pair, cfg.ip_pair_limit()) == (per_pair, per_ip_pair)
    await trio.private_client.reserve(trio.private_to_relay)
    flooder = Libp2pHost(Identity.generate())
    sybils = [Libp2pHost(Identity.generate()) for _ in range(3)]
    honest = Libp2pHost(Identity.generate())
    trio.hosts += [flooder, *sybils, honest]
    held = await _dial_until_refused(RelayClient(flooder), await flooder.dial(trio.relay_addr), trio.private,
                                     cfg.max_circuits_per_peer)
    assert len(held) == cfg.max_circuits_per_pair < cfg.max_circuits_per_peer
    for sybil in sybils:  # more identities from the same address
        held += await _dial_until_refused(RelayClient(sybil), await sybil.dial(trio.relay_addr), trio.private,
                                          cfg.max_circuits_per_peer)
    assert len(held) == cfg.ip_pair_limit() < cfg.max_circuits_per_peer
    await honest.listen("127.0.0.2", 0)  # dials leave from 127.0.0.2: another address
    conn = await RelayClient(honest).dial(await honest.dial(trio.relay_addr), trio.private.peer_id)
    assert await _echo(conn, b"still reachable") == b"still reachable"


async def test_malformed_and_unexpected_hop_messages_get_their_status(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()

    async def ask(raw: bytes) -> Status | None:
        stream = await trio.dialler_to_relay.open_stream(circuit.HOP)
        await stream.write(raw)
        answer = circuit.decode_hop(await read_message(stream, 5))
        return answer.status

    assert await ask(bytes([0x02, 0x08, 0x07])) is Status.MALFORMED_MESSAGE  # unknown type
    assert await ask(HopMessage(HopType.STATUS, status=Status.OK).encode()) is Status.UNEXPECTED_MESSAGE
    assert await ask(HopMessage(HopType.CONNECT).encode()) is Status.MALFORMED_MESSAGE  # no peer
    assert await ask(HopMessage(HopType.CONNECT, peer=PeerInfo(trio.dialler.peer_id)).encode()) \
        is Status.NO_RESERVATION
    # the relay keeps serving
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(conn, b"ok") == b"ok"


async def test_stop_from_a_relay_we_did_not_reserve_on_is_refused(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    # the private peer has no reservation on the relay: it must not accept a stranger's STOP
    await trio.private_client.reserve(trio.private_to_relay)
    trio.private_client.reservations.clear()
    with pytest.raises(RelayRefused) as refused:
        await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert refused.value.status is Status.CONNECTION_FAILED


async def test_observed_address_is_not_told_or_believed_over_a_circuit(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    await asyncio.wait_for(trio.dialler_to_relay.identified.wait(), 5)
    before = dict(trio.dialler.observed_addrs)
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    await asyncio.wait_for(conn.identified.wait(), 5)
    assert conn.identify is not None and conn.identify.observed_addr is None  # the private peer saw the relay
    await wait_until(lambda: any(c.relay is not None and c.identify is not None for c in trio.private.connections),
                     5, "the private peer identified the dialler")
    inbound = next(c for c in trio.private.connections if c.relay is not None)
    assert inbound.identify.observed_addr is None  # type: ignore[union-attr]
    assert dict(trio.dialler.observed_addrs) == before


async def test_dial_the_advertised_circuit_address(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios()
    assert trio.private_client.circuit_addrs() == []  # nothing to advertise before a reservation
    await trio.private_client.reserve(trio.private_to_relay)
    (addr,) = trio.private_client.circuit_addrs()
    assert str(addr) == f"{trio.relay_addr}/p2p-circuit/p2p/{trio.private.peer_id}"
    # a fresh dialler with no connection to the relay reaches the private peer from that text alone
    stranger = Libp2pHost(Identity.generate())
    trio.hosts.append(stranger)
    conn = await RelayClient(stranger).dial_addr(DialAddr.parse(str(addr)))
    assert conn.peer_id == trio.private.peer_id and conn.relay == trio.relay_host.peer_id
    assert await _echo(conn, b"hello through the circuit") == b"hello through the circuit"


SINK = "/murmur-test/sink/1.0.0"
BUFFERED = 2 * 1024 * 1024  # every host's max_peer_buffered_bytes in the test below
FRAME = 64 * 1024
STALL_S = 2.0


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_receiver_that_never_reads_costs_the_relay_bounded_memory(trios, path: str) -> None:  # type: ignore[no-untyped-def]
    """A members' circuit (1 GiB) whose far end never reads: the sender stalls, and
    what the relay holds stays within its per-peer budgets (backpressure runs
    from the private peer's budget back through the relay to the sender)."""
    trio = await trios(path=path, max_frame=FRAME, max_peer_buffered_bytes=BUFFERED, peer_reserve_bytes=FRAME)
    trio.relay.config = RelayConfig(learning_peers=frozenset({trio.private.peer_id, trio.dialler.peer_id}),
                                    stall_timeout_s=STALL_S)
    opened = asyncio.Event()

    async def sink(stream) -> None:  # type: ignore[no-untyped-def]
        opened.set()
        await asyncio.Event().wait()  # holds the stream, reads nothing

    trio.private.set_handler(SINK, sink)
    await trio.private_client.reserve(trio.private_to_relay)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    stream = await conn.open_stream(SINK)
    chunk = os.urandom(FRAME // 2)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for _ in range(64 * 1024 * 1024 // len(chunk)):
            await stream.write(chunk)
            sent += len(chunk)

    writer = asyncio.create_task(flood())
    await asyncio.wait_for(opened.wait(), 5)
    done, _ = await asyncio.wait([writer], timeout=STALL_S / 2)
    assert not done, "64 MiB went into a stream nobody reads"
    relay_conns = trio.relay_host.connections
    assert len(relay_conns) == 2
    # a budget holds at most its limit plus what one read brings (the decoder's scratch), as budget.py says
    slack = max(FRAME, DEFAULT_SCRATCH_BYTES)
    for c in relay_conns:
        assert c.budget.peak < BUFFERED + slack, (c.peer_id, c.budget.peak)
    assert trio.relay_host.pool.used < 2 * (BUFFERED + slack)
    assert trio.relay.stats["bytes_relayed"] < sent + FRAME
    if path == "fast":
        # one budget for all streams of a connection: the stalled circuit is cut, the
        # sender's writes fail, and its connection to the relay flows again
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(writer, 10 * STALL_S)
        assert trio.relay.stats["cut_stalled"] == 1
        await wait_until(lambda: trio.relay.circuits == 0, 5, "circuit released")
    else:
        # yamux: the sink stream's window stops the sender end to end; the relay's
        # copy is idle (not stalled) and the connections' other streams flow
        assert trio.relay.stats["cut_stalled"] == 0 and not writer.done()
        writer.cancel()
    await trio.dialler_client.reserve(trio.dialler_to_relay)  # the same connection serves a new request
    assert trio.dialler.peer_id in trio.relay.reservations


async def test_garbage_through_a_circuit_fails_the_upgrade_and_frees_it(trios) -> None:  # type: ignore[no-untyped-def]
    """A dialler that sends junk instead of multistream-select over its circuit:
    the private peer's upgrade fails as a TCP one would, the circuit is torn
    down, and the private peer still takes proper circuits."""
    trio = await trios()
    await trio.private_client.reserve(trio.private_to_relay)
    stream = await trio.dialler_to_relay.open_stream(circuit.HOP)
    await stream.write(HopMessage(HopType.CONNECT, peer=PeerInfo(trio.private.peer_id)).encode())
    answer = circuit.decode_hop(await read_message(stream, 5))
    assert answer.status is Status.OK and answer.limit is not None
    await stream.write(b"\x13/not-multistream\n" + os.urandom(200))
    await wait_until(lambda: sum(trio.private.faults.values()) >= 1, 5, "the private peer's upgrade failed")
    await wait_until(lambda: trio.relay.circuits == 0, 5, "circuit torn down")
    # Our end of the circuit ends too. The relay's RESET may still be on its
    # way: what came before it (the private peer's multistream header, sent
    # when the circuit opened) is read first, and nothing else.
    assert await asyncio.wait_for(_until_ended(stream), 5) in (b"", multistream.encode_message(multistream.PROTOCOL_ID))
    assert not any(c.relay is not None for c in trio.private.connections)
    conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert await _echo(conn, b"proper") == b"proper"


async def test_a_reservation_ends_at_its_expiry_or_with_its_connection(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(reservation_ttl_s=1))
    reservation = await trio.private_client.reserve(trio.private_to_relay)
    assert reservation.expire <= int(time.time()) + 1
    await wait_until(lambda: trio.private.peer_id not in trio.relay.reservations, 3, "reservation expired")
    with pytest.raises(RelayRefused) as refused:
        await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
    assert refused.value.status is Status.NO_RESERVATION
    # renewed, then the reserving connection closes: the reservation goes with it
    trio.relay.config = RelayConfig()
    await trio.private_client.reserve(trio.private_to_relay)
    assert trio.private.peer_id in trio.relay.reservations
    await trio.private_to_relay.close()
    await wait_until(lambda: trio.private.peer_id not in trio.relay.reservations, 5, "reservation dropped")


async def test_the_client_keeps_its_reservation_alive_and_drops_it_with_the_relay(trios) -> None:  # type: ignore[no-untyped-def]
    trio = await trios(RelayConfig(reservation_ttl_s=2))
    trio.private_client.keep(trio.private_to_relay)
    try:
        await wait_until(lambda: trio.relay.stats["reservations_total"] >= 3, 10, "two refreshes")
        assert trio.private.peer_id in trio.relay.reservations  # past the first reservation's expiry
        conn = await trio.dialler_client.dial(trio.dialler_to_relay, trio.private.peer_id)
        assert await _echo(conn, b"kept") == b"kept"
        assert trio.private_client.circuit_addrs()
        await trio.private_to_relay.close()
        await wait_until(lambda: not trio.private_client.reservations, 5, "reservation forgotten")
        assert trio.private_client.circuit_addrs() == []
    finally:
        await trio.private_client.close()
