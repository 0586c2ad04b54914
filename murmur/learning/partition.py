"""Split a training pool between nodes without any coordination.

Every node computes the *whole* assignment from ``(seed, num_nodes)`` — the
seed is shared by the network — and keeps its own part. That is what makes the
parts disjoint and covering with no messages exchanged; the node index only
selects which part is kept.

Three schemes:

* ``iid``: a seeded permutation cut into ``num_nodes`` near-equal parts.
* ``dirichlet(alpha)``: per class, proportions ~ Dir(alpha · 1); small alpha
  gives each node few classes (label skew). Nodes left empty by a very small
  alpha receive one sample from the currently largest node, so no node is
  ever empty.
* ``shards(k)``: sort by label, cut into ``k · num_nodes`` shards, give each
  node ``k`` random shards (the FedAvg paper's pathological non-IID split).

``groups`` (optional) switches every scheme to assigning whole groups — e.g.
Shakespeare roles — instead of single samples; the label of a group is its
most frequent label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from murmur.enums import ParsedEnum
from murmur.errors import ConfigError

#: Stream tag mixed into the seed so the partition's random numbers never
#: coincide with another consumer of the same network seed.
_PARTITION_STREAM = 0x5A17


class TooManyNodes(ConfigError):
    """The training pool has fewer samples (or groups) than the network has
    nodes, so some node would get no data. Its own type so that whoever knows
    where ``num_nodes`` came from (the node's config, a scenario) can say so:
    the data set's size is only known here, once it is loaded."""


class PartitionKind(ParsedEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


@dataclass(frozen=True)
class PartitionSpec:
    kind: PartitionKind = PartitionKind.IID
    alpha: float = 0.5
    shards: int = 2

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {self.alpha}")
        if self.shards < 1:
            raise ConfigError(f"shards per node must be >= 1, got {self.shards}")


def _rng(seed: int, num_nodes: int) -> np.random.Generator:
    return np.random.default_rng([_PARTITION_STREAM, seed, num_nodes])


def _iid(n: int, num_nodes: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_nodes))


def _dirichlet(
    labels: np.ndarray, num_nodes: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        share = rng.dirichlet(np.full(num_nodes, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].append(chunk)
    nodes = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    # Tiny alpha can leave nodes empty; move one sample at a time from the
    # largest node (ties broken by index, so deterministic) until none is.
    for node in range(num_nodes):
        if len(nodes[node]) == 0:
            donor = int(np.argmax([len(p) for p in nodes]))
            nodes[node], nodes[donor] = nodes[donor][-1:], nodes[donor][:-1]
    return nodes


def _shards(
    labels: np.ndarray, num_nodes: int, per_node: int, rng: np.random.Generator
) -> list[np.ndarray]:
    total = num_nodes * per_node
    if total > len(labels):
        raise TooManyNodes(
            f"{num_nodes} nodes x {per_node} shards needs at least {total} samples, "
            f"have {len(labels)}"
        )
    # Shuffle first so samples of equal label are in random order, then a
    # stable sort groups them by label.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, total)
    order = rng.permutation(total)
    return [
        np.concatenate([shards[s] for s in order[node * per_node : (node + 1) * per_node]])
        for node in range(num_nodes)
    ]


def partition_all(
    labels: np.ndarray,
    num_nodes: int,
    seed: int,
    spec: PartitionSpec = PartitionSpec(),
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices into ``labels`` for every node: disjoint, covering, none empty.

    Each node's indices are sorted ascending (the order carries no
    information; shuffling is the trainer's job).
    """
    labels = np.asarray(labels)
    if num_nodes < 1:
        raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
    if groups is not None:
        return _partition_groups(labels, np.asarray(groups), num_nodes, seed, spec)
    if len(labels) < num_nodes:
        raise TooManyNodes(f"{len(labels)} training samples cannot fill {num_nodes} nodes")
    rng = _rng(seed, num_nodes)
    if spec.kind is PartitionKind.IID:
        parts = _iid(len(labels), num_nodes, rng)
    elif spec.kind is PartitionKind.DIRICHLET:
        parts = _dirichlet(labels, num_nodes, spec.alpha, rng)
    else:
        parts = _shards(labels, num_nodes, spec.shards, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _partition_groups(
    labels: np.ndarray, groups: np.ndarray, num_nodes: int, seed: int, spec: PartitionSpec
) -> list[np.ndarray]:
    """Partition whole groups, using each group's majority label as its label."""
    group_ids, inverse = np.unique(groups, return_inverse=True)
    if len(group_ids) < num_nodes:
        raise TooManyNodes(f"{len(group_ids)} clients in the training data cannot fill {num_nodes} nodes")
    counts = np.zeros((len(group_ids), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (inverse, labels), 1)
    group_labels = counts.argmax(axis=1)
    group_parts = partition_all(group_labels, num_nodes, seed, spec)
    return [np.flatnonzero(np.isin(inverse, part)) for part in group_parts]


def node_indices(
    labels: np.ndarray,
    node_index: int,
    num_nodes: int,
    seed: int,
    spec: PartitionSpec = PartitionSpec(),
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """This node's part of :func:`partition_all`."""
    if not 0 <= node_index < num_nodes:
        raise ConfigError(f"node_index {node_index} outside 0..{num_nodes - 1}")
    return partition_all(labels, num_nodes, seed, spec, groups)[node_index]


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label distribution
    and the pool's: 0 for perfectly IID parts, near 1 for single-class parts."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    dists = [
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(dists))
