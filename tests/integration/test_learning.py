"""Decentralized learning on real daemons: 8 nodes on loopback, digits-mlp, Dirichlet(0.5).

Each test runs a real network (Noise transport, Cyclon membership, signed
deltas) to the end of its rounds and checks what the nodes themselves report:
mean test accuracy, label-flip attack success rate, and the weight they gave
the Sybils. The attacker is one process-worth of identities: 4 Sybils with
their own keys and connections, all sending one poisoned model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from murmur.node.daemon import Node
from murmur.testnet.sybil import SybilAttacker
from tests.integration.cluster import attacked_learning, node_config, wait_until

HONEST = 8
ROUNDS = 40
RUN_TIMEOUT_S = 240.0
LEARNING = attacked_learning(HONEST, ROUNDS, alpha=0.5, deadline_s=3.0)


@dataclass
class Outcome:
    accuracy: float  # mean over honest nodes, final round
    attack_rate: float
    sybil_weight: float  # mean weight honest nodes gave a Sybil they aggregated
    rounds: list[int]
    catch_ups: int  # models honest nodes adopted from a neighbour ahead
    sybil_weights_by_node: dict[int, list[float]]  # in the last round: who gave which Sybil weight (for a failure's message)


async def run_network(
    tmp_path: Path, aggregator: str, sybils: int, rounds: int = ROUNDS, lead_rounds: int = 0, deadline_s: float = LEARNING["learning.round_deadline_s"]
) -> Outcome:
    nodes: list[Node] = []
    attacker: SybilAttacker | None = None
    try:
        bootstrap: tuple = ()
        for i in range(HONEST):
            overrides = {**LEARNING, "learning.node_index": i, "learning.aggregator": aggregator,
                         "learning.rounds": rounds, "learning.round_deadline_s": deadline_s}
            node = Node(node_config(tmp_path / f"n{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        if sybils:
            configs = [
                node_config(
                    tmp_path / f"sybil{j}",
                    bootstrap=bootstrap,
                    overrides={**LEARNING, "learning.node_index": HONEST, "learning.attack": "label_flip",
                               "network.neighbours": 4, "learning.rounds": lead_rounds + rounds},
                )
                for j in range(sybils)
            ]
            attacker = SybilAttacker(configs, lead_rounds=lead_rounds)
            await attacker.__aenter__()
        await wait_until(lambda: all(n.learner.round >= rounds for n in nodes), RUN_TIMEOUT_S, "all rounds done")
        statuses = [n.learner.status() for n in nodes]
        sybil_ids = set(attacker.peer_ids) if attacker else set()
        sybil_w = [w for s in statuses for p, w in s["weights"].items() if p in sybil_ids]
        return Outcome(
            accuracy=sum(s["accuracy"] for s in statuses) / len(statuses),
            attack_rate=sum(s["attack_rate"] for s in statuses) / len(statuses),
            sybil_weight=sum(sybil_w) / len(sybil_w) if sybil_w else 0.0,
            rounds=[s["round"] for s in statuses],
            catch_ups=sum(n.learner.catch_ups for n in nodes),
            sybil_weights_by_node={i: [round(w, 3) for p, w in s["weights"].items() if p in sybil_ids]
                                   for i, s in enumerate(statuses) if any(p in sybil_ids for p in s["weights"])},
        )
    finally:
        if attacker is not None:
            await attacker.close()
        await asyncio.gather(*(n.stop() for n in nodes))


# Three networks in one test, each bounded by RUN_TIMEOUT_S: a stalled one fails
# with run_network's own message, not pytest-timeout's kill (the default 300 s
# is less than three of those bounds; a typical run of all three takes ~60 s).
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 60)
async def test_accuracy_and_sybil_resilience(tmp_path: Path) -> None:
    """One clean run and two attacked ones (network runs are the expensive part)."""
    clean = await run_network(tmp_path / "clean", "mean", sybils=0)
    attacked_mean = await run_network(tmp_path / "mean", "mean", sybils=4)
    attacked_wall = await run_network(tmp_path / "wall", "sybilwall", sybils=4)

    assert clean.accuracy >= 0.85, clean
    # Plain averaging lets the Sybils' flipped model in. Their weight is steady
    # (0.11-0.13 in 10 runs); the attack rate of the final models is not, since
    # it hangs on which neighbours the last rounds drew: 0.12-0.56 in the same
    # 10 runs on an idle machine, 0.077 once under CI load. Clean runs score
    # 0.000; the weight is what separates plain averaging from SybilWall below.
    assert attacked_mean.sybil_weight > 0.08, attacked_mean
    assert attacked_mean.attack_rate >= 0.05, attacked_mean
    # SybilWall finds the identical models and gives them no weight, except
    # where a node has one Sybil among its neighbours: that one has no twin
    # there until a record of one reaches the node, and holds weight until then
    # (the sybilwall module's docstring). 1 run in ~90 ended with weight 0.038
    # and attack rate 0.042 (its files were not kept; 60 others printed 0.000
    # and 0.000). The bounds: the project's target for the attack rate (0.05),
    # and less than half the weight plain averaging gives the Sybils.
    assert attacked_wall.sybil_weight <= 0.05, attacked_wall
    assert attacked_wall.attack_rate <= 0.05, attacked_wall
    assert clean.accuracy - attacked_wall.accuracy <= 0.03, (clean, attacked_wall)


async def test_sybils_claiming_a_far_round_capture_no_one(tmp_path: Path) -> None:
    """Sybils that claim to be 1000 rounds ahead (in their hellos and in the
    round of every delta they send) are a minority no past round vouches for:
    no honest node adopts their model, and the honest nodes learn as usual.
    (A node used to adopt the model of whoever claimed the highest round.)"""
    rounds = 15
    # Every round waits out its deadline for the Sybils' never-current deltas: keep it short.
    outcome = await run_network(tmp_path, "mean", sybils=2, rounds=rounds, lead_rounds=1000, deadline_s=1.0)
    assert outcome.catch_ups == 0, outcome
    assert all(r == rounds for r in outcome.rounds), outcome
    assert outcome.accuracy >= 0.8, outcome


async def test_gossip_learning_mode(tmp_path: Path) -> None:
    """Asynchronous gossip learning: models pushed to random peers and merged by age."""
    cycles = 40
    nodes: list[Node] = []
    try:
        bootstrap: tuple = ()
        for i in range(6):
            overrides = {**LEARNING, "learning.node_index": i, "learning.num_nodes": 6, "learning.mode": "gossip",
                         "learning.rounds": cycles, "learning.round_deadline_s": 0.2}
            node = Node(node_config(tmp_path / f"g{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        await wait_until(lambda: all(n.learner.round >= cycles for n in nodes), RUN_TIMEOUT_S, "gossip cycles")
        statuses = [n.learner.status() for n in nodes]
        assert all(s["mode"] == "gossip" for s in statuses)
        assert all(n.learner.gossip_merges >= cycles // 4 for n in nodes)  # merged others' models, not just trained
        assert sum(s["accuracy"] for s in statuses) / len(statuses) >= 0.8, statuses
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_privacy_refuses_gossip_mode(tmp_path: Path) -> None:
    from murmur.errors import ConfigError

    # refused by the config's own checks, before a node exists (so by `murmur config check` too)
    with pytest.raises(ConfigError, match="privacy.enabled: needs learning.mode = \"dsgd\""):
        node_config(tmp_path / "p", overrides={**LEARNING, "learning.mode": "gossip", "privacy.enabled": True})


async def test_neighbours_started_from_different_models_fetch_each_other(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Two nodes with another ``learning.seed`` each (another start, as two
    trainers whose builds interleaved had): each replica of the other must
    be the other's public model exactly, fetched once, not replayed from its
    own start (which left it off by the two starts' difference all run)."""
    nodes: list[Node] = []
    try:
        bootstrap: tuple = ()
        for i in range(2):
            overrides = {**LEARNING, "learning.node_index": i, "learning.num_nodes": 2, "learning.rounds": 3,
                         "learning.round_deadline_s": 2.0, "learning.seed": i}
            node = Node(node_config(tmp_path / f"s{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        assert nodes[0].learner.engine.initial_digest != nodes[1].learner.engine.initial_digest
        await wait_until(lambda: all(n.learner.round >= 3 for n in nodes), RUN_TIMEOUT_S, "both nodes done")
        for me, other in (nodes, nodes[::-1]):
            held = me.learner.engine.replica(str(other.peer_id))
            assert held is not None, "no replica of the neighbour"
            public, sent = other.learner.engine.public_state()
            assert held[1] == sent and torch.equal(held[0], public)
            assert me.status()["faults"] == {}, me.status()["faults"]
        told = [r for r in caplog.records if getattr(r, "event", None) == "initial_model_differs"]
        assert len(told) == 2, [r.getMessage() for r in told]
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_asking_a_neighbour_twice_for_its_model_is_not_a_replay(tmp_path: Path) -> None:
    """A node asks a neighbour for its public model (a re-sync, a catch-up)
    and asks again while that model stands still: the neighbour answers with
    the same signed bytes. The second answer used to be taken for a replay,
    so the honest neighbour was dropped and penalised (ReplayError)."""
    nodes: list[Node] = []
    try:
        bootstrap: tuple = ()
        for i in range(2):
            overrides = {**LEARNING, "learning.node_index": i, "learning.num_nodes": 2, "learning.rounds": 2,
                         "learning.round_deadline_s": 1.0}
            node = Node(node_config(tmp_path / f"m{i}", bootstrap=bootstrap, overrides=overrides))
            await node.start()
            nodes.append(node)
            bootstrap = bootstrap or (node.addrs[0],)
        asker, neighbour = nodes
        await wait_until(lambda: all(n.learner.round >= 2 for n in nodes), RUN_TIMEOUT_S, "both nodes done")
        session = asker.session(neighbour.peer_id)
        assert session is not None
        for attempt in range(2):
            await asker.learner.models.resync(session)  # the path a replica gap takes
            await wait_until(lambda: not asker.learner.models.asked(neighbour.peer_id), 10.0, f"answer {attempt}")
        assert asker.status()["faults"] == {}, asker.status()["faults"]
        assert asker.session(neighbour.peer_id) is session and not session.closed
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
