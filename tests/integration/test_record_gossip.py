"""What a stranger (connected, never a learning neighbour) sends a learning
node is not taken. History records reach SybilWall only through the node's gossip rules:
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
import pytest
import torch

from murmur.learning.aggregators.sybilwall import SybilWallAggregator
from murmur.node.records import Statement, describe, observe, sign_statement
from murmur.protocol.identity import Identity
from murmur.protocol.layout import TransferKind
from murmur.protocol.messages import DeltaStart, Hello, LearnerInfo
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
        await peer.send([hello, LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0, initial=info.initial), *records])
        await cluster.wait_until(
            lambda: (victim.metrics.value("murmur_messages_total", direction="in", kind="HistoryRecord") or 0)
            >= RECORDS, 10.0, "every record read")
        assert learner.aggregator.known_peers() == []
        assert len(learner.records.book) == 0
        await peer.hang_up()


async def test_strangers_cannot_take_the_room_of_a_neighbours_round_messages(tmp_path: Path) -> None:
    """Strangers that announce round messages and never send them held the
    node's whole assembly budget, so the neighbour's next message was
    refused, the neighbour penalised, dropped and banned. A stranger's start
    is now refused (a LimitExceeded, charged to it); the neighbour learns on."""
    async with Cluster(2, tmp_path, LEARNING) as cluster:
        victim, neighbour = cluster.node(0), cluster.node(1)
        learner = victim.learner
        await cluster.wait_until(lambda: learner.round >= 2, 30.0, "warm-up rounds")
        layout = learner.layout
        assembler = learner._assemblers[victim.peer_id]
        strangers = [Identity.generate() for _ in range(4)]
        info = learner._info()
        for stranger in strangers:
            peer = await HandPeer.connect_to(victim, stranger)
            hello = Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="stranger", round=learner.round, degree=1)
            starts = [DeltaStart(tid, learner.round, stranger.peer_id, victim.peer_id, learner.codec, "float32",
                                 layout.shape(TransferKind.ROUND), layout.payload_bytes(TransferKind.ROUND, learner.codec),
                                 layout.meta(TransferKind.ROUND, degree=1)) for tid in (1, 2)]
            await peer.send([hello, LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0, initial=info.initial), *starts])
        await cluster.wait_until(
            lambda: (victim.metrics.value("murmur_messages_total", direction="in", kind="DeltaStart") or 0)
            >= 2 * len(strangers), 10.0, "every start read")
        assert all(assembler.active(s.peer_id) == 0 for s in strangers)  # before: two each, held until they timed out
        tracked = [s.peer_id for s in strangers if s.peer_id in victim.table]  # the table bounds strangers per address
        assert tracked and all(victim.table.score(p) < 0 for p in tracked)
        start = learner.round
        await cluster.wait_until(lambda: learner.round >= start + 3, 30.0, "rounds with the neighbour go on")
        assert victim.table.score(neighbour.peer_id) >= 0
        assert learner.status()["deltas_refused_for_room"] == 0  # the strangers took none of the room
        assert victim.session(neighbour.peer_id) is not None


@pytest.mark.parametrize("aggregator", ["sybilwall", "mean"])
async def test_a_replica_that_went_off_its_owners_statement_is_fetched_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, aggregator: str) -> None:
    """Fault injection: node 0's replica of node 1 is shifted (as a start the
    two did not share left it, unnoticed, for whole runs). Checking it
    against node 1's signed statement (a neighbour in turn each round, and
    under SybilWall before vouching for it) finds it off, and node 0 fetches
    node 1's model again: the replica is exact after."""
    overrides = {**LEARNING, "learning.aggregator": aggregator, "learning.num_nodes": 3, "network.neighbours": 2}
    async with Cluster(3, tmp_path, overrides) as cluster:
        me, other = cluster.node(0), cluster.node(1)
        peer = str(other.peer_id)
        await cluster.wait_until(lambda: me.learner.engine.replica(peer) is not None and me.learner.round >= 2,
                                 30.0, "node 0 holds a replica of node 1")
        await me.learner._guard.run(lambda: me.learner.engine.replica(peer)[0].add_(0.5))  # type: ignore[index]

        def exact() -> bool:
            held, public = me.learner.engine.replica(peer), other.learner.engine.public_state()
            return held is not None and held[1] == public[1] and torch.equal(held[0], public[0])

        await cluster.wait_until(
            lambda: any(getattr(r, "event", None) == "replica_disagrees" for r in caplog.records), 30.0,
            "the shifted replica found off node 1's statement")
        await cluster.wait_until(exact, 30.0, "node 0's replica of node 1 exact again")
        assert me.status()["faults"] == {}, me.status()["faults"]
