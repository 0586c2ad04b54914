"""The node privacy layer: commit/key-share checks on a real (started,
loopback) node with real Ed25519/X25519 keys, its calibration from the config,
and what it tells its user (calibration and the stage alone:
privacy/test_calibration.py).

The handlers are driven directly with the peer a session would carry: the
wire and the session are tested in tests/integration/test_privacy_network.py;
here what is under test is what the layer does with a verified peer's bytes.
"""

from __future__ import annotations

import logging
import math
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from absl import logging as absl_logging

from murmur.errors import ConfigError, ReplayError, SignatureError
from murmur.learning.privacy.calibration import NoiseObjective, PrivacyLevel, PrivacyScheme, assumed_graph, calibrate
from murmur.learning.privacy.noise import make_round_commit
from murmur.learning.privacy.seeds import PairwiseSeeds
from murmur.learning.privacy.stage import PrivacyStage
from murmur.learning.rounds import TrainFrom
from murmur.learning.topology import complete, torus
from murmur.node.config import NodeConfig
from murmur.node.daemon import PEER_LOG_BUDGET, Node
from murmur.node.privacy import NodePrivacy
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import KeyShare, RoundCommit
from tests.integration.cluster import node_config
from tests.unit.privacy.test_calibration import ANCHOR, DIM, edge_network

absl_logging.set_verbosity(absl_logging.ERROR)


# --------------------------------------------------------------------------- on a real node


@dataclass(frozen=True)
class _From:
    """What a handler reads of a session: the authenticated peer id."""

    peer: PeerId


@pytest.fixture
async def node_privacy(tmp_path: Path) -> AsyncIterator[NodePrivacy]:
    node = Node(node_config(tmp_path / "n"))
    await node.start()
    try:
        plan = calibrate(PrivacyScheme.DECOR, graph=torus(4), **ANCHOR)
        seeds = PairwiseSeeds(node.identity)
        stage = PrivacyStage(node.peer_id, plan, {})
        yield NodePrivacy(node, stage, seeds, commit_wait_s=0.2)
    finally:
        await node.stop()


async def test_forged_keyshare_raises_signature_error(node_privacy: NodePrivacy) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    forged = PairwiseSeeds(mallory).share_for(node_privacy.node.peer_id)  # signed by mallory
    with pytest.raises(SignatureError):
        await node_privacy._on_keyshare(_From(alice.peer_id), KeyShare(forged.x25519_pub, forged.signature))
    assert not node_privacy.seeds.has(alice.peer_id)
    honest = PairwiseSeeds(alice).share_for(node_privacy.node.peer_id)
    await node_privacy._on_keyshare(_From(alice.peer_id), KeyShare(honest.x25519_pub, honest.signature))
    assert node_privacy.seeds.has(alice.peer_id)


def _wire(commit_round: int, signer: Identity, peers: list[PeerId]) -> RoundCommit:
    data = make_round_commit(signer, commit_round, peers)
    return RoundCommit(round=data.round, peers=tuple(PeerId.from_bytes(p) for p in data.peers),
                       signature=data.signature)


async def test_forged_round_commit_raises_signature_error(node_privacy: NodePrivacy) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    me = node_privacy.node.peer_id
    with pytest.raises(SignatureError):
        await node_privacy._on_commit(_From(alice.peer_id), _wire(0, mallory, [me]))
    # A genuine commit with its peer list altered after signing is forged too.
    genuine = _wire(0, alice, [me])
    altered = RoundCommit(round=0, peers=(), signature=genuine.signature)
    with pytest.raises(SignatureError):
        await node_privacy._on_commit(_From(alice.peer_id), altered)
    assert alice.peer_id not in node_privacy._commits.get(0)
    await node_privacy._on_commit(_From(alice.peer_id), genuine)
    assert alice.peer_id in node_privacy._commits.get(0)


async def test_two_different_commits_for_one_round_is_replay(node_privacy: NodePrivacy) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    me = node_privacy.node.peer_id
    first = _wire(1, alice, [me])
    await node_privacy._on_commit(_From(alice.peer_id), first)
    await node_privacy._on_commit(_From(alice.peer_id), first)  # the same bytes again: idempotent
    with pytest.raises(ReplayError):
        await node_privacy._on_commit(_From(alice.peer_id), _wire(1, alice, [me, bob.peer_id]))
    assert node_privacy._commits.get(1)[alice.peer_id].peers == (me.raw,)


# --------------------------------------------------------------------------- the DP-SGD step calibration assumes


