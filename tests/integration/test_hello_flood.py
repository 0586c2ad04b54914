"""A flood of fresh identities saying Hello does not push a long-known peer out of the table.

The victim is a real Node (in-process, loopback, real Noise). Its data dir
holds the peer table of an earlier life: an honest peer it has known for 30
days (a Hello every few hours, the last one two hours ago, so its decaying
score is nearly gone, as it would be for any peer away for an afternoon).
Then 3,300 identities that never existed before say Hello, over three times
the table's 1024 records:

- ``REAL`` of them over real connections: an Ed25519 key each, a Noise
  handshake, one ``Hello`` frame, hang up. This is the whole path a flood
  takes: transport, session, dispatcher, membership's Hello handler, table.
- ``TABLE_LOAD`` more straight into the victim's table, with exactly the two
  calls membership's Hello handler makes (``observe`` with the observed
  address, then ``mark_alive``): thousands of handshakes would take a minute
  on a shared 2-core box and add nothing the real ones do not exercise.

Before, every fresh id entered at score 1, seen now, and the table evicted
the lowest decayed score: the honest peer went first, in memory and in
``peers.json``. Now it is reputed (standing earned over time) and only new
records are evicted to make room.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from murmur.node.daemon import Node
from murmur.node.state import StateDir
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import Hello
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.peertable import PeerTable, PeerTableConfig
from tests.integration.cluster import node_config, wait_until
from tests.integration.handpeer import HandPeer

DAY = 86400.0
REAL = 300
TABLE_LOAD = 3000
CONCURRENCY = 8  # under the victim's per-subnet inbound cap: every flooder is 127.0.0.1
FLOOD_S = 60.0  # bound for REAL handshakes on a loaded 2-core box
HELLO_S = 5.0


class PastClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _victims_past(peers_path: Path, honest: PeerId, honest_addr: Multiaddr) -> None:
    """The table an earlier run of the victim saved: ``honest`` said Hello every
    3.6 hours for 30 days, the last time two hours ago."""
    now = time.time()
    clock = PastClock(now - 30 * DAY)
    table = PeerTable(PeerTableConfig(), clock)
    while clock.t < now - 2 * 3600:
        table.observe(honest, [honest_addr])
        table.mark_alive(honest)
        clock.t += 3.6 * 3600
    table.save(peers_path)


async def _say_hello(victim: Node, identities: list[Identity]) -> None:
    hello = Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="flood", round=0, degree=1)
    for identity in identities:
        peer = await HandPeer.connect_to(victim, identity)
        await peer.send([hello])
        # the victim greets first: hanging up before it read our Hello would cut that short
        await wait_until(lambda: identity.peer_id in victim.table, HELLO_S, "Hello handled")
        await peer.hang_up()


def _hellos(victim: Node) -> float:
    return victim.metrics.value("murmur_messages_total", direction="in", kind="Hello") or 0.0


async def test_a_long_known_peer_survives_a_hello_flood_in_the_table_and_on_disk(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "victim").create()
    honest = Identity.generate().peer_id
    honest_addr = Multiaddr("127.0.0.1", 9)  # away now: nobody listens there
    _victims_past(state.peers_path, honest, honest_addr)

    victim = Node(node_config(state.path))
    await victim.start()
    try:
        table = victim.table
        assert honest in table and table.score(honest) < 0.5
        capacity = table.config.max_peers

        flooders = [Identity.generate() for _ in range(REAL)]
        await asyncio.gather(*(_say_hello(victim, flooders[i::CONCURRENCY]) for i in range(CONCURRENCY)))
        await wait_until(lambda: _hellos(victim) == REAL, FLOOD_S, f"{REAL} Hellos handled")
        assert len(table) == REAL + 1 and honest in table  # the real part alone does not fill it

        for _ in range(TABLE_LOAD):
            fresh = Identity.generate().peer_id
            table.observe(fresh, [Multiaddr("127.0.0.1", 9)])  # what Membership._on_hello does
            table.mark_alive(fresh)
        assert len(table) == capacity  # full, and churned: most flooders came and went
        assert sum(f.peer_id in table for f in flooders) < REAL

        assert honest in table and table.is_reputed(honest)
        assert table.get(honest).addrs == [honest_addr]  # type: ignore[union-attr]
    finally:
        await victim.stop()  # saves peers.json, as on every graceful stop

    on_disk = PeerTable(PeerTableConfig(exempt_loopback=True))  # as the victim reads it (network.allow_loopback)
    assert on_disk.load(state.peers_path) is None
    assert honest in on_disk and on_disk.is_reputed(honest) and len(on_disk) == capacity


async def test_a_reputed_peer_s_connection_is_protected_from_eviction(tmp_path: Path) -> None:
    """A peer the table has known for weeks holds a protected slot the moment
    it connects: the admission policy never evicts it for a newcomer."""
    state = StateDir(tmp_path / "victim").create()
    honest = Identity.generate()
    _victims_past(state.peers_path, honest.peer_id, Multiaddr("127.0.0.1", 9))
    stranger = Identity.generate()
    victim = Node(node_config(state.path))
    await victim.start()
    try:
        peers = [await HandPeer.connect_to(victim, identity) for identity in (honest, stranger)]
        await wait_until(lambda: all(victim.session(i.peer_id) for i in (honest, stranger)), HELLO_S, "both sessions")
        assert victim.session(honest.peer_id).conn.useful_at is not None  # type: ignore[union-attr]
        assert victim.session(stranger.peer_id).conn.useful_at is None  # type: ignore[union-attr]
        for peer in peers:
            await peer.hang_up()
    finally:
        await victim.stop()
