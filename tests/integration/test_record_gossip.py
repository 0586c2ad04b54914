"""History records reach SybilWall only through the node's gossip rules:
against a live learning node, a stranger that is not a learning neighbour
sends records whose signatures all hold (it is their observer, and it made
up their subjects, whose keys it has): none of them is kept.

The aggregator's own rules have known-answer tests in
tests/unit/aggregators/test_sybilwall.py, the signatures and the per-sender
intake bound in tests/unit/test_records.py; this is the wiring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from murmur.learning.aggregators.sybilwall import SybilWallAggregator
from murmur.node.records import Statement, describe, observe, sign_statement
from murmur.protocol.identity import Identity
from murmur.protocol.messages import Hello, LearnerInfo
from tests.integration.cluster import Cluster
from tests.integration.handpeer import HandPeer
from tests.integration.test_hostile_neighbours import LEARNING

RECORDS = 20


async def test_records_from_a_peer_we_do_not_learn_from_are_not_kept(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, {**LEARNING, "learning.aggregator": "sybilwall"}) as cluster:
        victim = cluster.node(0)
        learner = victim.learner
        assert isinstance(learner.aggregator, SybilWallAggregator)
        await cluster.wait_until(lambda: learner.round >= 2, 30.0, "warm-up rounds")
        stranger = Identity.generate()
        peer = await HandPeer.connect_to(victim, stranger)
        info = learner._info()
        hello = Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="stranger", round=learner.round, degree=1)
        records = []
        for i in range(RECORDS):
            subject = Identity.from_seed(bytes([i + 1]) * 32)
            model = np.full(learner.engine.num_params, 0.01 * i, dtype=np.float32)
            round_ = learner.aggregator.round
            digest, sketch = describe(model)
            statement = Statement(round_, sign_statement(subject, round_, digest, sketch), sketch)
            record = observe(stranger, subject.peer_id, round_, model, statement)
            assert record is not None
            records.append(record)
        await peer.send([hello, LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0), *records])
        await cluster.wait_until(
            lambda: (victim.metrics.value("murmur_messages_total", direction="in", kind="HistoryRecord") or 0)
            >= RECORDS, 10.0, "every record read")
        assert learner.aggregator.known_peers() == []
        assert len(learner._records) == 0
        await peer.hang_up()
