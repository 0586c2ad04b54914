"""Circuit relay v2 against other implementations: murmur hosts reserve on and
meet through a py-libp2p relay (``libp2p.relay.circuit_v2``) and a js-libp2p
one (``@libp2p/circuit-relay-v2``), and py-libp2p and js-libp2p peers
reserve on a murmur relay and are reached through it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import Libp2pHost, echo_handler
from murmur.protocol.circuit import Status
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.relay import RelayClient, RelayService
from murmur.protocol.multiaddr import Multiaddr
from tests.interop.conftest import HERE, RemotePeer, js_libp2p_dir, py_libp2p_python

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

ECHO = "/murmur-interop/echo/1.0.0"


@pytest.fixture(scope="module", params=["py-libp2p", "js-libp2p"])
def other_relay(request: pytest.FixtureRequest) -> Iterator[RemotePeer]:
    """Another implementation's circuit relay v2 server, 4 MiB per circuit."""
    if request.param == "py-libp2p":
        python, install_s = py_libp2p_python()
        peer = RemotePeer("py-libp2p", [str(python), str(HERE / "py_peer.py")], HERE, install_s)
        peer.call("relay", data=4 * 1024 * 1024)
    else:
        target, install_s = js_libp2p_dir()
        peer = RemotePeer("js-libp2p", ["node", "--import", "./polyfill.mjs", "peer.mjs", "--relay"], target,
                          install_s)
    try:
        yield peer
    finally:
        peer.close()


async def test_murmur_peers_reserve_and_meet_through_another_implementations_relay(
        other_relay: RemotePeer) -> None:
    private, dialler = Libp2pHost(Identity.generate()), Libp2pHost(Identity.generate())
    private.set_handler(ECHO, echo_handler)
    private_client, dialler_client = RelayClient(private), RelayClient(dialler)
    relay_addr = Multiaddr.parse(other_relay.addrs[0])
    try:
        to_relay = await private.dial(relay_addr)
        reservation = await private_client.reserve(to_relay)
        assert reservation.expire > 0, other_relay.evidence()
        conn = await dialler_client.dial(await dialler.dial(relay_addr), private.peer_id)
        assert conn.peer_id == private.peer_id and conn.relay is not None
        data = os.urandom(50_000)
        stream = await conn.open_stream(ECHO)
        await stream.write(data)
        await stream.close_write()
        assert await stream.read_all(len(data) + 1) == data, other_relay.evidence()
    finally:
        await dialler.close()
        await private.close()


@pytest.fixture(scope="module")
def py_private() -> Iterator[RemotePeer]:
    python, install_s = py_libp2p_python()
    peer = RemotePeer("py-libp2p", [str(python), str(HERE / "py_peer.py")], HERE, install_s)
    try:
        yield peer
    finally:
        peer.close()


async def test_a_py_libp2p_peer_reserves_on_a_murmur_relay_and_is_reached_through_it(
        py_private: RemotePeer) -> None:
    relay_host, dialler = Libp2pHost(Identity.generate()), Libp2pHost(Identity.generate())
    relay = RelayService(relay_host)
    try:
        (relay_addr,) = await relay_host.listen("127.0.0.1", 0)
        answer = await py_private.acall("reserve", addr=str(relay_addr))
        assert answer["status"] == Status.OK and answer["expire"] > 0
        assert answer["addrs"] == [str(relay_addr)]
        target = PeerId.from_string(py_private.peer_id)
        assert target in relay.reservations
        conn = await RelayClient(dialler).dial(await dialler.dial(relay_addr), target)
        assert conn.peer_id == target and conn.muxer == "/yamux/1.0.0"
        data = os.urandom(50_000)
        stream = await conn.open_stream(ECHO)
        await stream.write(data)
        await stream.close_write()
        assert await stream.read_all(len(data) + 1) == data, py_private.evidence()
        assert relay.stats["circuits_total"] == 1
    finally:
        await dialler.close()
        await relay_host.close()


async def test_a_js_libp2p_peer_reserves_on_a_murmur_relay_and_is_reached_through_it() -> None:
    relay_host, dialler = Libp2pHost(Identity.generate()), Libp2pHost(Identity.generate())
    relay = RelayService(relay_host)
    target_dir, install_s = js_libp2p_dir()
    js: RemotePeer | None = None
    try:
        (relay_addr,) = await relay_host.listen("127.0.0.1", 0)
        js = await asyncio.to_thread(RemotePeer, "js-libp2p", [
            "node", "--import", "./polyfill.mjs", "peer.mjs", "--circuit", str(relay_addr)], target_dir, install_s)
        target = PeerId.from_string(js.peer_id)
        assert target in relay.reservations, js.evidence()
        assert f"{relay_addr}/p2p-circuit/p2p/{target}" in js.addrs  # what it advertises
        conn = await RelayClient(dialler).dial(await dialler.dial(relay_addr), target)
        assert conn.peer_id == target and conn.relay == relay_host.peer_id
        data = os.urandom(20_000)  # within the stranger's 128 KiB per direction, handshakes included
        stream = await conn.open_stream(ECHO)
        await stream.write(data)
        await stream.close_write()
        assert await stream.read_all(len(data) + 1) == data, js.evidence()
    finally:
        if js is not None:
            js.close()
        await dialler.close()
        await relay_host.close()
