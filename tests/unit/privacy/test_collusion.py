"""Calibrating against colluders: the plan's ε holds against every coalition
of k nodes, checked by direct inversion against all of them, not only the
candidates calibration weighs (neighbour sets)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from murmur.errors import ConfigError
from murmur.learning import topology as tp
from murmur.learning.privacy.accountant import (
    SENSITIVITY_FACTOR,
    epsilon_from_rdp_coef,
    example_level_epsilon,
)
from murmur.learning.privacy.calibration import _edge_laplacian, assumed_graph, calibrate, epsilon_against
from murmur.learning.privacy.collusion import (
    CollusionBound,
    coalitions,
    hidden_laplacian,
    strips_a_node,
    worst_inverse_diag,
)
from murmur.learning.privacy.schemes import NoiseObjective, PrivacyLevel, PrivacyScheme

EPS, DELTA, ROUNDS, CLIP = 10.0, 1e-5, 100, 1.0
RATE, BATCH = 0.1, 32  # example level


def _every(n: int, k: int) -> list[frozenset[int]]:
    return [frozenset(c) for c in itertools.combinations(range(n), k)]


def _spent(plan, graph, against: list[frozenset[int]]) -> float:  # noqa: ANN001 - a PrivacyPlan
    """The ε ``plan`` spends over ROUNDS against the worst of ``against``."""
    worst = worst_inverse_diag(_edge_laplacian(plan.noise, graph, None), plan.noise.sigma_cdp**2, against)
    rho = SENSITIVITY_FACTOR * plan.sensitivity**2 * worst
    if plan.level is PrivacyLevel.EXAMPLE:
        return example_level_epsilon(rho, RATE, ROUNDS, DELTA)
    return epsilon_from_rdp_coef(rho, ROUNDS, DELTA)


def _plan(graph, level: PrivacyLevel, k: int, scheme: PrivacyScheme = PrivacyScheme.DECOR):  # noqa: ANN001, ANN202
    return calibrate(scheme, epsilon=EPS, delta=DELTA, rounds=ROUNDS, clip=CLIP, graph=graph, level=level,
                     sampling_rate=RATE if level is PrivacyLevel.EXAMPLE else None, batch_size=BATCH,
                     objective=NoiseObjective.AUTO, colluders=k)


def test_a_hidden_laplacian_drops_the_coalitions_rows_and_the_edges_to_it() -> None:
    lap = tp.laplacian(tp.ring(5))  # 0-1-2-3-4-0
    hidden = hidden_laplacian(lap, frozenset({0}))
    # nodes 1..4 remain; 1 and 4 lost their edge to 0 (degree 1), 2 and 3 keep 2
    assert np.diag(hidden).tolist() == [1.0, 2.0, 2.0, 1.0]
    assert hidden[0, 1] == -1.0 and hidden[0, 3] == 0.0  # 1-2 kept; 1-4 never an edge
    assert np.allclose(hidden.sum(axis=1), 0.0)  # still a Laplacian


def test_candidates_are_each_nodes_neighbour_sets() -> None:
    g = tp.ring(6)
    assert coalitions(g, 0) == [frozenset()]
    assert coalitions(g, 1) == [frozenset({i}) for i in range(6)]
    assert len(coalitions(g, 2)) == 6  # {i-1, i+1} for each i
    assert coalitions(g, 3) == sorted({frozenset(g[i]) for i in range(6)}, key=sorted)  # degree 2 <= 3
    assert strips_a_node(g, 2) and not strips_a_node(g, 1) and not strips_a_node(g, 0)
    with pytest.raises(ValueError):
        coalitions(g, -1)


@pytest.mark.parametrize("seed", range(3))
def test_the_worst_coalition_of_k_is_always_among_the_candidates(seed: int) -> None:
    """Exhaustively, on random graphs (irregular, per-edge variances): no
    coalition of k nodes hurts any node more than the worst neighbour set."""
    rng = np.random.default_rng(seed)
    for _ in range(30):
        n = int(rng.integers(5, 10))
        graph: list[set[int]] = [set() for _ in range(n)]
        lap = np.zeros((n, n))
        for i, j in itertools.combinations(range(n), 2):
            if rng.random() < 0.5:
                graph[i].add(j)
                graph[j].add(i)
                v = rng.uniform(0.1, 10.0)
                lap[[i, j], [i, j]] += v
                lap[i, j] -= v
                lap[j, i] -= v
        for k in (1, 2):
            for local in (0.05, 1.0):
                every = worst_inverse_diag(lap, local, _every(n, k))
                weighed = worst_inverse_diag(lap, local, coalitions(graph, k))
                assert weighed >= every * (1 - 1e-9), (n, k, local)
                fast = CollusionBound(graph, lap, k).max_inverse_diag(local)
                assert fast == pytest.approx(weighed, rel=1e-9)


@pytest.mark.parametrize("level", [PrivacyLevel.USER, PrivacyLevel.EXAMPLE])
def test_a_plan_against_k_colluders_spends_its_budget_against_every_coalition_of_k(level: PrivacyLevel) -> None:
    """The default plan (10 nodes, 6 neighbours, ε = 10 over 100 rounds).
    Calibrated for outsiders it spends more against one colluding neighbour
    (10.7 user level, 11.3 example level); calibrated against k it spends at
    most 10 against every coalition of k, costing more local noise."""
    graph = assumed_graph(10, 6, 0)
    outsiders = _plan(graph, level, 0)
    assert _spent(outsiders, graph, [frozenset()]) == pytest.approx(EPS, rel=1e-3)
    assert _spent(outsiders, graph, _every(10, 1)) > EPS * 1.05
    previous = outsiders.noise.sigma_cdp
    for k in (1, 2):
        plan = _plan(graph, level, k)
        assert _spent(plan, graph, _every(10, k)) <= EPS * (1 + 1e-6), k
        assert _spent(plan, graph, _every(10, k)) == pytest.approx(EPS, rel=1e-2)  # bound, not loose
        assert previous < plan.noise.sigma_cdp < plan.sigma_ldp  # dearer, and still better than LDP
        previous = plan.noise.sigma_cdp


@pytest.mark.parametrize("level", [PrivacyLevel.USER, PrivacyLevel.EXAMPLE])
def test_epsilon_against_a_coalition_is_what_the_plan_spends_against_the_worst_one(level: PrivacyLevel) -> None:
    """What a node reports of its run against k colluders (status, start-up
    log): the exhaustive worst case, e.g. 10.7 against one neighbour for the
    default user-level plan calibrated for outsiders."""
    graph = assumed_graph(10, 6, 0)
    plan = _plan(graph, level, 0)
    assert epsilon_against(plan, graph, 0, ROUNDS) == pytest.approx(EPS, rel=1e-3)
    for k in (1, 2, 3):
        assert epsilon_against(plan, graph, k, ROUNDS) == pytest.approx(_spent(plan, graph, _every(10, k)), rel=1e-9)
    assert epsilon_against(plan, graph, 1, ROUNDS) == pytest.approx(10.72 if level is PrivacyLevel.USER else 11.31,
                                                                    abs=0.01)
    big = assumed_graph(200, 8, 0)
    assert epsilon_against(_plan(big, level, 0), big, 2, ROUNDS) is None  # too many coalitions to weigh


def test_the_run_objective_keeps_decors_edges_when_the_one_step_sweep_finds_none_worth_it() -> None:
    """50 nodes of degree 6 at example level against one colluder: the
    one-step sweep finds no σ_cor better than LDP, and the plan was LDP; the
    run's objective (the node's at example level) still finds the pairwise
    terms worth it, within the budget against every single colluder."""
    graph = assumed_graph(50, 6, 0)
    plan = _plan(graph, PrivacyLevel.EXAMPLE, 1)
    assert plan.noise is not None
    assert plan.noise.sigma_cdp < 0.35 * plan.sigma_ldp  # LDP before
    assert _spent(plan, graph, _every(50, 1)) <= EPS * (1 + 1e-6)


def test_a_coalition_that_can_hold_all_of_a_nodes_edges_leaves_local_noise_only() -> None:
    graph = assumed_graph(10, 6, 0)
    for scheme in (PrivacyScheme.DECOR, PrivacyScheme.CORN):
        plan = _plan(graph, PrivacyLevel.USER, 6, scheme)
        assert plan.noise.sigma_cdp == pytest.approx(plan.sigma_ldp)
        assert plan.noise.edge_scale.std("a", "b") == 0.0 and plan.min_edges == 0  # type: ignore[arg-type]


def test_corn_is_rebound_against_colluders() -> None:
    graph = assumed_graph(10, 6, 0)
    for k in (0, 1, 3):
        plan = _plan(graph, PrivacyLevel.USER, k, PrivacyScheme.CORN)
        assert _spent(plan, graph, _every(10, k)) <= EPS * (1 + 1e-6), k


def test_too_many_coalitions_to_weigh_is_a_config_error_naming_the_key() -> None:
    graph = assumed_graph(200, 8, 0)
    with pytest.raises(ConfigError, match=r"^privacy\.colluders: .*5558 coalitions"):
        _plan(graph, PrivacyLevel.USER, 2)
