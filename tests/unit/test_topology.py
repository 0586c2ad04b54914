"""Graph generators and mixing matrices: known answers."""

import numpy as np
import pytest

from murmur.learning import topology as topo


def test_grid_4x4_degrees():
    g = topo.grid(4)
    degrees = sorted(len(s) for s in g)
    assert degrees == [2] * 4 + [3] * 8 + [4] * 4  # corners, edges, interior
    assert topo.is_connected(g)
    assert len(topo.edges(g)) == 24


def test_ring_and_complete():
    assert all(len(s) == 2 for s in topo.ring(16))
    assert all(len(s) == 15 for s in topo.complete(16))
    with pytest.raises(ValueError):
        topo.ring(2)


@pytest.mark.parametrize("graph", [topo.ring(7), topo.grid(3, 5), topo.erdos_renyi(20, 0.3, seed=4)])
def test_metropolis_hastings_is_symmetric_doubly_stochastic(graph):
    w = topo.metropolis_hastings(graph)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1.0) and np.allclose(w.sum(axis=1), 1.0)
    assert (w >= 0).all()
    # Averaging with W preserves the network mean.
    x = np.random.default_rng(0).normal(size=len(graph))
    assert np.isclose((w @ x).mean(), x.mean())


def test_laplacian_rows_sum_to_zero_and_psd():
    g = topo.erdos_renyi(12, 0.4, seed=1)
    lap = topo.laplacian(g)
    assert np.allclose(lap.sum(axis=1), 0)
    assert np.linalg.eigvalsh(lap).min() > -1e-9
    weighted = topo.laplacian(g, {e: 2.0 for e in topo.edges(g)})
    assert np.allclose(weighted, 2 * lap)


def test_generators_are_deterministic_in_seed():
    assert topo.erdos_renyi(20, 0.2, seed=3) == topo.erdos_renyi(20, 0.2, seed=3)
    assert topo.random_regularish(12, 4, seed=9) == topo.random_regularish(12, 4, seed=9)
    assert topo.is_connected(topo.random_regularish(30, 3, seed=2))


def test_torus_is_4_regular():
    g = topo.torus(4)
    assert all(len(s) == 4 for s in g)
    assert len(topo.edges(g)) == 32
    assert topo.is_connected(g)
