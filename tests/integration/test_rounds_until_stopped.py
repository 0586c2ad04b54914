"""``learning.rounds = 0`` trains until the node is stopped, as the docs say.

It used to mean "no rounds at all": the round loop ran while ``round <
rounds + mixing_rounds``, i.e. never, and the node sat at round 0. Real
in-process daemons on loopback (Noise, Cyclon, signed deltas), digits-mlp.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from murmur.errors import ConfigError
from murmur.node.daemon import Node
from murmur.node.learner import SPENT_MIXING_ROUNDS
from tests.integration.cluster import node_config, wait_until

PAST = 6  # more rounds than any count the loop could have stopped at by mistake (0, or mixing_rounds)
RUN_TIMEOUT_S = 90.0
LEARNING = {
    "learning.enabled": True,
    "learning.rounds": 0,
    "learning.num_nodes": 2,
    "learning.local_steps": 2,
    "learning.round_deadline_s": 1.0,
    "learning.threads": 1,
    "learning.device": "cpu",
    "network.neighbours": 1,
}


@pytest.mark.parametrize("mode", ["dsgd", "gossip"])
async def test_rounds_zero_trains_until_stopped(tmp_path: Path, mode: str) -> None:
    nodes: list[Node] = []
    try:
        bootstrap: tuple = ()
        for i in range(2):
            overrides = {**LEARNING, "learning.node_index": i, "learning.mode": mode}
            if mode == "gossip":
                overrides["learning.round_deadline_s"] = 0.2  # a gossip cycle's period
            node = Node(node_config(tmp_path / f"n{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        # (a round's metrics row is written just after its number moves on)
        await wait_until(lambda: all(len(n.state.read_metrics()) >= PAST for n in nodes), RUN_TIMEOUT_S,
                         f"{PAST} rounds")
        for node in nodes:
            rows = node.state.read_metrics()
            assert node.learner.round >= PAST
            assert all(math.isfinite(row["train_loss"]) for row in rows), rows  # trained, not mixing-only
            assert not node.learner._finished  # still telling its neighbours it has rounds to come
            assert node.health()["ok"], node.health()
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_rounds_zero_with_privacy_stops_when_the_budget_is_spent(tmp_path: Path) -> None:
    """Privacy has a horizon of its own (privacy.rounds, the budget): with
    rounds = 0 a node trains until it has spent the budget, then sends nothing."""
    async with _private_pair(tmp_path, learning_rounds=0) as nodes:
        await wait_until(lambda: all(n.status()["learning"]["budget_exhausted"] for n in nodes), RUN_TIMEOUT_S,
                         "every budget spent")
        await wait_until(lambda: not any("rounds" in n.tasks for n in nodes), 10.0, "round loops ended")
        for node in nodes:
            stage = node.learner.privacy.stage
            assert stage.counters.rounds_sent == BUDGET_ROUNDS
            assert stage.epsilon_spent() <= 1.0 + 1e-9
            assert node.learner._finished  # told its neighbours not to wait for it


async def test_a_budget_spent_long_before_the_last_round_mixes_a_bounded_stretch_then_stops(tmp_path: Path) -> None:
    """With privacy.rounds far below learning.rounds (as a testnet bounded by
    seconds has it) a spent node used to mix to the last round: hundreds of
    rounds where nothing honest trains back what Sybils push. It now mixes
    SPENT_MIXING_ROUNDS, then stops and says so."""
    rounds = BUDGET_ROUNDS + SPENT_MIXING_ROUNDS + PAST
    async with _private_pair(tmp_path, learning_rounds=rounds) as nodes:
        await wait_until(lambda: all(n.status()["learning"]["finished"] for n in nodes), RUN_TIMEOUT_S,
                         "every node finished")
        for node in nodes:
            assert node.status()["learning"]["state"] == "budget_spent"
            assert node.learner.privacy.stage.counters.rounds_sent == BUDGET_ROUNDS
            rows = node.state.read_metrics()
            assert [r["round"] for r in rows] == list(range(BUDGET_ROUNDS + SPENT_MIXING_ROUNDS))
            assert node.learner._finished  # told its neighbours not to wait for it


BUDGET_ROUNDS = 3  # the privacy horizon of _private_pair's nodes


@contextlib.asynccontextmanager
async def _private_pair(tmp_path: Path, learning_rounds: int) -> AsyncIterator[list[Node]]:
    """Two linked nodes with DECOR noise calibrated for BUDGET_ROUNDS rounds at epsilon 1."""
    overrides = {**LEARNING, "learning.rounds": learning_rounds, "privacy.enabled": True, "privacy.scheme": "decor",
                 "privacy.rounds": BUDGET_ROUNDS, "privacy.epsilon": 1.0}
    nodes: list[Node] = []
    try:
        bootstrap: tuple = ()
        for i in range(2):
            node = Node(node_config(tmp_path / f"p{i}", bootstrap=bootstrap,
                                    overrides={**overrides, "learning.node_index": i}))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


def test_mixing_rounds_need_a_last_training_round(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learning.mixing_rounds: needs learning.rounds > 0"):
        node_config(tmp_path, overrides={**LEARNING, "learning.mixing_rounds": 5})


async def test_a_budget_spent_before_the_last_training_round_leaves_the_rest_to_mixing(tmp_path: Path) -> None:
    """The noise is calibrated for exactly learning.rounds by default, so a
    node that re-ran rounds after a restart spends its budget a little early.
    Here the horizon is short on purpose (3 rounds of 6): the node trains 3
    rounds, then mixes through to its last round with nothing sent from its
    data (the loop used to end at the budget, and the node left its
    neighbours' averages)."""
    rounds = 2 * BUDGET_ROUNDS
    async with _private_pair(tmp_path, learning_rounds=rounds) as nodes:
        await wait_until(lambda: all(n.status()["learning"]["done"] for n in nodes), RUN_TIMEOUT_S, "every node done")
        for node in nodes:
            stage = node.learner.privacy.stage
            assert stage.counters.rounds_sent == BUDGET_ROUNDS
            assert stage.epsilon_spent() <= 1.0 + 1e-9
            rows = node.state.read_metrics()
            assert [r["round"] for r in rows] == list(range(rounds))
            assert rows[-1]["received"] > 0  # still mixing with its neighbour in the last round
