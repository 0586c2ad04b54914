"""A peer that never answers a stream's negotiation holds up no announcement.

After a catch-up (and at the end of its rounds) a learner tells every peer
from which round on it sends. It told them one after another without a
deadline: one peer that never answered multistream-select held the
announcement, and after a catch-up the round loop, for the transport's
negotiate_timeout_s (9.5 s measured), once per such peer.
"""

from __future__ import annotations

import time
from pathlib import Path

from murmur.node.learner import ANNOUNCE_TIMEOUT_S
from tests.integration.cluster import Cluster, wait_until
from tests.integration.test_learning_links import learning
from tests.integration.test_node_faults import RawPeer


async def test_a_silent_peer_holds_the_announcement_no_longer_than_its_deadline(tmp_path: Path) -> None:
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:  # negotiate_timeout_s at its default: 10 s
        node = cluster.node(0)
        assert node.learner is not None
        silent = await RawPeer.to(node)  # upgraded, then reads nothing and answers nothing
        await wait_until(lambda: node.session(silent.peer_id) is not None, 5.0, "the node sees the silent peer")
        started = time.monotonic()
        await node.learner._announce_progress()
        took = time.monotonic() - started
        assert took < ANNOUNCE_TIMEOUT_S + 1.0, f"the announcement waited {took:.1f} s for the silent peer"
        silent.close()
