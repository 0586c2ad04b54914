"""Who learns with whom: model fingerprints, and a node that says it is stalled.

Real in-process daemons on loopback (Noise, signed deltas, the round engine),
each with a plug-in trainer named the way a user names their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest

from murmur.node.daemon import Node
from murmur.node.catchup import CATCH_UP_GAP
from murmur.node.learner import NodeLearner
from murmur.node.render import render_status
from murmur.node.stalls import HELD_BACK_STREAK
from murmur.protocol.identity import Identity
from tests.integration.cluster import Cluster, node_config

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


async def test_status_says_why_a_node_trains_alone_until_its_peer_runs_its_model(tmp_path: Path) -> None:
    """A user whose two nodes run different models saw only health ok and
    "0 learning neighbours" in ``murmur status`` (the reason was one log line):
    status now counts the peers it does not learn with and names the latest
    one's reason, and says the node is alone. Once that peer restarts with
    the same model they link, and the stale reason is gone."""
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:
        first = cluster.node(0)
        other = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 31})
        await cluster.wait_until(lambda: first.status()["incompatible"] is not None and first.learner.round >= 2,
                                 10.0, "a refusal and two rounds")
        incompatible = first.status()["incompatible"]
        assert incompatible["peers"] == 1 and incompatible["peer"] == str(other.peer_id)
        assert "theirs: trainer tests.trainers:VectorTrainer, 31 parameters" in incompatible["reason"]
        shown = render_status(first.status())
        assert "incompatible 1 peers not learned with; latest " in " ".join(shown.split())
        assert "ALONE        no learning neighbour: the peers it met run another model or no murmur" in shown

        fixed = len(cluster.members) - 1
        await cluster.stop(fixed)
        restarted = await cluster.restart(fixed)  # the cluster's own options: size 21, as the first node
        await cluster.wait_until(lambda: restarted.peer_id in cluster.neighbours(first), 10.0, "the link")
        assert first.status()["incompatible"] is None
        assert "ALONE" not in render_status(first.status())


async def test_two_nodes_whose_one_common_peer_runs_another_model_still_meet(tmp_path: Path) -> None:
    """Two nodes bootstrapped to one node that runs another model (another
    codec, say) never met: the bootstrap node dropped each from its view as
    it refused to learn with them, so no shuffle handed one to the other, and
    each trained alone at its round deadline. It keeps them in its view (only
    not as learning neighbours), and they link to each other."""
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:
        first = cluster.node(0)
        a = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 31})
        b = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 31})
        await cluster.wait_until(lambda: b.peer_id in cluster.neighbours(a) and a.peer_id in cluster.neighbours(b),
                                 30.0, "the two nodes of one model linked")
        assert not cluster.neighbours(first)
        assert first.status()["incompatible"]["peers"] == 2


async def test_a_peer_switching_models_back_and_forth_is_warned_of_once(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A peer that runs our model again leaves the incompatible set (above),
    so one whose Hellos alternate between two models would re-enter it with
    each: one WARNING per Hello, a log flood at the peer's pace."""
    node = Node(node_config(tmp_path))
    await node.start()
    try:
        peer = Identity.generate().peer_id
        with caplog.at_level(logging.WARNING, logger="murmur.node.daemon"):
            for _ in range(50):
                node.refuse_learning(peer, "theirs: another model")
                node.accept_learning(peer)
            node.refuse_learning(peer, "theirs: another model")
        warned = [r.getMessage() for r in caplog.records].count("peer runs a different model; not learning with it")
        assert warned == 1
        assert node.status()["incompatible"]["peers"] == 1  # still said in status, where it costs nothing
    finally:
        await node.stop()


async def test_status_says_when_local_training_diverges(tmp_path: Path) -> None:
    """A learning rate far too large makes every local step non-finite: the
    engine skips it (logging an ERROR) and the node only averages its
    neighbours' models, while status said health ok and showed the evaluation
    loss of that average. Status now counts the diverged rounds in a row and
    says what to change; a node that trains sanely shows none."""
    async with Cluster(1, tmp_path, learning(size=21)) as cluster:
        sane = cluster.node(0)
        wild = await cluster.add_node(bootstrap=True, learning__trainer_options={"size": 21, "lr": math.inf})
        await cluster.wait_until(lambda: wild.learner.round >= 3 and sane.learner.round >= 3, 15.0, "three rounds")
        assert wild.status()["learning"]["rounds_diverged"] >= 3
        assert sane.status()["learning"]["rounds_diverged"] == 0
        shown = render_status(wild.status())
        assert "DIVERGED     local training gave a non-finite step in the last " in shown
        assert "lower the learning rate (learning.trainer_options.lr)" in shown
        assert "DIVERGED" not in render_status(sane.status())


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


async def come_level_without_a_handover(cluster: Cluster, nodes: list[Node], timeout_s: float) -> None:
    """Wait until ``nodes`` run rounds within CATCH_UP_GAP of each other, and
    check that none of them got there by adopting another's model."""
    def level() -> bool:
        rounds = [n.learner.round for n in nodes]
        return max(rounds) - min(rounds) <= CATCH_UP_GAP

    await cluster.wait_until(level, timeout_s, "the two groups' rounds level")
    assert all(n.status()["learning"]["catch_ups"] == 0 for n in nodes)  # no model was handed over


