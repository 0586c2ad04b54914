"""Who learns with whom: model fingerprints, and a node that says it is stalled.

Real in-process daemons on loopback (Noise, signed deltas, the round engine),
each with a plug-in trainer named the way a user names their own.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from murmur.node.learner import NodeLearner
from tests.integration.cluster import Cluster

TRAINER = "tests.trainers:VectorTrainer"


def learning(**options: Any) -> dict[str, Any]:
    return {
        "learning.enabled": True,
        "learning.trainer": TRAINER,
        "learning.num_nodes": 2,
        "learning.rounds": 1000,
        "learning.round_deadline_s": 0.5,
        "learning.trainer_options": options,
        "network.neighbours": 1,
    }


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


async def test_nodes_with_different_models_refuse_each_other_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """21 against 31 parameters: each side refuses the other in one line
    naming both models, neither counts the other as a neighbour, no delta is
    refused as a fault, and the connection is not made again and again."""
    caplog.set_level(logging.INFO, logger="murmur")
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:
        other = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 31})
        nodes = [cluster.node(0), other]
        await cluster.wait_until(lambda: len(events(caplog, "incompatible_peer")) >= 2, 10.0, "both refusals")
        rounds = {id(n): n.learner.round for n in nodes}
        await cluster.wait_until(lambda: all(n.learner.round >= rounds[id(n)] + 6 for n in nodes), 20.0,
                                 "six more rounds each")
        refusals = events(caplog, "incompatible_peer")
        assert len(refusals) == 2, [r.__dict__.get("reason") for r in refusals]
        reasons = sorted(r.__dict__["reason"] for r in refusals)
        assert "theirs: trainer tests.trainers:VectorTrainer, 21 parameters" in reasons[0]
        assert "ours: trainer tests.trainers:VectorTrainer, 31 parameters" in reasons[0]
        for node in nodes:
            assert cluster.neighbours(node) == set()
            assert node.status()["faults"] == {}
        opened = [r for r in caplog.records if getattr(r, "event", None) == "connected"]
        assert len(opened) <= 4, f"{len(opened)} connections: a reconnect loop"  # one each way at most


async def test_a_node_whose_rounds_cannot_keep_up_says_it_is_stalled(tmp_path: Path) -> None:
    """Training takes 4 s against a 0.5 s deadline while a neighbour is
    connected: within a few deadlines status says the node is stalled and
    in which phase, instead of looking busy."""
    async with Cluster(2, tmp_path, learning(size=1000)) as cluster:
        slow = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 1000, "sleep_s": 4.0})
        await cluster.wait_until(lambda: slow.status()["learning"]["stalled"], 15.0, "the slow node stalled")
        learning_status = slow.status()["learning"]
        assert "the round loop is in phase train_s" in learning_status["stall_reason"]
        assert slow.metrics.value("murmur_learning_stalled") == 1


async def test_a_slow_greeting_does_not_cost_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node's ``LearnerInfo`` leaves 1.5 s after its ``Hello`` (a loaded
    machine), longer than a maintain tick: the Link it chose to send still
    follows its LearnerInfo on the hello stream, so the peer does not refuse
    it for want of one. (A Link sent between the two was refused, and the
    asker's sampler shunned the peer for 300 s; found while chasing a CI
    failure of the NAT test.)"""
    greet = NodeLearner.greet

    async def slow_greet(self: NodeLearner, front: Any, session: Any) -> None:
        await asyncio.sleep(1.5)
        await greet(self, front, session)

    monkeypatch.setattr(NodeLearner, "greet", slow_greet)
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:
        other = await cluster.add_node(bootstrap=True)
        nodes = [cluster.node(0), other]
        await cluster.wait_until(lambda: all(len(cluster.neighbours(n)) == 1 for n in nodes), 10.0,
                                 "a learning edge between the two")
        rounds = {id(n): n.learner.round for n in nodes}
        await cluster.wait_until(lambda: all(n.learner.round >= rounds[id(n)] + 3 for n in nodes), 10.0,
                                 "three rounds each")
        for node in nodes:
            assert node.membership.links_refused == 0
            assert node.status()["faults"] == {}
