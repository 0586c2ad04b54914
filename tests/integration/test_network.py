"""Eight real nodes in one process on loopback: discovery, neighbours, gossip, crashes, restarts.

Everything is real (sockets, Noise, msgpack, Cyclon); every bound asserted
here is a bound on how long the system took, measured by polling.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from murmur.protocol.identity import PeerId
from murmur.node.daemon import Node
from murmur.node.state import PEERS_FILE
from tests.integration.cluster import Cluster, node_config, wait_until

N = 8
CONVERGE_S = 10.0
GOSSIP_S = 5.0
RECOVER_S = 10.0  # the brief's bound for "crashed peers are evicted and replaced"
REJOIN_S = 10.0


async def test_discovery_gossip_crash_and_restart(tmp_path: Path) -> None:
    async with Cluster(N, tmp_path) as cluster:
        k = cluster.k
        # 1. One bootstrap address is enough for everyone to find k live neighbours.
        took = await cluster.wait_until(cluster.all_healthy, CONVERGE_S, "every node with k live neighbours")
        print(f"converged in {took:.2f}s")
        for node in cluster:
            assert len(node.sampler) >= k, "the Cyclon view holds at least k peers"
            assert node.peer_id not in cluster.neighbours(node)
        # Links are symmetric: if a counts b, b counts a (that is what Link is for).
        await cluster.wait_until(lambda: _symmetric(cluster), CONVERGE_S, "symmetric learning edges")

        # 2. A flood from one node reaches each other node exactly once.
        received: dict[PeerId, Counter[bytes]] = {n.peer_id: Counter() for n in cluster}
        for node in cluster:
            node.subscribe("test/hello", lambda origin, payload, me=node.peer_id: received[me].update([payload]))
        source = cluster.node(3)
        first_hops = await source.publish("test/hello", b"one")
        assert first_hops >= k
        others = [n.peer_id for n in cluster if n is not source]
        await wait_until(lambda: all(received[p][b"one"] >= 1 for p in others), GOSSIP_S, "gossip at every node")
        # Let every forwarded duplicate arrive (each node forwards once: <= 2E messages),
        # then check nobody delivered twice and the origin never delivered its own message.
        await _quiesce(cluster)
        assert all(received[p][b"one"] == 1 for p in others), {str(p)[-6:]: received[p][b"one"] for p in others}
        assert received[source.peer_id][b"one"] == 0

        # 3. Three nodes die abruptly (no Goodbye): survivors evict and replace them.
        victims = [1, 4, 6]
        dead = {cluster.node(i).peer_id for i in victims}
        await asyncio.gather(*(cluster.crash(i) for i in victims))
        took = await cluster.wait_until(
            lambda: cluster.all_healthy() and not any(dead & cluster.neighbours(n) for n in cluster),
            RECOVER_S,
            "survivors back to k live neighbours",
        )
        assert took < RECOVER_S
        print(f"crash repair took {took:.2f}s")
        for node in cluster:
            assert not dead & set(node.sampler.neighbours(k)), "a dead peer is still a sampler neighbour"
            assert node.membership.evictions >= 0

        # Gossip still reaches every survivor exactly once after the repair.
        survivors = [n.peer_id for n in cluster if n is not source]
        await source.publish("test/hello", b"two")
        await wait_until(lambda: all(received[p][b"two"] >= 1 for p in survivors), GOSSIP_S, "gossip after crash")
        await _quiesce(cluster)
        assert all(received[p][b"two"] == 1 for p in survivors)
        assert all(received[p][b"two"] == 0 for p in dead)

        # 4. A crashed node restarted on its data dir keeps its identity and rejoins.
        old_id = cluster.members[4].peer_id
        restarted = await cluster.restart(4)
        assert restarted.peer_id == old_id
        await cluster.wait_until(lambda: cluster.healthy(restarted), REJOIN_S, "restarted node has k neighbours")
        await cluster.wait_until(
            lambda: any(restarted.peer_id in cluster.neighbours(n) for n in cluster if n is not restarted),
            REJOIN_S,
            "somebody links the restarted node",
        )


async def test_graceful_stop_is_noticed_at_once(tmp_path: Path) -> None:
    """A Goodbye evicts the leaver everywhere without waiting for a timeout."""
    async with Cluster(5, tmp_path) as cluster:
        await cluster.wait_until(cluster.all_healthy, CONVERGE_S, "converged")
        leaver = cluster.node(2).peer_id
        await cluster.stop(2)
        await cluster.wait_until(
            lambda: cluster.all_healthy() and all(leaver not in cluster.neighbours(n) for n in cluster),
            RECOVER_S,
            "leaver replaced",
        )
        assert (tmp_path / "node2" / "peers.json").exists()


async def test_simultaneous_dial_keeps_one_connection(tmp_path: Path) -> None:
    """Both ends dial each other at once; the dedup rule leaves one TCP
    connection that both ends use (the one dialled by the smaller peer id)."""
    async with Cluster(1, tmp_path) as cluster:
        a = cluster.node(0)
        b = await cluster.add_node()
        for _ in range(5):  # several rounds: the race resolves differently each time
            sa, sb = await asyncio.gather(a.connect(b.addrs, b.peer_id), b.connect(a.addrs, a.peer_id))
            await wait_until(lambda: _one_shared_connection(a, b), 3.0, "one shared connection")
            smaller = min(a.peer_id, b.peer_id)
            kept = a.session(b.peer_id)
            assert kept is not None
            assert kept.conn.outbound == (a.peer_id == smaller)
            # The session survives: no fault, and a message goes through it both ways.
            got: list[bytes] = []
            b.subscribe("dedup", lambda _o, p: got.append(p))
            await a.publish("dedup", b"x")
            await wait_until(lambda: got == [b"x"], 2.0, "message over the kept connection")
            assert a.status()["faults"] == {} and b.status()["faults"] == {}
            # Tear the connection down before the next round.
            await kept.close()
            await wait_until(lambda: a.session(b.peer_id) is None and b.session(a.peer_id) is None, 3.0, "closed")
            b._subscribers.clear()


def _one_shared_connection(a, b) -> bool:  # type: ignore[no-untyped-def]
    sa, sb = a.session(b.peer_id), b.session(a.peer_id)
    if sa is None or sb is None:
        return False
    a_conns = [c for c in a.host.connections if c.peer_id == b.peer_id]
    b_conns = [c for c in b.host.connections if c.peer_id == a.peer_id]
    if len(a_conns) != 1 or len(b_conns) != 1:
        return False
    # The same TCP connection seen from both ends: a's remote port is b's local port or vice versa.
    return sa.conn is a_conns[0] and sb.conn is b_conns[0] and sa.conn.outbound != sb.conn.outbound


def _symmetric(cluster: Cluster) -> bool:
    by_id = {n.peer_id: n for n in cluster}
    for node in cluster:
        for peer in cluster.neighbours(node):
            other = by_id.get(peer)
            if other is None or node.peer_id not in cluster.neighbours(other):
                return False
    return True


async def _quiesce(cluster: Cluster, settle_s: float = 0.3, timeout: float = GOSSIP_S) -> None:
    """Wait until no node received a Gossip message for ``settle_s``: every
    forwarded duplicate has landed (shuffles and pings go on; they don't count)."""

    def gossip_in() -> float:
        return sum(n.metrics.value("murmur_messages_total", direction="in", kind="Gossip") or 0.0 for n in cluster)

    deadline = asyncio.get_running_loop().time() + timeout
    last = -1.0
    while (now := gossip_in()) != last:
        assert asyncio.get_running_loop().time() < deadline, "gossip never went quiet"
        last = now
        await asyncio.sleep(settle_s)


async def test_late_duplicate_dial_replaces_cleanly(tmp_path: Path) -> None:
    """The slow half of a simultaneous dial: the smaller id's connection
    completes its handshake *after* the other one already exchanged Hellos.
    Both ends must switch to it without treating its Hello as a second Hello
    on one connection (a DecodeError that would drop the edge)."""
    async with Cluster(1, tmp_path) as cluster:
        a = cluster.node(0)
        b = await cluster.add_node()
        small, large = sorted((a, b), key=lambda n: n.peer_id)
        first = await large.connect(small.addrs, small.peer_id)  # the larger id dials first...
        await wait_until(lambda: first.hello is not None and small.session(large.peer_id) is not None
                         and small.session(large.peer_id).hello is not None, 2.0, "hellos exchanged")
        await small.host.dial(large.addrs[0])  # ...and the smaller id's dial lands late
        await wait_until(lambda: _one_shared_connection(a, b) and small.session(large.peer_id).conn.outbound,
                         3.0, "both ends on the smaller id's connection")
        got: list[bytes] = []
        large.subscribe("late", lambda _o, p: got.append(p))
        await small.publish("late", b"y")
        await wait_until(lambda: got == [b"y"], 2.0, "message over the new connection")
        assert small.status()["faults"] == {} and large.status()["faults"] == {}
        assert small.session(large.peer_id).hello is not None


async def test_mdns_finds_peers_without_bootstrap(tmp_path) -> None:
    """Two nodes with mDNS on and no bootstrap address connect to each other."""
    nodes: list[Node] = []
    try:
        for i in range(2):
            node = Node(node_config(tmp_path / f"m{i}", overrides={"network.mdns": True, "network.neighbours": 1}))
            try:
                await node.start()
            except OSError as exc:  # no multicast on this host
                pytest.skip(f"mDNS sockets unavailable: {exc}")
            nodes.append(node)
        await wait_until(lambda: all(n.sessions() for n in nodes), 15.0, "mDNS discovery")
        assert nodes[1].peer_id in {s.peer for s in nodes[0].sessions()}
    finally:
        for node in nodes:
            await node.stop()


async def test_a_node_that_lost_every_peer_dials_its_bootstrap_again(tmp_path: Path) -> None:
    """Two nodes; only the second can dial (the first forgets it: as if it sat
    behind a NAT). The first crashes and stays down past the second's redial;
    when it is back, the second finds it again through its bootstrap address
    instead of sitting alone with an empty view for good."""
    async with Cluster(1, tmp_path, network__neighbours=1) as cluster:
        lone = await cluster.add_node(bootstrap=True)
        first = cluster.node(0).peer_id
        await cluster.wait_until(lambda: cluster.neighbours(lone) == {first}, CONVERGE_S, "the two linked")
        await cluster.crash(0)
        await cluster.wait_until(lambda: not lone.sessions() and len(lone.sampler) == 0, RECOVER_S,
                                 "the second alone, its redial failed")
        (cluster.members[0].data_dir / PEERS_FILE).unlink(missing_ok=True)  # it cannot dial the second
        restarted = await cluster.restart(0)
        await cluster.wait_until(lambda: cluster.neighbours(lone) == {first} and cluster.neighbours(restarted)
                                 == {lone.peer_id}, REJOIN_S + 5.0, "the two linked again")
