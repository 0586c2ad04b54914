"""One connected peer, within its shuffle budget, holds at most one shuffle's worth of a node's view.

Cyclon merges what a shuffle brings; the per-peer request budget
(``SHUFFLE_BURST``, then one a shuffle interval) bounds how often, not how
much stays. One attacker that answered the node's stream negotiations (so
it stayed connected) and sent, at its budget, requests of made-up records
(fresh ids at addresses that refuse) held 92% of a victim's 20-slot view on
average over 20 s, 100% from 12 s on, next to five honest nodes: the records
the victim dialled and evicted were replaced by the next request, and the
victim handed them on to its honest peers' views (7, 5, 3, 5, 1). Now at
most ``max_per_source`` (l) entries the view holds came from one source.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from murmur.node.membership import SHUFFLE_BURST
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import Hello, ShuffleRequest
from tests.integration.cluster import Cluster
from tests.integration.handpeer import HandPeer

HONEST = 3
INTERVAL_S = 0.5
VIEW = 20
SHUFFLE_LENGTH = 8
INTERVALS = 16


async def test_one_source_cannot_hold_more_than_a_shuffle_of_the_view(tmp_path: Path) -> None:
    overrides = {"network.shuffle_interval_s": INTERVAL_S, "network.view_size": VIEW,
                 "network.shuffle_length": SHUFFLE_LENGTH}
    async with Cluster(HONEST, tmp_path, overrides=overrides) as cluster:
        victim = cluster.node(0)
        await cluster.wait_until(lambda: all(len(cluster.node(i).sampler) >= HONEST - 1 for i in range(HONEST)),
                                 20.0, "the honest nodes know each other")
        attacker = await HandPeer.connect_to(victim, Identity.generate())
        answering = asyncio.ensure_future(attacker.agree_to_streams())
        attacker.write(attacker.frames(Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="x", round=0, degree=1)))
        fakes: set[PeerId] = set()
        held: list[int] = []
        for tick in range(INTERVALS):
            for _ in range(SHUFFLE_BURST if tick == 0 else 1):  # the budget: a burst, then one an interval
                entries = []
                for _ in range(SHUFFLE_LENGTH):
                    n = len(fakes)
                    fakes.add(fake := Identity.generate().peer_id)
                    entries.append((fake, (f"/ip4/127.{100 + n // 250}.{n % 250}.1/tcp/1",), 0))
                attacker.write(attacker.frames(ShuffleRequest(entries=tuple(entries))))
            await asyncio.sleep(INTERVAL_S)  # the attacker's pace: what is measured is the view meanwhile
            held.append(sum(d.peer in fakes for d in victim.sampler.view()))
        print(f"made-up records in the victim's view, per interval: {held}")
        assert victim.session(attacker.identity.peer_id) is not None, "the attacker stayed connected throughout"
        assert max(held) <= victim.sampler.config.source_cap, held
        assert min(held[SHUFFLE_BURST:]) > 0, "its requests are still merged, within the share"
        attacker.close()
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