async def test_two_pairs_started_apart_come_level_and_say_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pair of nodes runs ahead; a second pair, started later on its own,
    then links to it. Each node of the late pair has its partner level with it
    and two neighbours ahead that it never weighed: two thirds, not more, so it
    does not adopt their model (a Sybil claims rounds ahead too). It says so,
    once a streak, and its status counts the rounds. The first pair, most of
    whose neighbours are now behind and sending, waits out its deadlines
    (ahead_of_network; at half pace while only one late node is linked:
    lagging_neighbour) until the late pair, which counts their later rounds
    as delivered, comes level: the four run the same rounds. (They kept
    their distance for good before: each side ran at the pace of its
    partner.)"""
    caplog.set_level(logging.INFO, logger="murmur")
    overrides = {**learning(size=64), "learning.num_nodes": 4, "network.neighbours": 3}
    async with Cluster(2, tmp_path / "ahead", overrides) as ahead:
        await ahead.wait_until(lambda: all(n.learner.round >= 20 for n in ahead), 30.0, "the first pair's rounds")
        async with Cluster(2, tmp_path / "behind", overrides) as behind:
            first = ahead.node(0)
            await behind.node(0).connect(first.addrs, first.peer_id)
            await behind.wait_until(lambda: all(n.learner._held_back.count >= HELD_BACK_STREAK for n in behind), 60.0,
                                    "the late pair held back")
            for node in behind:
                status = node.status()["learning"]
                assert status["rounds_held_back"] >= HELD_BACK_STREAK and status["catch_ups"] == 0, status
            warned = events(caplog, "held_back")
            assert {r.name for r in warned} == {"murmur.node.learner"} and len(warned) >= 2, warned
            # (its neighbours ahead: both of the first pair, or the one it met first)
            assert all(r.levelno == logging.WARNING and re.search(r"(2 of 3|1 of 2) neighbours are ahead", r.getMessage())
                       for r in warned), [r.getMessage() for r in warned]
            assert all(r.rounds_held_back == HELD_BACK_STREAK for r in warned)  # once a streak, not every round

            await come_level_without_a_handover(behind, [*ahead, *behind], 30.0)
            assert all(n.status()["learning"]["rounds_paced"] > 0 for n in ahead)
            # One line a streak, named by how it began: a node of the first pair
            # that met one late node before the other began at half pace.
            paced = [r.getMessage() for r in events(caplog, "pacing")]
            assert paced and all(re.match(r"(most neighbours are|a neighbour is) behind", m) for m in paced), paced


async def test_two_groups_met_through_a_minority_of_links_come_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three nodes run ahead; three more, started later, link among
    themselves and then to the first three through a node of each. Every
    node has at most a third of its neighbours on the other side: too few
    for the late ones to adopt a model (two thirds, and more), too few for
    the first ones to wait out their deadlines (most of them). Both sides
    kept their distance for good (the default testnet's split runs); now a
    node with any neighbour behind and sending runs at half pace
    (lagging_neighbour), and the late group, at its full pace, comes level."""
    caplog.set_level(logging.INFO, logger="murmur")
    overrides = {**learning(size=64), "learning.num_nodes": 6, "network.neighbours": 3}
    async with Cluster(3, tmp_path / "ahead", overrides) as ahead:
        await ahead.wait_until(lambda: all(n.learner.round >= 20 for n in ahead), 30.0, "the first group's rounds")
        async with Cluster(3, tmp_path / "behind", overrides) as behind:
            await behind.wait_until(lambda: all(len(n.membership.learning_neighbours()) >= 2 for n in behind), 30.0,
                                    "the late group linked among itself")
            first = ahead.node(0)
            await behind.node(0).connect(first.addrs, first.peer_id)
            await come_level_without_a_handover(behind, [*ahead, *behind], 60.0)
            paced = events(caplog, "pacing")
            assert any("a neighbour is behind" in r.getMessage() and r.half for r in paced), \
                [r.getMessage() for r in paced]
            # Each line names rounds that were behind when the node decided (read
            # after the wait it said "rounds 21-21, ours 21" of one come level meanwhile).
            for r in paced:
                found = re.search(r"rounds (\d+)-(\d+), ours (\d+)", r.getMessage())
                assert found is not None and int(found[2]) + CATCH_UP_GAP < int(found[3]), r.getMessage()


async def test_nodes_on_one_machine_without_allow_loopback_say_why_they_do_not_all_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four daemons started on one machine without network.allow_loopback:
    the subnet limits take 127.0.0.0/24 for one operator, so one node had
    every edge refused and trained alone for the whole run, saying nothing.
    It (or the node that refused it) now says what to set, once."""
    caplog.set_level(logging.INFO, logger="murmur")
    overrides = {**learning(size=21), "learning.num_nodes": 4, "network.neighbours": 3,
                 "network.allow_loopback": False}
    async with Cluster(4, tmp_path, overrides):
        hints: list[logging.LogRecord] = []
        for _ in range(100):
            hints = events(caplog, "loopback_hint")
            if hints:
                break
            await asyncio.sleep(0.1)
        assert hints, "no node said why"
        assert "network.allow_loopback = true" in hints[0].getMessage()
        assert hints[0].levelno == logging.WARNING
