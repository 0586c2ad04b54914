"""A neighbour that never answers a stream's negotiation holds up nobody's gossip.

Forwarding sent to one target after another, each without a deadline: a
session whose peer never answered multistream-select held every forward (and
the stream of the peer the gossip came from) until the transport's
negotiate_timeout_s gave up on it, 10 s by default, again for every message
that found it negotiating.
"""

from __future__ import annotations

import time
from pathlib import Path

from murmur.node.daemon import GOSSIP_SEND_TIMEOUT_S
from tests.integration.cluster import Cluster, wait_until
from tests.integration.test_node_faults import TOPIC, RawPeer

MESSAGES = 3


async def test_a_neighbour_that_never_negotiates_does_not_stall_forwarding_to_the_others(tmp_path: Path) -> None:
    async with Cluster(1, tmp_path) as cluster:  # negotiate_timeout_s at its default: 10 s
        hub = cluster.node(0)
        silent = await RawPeer.to(hub)  # upgraded, then reads nothing and answers nothing
        await wait_until(lambda: hub.session(silent.peer_id) is not None, 5.0, "the hub sees the silent peer")
        publisher, listener = await cluster.add_node(), await cluster.add_node()
        got: list[bytes] = []
        listener.subscribe(TOPIC, lambda _origin, payload: got.append(payload))
        for node in (publisher, listener):
            await node.connect(hub.addrs, hub.peer_id)
            await wait_until(lambda n=node: hub.session(n.peer_id) is not None, 5.0, "the hub sees the node")
        started = time.monotonic()
        for i in range(MESSAGES):
            assert await publisher.publish(TOPIC, bytes([i])) == 1
        await wait_until(lambda: len(got) == MESSAGES, 2 * GOSSIP_SEND_TIMEOUT_S, "every message forwarded")
        stalled = time.monotonic() - started
        assert stalled < GOSSIP_SEND_TIMEOUT_S, f"forwarding stalled {stalled:.1f} s behind the silent peer"
        assert hub.gossip_held_back >= 1  # the silent peer skipped what came while its first send hung
        silent.close()
