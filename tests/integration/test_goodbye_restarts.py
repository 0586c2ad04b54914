"""A node stopped gracefully and started again is not scored as a failure.

Stopping says Goodbye; its peers drop it from their views and neighbours at
once. That was also charged as a failed dial (5 points, one back for its
next Hello): an honest node stopped and started 26 times in a row (a config
being tuned, a service restarted by its supervisor) fell to -104 at its peer
and was banned there for an hour.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.cluster import Cluster, wait_until

RESTARTS = 4


async def test_graceful_restarts_cost_no_score(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path) as cluster:
        peer = cluster.node(0)
        leaver = cluster.node(1).peer_id
        await wait_until(lambda: peer.session(leaver) is not None, 5.0, "connected")
        for _ in range(RESTARTS):
            before = peer.membership.evictions
            await cluster.stop(1)
            await wait_until(lambda b=before: peer.membership.evictions > b, 5.0, "the goodbye handled")
            await cluster.restart(1)
            await wait_until(lambda: peer.session(leaver) is not None, 5.0, "reconnected")
        assert not peer.table.is_banned(leaver)
        assert peer.table.score(leaver) >= 0, "leaving was charged as a failure"
