"""Partitioners: determinism, disjoint cover, no empty node, skew vs alpha."""

from __future__ import annotations

import numpy as np
import pytest

from murmur.errors import ConfigError
from murmur.learning.partition import (
    PartitionKind,
    PartitionSpec,
    label_skew,
    node_indices,
    partition_all,
)

LABELS = np.random.default_rng(0).integers(0, 10, size=2000)
SPECS = [
    PartitionSpec(PartitionKind.IID),
    PartitionSpec(PartitionKind.DIRICHLET, alpha=0.3),
    PartitionSpec(PartitionKind.DIRICHLET, alpha=1e-4),
    PartitionSpec(PartitionKind.SHARDS, shards=2),
]


def _assert_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "some sample assigned twice or not at all"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{s.alpha}")
@pytest.mark.parametrize("num_nodes", [1, 7, 50])
def test_disjoint_cover_no_empty(spec: PartitionSpec, num_nodes: int) -> None:
    _assert_cover(partition_all(LABELS, num_nodes, seed=3, spec=spec), len(LABELS))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{s.alpha}")
def test_deterministic_and_seed_dependent(spec: PartitionSpec) -> None:
    a = [node_indices(LABELS, i, 8, 11, spec) for i in range(8)]
    b = [node_indices(LABELS, i, 8, 11, spec) for i in range(8)]
    c = [node_indices(LABELS, i, 8, 12, spec) for i in range(8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Each node computes only its own part, yet the parts still tile the pool.
    _assert_cover(a, len(LABELS))


def test_tiny_alpha_with_more_nodes_than_classes_leaves_no_node_empty() -> None:
    labels = np.repeat(np.arange(3), 10)  # 30 samples, 3 classes
    parts = partition_all(labels, 25, seed=1, spec=PartitionSpec(PartitionKind.DIRICHLET, alpha=1e-6))
    _assert_cover(parts, 30)


def test_skew_increases_as_alpha_decreases() -> None:
    skews = [
        np.mean(
            [
                label_skew(LABELS, partition_all(LABELS, 10, seed, PartitionSpec(PartitionKind.DIRICHLET, alpha=a)))
                for seed in range(3)
            ]
        )
        for a in (100.0, 1.0, 0.1, 0.01)
    ]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.1 and skews[-1] > 0.7
    iid = label_skew(LABELS, partition_all(LABELS, 10, 0, PartitionSpec(PartitionKind.IID)))
    assert iid < 0.1


def test_shards_give_each_node_at_most_k_plus_boundary_classes() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_all(labels, 10, seed=5, spec=PartitionSpec(PartitionKind.SHARDS, shards=2))
    _assert_cover(parts, 1000)
    # 20 shards of 50 samples, each within one class: a node sees <= 2 classes.
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_groups_are_assigned_whole() -> None:
    groups = np.repeat(np.arange(40), 5)
    labels = np.random.default_rng(1).integers(0, 4, size=len(groups))
    for spec in SPECS[:2]:
        parts = partition_all(labels, 6, seed=2, spec=spec, groups=groups)
        _assert_cover(parts, len(groups))
        owners = {}
        for node, part in enumerate(parts):
            for g in np.unique(groups[part]):
                assert owners.setdefault(int(g), node) == node, "a group was split across nodes"


def test_bad_inputs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot fill"):
        partition_all(np.zeros(3, dtype=np.int64), 4, seed=0)
    with pytest.raises(ConfigError, match="node_index"):
        node_indices(LABELS, 8, 8, 0)
    with pytest.raises(ConfigError, match="alpha"):
        PartitionSpec(PartitionKind.DIRICHLET, alpha=0.0)
    with pytest.raises(ConfigError, match="unknown partition 'round-robin'"):
        PartitionKind.parse("round-robin")
    with pytest.raises(ConfigError, match="shards"):
        partition_all(LABELS, 1500, 0, PartitionSpec(PartitionKind.SHARDS, shards=2))
