"""Privacy calibration and the sans-IO stage (murmur.learning.privacy): the
DECOR paper's (Allouah et al., ICML 2024) user-level numbers through
:func:`calibrate`, the RUN objective, the stage's fallback to σ_ldp, and the
exact DP-SGD step example-level accounting rests on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from absl import logging as absl_logging

from murmur.learning.privacy.accountant import example_level_epsilon, rdp_coef_of_covariance, residual_noise
from murmur.learning.privacy.calibration import (
    NoiseObjective,
    PrivacyLevel,
    PrivacyPlan,
    PrivacyScheme,
    assumed_graph,
    calibrate,
    run_residual,
)
from murmur.learning.privacy.seeds import PairwiseSeeds
from murmur.learning.privacy.stage import PrivacyStage
from murmur.learning.topology import Graph, complete, edges, metropolis_hastings, ring, torus
from murmur.protocol.identity import Identity, PeerId

absl_logging.set_verbosity(absl_logging.ERROR)

# The user-level setting of the DECOR paper's experiments and code (Allouah et al., ICML 2024):
# n = 16, C = 1, T = 3500, δ = 1e-5, ε = 10.
ANCHOR = {"epsilon": 10.0, "delta": 1e-5, "rounds": 3500, "clip": 1.0}
SIGMA_LDP_ANCHOR = 67.2
SIGMA_CENTRAL_ANCHOR = 16.8
DIM = 4096


def test_ldp_anchor_through_calibrate() -> None:
    plan = calibrate(PrivacyScheme.LDP, graph=torus(4), **ANCHOR)
    assert plan.sigma_ldp == pytest.approx(SIGMA_LDP_ANCHOR, rel=5e-3)
    assert plan.noise is not None and plan.noise.sigma_cdp == pytest.approx(plan.sigma_ldp)
    assert plan.sigma_ldp / math.sqrt(16) == pytest.approx(SIGMA_CENTRAL_ANCHOR, rel=5e-3)
    assert plan.min_edges == 0 and not plan.uses_edges


@pytest.mark.parametrize("graph", [ring(16), torus(4), complete(16)], ids=["ring", "torus", "complete"])
def test_decor_lies_between_central_and_ldp(graph: list[set[int]]) -> None:
    plan = calibrate(PrivacyScheme.DECOR, graph=graph, **ANCHOR)
    assert plan.noise is not None
    sigma_cdp = plan.noise.sigma_cdp
    assert SIGMA_CENTRAL_ANCHOR * 0.995 <= sigma_cdp < plan.sigma_ldp
    assert 0 < plan.residual_ratio < 1
    assert plan.min_edges == min(len(n) for n in graph)


def test_complete_graph_decor_reaches_central() -> None:
    # With every pair sharing a seed, the correlated part can absorb all but the mean.
    plan = calibrate(PrivacyScheme.DECOR, graph=complete(16), **ANCHOR)
    assert plan.noise is not None
    assert plan.noise.sigma_cdp == pytest.approx(SIGMA_CENTRAL_ANCHOR, rel=0.02)


def test_corn_no_worse_than_decor_on_torus() -> None:
    decor = calibrate(PrivacyScheme.DECOR, graph=torus(4), **ANCHOR)
    corn = calibrate(PrivacyScheme.CORN, graph=torus(4), **ANCHOR)
    assert corn.residual_ratio <= decor.residual_ratio + 1e-3


def test_example_level_spends_exactly_the_budget() -> None:
    q, batch, rounds, eps = 64 / 3750, 64, 500, 1.0
    plan = calibrate(PrivacyScheme.LDP, epsilon=eps, delta=1e-5, rounds=rounds, clip=0.2, graph=torus(4),
                     level=PrivacyLevel.EXAMPLE, sampling_rate=q, batch_size=batch)
    assert plan.sensitivity == pytest.approx(0.2 / batch)
    assert plan.sampling_rate == q
    assert example_level_epsilon(plan.rdp_coef, q, rounds, 1e-5) == pytest.approx(eps, rel=1e-3)
    tighter = calibrate(PrivacyScheme.LDP, epsilon=eps / 10, delta=1e-5, rounds=rounds, clip=0.2, graph=torus(4),
                        level=PrivacyLevel.EXAMPLE, sampling_rate=q, batch_size=batch)
    assert tighter.sigma_ldp > plan.sigma_ldp


# --------------------------------------------------------------------------- the RUN objective


def _injected_covariance(plan: PrivacyPlan, graph: Graph, peers: list[PeerId]) -> np.ndarray:
    assert plan.noise is not None
    sigma = plan.noise.sigma_cdp**2 * np.eye(len(graph))
    for i, j in edges(graph):
        var = plan.noise.edge_scale.std(peers[i], peers[j]) ** 2
        sigma[[i, j], [i, j]] += var
        sigma[i, j] -= var
        sigma[j, i] -= var
    return sigma


def test_run_residual_of_one_round_is_the_one_step_residual() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16))
    sigma = a @ a.T
    mixing = metropolis_hastings(torus(4))
    assert run_residual(sigma, mixing, 1) == pytest.approx(residual_noise(sigma, mixing))
    # The mean keeps every round's noise: T rounds of σ²I leave at least T·σ²/n.
    assert run_residual(np.eye(16), mixing, 100) >= 100 / 16


@pytest.mark.parametrize("scheme", [PrivacyScheme.DECOR, PrivacyScheme.CORN])
def test_run_objective_keeps_the_budget_and_nears_central(scheme: PrivacyScheme) -> None:
    graph = torus(4)
    peers = [Identity.generate().peer_id for _ in graph]
    run = calibrate(scheme, graph=graph, peers=peers, objective=NoiseObjective.RUN, **ANCHOR)
    one = calibrate(scheme, graph=graph, peers=peers, **ANCHOR)
    assert run.noise is not None and one.noise is not None
    # Same privacy: the injected covariance satisfies the same per-round ρ.
    for plan in (run, one):
        rho = rdp_coef_of_covariance(_injected_covariance(plan, graph, peers), plan.sensitivity)
        assert rho <= plan.rdp_coef * (1 + 1e-6)
    # The RUN split puts σ_cdp within 10% of central DP (DECOR paper's grid: 17.8–23), one-step far above.
    assert SIGMA_CENTRAL_ANCHOR <= run.noise.sigma_cdp <= 1.1 * SIGMA_CENTRAL_ANCHOR
    assert one.noise.sigma_cdp > 2 * SIGMA_CENTRAL_ANCHOR
    mixing = metropolis_hastings(graph)
    rounds = int(ANCHOR["rounds"])
    assert run_residual(_injected_covariance(run, graph, peers), mixing, rounds) < run_residual(
        _injected_covariance(one, graph, peers), mixing, rounds)


# --------------------------------------------------------------------------- stage fallback


def edge_network(n: int) -> list[PairwiseSeeds]:
    seeds = [PairwiseSeeds(Identity.generate()) for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                seeds[j].accept_share(seeds[i].me, seeds[i].share_for(seeds[j].me))
    return seeds


def test_stage_falls_back_to_sigma_ldp_when_edges_are_missing() -> None:
    graph = complete(5)  # node 0 has 4 neighbours
    seeds = edge_network(5)
    peers = [s.me for s in seeds]
    plan = calibrate(PrivacyScheme.DECOR, graph=graph, peers=peers, **ANCHOR)
    assert plan.noise is not None and plan.min_edges == 4 and plan.noise.sigma_cdp < plan.sigma_ldp
    secrets = {p: seeds[0].secret(p) for p in seeds[0].peers()}
    stage = PrivacyStage(peers[0], plan, secrets, resolve=PeerId.from_string)
    zero = torch.zeros(DIM)

    all_four = [str(p) for p in peers[1:]]
    stage.perturb(zero, 0, all_four)
    assert stage.last_local_std == plan.noise.sigma_cdp
    assert stage.counters.fallback_rounds == 0

    stage.perturb(zero, 1, all_four[:2])  # two edges missing this round
    assert stage.last_local_std == plan.sigma_ldp
    assert stage.counters.fallback_rounds == 1
    # The noise really is σ_ldp-strong locally plus the two active pairwise terms.
    local = stage.last_noise - stage.pairwise_sums[1]  # type: ignore[operator]
    assert float(local.std()) == pytest.approx(plan.sigma_ldp, rel=0.05)
    assert stage.active[1] == tuple(sorted(peers[1:3]))


def test_dp_clip_step_moves_at_most_lr_times_clip_and_matches_vmap() -> None:
    """Example-level sensitivity lr·C/B rests on this: one dp_clip step is
    −lr·(mean of per-example gradients clipped to C), computed exactly."""
    from murmur.learning.privacy import dpsgd
    from murmur.learning.trainers.base import Batch, TrainerContext
    from murmur.learning.trainers.digits import DigitsMLPTrainer

    lr, clip = 0.5, 0.01  # a clip far below the gradients' norms: every example is clipped
    trainer = DigitsMLPTrainer(TrainerContext(0, 4, 0, device="cpu", options={
        "lr": lr, "batch_size": 16, "momentum": 0.0, "local_steps": 1, "dp_clip": clip}))
    before = trainer.get_flat()
    trainer.train(1)
    step = trainer.get_flat() - before
    assert 0 < float(step.norm()) <= lr * clip * (1 + 1e-5)

    x, y = trainer._x_train[:16], trainer._y_train[:16]
    reference = dpsgd.clipped_mean_grad(trainer.model, trainer.loss_fn, x, y, clip)
    fast, _ = dpsgd.linear_clipped_mean_grad(trainer.model, trainer.loss_fn, x, y, clip)
    for name, g in reference.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-4, atol=1e-7)
    trainer.compute_gradients(Batch(x, y))
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-7)


def test_auto_objective_follows_the_privacy_level() -> None:
    assert NoiseObjective.AUTO.resolve(PrivacyLevel.USER) is NoiseObjective.ONE_STEP
    assert NoiseObjective.AUTO.resolve(PrivacyLevel.EXAMPLE) is NoiseObjective.RUN
    assert NoiseObjective.RUN.resolve(PrivacyLevel.USER) is NoiseObjective.RUN
    auto = calibrate(PrivacyScheme.DECOR, graph=torus(4), objective=NoiseObjective.AUTO, **ANCHOR)
    one_step = calibrate(PrivacyScheme.DECOR, graph=torus(4), objective=NoiseObjective.ONE_STEP, **ANCHOR)
    assert auto == one_step


@pytest.mark.parametrize(("degree", "nodes", "need"), [(1, 10, 2), (2, 10, 2), (6, 10, 6), (6, 4, 3), (1, 2, 1)])
def test_a_round_needs_as_many_edges_as_the_graph_it_was_calibrated_on(degree: int, nodes: int, need: int) -> None:
    """Degree 1 is calibrated on a ring (two edges a node): a node with one
    active edge must fall back, not send with the ring's smaller noise,
    whatever smaller min_edges the caller asks for."""
    plan = calibrate(PrivacyScheme.DECOR, epsilon=10.0, delta=1e-5, rounds=100, clip=1.0,
                     graph=assumed_graph(nodes, degree, seed=0), min_edges=min(degree, nodes - 1))
    assert plan.min_edges == need
