"""A node that only forwards gossip is never charged for it by its neighbours.

Flood gossip sends every new message to every session, so what a node
forwards to one neighbour is the sum of what all its other peers publish.
Each peer's gossip is charged against a budget (past it: LimitExceeded, 5
points); peers each publishing within their own budget through an honest
node got that node charged, and banned, by its other neighbour (in a
real-socket run: two publishing 12 messages a second each, banned within 14 s).
Now every node sends each peer at most half of that peer's budget.
"""

from __future__ import annotations

import os
from pathlib import Path

from murmur.node.daemon import GOSSIP_BURST, GOSSIP_UNIT_BYTES
from murmur.protocol.gossip import message_id
from murmur.protocol.messages import Gossip
from tests.integration.cluster import Cluster, wait_until

TOPIC = "probe"
PUBLISHERS = 4
MESSAGE_UNITS = 9  # a message of 8 units of payload costs 9
BIG = GOSSIP_UNIT_BYTES * (MESSAGE_UNITS - 1)
PER_PUBLISHER = GOSSIP_BURST // MESSAGE_UNITS  # each within the relay's budget for it


async def test_forwarded_gossip_does_not_get_the_forwarder_banned(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path) as cluster:
        victim, relay = cluster.node(0), cluster.node(1)
        delivered: list[bytes] = []
        victim.subscribe(TOPIC, lambda _origin, payload: delivered.append(payload))
        await wait_until(lambda: victim.session(relay.peer_id) is not None, 5.0, "relay and victim connected")
        publishers = [await cluster.add_node() for _ in range(PUBLISHERS)]
        for publisher in publishers:
            await publisher.connect(relay.addrs, relay.peer_id)
            await wait_until(lambda p=publisher: relay.session(p.peer_id) is not None, 5.0, "publisher connected")
        sent = 0  # to the relay: its only session
        for i in range(PER_PUBLISHER):
            for j, publisher in enumerate(publishers):
                sent += await publisher.publish(TOPIC, bytes([i, j]) * (BIG // 2))
        assert sent * MESSAGE_UNITS > GOSSIP_BURST, "more than the victim takes from one peer at once"
        await wait_until(lambda: relay.gossip.delivered == sent, 5.0, "the relay read every publication")
        # A marker on the relay's gossip stream to the victim, behind everything it forwarded.
        session = relay.session(victim.peer_id)
        assert session is not None
        marker = b"after the forwards"
        mid = message_id(relay.peer_id, int.from_bytes(os.urandom(4), "big"), TOPIC, marker)
        await session.send(Gossip(msg_id=mid, origin=relay.peer_id, ttl=1, topic=TOPIC, payload=marker))
        await wait_until(lambda: marker in delivered or victim.table.is_banned(relay.peer_id), 5.0,
                         "the victim read what the relay sent")
        assert not victim.table.is_banned(relay.peer_id)
        assert victim.table.score(relay.peer_id) >= 0, "the relay was charged for gossip it only forwarded"
        assert "LimitExceeded" not in victim.status()["faults"]