@pytest.mark.parametrize("objective", [NoiseObjective.ONE_STEP, NoiseObjective.RUN])
async def test_node_calibrates_with_the_configured_objective(tmp_path: Path, objective: NoiseObjective) -> None:
    """``privacy.objective`` reaches the node's plan: the node's σ_cdp is the
    one ``calibrate`` gives on the same assumed graph with that objective."""
    base = node_config(tmp_path / "n")
    cfg = dataclasses.replace(
        base,
        learning=dataclasses.replace(base.learning, num_nodes=16),
        privacy=dataclasses.replace(base.privacy, enabled=True, objective=objective, epsilon=10.0, rounds=100,
                                    assumed_degree=4),
    )
    node = Node(cfg)
    await node.start()
    try:
        privacy = NodePrivacy.for_node(node, trainer=None)
    finally:
        await node.stop()
    degree = cfg.privacy.assumed_degree or cfg.network.neighbours
    graph = assumed_graph(cfg.learning.num_nodes, degree, cfg.learning.seed)
    kwargs = dict(epsilon=10.0, delta=cfg.privacy.delta, rounds=100, clip=cfg.privacy.clip, graph=graph)
    expected = calibrate(PrivacyScheme.DECOR, objective=objective, **kwargs)
    other = calibrate(PrivacyScheme.DECOR, objective=next(o for o in (NoiseObjective.ONE_STEP, NoiseObjective.RUN)
                                                          if o is not objective), **kwargs)
    plan = privacy.stage.plan
    assert plan.noise is not None and expected.noise is not None and other.noise is not None
    assert plan.noise.sigma_cdp == pytest.approx(expected.noise.sigma_cdp)
    assert abs(expected.noise.sigma_cdp - other.noise.sigma_cdp) > 0.05 * expected.noise.sigma_cdp


# --------------------------------------------------------------------------- example level on a node


def _example_level_config(tmp_path: Path, **trainer_options: object) -> NodeConfig:
    base = node_config(tmp_path / "n")
    options = {"lr": 0.2, "batch_size": 16, "momentum": 0.0, "dp_clip": 1.0, **trainer_options}
    return dataclasses.replace(
        base,
        learning=dataclasses.replace(base.learning, enabled=True, trainer="digits-mlp", num_nodes=8, local_steps=1,
                                     trainer_options=options),
        privacy=dataclasses.replace(base.privacy, enabled=True, level=PrivacyLevel.EXAMPLE, epsilon=1.0, rounds=50,
                                    assumed_degree=3),
    )


async def test_example_level_node_trains_from_the_public_model(tmp_path: Path) -> None:
    """The node accounts one example as lr·dp_clip/B and trains from the public model."""
    node = Node(_example_level_config(tmp_path))
    await node.start()
    try:
        learner = node.learner
        assert learner is not None and learner.privacy is not None
        assert learner.engine.config.train_from is TrainFrom.PUBLIC
        plan = learner.privacy.stage.plan
        assert plan.sensitivity == pytest.approx(0.2 * 1.0 / 16)
        assert plan.sampling_rate == pytest.approx(16 / learner.trainer.train_size)
    finally:
        await node.stop()


@pytest.mark.parametrize(("options", "word"), [({"momentum": 0.9}, "momentum=0.9"), ({"dp_clip": 0.0}, "dp_clip=0.0"),
                                                ({"local_steps": 5}, "local_steps=5")])
async def test_example_level_refuses_training_it_cannot_account(tmp_path: Path, options: dict[str, object],
                                                                word: str) -> None:
    cfg = _example_level_config(tmp_path, **options)
    if "local_steps" in options:
        cfg = dataclasses.replace(cfg, learning=dataclasses.replace(cfg.learning, local_steps=5))
    with pytest.raises(ConfigError, match="one DP-SGD step per round") as info:
        node = Node(cfg)
        await node.start()
        await node.stop()
    assert word in str(info.value)


def test_the_ledger_composes_what_earlier_runs_spent() -> None:
    """ε continues across a restart, under the same calibration or another."""
    from murmur.learning.privacy.accountant import Accountant, Spent, epsilon_from_rdp_coef

    first = Accountant(rdp_coef=0.01, delta=1e-5, budget=100.0)
    first.step(30)
    again = Accountant(rdp_coef=0.01, delta=1e-5, budget=100.0, prior=tuple(first.ledger()))
    again.step(10)
    assert again.epsilon_spent() == pytest.approx(epsilon_from_rdp_coef(0.01, 40, 1e-5))
    other = Accountant(rdp_coef=0.02, delta=1e-5, budget=100.0, prior=(Spent(0.01, None, 40),))
    other.step(5)
    assert other.epsilon_spent() == pytest.approx(epsilon_from_rdp_coef(0.01 * 40 + 0.02 * 5, 1, 1e-5))
    example = Accountant(rdp_coef=0.5, delta=1e-5, budget=100.0, sampling_rate=0.1, prior=(Spent(0.5, 0.1, 20),))
    example.step(20)
    assert example.epsilon_spent() == pytest.approx(
        Accountant(rdp_coef=0.5, delta=1e-5, budget=100.0, sampling_rate=0.1, steps=40).epsilon_spent(), rel=1e-6)


# --------------------------------------------------------------------------- telling the user


