"""PrivacyNoise: committed-edge pairwise noise cancels, variance is as accounted,
dropouts leave bounded, reported noise."""

from __future__ import annotations

import math

import pytest
import torch

from murmur.errors import DecodeError, SignatureError
from murmur.learning.privacy.noise import (
    NoiseConfig,
    PerEdgeScale,
    PrivacyNoise,
    RoundCommit,
    UniformEdgeScale,
    active_peers,
    clip_to_norm,
    edge_active,
    make_round_commit,
    verify_round_commit,
)
from murmur.learning.privacy.seeds import PairwiseSeeds
from murmur.protocol.identity import Identity, PeerId

N_NODES = 8
# ring plus chords: degrees 2..4, so per-node noise differs
EDGES = [(i, (i + 1) % N_NODES) for i in range(N_NODES)] + [(0, 4), (1, 5), (2, 6)]


def build_network(edge_scale_of=None):
    nodes = [PairwiseSeeds(Identity.from_seed(bytes([k + 1]) * 32)) for k in range(N_NODES)]
    neigh: dict[int, set[int]] = {k: set() for k in range(N_NODES)}
    for i, j in EDGES:
        neigh[i].add(j)
        neigh[j].add(i)
        # shares travel both ways, each end verifies and derives the secret itself
        nodes[i].accept_share(nodes[j].me, nodes[j].share_for(nodes[i].me))
        nodes[j].accept_share(nodes[i].me, nodes[i].share_for(nodes[j].me))
    return nodes, neigh


def secrets_of(node: PairwiseSeeds):
    return {p: node.secret(p) for p in node.peers()}


def test_pairwise_terms_cancel_over_a_committed_round() -> None:
    nodes, neigh = build_network()
    rnd, dim = 12, 50_000
    ids = [n.me for n in nodes]
    commits = {ids[k]: make_round_commit(nodes[k].identity, rnd, [ids[j] for j in neigh[k]]) for k in range(N_NODES)}
    total = torch.zeros(dim, dtype=torch.float64)
    per_node_norm = []
    for k, node in enumerate(nodes):
        verified = {p: c for p, c in commits.items() if p != node.me and verify_round_commit(c, p) is not None}
        act = active_peers(node.me, commits[node.me], verified)
        assert act == {ids[j] for j in neigh[k]}
        pn = PrivacyNoise(node.me, NoiseConfig(1.0, 0.0, UniformEdgeScale(5.0)), secrets_of(node))
        v = pn.pairwise(rnd, act, dim)
        per_node_norm.append(float(v.norm()))
        total += v.double()
    assert min(per_node_norm) > 5.0 * math.sqrt(2 * dim) * 0.9  # each node's term is large...
    assert float(total.abs().max()) < 1e-4  # ...and the network sum is zero to float32 rounding


def test_per_edge_scales_cancel_too() -> None:
    nodes, neigh = build_network()
    ids = [n.me for n in nodes]
    scale = PerEdgeScale.from_pairs({(ids[i], ids[j]): float(1 + i + j) for i, j in EDGES})
    total = torch.zeros(4096, dtype=torch.float64)
    for k, node in enumerate(nodes):
        pn = PrivacyNoise(node.me, NoiseConfig(1.0, 0.0, scale), secrets_of(node))
        total += pn.pairwise(3, [ids[j] for j in neigh[k]], 4096).double()
    assert float(total.abs().max()) < 1e-4
    assert scale.std(ids[0], ids[1]) == scale.std(ids[1], ids[0]) == pytest.approx(math.sqrt(2.0))


def test_edge_is_active_only_if_both_commit_to_each_other_in_that_round() -> None:
    a, b, c = (Identity.generate() for _ in range(3))
    ca = make_round_commit(a, 5, [b.peer_id, c.peer_id])
    cb = make_round_commit(b, 5, [a.peer_id])
    cc = make_round_commit(c, 5, [b.peer_id])  # c did not list a
    assert edge_active(a.peer_id, ca, b.peer_id, cb)
    assert edge_active(b.peer_id, cb, a.peer_id, ca)
    assert not edge_active(a.peer_id, ca, c.peer_id, cc)
    assert not edge_active(a.peer_id, ca, b.peer_id, make_round_commit(b, 6, [a.peer_id]))
    assert not edge_active(a.peer_id, ca, b.peer_id, None)


