"""Starting a node leaves the event loop to the nodes already up in its process.

Building a learner (the trainer's data, the privacy calibration: 1.8 s of
CPU a node when four started at once) ran on the event loop. A
testnet worker starts several nodes in one process, so its first node could
not complete a handshake until its last one was built; in the default
testnet the node that dialled it linked only to a Sybil that was up before
everyone, and ran its first ten rounds with it alone. Real daemons on
loopback; the slow build is the real constructor behind a sleep.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from murmur.node.daemon import Node
from murmur.node.learner import NodeLearner
from murmur.testnet.worker import _running
from tests.integration.cluster import node_config

BUILD_S = 2.0  # what the slow learner build holds its thread for
LEARNING = {
    "learning.enabled": True,
    "learning.trainer": "tests.trainers:VectorTrainer",
    "learning.trainer_options": {"size": 21},
    "learning.num_nodes": 3,
}


def _slow_build(monkeypatch: pytest.MonkeyPatch) -> None:
    build = NodeLearner.__init__

    def slow(self: NodeLearner, *args: Any, **kwargs: Any) -> None:
        time.sleep(BUILD_S)  # a constructor busy for seconds, as calibrating the privacy noise is
        build(self, *args, **kwargs)

    monkeypatch.setattr(NodeLearner, "__init__", slow)


async def test_a_node_already_up_answers_a_dial_while_another_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Node(node_config(tmp_path / "first", overrides=LEARNING))
    dialler = Node(node_config(tmp_path / "dialler", overrides=LEARNING))
    late = Node(node_config(tmp_path / "late", overrides=LEARNING))
    try:
        await first.start()
        await dialler.start()
        _slow_build(monkeypatch)
        starting = asyncio.create_task(late.start(), name="late-start")
        began = time.monotonic()
        await asyncio.sleep(0.1)  # its build is under way
        held = time.monotonic() - began
        assert held < BUILD_S / 2, f"the loop was held for {held:.2f} s while another node was built"
        began = time.monotonic()
        await dialler.connect(first.addrs, first.peer_id)
        took = time.monotonic() - began
        assert not starting.done(), "the build ended before the dial: the test measured nothing"
        assert took < BUILD_S / 2, f"the dial took {took:.2f} s while another node was built"
        await starting
        assert late.learner is not None
    finally:
        for node in (late, dialler, first):
            await node.stop()


async def test_a_worker_starts_its_nodes_together_and_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three nodes in one worker, each build BUILD_S: up in about one build,
    not three. A node that cannot start (its data directory is a file) fails
    the whole worker with its error, and the others are stopped."""
    _slow_build(monkeypatch)
    configs = [node_config(tmp_path / f"n{i}", overrides=LEARNING) for i in range(3)]
    began = time.monotonic()
    async with _running(configs, None) as nodes:
        took = time.monotonic() - began
        assert len(nodes) == 3 and all(n.learner is not None for n in nodes)
        assert took < 2 * BUILD_S, f"three builds of {BUILD_S} s took {took:.1f} s: one after another"

    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory", encoding="utf-8")
    configs = [node_config(tmp_path / "m0", overrides=LEARNING), node_config(blocked, overrides=LEARNING)]
    survivors: list[Node] = []
    real_start = Node.start

    async def recording_start(self: Node) -> None:
        survivors.append(self)
        await real_start(self)

    monkeypatch.setattr(Node, "start", recording_start)
    with pytest.raises(Exception) as failed:
        async with _running(configs, None):
            pytest.fail("a worker with a node that cannot start came up")
    assert "blocked" in str(failed.value), failed.value
    assert len(survivors) == 2 and not any(n._started for n in survivors)  # the one that came up was stopped
