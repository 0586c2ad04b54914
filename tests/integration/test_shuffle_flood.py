"""One peer's shuffle requests cannot fill a node's Cyclon view with records it made up.

Cyclon merges what a shuffle request brings, so every request from a
stranger puts its records in our view. An honest node starts one shuffle per
interval, with one peer, and sends ``shuffle_length`` entries; an attacker
that sent twenty requests a second, of 64 made-up records each (fresh ids,
addresses on distinct /24s that never answer), held 15 of a victim's 19 view
slots within 4 s. Requests over a peer's budget are answered empty and
merge nothing, and a request's entries past ``shuffle_length`` are not read.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from murmur.node.membership import SHUFFLE_BURST
from murmur.protocol.gossip import message_id
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import Gossip, ShuffleRequest
from murmur.testnet.hostile import RawPeer
from tests.integration.cluster import Cluster, wait_until

TOPIC = "probe"
VIEW = 64
SHUFFLE_LENGTH = 8
REQUESTS = 6
ENTRIES = 64  # the most a ShuffleRequest may carry


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    # No shuffle of the victim's own during the test (it would dial and evict the fakes),
    # and room in the view for every fake, so only the budget limits them.
    async with Cluster(1, tmp_path, overrides={"network.view_size": VIEW, "network.shuffle_length": SHUFFLE_LENGTH,
                                               "network.shuffle_interval_s": 600.0}) as c:
        yield c


def fake_entries(request: int) -> tuple[tuple[PeerId, tuple[str, ...], int], ...]:
    """Fresh ids at addresses nobody answers, one /24 each: the subnet limit does not stop them."""
    return tuple((Identity.generate().peer_id, (f"/ip4/10.{request}.{j}.1/tcp/4001",), 0) for j in range(ENTRIES))


async def test_one_peer_cannot_fill_the_view_with_made_up_records(cluster: Cluster) -> None:
    victim = cluster.node(0)
    delivered: list[bytes] = []
    victim.subscribe(TOPIC, lambda _origin, payload: delivered.append(payload))
    attacker = await RawPeer.connect(victim.addrs[0])
    await wait_until(lambda: victim.session(attacker.identity.peer_id) is not None, 2.0, "victim sees the attacker")
    fakes: set[PeerId] = set()
    for request in range(REQUESTS):
        entries = fake_entries(request)
        fakes.update(peer for peer, _addrs, _age in entries)
        attacker.writer.write(attacker.frames(ShuffleRequest(entries=entries)))
    payload = b"after the requests"  # handled after every request on this connection
    mid = message_id(attacker.identity.peer_id, int.from_bytes(os.urandom(4), "big"), TOPIC, payload)
    attacker.writer.write(attacker.frames(Gossip(msg_id=mid, origin=attacker.identity.peer_id, ttl=4, topic=TOPIC,
                                                 payload=payload)))
    await wait_until(lambda: payload in delivered, 5.0, "gossip after the requests")
    taken = sum(desc.peer in fakes for desc in victim.sampler.view())
    # Before: the first request filled the view's free slots (63 of 64 fakes) at once.
    assert taken <= SHUFFLE_BURST * SHUFFLE_LENGTH, f"{taken} made-up records in the view"
    assert taken > 0, "a shuffle request within the budget is merged as before"
    assert victim.status()["faults"] == {}, "over-asking is refused, not blamed (an honest peer may shuffle early)"
    attacker.close()