def test_round_commit_verification() -> None:
    a, b = Identity.generate(), Identity.generate()
    commit = make_round_commit(a, 9, [b.peer_id])
    assert verify_round_commit(commit, a.peer_id) == {b.peer_id}
    with pytest.raises(SignatureError):
        verify_round_commit(RoundCommit(10, commit.peers, commit.signature), a.peer_id)
    with pytest.raises(SignatureError):
        verify_round_commit(commit, b.peer_id)
    unsorted = tuple(sorted([a.peer_id.raw, b.peer_id.raw], reverse=True))
    with pytest.raises(DecodeError):
        verify_round_commit(RoundCommit(9, unsorted, commit.signature), a.peer_id)
    with pytest.raises(DecodeError):
        bad = RoundCommit(9, (b"\x00junk",), a.sign(b"x"))
        verify_round_commit(bad, a.peer_id)


def test_sent_vector_has_the_accounted_variance() -> None:
    nodes, neigh = build_network()
    ids = [n.me for n in nodes]
    k = 0  # degree 3: neighbours 1, 7, 4
    scale = PerEdgeScale.from_pairs({(ids[i], ids[j]): 4.0 * (1 + (i + j) % 3) for i, j in EDGES})
    pn = PrivacyNoise(ids[k], NoiseConfig(clip=2.0, sigma_cdp=3.0, edge_scale=scale), secrets_of(nodes[k]))
    dim = 400_000
    delta = torch.full((dim,), 0.01)  # norm 6.3 > C: clipped to 2
    act = [ids[j] for j in neigh[k]]
    sent = pn.privatize(delta, 4, act)
    noise = sent - clip_to_norm(delta, 2.0)
    expected = 9.0 + sum(scale.std(ids[k], p) ** 2 for p in act)
    assert expected == pytest.approx(pn.sent_variance_per_coord(act))
    # var of a sample of 4e5 has relative sd sqrt(2/4e5) ≈ 0.22%; 2% is > 9 sd
    assert float(noise.var()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 0.05
    # local noise is fresh: a second call differs although the pairwise part repeats
    again = pn.privatize(delta, 4, act)
    assert not torch.equal(sent, again)
    assert float((sent - again).var()) == pytest.approx(2 * 9.0, rel=0.02)


def test_clip_to_norm() -> None:
    v = torch.tensor([3.0, 4.0])
    assert torch.allclose(clip_to_norm(v, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clip_to_norm(v, 10.0), v)


def test_dropout_leaves_bounded_reported_noise() -> None:
    nodes, neigh = build_network()
    ids = [n.me for n in nodes]
    sigma, dim, rnd = 2.0, 100_000, 21
    dead = 4  # committed to round 21, then died before its delta arrived
    sends = {}
    for k, node in enumerate(nodes):
        pn = PrivacyNoise(node.me, NoiseConfig(1e9, 0.0, UniformEdgeScale(sigma)), secrets_of(node))
        sends[k] = (pn, pn.privatize(torch.zeros(dim), rnd, [ids[j] for j in neigh[k]]))
    residual = sum(sends[k][1].double() for k in range(N_NODES) if k != dead)
    reports = []
    for k in neigh[dead]:
        pn = sends[k][0]
        act = [ids[j] for j in neigh[k]]
        delivered = [p for p in act if p != ids[dead]]
        reports.append(pn.uncancelled(rnd, act, delivered, dim))
    for rep in reports:
        assert rep.missing == (ids[dead],)
        assert rep.variance == pytest.approx(dim * sigma**2)
        # ‖v‖²/σ² ~ χ²_d: mean d, sd √(2d); 6 sd is a bound no honest draw crosses
        chi2 = rep.norm**2 / sigma**2
        assert abs(chi2 - dim) < 6 * math.sqrt(2 * dim)
    # what actually stays in the network sum is exactly the reported un-cancelled terms:
    # the survivors' terms with the dead node (its own terms never arrived)
    expected_var = sum(r.variance for r in reports)
    assert float((residual**2).sum()) == pytest.approx(expected_var, rel=0.05)
    assert float((residual**2).sum()) < expected_var + 6 * math.sqrt(2 * dim) * sigma**2 * len(reports)


def test_missing_secret_is_an_error_not_silent_noise() -> None:
    a, b = Identity.generate(), Identity.generate()
    pn = PrivacyNoise(a.peer_id, NoiseConfig(1.0, 1.0, UniformEdgeScale(1.0)), {})
    with pytest.raises(KeyError):
        pn.privatize(torch.zeros(4), 0, [b.peer_id])


def test_peer_ids_sorted_in_commit() -> None:
    a = Identity.generate()
    others = [Identity.generate().peer_id for _ in range(5)]
    commit = make_round_commit(a, 1, others)
    assert list(commit.peers) == sorted(p.raw for p in others)
    assert verify_round_commit(commit, a.peer_id) == frozenset(others)
    assert all(isinstance(p, PeerId) for p in verify_round_commit(commit, a.peer_id))
