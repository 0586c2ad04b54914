"""Graphs used for learning neighbourhoods, benches and privacy calibration.

Graphs are adjacency lists (``list[set[int]]``) over node indices: small,
hashable-free and easy to hand to numpy. Every generator is deterministic in its
seed so a bench row or a test can be reproduced exactly.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np

Graph = list[set[int]]


def ring(n: int) -> Graph:
    if n < 3:
        raise ValueError("a ring needs at least 3 nodes")
    return [{(i - 1) % n, (i + 1) % n} for i in range(n)]


def complete(n: int) -> Graph:
    return [set(range(n)) - {i} for i in range(n)]


def grid(rows: int, cols: int | None = None) -> Graph:
    """A rows×cols 2-D grid without wrap-around (see :func:`torus` for DECOR's)."""
    cols = rows if cols is None else cols
    g: Graph = [set() for _ in range(rows * cols)]
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols:
                g[i].add(i + 1)
                g[i + 1].add(i)
            if r + 1 < rows:
                g[i].add(i + cols)
                g[i + cols].add(i)
    return g


def torus(rows: int, cols: int | None = None) -> Graph:
    """A rows×cols grid with wrap-around: every node has degree 4 (for sides >= 3).
    This is the "grid" of the DECOR experiments (networkx grid_2d_graph(periodic=True))."""
    cols = rows if cols is None else cols
    if rows < 3 or cols < 3:
        raise ValueError("a torus needs sides of at least 3")
    g: Graph = [set() for _ in range(rows * cols)]
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                g[i].add(j)
                g[j].add(i)
    return g


def erdos_renyi(n: int, p: float, seed: int, *, connected: bool = True, max_tries: int = 1000) -> Graph:
    """G(n, p); with ``connected`` it redraws until the graph is connected."""
    rng = random.Random(seed)
    for _ in range(max_tries):
        g: Graph = [set() for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                if rng.random() < p:
                    g[i].add(j)
                    g[j].add(i)
        if not connected or is_connected(g):
            return g
    raise ValueError(f"no connected G({n}, {p}) in {max_tries} draws")


def random_regularish(n: int, degree: int, seed: int) -> Graph:
    """A connected graph where every node has about ``degree`` neighbours:
    a ring for connectivity plus random chords until degrees reach the target."""
    rng = random.Random(seed)
    g = ring(n)
    nodes = list(range(n))
    for _ in range(n * degree * 4):
        i, j = rng.sample(nodes, 2)
        if j not in g[i] and len(g[i]) < degree and len(g[j]) < degree:
            g[i].add(j)
            g[j].add(i)
    return g


def is_connected(g: Graph) -> bool:
    if not g:
        return True
    seen = {0}
    queue = deque([0])
    while queue:
        for j in g[queue.popleft()]:
            if j not in seen:
                seen.add(j)
                queue.append(j)
    return len(seen) == len(g)


def metropolis_hastings(g: Graph) -> np.ndarray:
    """W_ij = 1/(max(deg_i, deg_j)+1) on edges, W_ii = 1 − Σ_j W_ij: symmetric and
    doubly stochastic, so averaging with it preserves the network mean."""
    n = len(g)
    w = np.zeros((n, n))
    for i in range(n):
        for j in g[i]:
            w[i, j] = 1.0 / (max(len(g[i]), len(g[j])) + 1)
        w[i, i] = 1.0 - w[i].sum()
    return w


def laplacian(g: Graph, weights: dict[tuple[int, int], float] | None = None) -> np.ndarray:
    """(Weighted) graph Laplacian; ``weights`` keyed by (min, max) edge."""
    n = len(g)
    lap = np.zeros((n, n))
    for i in range(n):
        for j in g[i]:
            if i < j:
                c = 1.0 if weights is None else weights.get((i, j), 0.0)
                lap[i, i] += c
                lap[j, j] += c
                lap[i, j] -= c
                lap[j, i] -= c
    return lap


def edges(g: Graph) -> list[tuple[int, int]]:
    return sorted((i, j) for i in range(len(g)) for j in g[i] if i < j)
