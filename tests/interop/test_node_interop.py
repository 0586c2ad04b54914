"""A murmur *node* (not only its bare host) with py-libp2p and js-libp2p peers, each way round.

``they-dial``: the other implementation dials the node's listen address;
``we-dial``: the node has the other peer as its bootstrap address. Either way
the connection is upgraded to ``/noise`` + ``/yamux/1.0.0`` (the node offers
its fast path first; they answer ``na``), identify runs both ways (each side
learns the other's protocols and the address it was seen at, and the node
keeps it in its peer table), pings go both ways, and the node, a learning
one, refuses the peer as a learning neighbour (it speaks no ``/murmur/...``
protocol) but keeps the connection for identify and ping while its rounds go
on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.protocol.libp2p import Libp2pConnection, YamuxConnection
from murmur.protocol.messages import MurmurProtocol
from murmur.protocol.multiaddr import Multiaddr
from tests.integration.cluster import node_config, wait_until
from tests.interop.conftest import RemotePeer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

DIRECTIONS = ["they-dial", "we-dial"]
LEARNING = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.num_nodes": 2,
    "learning.rounds": 100_000,
    "learning.local_steps": 1,
    "learning.round_deadline_s": 0.3,
    "learning.threads": 1,
    "learning.device": "cpu",
}


@contextlib.asynccontextmanager
async def node_with(remote: RemotePeer, direction: str, tmp_path: Path) -> AsyncIterator[tuple[Node, Libp2pConnection]]:
    overrides = dict(LEARNING)
    if direction == "we-dial":
        overrides["network.bootstrap"] = [remote.addrs[0]]
    node = Node(node_config(tmp_path / direction, overrides=overrides))
    await node.start()
    try:
        if direction == "they-dial":
            await remote.acall("dial", addr=str(node.addrs[0]))

        def connection() -> Libp2pConnection | None:
            return next((c for c in node.host.connections if str(c.peer_id) == remote.peer_id), None)

        await wait_until(lambda: connection() is not None, 10, f"{remote.name}'s connection")
        conn = connection()
        assert conn is not None

        async def registered() -> bool:  # their side of the upgrade may finish a moment after ours
            return (await remote.acall("connected", peer=str(node.peer_id)))["connected"]

        await wait_until(registered, 10, f"{remote.name} lists the node's connection")
        yield node, conn
    finally:
        await node.stop()


@pytest.mark.parametrize("direction", DIRECTIONS)
async def test_a_murmur_node_and_a_libp2p_peer(remote: RemotePeer, direction: str, tmp_path: Path) -> None:
    async with node_with(remote, direction, tmp_path) as (node, conn):
        assert isinstance(conn, YamuxConnection) and (conn.security, conn.muxer) == ("/noise", "/yamux/1.0.0")
        peer = conn.peer_id
        # what they told the node, and what it keeps of it
        await asyncio.wait_for(conn.identified.wait(), 10)
        info = conn.identify
        assert info is not None, f"identify of {remote.name} failed{remote.evidence()}"
        assert info.agent_version and info.agent_version.startswith(remote.name)
        observed = info.observed_addr.to_tcp() if info.observed_addr else None
        assert observed is not None and (observed.host, observed.port) == conn.local, \
            f"{remote.name} observed the node at {info.observed_addr}, it is {conn.local}"

        def entry() -> dict:
            return next(dict(p) for p in node.peers() if p["peer_id"] == str(peer))

        await wait_until(lambda: any(p["peer_id"] == str(peer) and p["agent"] for p in node.peers()), 5,
                         "identify in the peer table")
        assert entry()["agent"] == info.agent_version and "/ipfs/id/1.0.0" in entry()["protocols"]
        assert entry()["observed"] == str(info.observed_addr)
        assert [str(Multiaddr.parse(a).without_peer()) for a in remote.addrs] == [
            a for a in entry()["listen_addrs"]]
        # what the node told them
        theirs = await remote.acall("identify", peer=str(node.peer_id))
        assert {MurmurProtocol.HELLO, MurmurProtocol.DELTA, "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"} <= set(
            theirs["protocols"])
        assert theirs["agent"].startswith("murmur/")
        assert theirs["observed"].startswith(f"/ip4/127.0.0.1/tcp/{conn.remote[1]}")
        assert theirs["listen"] == [str(node.addrs[0].without_peer())]
        # ping both ways
        ours = await node.host.ping(conn, 3)
        assert len(ours) == 3 and all(0 < r < 1 for r in ours)
        pinged = await remote.acall("ping", peer=str(node.peer_id), count=3)
        assert len(pinged["rtts_ms"]) == 3
        # never a learning neighbour, and the connection stays while the rounds go on
        await wait_until(lambda: peer in node._incompatible, 10, "the node sees it speaks no murmur protocol")
        start = node.learner.round
        await wait_until(lambda: node.learner.round >= start + 3, 30, "three more rounds")
        assert node.session(peer) is None and peer not in node.sampler
        assert str(peer) not in node.status()["neighbours"]
        assert str(peer) not in node.learner.status()["weights"]
        assert not conn.closed and (await remote.acall("connected", peer=str(node.peer_id)))["connected"]
        assert entry()["connected"] and entry()["murmur"] is False
        assert node.status()["faults"] == {}, node.status()["faults"]  # not speaking murmur is no fault
