"""One peer's peer-exchange requests cannot make a node upload its view over and over.

Shuffle requests had a per-peer budget; peer-exchange requests had none:
each was answered with up to 32 entries of the view. One peer sent 20,000
requests (300 KB) in 3 s and had 5.6 MB sent back (next to five honest
nodes; each answer grows with the view). Past ``PEX_BURST`` (and one more a
shuffle interval) a request is now answered with no peers.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from murmur.node.membership import PEX_BURST
from murmur.protocol.identity import Identity
from murmur.protocol.messages import Hello, PeerExchangeRequest
from tests.integration.cluster import Cluster
from tests.integration.handpeer import HandPeer

HONEST = 4
REQUESTS = 200
MAX_ANSWER_BYTES = 4096  # what an answer with the view may take
EMPTY_ANSWER_BYTES = 32  # an answer with no peers (13 measured); one with this view was ~210


async def test_peer_exchange_requests_over_the_budget_get_no_peers(tmp_path: Path) -> None:
    # No shuffles during the test (the budget's refill is a shuffle interval, and they would be traffic too).
    async with Cluster(HONEST, tmp_path, overrides={"network.shuffle_interval_s": 600.0}) as cluster:
        victim = cluster.node(0)
        await cluster.wait_until(lambda: len(victim.sampler) >= HONEST - 1, 20.0, "the victim knows the others")
        attacker = await HandPeer.connect_to(victim, Identity.generate())
        answering = asyncio.ensure_future(attacker.agree_to_streams())
        await attacker.send([Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="x", round=0, degree=1)])
        await cluster.wait_until(lambda: victim.session(attacker.identity.peer_id) is not None, 5.0, "connected")
        answers = lambda: victim.metrics.value("murmur_messages_total", direction="out",  # noqa: E731
                                               kind="PeerExchangeResponse") or 0
        sent = lambda: victim.metrics.value("murmur_bytes_total", direction="out") or 0  # noqa: E731
        before_answers, before_bytes = answers(), sent()
        for _ in range(REQUESTS):
            attacker.write(attacker.frames(PeerExchangeRequest(max_peers=32)))
        await cluster.wait_until(lambda: answers() - before_answers >= REQUESTS, 15.0, "every request answered")
        uploaded = sent() - before_bytes
        print(f"{REQUESTS} requests: {answers() - before_answers:.0f} answers, {uploaded:.0f} bytes out")
        assert uploaded <= PEX_BURST * MAX_ANSWER_BYTES + REQUESTS * EMPTY_ANSWER_BYTES, f"{uploaded} bytes out for {REQUESTS} requests"
        assert victim.status()["faults"] == {}, "asking too often is refused, not blamed"
        attacker.close()
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
