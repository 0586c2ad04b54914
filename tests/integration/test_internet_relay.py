"""Circuit relay v2 on the emulated internet: a public relay, a peer behind a
symmetric NAT (unreachable directly, no hole punch can predict its ports), and
a public dialler that reaches it only through the relay; and the per-IP
reservation limit against Sybils sharing one router's address. Root only
(skipped otherwise, with the reason)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from murmur.errors import TimeoutFault
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost, echo_handler
from murmur.protocol.circuit import Status
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayRefused, RelayService
from murmur.protocol.multiaddr import DialAddr, Multiaddr
from murmur.testnet.internet import Host, Internet, NatKind, Router, Topology
from tests.integration.emulation import ns_host, require_internet

PORT = 4001
ECHO = "/murmur-test/echo/1.0.0"


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


@pytest.fixture
def net() -> Iterator[Internet]:
    topology = Topology(hosts=(Host("relay"), Host("dialler"), Host("private", router="home")),
                        routers=(Router("home", nat=NatKind.SYMMETRIC),))
    with Internet(topology) as emulated:
        yield emulated


def _host(net: Internet, name: str) -> Libp2pHost:
    return ns_host(net, name)


async def _echo(conn: Libp2pConnection, data: bytes) -> bytes:
    stream = await conn.open_stream(ECHO)

    async def send() -> None:
        await stream.write(data)
        await stream.close_write()

    sender = asyncio.create_task(send())
    got = await stream.read_all(len(data) + 1)
    await sender
    return got


async def test_peer_behind_symmetric_nat_is_reached_through_a_public_relay(net: Internet) -> None:
    relay, private, dialler = (_host(net, n) for n in ("relay", "private", "dialler"))
    service = RelayService(relay, RelayConfig())
    private.set_handler(ECHO, echo_handler)
    private_client, dialler_client = RelayClient(private), RelayClient(dialler)
    try:
        (relay_addr,) = await relay.listen(net.address("relay"), PORT)
        await private.listen(net.address("private"), PORT)  # on its LAN: nobody outside gets there
        # directly, the private peer cannot be reached: its router drops what it did not ask for
        with pytest.raises((TimeoutFault, OSError)):
            await dialler.dial(Multiaddr(net.plan.public_address("private"), PORT, private.peer_id))
        to_relay = await private.dial(relay_addr)
        assert to_relay.local[0] == net.address("private")
        await private_client.reserve(to_relay)
        assert list(service.reservations) == [private.peer_id]
        assert next(iter(service._reservations.values())).ip == net.plan.public_address("private")  # its NAT's
        (advertised,) = private_client.circuit_addrs()
        assert str(advertised).startswith(f"/ip4/{net.address('relay')}/tcp/{PORT}/p2p/")

        conn = await dialler_client.dial_addr(DialAddr.parse(str(advertised)))
        assert conn.peer_id == private.peer_id and conn.relay == relay.peer_id
        data = os.urandom(64 * 1024)
        assert await _echo(conn, data) == data
        assert service.stats["bytes_relayed"] > 2 * len(data)
    finally:
        for host in (dialler, private, relay):
            await host.close()


async def test_a_reservation_flood_from_one_home_leaves_room_for_another() -> None:
    """Sybil identities behind one router share its public address: past the
    relay's per-IP limit they are refused, while a peer behind another router
    still reserves and is reached."""
    topology = Topology(hosts=(Host("relay"), Host("dialler"), Host("sybils", router="home1"),
                               Host("honest", router="home2")),
                        routers=(Router("home1", nat=NatKind.EIM), Router("home2", nat=NatKind.SYMMETRIC)))
    with Internet(topology) as net:
        relay = _host(net, "relay")
        service = RelayService(relay, RelayConfig(max_reservations_per_ip=3))
        sybils = [_host(net, "sybils") for _ in range(6)]
        honest, dialler = _host(net, "honest"), _host(net, "dialler")
        honest.set_handler(ECHO, echo_handler)
        hosts = [dialler, honest, *sybils, relay]
        try:
            (relay_addr,) = await relay.listen(net.address("relay"), PORT)
            refused = 0
            for sybil in sybils:
                try:
                    await RelayClient(sybil).reserve(await sybil.dial(relay_addr))
                except RelayRefused as exc:
                    assert exc.status is Status.RESERVATION_REFUSED
                    refused += 1
            assert refused == 3 and len(service.reservations) == 3
            honest_client = RelayClient(honest)
            await honest_client.reserve(await honest.dial(relay_addr))
            assert honest.peer_id in service.reservations
            (advertised,) = honest_client.circuit_addrs()
            conn = await RelayClient(dialler).dial_addr(DialAddr.parse(str(advertised)))
            assert await _echo(conn, b"room for me") == b"room for me"
        finally:
            for host in hosts:
                await host.close()
