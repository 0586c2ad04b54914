"""murmur's libp2p host against py-libp2p and js-libp2p, each way round.

``they-dial``: the other implementation dials our listener; ``we-dial``: we
dial theirs. In both, each side opens streams to the other's echo handler,
pings the other, and asks the other who it is (identify both ways). Every
peer is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from murmur.errors import PeerFault
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost, StreamResetError, echo_handler
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import encode_public_key
from tests.integration.cluster import wait_until
from tests.interop.conftest import RemotePeer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

ECHO = "/murmur-interop/echo/1.0.0"
MIB = 1024 * 1024
DIRECTIONS = ["they-dial", "we-dial"]


@contextlib.asynccontextmanager
async def connected(remote: RemotePeer, direction: str) -> AsyncIterator[tuple[Libp2pHost, Libp2pConnection, list]]:
    faults: list[PeerFault] = []
    host = Libp2pHost(Identity.generate(), on_fault=lambda conn, fault: faults.append(fault))
    host.set_handler(ECHO, echo_handler)
    addr = (await host.listen("127.0.0.1", 0))[0]
    try:
        if direction == "they-dial":
            await remote.acall("dial", addr=str(addr))
            await wait_until(lambda: host.connections, 10, f"{remote.name}'s connection")
            conn = host.connections[0]
        else:
            conn = await host.dial(Multiaddr.parse(remote.addrs[0]))

            async def registered() -> bool:  # their side of the upgrade may finish a moment after ours
                return (await remote.acall("connected", peer=str(host.peer_id)))["connected"]

            await wait_until(registered, 10, f"{remote.name} lists our connection")
        assert str(conn.peer_id) == remote.peer_id
        yield host, conn, faults
    finally:
        await host.close()


async def echo(conn: Libp2pConnection, data: bytes) -> bytes:
    stream = await conn.open_stream(ECHO)

    async def send() -> None:
        for i in range(0, len(data), 256 * 1024):
            await stream.write(data[i : i + 256 * 1024])
        await stream.close_write()

    sender = asyncio.create_task(send())
    got = await stream.read_all(len(data) + 1)
    await sender
    return got


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_connection_and_identify_both_ways(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        # what they told us
        await asyncio.wait_for(conn.identified.wait(), 10)
        info = conn.identify
        assert info is not None, f"identify of {remote.name} failed{remote.evidence()}"
        assert ECHO in info.protocols and "/ipfs/ping/1.0.0" in info.protocols and "/ipfs/id/1.0.0" in info.protocols
        assert info.agent_version and info.agent_version.startswith(remote.name)
        assert info.peer_id() == conn.peer_id
        assert [str(a.to_tcp().without_peer()) for a in info.listen_addrs if a.to_tcp()] == \
               [str(Multiaddr.parse(a).without_peer()) for a in remote.addrs]
        observed = info.observed_addr.to_tcp() if info.observed_addr else None
        assert observed is not None and (observed.host, observed.port) == conn.local, \
            f"{remote.name} observed us at {info.observed_addr}, we are {conn.local}"
        assert host.observed_addrs
        # what we told them
        theirs = await remote.acall("identify", peer=str(host.peer_id))
        assert {ECHO, "/ipfs/ping/1.0.0", "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0"} <= set(theirs["protocols"])
        assert theirs["agent"].startswith("murmur/")
        assert theirs["observed"].startswith(f"/ip4/127.0.0.1/tcp/{conn.remote[1]}")
        assert bytes.fromhex(theirs["public_key"]) == encode_public_key(host.peer_id.public_key_bytes)
        assert faults == []


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_ping_rtt_both_ways(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        theirs = await remote.acall("ping", peer=str(host.peer_id), count=3)
        ours = await host.ping(conn, 3)
        assert len(theirs["rtts_ms"]) == 3 and all(0 <= r < 1000 for r in theirs["rtts_ms"])
        assert len(ours) == 3 and all(0 < r < 1 for r in ours)
        print(f"\n{remote.name} {direction}: their ping {theirs['rtts_ms']} ms, ours "
              f"{[round(r * 1000, 3) for r in ours]} ms")
        assert faults == []


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_four_mib_echo_both_ways(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        theirs = await remote.acall("echo", peer=str(host.peer_id), size=4 * MIB)
        data = os.urandom(4 * MIB)
        start = time.perf_counter()
        assert await echo(conn, data) == data
        ours = time.perf_counter() - start
        print(f"\n{remote.name} {direction}: 4 MiB echo, theirs {theirs['seconds']:.3f} s, ours {ours:.3f} s")
        assert faults == []


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_hundred_concurrent_streams_both_ways(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        await remote.acall("streams", peer=str(host.peer_id), n=100, size=16 * 1024)
        payloads = [os.urandom(16 * 1024 + i) for i in range(100)]
        assert await asyncio.gather(*(echo(conn, p) for p in payloads)) == payloads
        assert faults == [] and not conn.closed


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_reset_mid_transfer_leaves_the_rest_intact(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        # they reset one of their streams to our echo while ten others run
        theirs = await remote.acall("reset", peer=str(host.peer_id))
        assert theirs["connected"] and not conn.closed
        # and we reset one of ours to theirs
        victim = await conn.open_stream(ECHO)
        others = [asyncio.create_task(echo(conn, os.urandom(100_000))) for _ in range(10)]
        await victim.write(os.urandom(200_000))
        victim.reset()
        with pytest.raises(StreamResetError):
            await victim.read()
        assert all(len(r) == 100_000 for r in await asyncio.gather(*others))
        assert await echo(conn, b"still connected") == b"still connected"
        assert (await remote.acall("connected", peer=str(host.peer_id)))["connected"]
        assert faults == [] and not conn.closed


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_clean_close_by_the_dialler(remote: RemotePeer, direction: str) -> None:
    async with connected(remote, direction) as (host, conn, faults):
        assert await echo(conn, b"before") == b"before"
        if direction == "they-dial":
            await remote.acall("close", peer=str(host.peer_id))
            await wait_until(lambda: conn.closed, 10, "we see their close")
        else:
            await conn.close()

            async def gone() -> bool:
                return not (await remote.acall("connected", peer=str(host.peer_id)))["connected"]

            await wait_until(gone, 10, f"{remote.name} sees our close")
        assert conn.fault is None and faults == []
        assert conn.budget.used == 0