def _small_network_config(tmp_path: Path, level: PrivacyLevel) -> NodeConfig:
    """A hand-started node of a four-node network, privacy on, the rest as the user left it."""
    cfg = _example_level_config(tmp_path) if level is PrivacyLevel.EXAMPLE else node_config(tmp_path / "n")
    learning = dataclasses.replace(cfg.learning, enabled=True, trainer="digits-mlp", num_nodes=4, rounds=100)
    privacy = dataclasses.replace(cfg.privacy, enabled=True, level=level, epsilon=10.0, rounds=0, assumed_degree=3)
    return dataclasses.replace(cfg, learning=learning, privacy=privacy)


@pytest.mark.parametrize("level", [PrivacyLevel.USER, PrivacyLevel.EXAMPLE])
async def test_a_node_says_when_its_privacy_noise_drowns_the_learning(
    tmp_path: Path, level: PrivacyLevel, caplog: pytest.LogCaptureFixture
) -> None:
    """User level on four nodes (measured: accuracy 0.11, chance) is told to
    the user as a WARNING with the figure and the way out; example level on
    the same network (measured: 0.84) is not, and both figures are the
    outlook's formula on the node's own plan and model size."""
    node = Node(_small_network_config(tmp_path, level))
    with caplog.at_level(logging.INFO, logger="murmur.node.privacy"):
        await node.start()
    try:
        privacy = node.learner.privacy
        assert privacy is not None and privacy.outlook is not None
        plan = privacy.stage.plan
        assert plan.noise is not None
        dim = node.learner.trainer.num_params()
        bound = plan.clip if level is PrivacyLevel.USER else plan.sensitivity * 16  # lr * dp_clip, batch 16
        expected = plan.noise.sigma_cdp * math.sqrt(dim) / (bound * math.sqrt(4 * 100))
        assert privacy.outlook.rho == pytest.approx(expected)
        assert node.status()["learning"]["privacy"]["noise_to_signal"] == pytest.approx(expected)
    finally:
        await node.stop()
    warned = [r for r in caplog.records if getattr(r, "event", None) == "privacy_outlook" and r.levelno == logging.WARNING]
    if level is PrivacyLevel.USER:
        assert expected > 5
        assert len(warned) == 1 and 'level = "example"' in warned[0].getMessage()
    else:
        assert expected < 0.2
        assert not warned


async def test_rounds_that_keep_falling_back_are_told_once_a_streak(
    node_privacy: NodePrivacy, caplog: pytest.LogCaptureFixture
) -> None:
    """No active edge where the plan needs four: every round falls back. The
    WARNING comes at the third in a row, not before (a late commit at start
    is no news) and not again within the streak; a round with its edges
    ends the streak."""
    stage = node_privacy.stage
    assert stage.plan.min_edges > 0
    zero = torch.zeros(DIM)
    with caplog.at_level(logging.WARNING, logger="murmur.node.privacy"):
        for r in range(2):
            node_privacy.perturb(zero, r, [])
        assert not caplog.records
        for r in range(2, 10):
            node_privacy.perturb(zero, r, [])
    warned = [r for r in caplog.records if getattr(r, "event", None) == "privacy_fallback"]
    assert [r.round for r in warned] == [2]  # type: ignore[attr-defined]
    assert stage.counters.fallback_rounds == 10
    assert "learning.num_nodes" in warned[0].getMessage() and "privacy.assumed_degree" in warned[0].getMessage()


async def test_a_neighbour_that_never_delivers_is_logged_within_the_peer_log_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A committed neighbour whose delta never arrives leaves our pairwise
    term un-cancelled every round. It is counted every round, and logged as
    often as the node's budget for peer-caused lines allows (PEER_LOG_BUDGET
    per key), not once a round."""
    node = Node(node_config(tmp_path / "n"))
    await node.start()
    try:
        seeds = edge_network(3)
        peers = [s.me for s in seeds]
        plan = calibrate(PrivacyScheme.DECOR, graph=complete(3), peers=peers, **ANCHOR)
        secrets = {p: seeds[0].secret(p) for p in seeds[0].peers()}
        privacy = NodePrivacy(node, PrivacyStage(peers[0], plan, secrets, resolve=PeerId.from_string), seeds[0],
                              commit_wait_s=0.2)
        committed, silent = [str(p) for p in peers[1:]], [str(peers[1])]
        rounds = PEER_LOG_BUDGET.per_key + 3
        with caplog.at_level(logging.WARNING, logger="murmur.node.privacy"):
            for r in range(rounds):
                privacy.perturb(torch.zeros(DIM), r, committed)
                privacy.after_round(r, committed, silent)
    finally:
        await node.stop()
    told = [r for r in caplog.records if getattr(r, "event", None) == "uncancelled_noise"]
    assert len(told) == PEER_LOG_BUDGET.per_key
    assert privacy.stage.counters.uncancelled_rounds == rounds
    assert node.peer_log.suppressed_total == rounds - PEER_LOG_BUDGET.per_key
