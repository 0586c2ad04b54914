"""A neighbour that never answers a stream's negotiation holds the privacy commit no longer than its budget.

The commit step sent KeyShares and the RoundCommit without a deadline: one
neighbour that never answered multistream-select held the step for the
transport's negotiate_timeout_s (10.0 s measured, against a commit budget of
1 s), and the round with it.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.cluster import Cluster, wait_until
from tests.integration.test_node_faults import RawPeer
from tests.integration.test_privacy_network import BASE, privacy

SLACK_S = 1.0  # the loop's own work on a busy machine


async def test_a_silent_neighbour_holds_the_commit_no_longer_than_its_budget(tmp_path: Path) -> None:
    async with Cluster(1, tmp_path, overrides={**BASE, "privacy.scheme": "decor"}) as cluster:
        node = cluster.node(0)
        stage = privacy(node)
        assert stage.stage.plan.uses_edges
        silent = await RawPeer.to(node)  # upgraded, then reads nothing and answers nothing
        await wait_until(lambda: node.session(silent.peer_id) is not None, 5.0, "the node sees the silent peer")
        started = time.monotonic()
        active = await stage.commit(node.learner.round + 1, {str(silent.peer_id): 0})
        took = time.monotonic() - started
        assert active == []  # no secret, no commit: no edge
        assert took < stage.commit_wait_s + SLACK_S, f"the commit waited {took:.1f} s for the silent neighbour"
        silent.close()
