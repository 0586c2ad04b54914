"""A testnet's nodes begin their rounds together (murmur.node.startgate).

Two real learning nodes behind one start gate, steered through a real worker
control socket as the testnet controller steers it: the node up first links
to nobody, waits out its start wait and then runs no round while the gate is
held (it ran 20 and more before the others began, and the two groups could
stay apart to the end); the worker says its nodes are at the gate only once
both learners arrived; ``begin`` opens it and both run.
"""

from __future__ import annotations

import time
from pathlib import Path

from murmur.node.daemon import Node
from murmur.node.startgate import StartGate
from murmur.testnet.controller import send_control
from murmur.testnet.worker import Worker
from tests.integration.cluster import node_config, wait_until

LEARNING = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.num_nodes": 2,
    "learning.rounds": 6,
    "learning.round_deadline_s": 1.0,
    "learning.start_wait_s": 0.5,
    "learning.threads": 1,
    "network.neighbours": 1,
}


async def test_rounds_wait_at_the_gate_until_every_learner_arrived_and_begin_opens_it(tmp_path: Path) -> None:
    worker = Worker(learners=2)
    sock = tmp_path / "ctl.sock"
    server = await worker.serve_control(sock)
    nodes: list[Node] = []
    try:
        assert await send_control(sock, {"cmd": "start", "hold_rounds": True}) == {"ok": True}
        gate = worker.gate
        assert gate is not None and gate.expected == 2
        first = Node(node_config(tmp_path / "first", overrides=LEARNING), start_gate=gate)
        await first.start()
        nodes.append(first)
        # Alone, it waits out its start wait for a neighbour, arrives, and is held.
        await wait_until(lambda: gate.arrived == 1, 10.0, "the first learner at the gate")
        assert (await send_control(sock, {"cmd": "up", "wait_s": 0.2})) == {"ok": True, "up": False}
        second = Node(node_config(tmp_path / "second", bootstrap=(first.addrs[0],), overrides=LEARNING),
                      start_gate=gate)
        await second.start()
        nodes.append(second)
        worker.bring_up(nodes)
        reply = await send_control(sock, {"cmd": "up", "wait_s": 20.0}, timeout_s=25.0)
        assert reply == {"ok": True, "up": True}
        assert all(n.learner is not None and n.learner.round == 0 for n in nodes), "a round ran at a held gate"
        assert not any(n.state.last_metrics() for n in nodes)
        assert all(len(n.membership.learning_neighbours()) == 1 for n in nodes)  # they linked while held

        assert await send_control(sock, {"cmd": "begin"}) == {"ok": True}
        await wait_until(lambda: all(n.learner is not None and n.learner.round >= 3 for n in nodes), 30.0,
                         "both nodes' rounds after begin")
    finally:
        for node in reversed(nodes):
            await node.stop()
        server.close()
        await worker.close_clients()


async def test_a_worker_started_without_hold_has_no_gate(tmp_path: Path) -> None:
    worker = Worker(learners=2)
    sock = tmp_path / "ctl.sock"
    server = await worker.serve_control(sock)
    try:
        assert await send_control(sock, {"cmd": "start"}) == {"ok": True}
        assert worker.gate is None  # a restarted node's worker: its rounds begin at once
        assert await send_control(sock, {"cmd": "begin"}) == {"ok": True}  # harmless
    finally:
        server.close()
        await worker.close_clients()


async def test_learners_short_of_neighbours_begin_at_once_when_the_gate_opens(tmp_path: Path) -> None:
    """Two nodes that each want two neighbours (a network planned for three)
    wait out their start wait before they arrive; once the gate opens they
    begin at once. They waited it out a second time after the gate, and
    began that much later than the learners that had their neighbours."""
    start_wait_s = 6.0
    overrides = {**LEARNING, "learning.num_nodes": 3, "network.neighbours": 2,
                 "learning.start_wait_s": start_wait_s}
    gate = StartGate(2)
    nodes: list[Node] = []
    try:
        first = Node(node_config(tmp_path / "first", overrides=overrides), start_gate=gate)
        await first.start()
        nodes.append(first)
        second = Node(node_config(tmp_path / "second", bootstrap=(first.addrs[0],), overrides=overrides),
                      start_gate=gate)
        await second.start()
        nodes.append(second)
        await wait_until(lambda: gate.all_arrived.is_set(), 3 * start_wait_s, "both learners at the gate")
        opened = time.monotonic()
        gate.open()
        await wait_until(lambda: all(n.learner is not None and n.learner.round >= 1 for n in nodes),
                         3 * start_wait_s, "a round after the gate opened")
        assert time.monotonic() - opened < start_wait_s / 2, "the start wait ran again after the gate"
    finally:
        for node in reversed(nodes):
            await node.stop()
