"""AutoNAT v2 between real hosts on loopback (the servers allow loopback
addresses, as a test network must): a dial-back proves an address with the
client's nonce; an address nobody answers on is unreachable; another IP than
the requester's costs it the amplification price first; and a client that
never pays, floods, or a server that claims a dial it did not make, gets
nothing out of the other side, which keeps serving well-behaved peers."""

from __future__ import annotations

import asyncio
import socket

import pytest

from murmur.protocol import autonat
from murmur.protocol.autonat import DialRequest, DialResponse, DialStatus, ResponseStatus
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import Libp2pHost
from murmur.protocol.libp2p.connection import StreamResetError
from murmur.protocol.libp2p.autonat import AutoNATClient, AutoNATConfig, AutoNATServer
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayService, read_message
from murmur.protocol.multiaddr import DialAddr, Multiaddr

LOOPBACK = AutoNATConfig(allow_private=True, per_peer_interval_s=0.0, request_timeout_s=5.0, dial_timeout_s=2.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def hosts():  # type: ignore[no-untyped-def]
    made: list[Libp2pHost] = []

    def make() -> Libp2pHost:
        host = Libp2pHost(Identity.generate())
        made.append(host)
        return host

    yield make
    for host in made:
        await host.close()


async def _pair(hosts, server_config: AutoNATConfig = LOOPBACK, client_config: AutoNATConfig = LOOPBACK,
                listen: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    server_host, client_host = hosts(), hosts()
    (server_addr,) = await server_host.listen("127.0.0.1", 0)
    (client_addr,) = await client_host.listen(listen, 0)
    server = AutoNATServer(server_host, server_config)
    client = AutoNATClient(client_host, client_config)
    conn = await client_host.dial(server_addr)
    return server, client, conn, client_addr


async def test_a_dial_back_proves_the_address_with_our_nonce(hosts) -> None:  # type: ignore[no-untyped-def]
    server, client, conn, addr = await _pair(hosts)
    result = await client.check(conn, [addr])
    assert result.reachable is True and result.addr == addr.without_peer()
    assert result.status is ResponseStatus.OK and result.server == conn.peer_id
    assert server.stats["dialed_ok"] == 1 and server.stats["paid_for"] == 0  # our own IP: no price
    assert client.stats["reachable"] == 1
    await server.close()


async def test_an_address_nobody_answers_on_is_unreachable(hosts) -> None:  # type: ignore[no-untyped-def]
    server, client, conn, _ = await _pair(hosts)
    result = await client.check(conn, [Multiaddr("127.0.0.1", _free_port())])
    assert result.reachable is False and server.stats["dial_error"] == 1
    await server.close()


async def test_another_ip_is_dialled_only_after_the_price_is_paid(hosts) -> None:  # type: ignore[no-untyped-def]
    server, client, conn, addr = await _pair(hosts, listen="0.0.0.0")
    other_ip = Multiaddr("127.0.0.2", addr.port)  # our listener answers there; the request came from 127.0.0.1
    result = await client.check(conn, [other_ip])
    assert result.reachable is True and server.stats["paid_for"] == 1 and server.stats["dialed_ok"] == 1

    stingy = AutoNATClient(client.host, AutoNATConfig(allow_private=True, max_pay_bytes=1000))
    declined = await stingy.check(conn, [other_ip])
    assert declined.reachable is None and declined.addr is None
    assert server.stats["dialed_ok"] == 1 and server.stats["paid_for"] == 1  # nothing dialled for free
    await server.close()


async def _raw_request(conn, addrs: list[Multiaddr], nonce: int = 5):  # type: ignore[no-untyped-def]
    stream = await conn.open_stream(autonat.DIAL_REQUEST)
    await stream.write(autonat.encode(DialRequest(tuple(a.to_bytes() for a in addrs), nonce)))
    return stream


async def test_a_client_that_never_pays_holds_nothing_and_others_are_served(hosts) -> None:  # type: ignore[no-untyped-def]
    """A request takes its dial-back slot only once paid: a requester that
    never pays used to hold the one slot for request_timeout_s (20 s by
    default) while every free check was rejected."""
    config = AutoNATConfig(allow_private=True, per_peer_interval_s=0.0, request_timeout_s=30.0, pay_timeout_s=1.0,
                           max_concurrent=1, max_paying=1)
    server, client, conn, addr = await _pair(hosts, server_config=config, listen="0.0.0.0")
    stream = await _raw_request(conn, [Multiaddr("127.0.0.2", addr.port)])
    asked = autonat.decode(await read_message(stream, 2.0, autonat.message_length, "autonat"))
    assert asked == autonat.DialDataRequest(0, autonat.DIAL_DATA_BYTES)
    other_host = hosts()
    other = AutoNATClient(other_host, LOOPBACK)
    (other_addr,) = await other_host.listen("127.0.0.1", 0)
    other_conn = await other_host.dial(next(iter(server.host.listen_addrs)))
    served = await other.check(other_conn, [other_addr])  # its own IP: free, and served while the other waits
    assert served.reachable is True and server.stats["dialed_ok"] == 1
    second = await _raw_request(other_conn, [Multiaddr("127.0.0.2", addr.port)])  # the one place to pay is taken
    rejected = autonat.decode(await read_message(second, 2.0, autonat.message_length, "autonat"))
    assert rejected == DialResponse(ResponseStatus.E_REQUEST_REJECTED)
    with pytest.raises(StreamResetError):  # pay_timeout_s, not request_timeout_s: given up on, with a penalty
        await asyncio.wait_for(stream.read(), 5.0)
    assert server.stats["timed_out"] == 1 and server._paying == 0 and server._in_flight == 0
    await server.close()


async def test_one_peer_gets_one_request_per_interval(hosts) -> None:  # type: ignore[no-untyped-def]
    config = AutoNATConfig(allow_private=True, per_peer_interval_s=60.0)
    server, client, conn, addr = await _pair(hosts, server_config=config)
    assert (await client.check(conn, [addr])).reachable is True
    flood = await asyncio.gather(*(client.check(conn, [addr]) for _ in range(20)))
    assert {r.status for r in flood} == {ResponseStatus.E_REQUEST_REJECTED}
    assert server.stats["rejected"] == 20 and server.stats["dialed_ok"] == 1
    await server.close()


async def test_a_server_claiming_a_dial_it_did_not_make_is_not_believed(hosts) -> None:  # type: ignore[no-untyped-def]
    liar_host, client_host = hosts(), hosts()

    async def lie(stream) -> None:  # type: ignore[no-untyped-def]
        await read_message(stream, 2.0, autonat.message_length, "autonat")
        await stream.write(autonat.encode(DialResponse(ResponseStatus.OK, 0, DialStatus.OK)))
        await stream.close_write()

    liar_host.set_handler(autonat.DIAL_REQUEST, lie)
    (liar_addr,) = await liar_host.listen("127.0.0.1", 0)
    (addr,) = await client_host.listen("127.0.0.1", 0)
    client = AutoNATClient(client_host, LOOPBACK)
    result = await client.check(await client_host.dial(liar_addr), [addr])
    assert result.reachable is None and client.stats["inconclusive"] == 1  # no nonce came back


async def test_a_dial_back_with_a_nonce_we_never_sent_is_discarded(hosts) -> None:  # type: ignore[no-untyped-def]
    stranger, client_host = hosts(), hosts()
    (addr,) = await client_host.listen("127.0.0.1", 0)
    client = AutoNATClient(client_host, LOOPBACK)
    conn = await stranger.dial(addr)
    stream = await conn.open_stream(autonat.DIAL_BACK)
    await stream.write(autonat.encode_dial_back(12345))
    with pytest.raises(StreamResetError):  # no DialBackResponse for a nonce not ours
        await stream.read()
    assert client.stats["nonce_mismatch"] == 1


async def test_over_a_circuit_every_address_costs_the_price(hosts) -> None:  # type: ignore[no-untyped-def]
    """A request that came through a relay has no observed IP of its own: the
    connection's remote address is the relay's. Taken as the requester's, any
    port of the relay's IP was dialled for free (an amplifier aimed at the
    relay); now every address costs the price."""
    relay_host, server_host, client_host = hosts(), hosts(), hosts()
    RelayService(relay_host, RelayConfig())
    (relay_addr,) = await relay_host.listen("127.0.0.2", 0)
    await server_host.listen("127.0.0.1", 0)
    await client_host.listen("127.0.0.3", 0)  # dials leave from 127.0.0.3: another IP than the relay's
    server = AutoNATServer(server_host, LOOPBACK)
    client = AutoNATClient(client_host, LOOPBACK)
    server_relay, client_relay = RelayClient(server_host), RelayClient(client_host)
    try:
        await server_relay.reserve(await server_host.dial(relay_addr))
        conn = await client_relay.dial_addr(DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{server_host.peer_id}"))
        port = _free_port()
        result = await client.check(conn, [Multiaddr("127.0.0.2", port)])  # a port of the relay's IP
        assert server.stats["paid_for"] == 1, "dialled the relay's IP for free"
        assert result.reachable is False and server.stats["dial_error"] == 1
    finally:
        await server_relay.close()
        await client_relay.close()
        await server.close()
