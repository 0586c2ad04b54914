"""What a node sends when privacy is on: clipped delta + pairwise + local noise.

Threat model: honest-but-curious, possibly colluding peers (Sybils included)
that know only the seeds of their own edges. Each honest node sends

    Δ̃_i = clip(Δ_i, C) + Σ_{j ∈ committed(t)} v_ij^t + v̄_i,
    v_ij^t ~ N(0, s_ij² I) from the edge seed, v̄_i ~ N(0, σ_cdp² I) local,

where v_ji = −v_ij. The pairwise terms cancel in the network sum only when
both ends of an edge add them in the same round, so a term is added only for
edges where both nodes *committed* to round t (signed ``RoundCommit``: round +
sorted peer list). A neighbour that committed and then died leaves its
partner's term un-cancelled: privacy is unharmed (more noise), utility is hit,
and :meth:`PrivacyNoise.uncancelled` reports exactly how much.

Per-edge std: DECOR uses one σ_cor for every edge; CorN's decentralisable form
gives each edge its own variance c_e (a weighted Laplacian). Both are an
:class:`EdgeScale`. Scales are looked up by the unordered pair, so s_ij = s_ji
holds by construction (a requirement for cancellation). Mixing weights are not
multiplied in here: what is added is exactly what the accountant accounts for
(DECOR's reference code, elfirdoussilab1/DECOR, scales edge noise by W_ij
while its accountant assumes it unscaled; murmur does not).
"""

from __future__ import annotations

import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from murmur.errors import DecodeError
from murmur.protocol.identity import Identity, PeerId

from .seeds import EdgeSecret, edge_noise

ROUND_COMMIT_DOMAIN = b"murmur-round-commit-v1"
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
MAX_COMMIT_PEERS = 4096


# --------------------------------------------------------------------------- scales


class EdgeScale(ABC):
    """Standard deviation of the pairwise noise on edge {a, b} (symmetric)."""

    @abstractmethod
    def std(self, a: PeerId, b: PeerId) -> float: ...


@dataclass(frozen=True)
class UniformEdgeScale(EdgeScale):
    """DECOR: the same σ_cor on every edge."""

    sigma_cor: float

    def std(self, a: PeerId, b: PeerId) -> float:
        return self.sigma_cor


@dataclass(frozen=True)
class PerEdgeScale(EdgeScale):
    """CorN decentralisable form: variance c_e per edge; missing edges get
    ``default_std``. Keys are unordered pairs, so the lookup is symmetric."""

    variances: Mapping[frozenset[PeerId], float]
    default_std: float = 0.0

    @classmethod
    def from_pairs(cls, variances: Mapping[tuple[PeerId, PeerId], float], default_std: float = 0.0) -> PerEdgeScale:
        out: dict[frozenset[PeerId], float] = {}
        for (a, b), var in variances.items():
            if var < 0:
                raise ValueError("edge variance must be non-negative")
            out[frozenset((a, b))] = float(var)
        return cls(out, default_std)

    def std(self, a: PeerId, b: PeerId) -> float:
        var = self.variances.get(frozenset((a, b)))
        return self.default_std if var is None else var**0.5


@dataclass(frozen=True)
class NoiseConfig:
    """Clip norm C, local std σ_cdp and the pairwise edge scale."""

    clip: float
    sigma_cdp: float
    edge_scale: EdgeScale

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.sigma_cdp < 0:
            raise ValueError("clip must be > 0 and sigma_cdp >= 0")


# --------------------------------------------------------------------------- commits


@dataclass(frozen=True)
class RoundCommit:
    """A node's signed statement "in round t I add pairwise noise for these peers"."""

    round: int
    peers: tuple[bytes, ...]  # PeerId.raw, sorted
    signature: bytes


def _commit_input(round_: int, signer: PeerId, peers: Iterable[bytes]) -> bytes:
    plist = list(peers)
    body = b"".join(_U32.pack(len(p)) + p for p in plist)
    return ROUND_COMMIT_DOMAIN + _U64.pack(round_) + signer.raw + _U32.pack(len(plist)) + body


def make_round_commit(identity: Identity, round_: int, peers: Iterable[PeerId]) -> RoundCommit:
    raws = tuple(sorted({p.raw for p in peers}))
    return RoundCommit(round_, raws, identity.sign(_commit_input(round_, identity.peer_id, raws)))


def verify_round_commit(commit: RoundCommit, signer: PeerId) -> frozenset[PeerId]:
    """Return the committed peer set; :class:`SignatureError` /
    :class:`DecodeError` for a forged or malformed commit."""
    if len(commit.peers) > MAX_COMMIT_PEERS:
        raise DecodeError(f"round commit lists {len(commit.peers)} peers (max {MAX_COMMIT_PEERS})")
    if list(commit.peers) != sorted(set(commit.peers)):
        raise DecodeError("round commit peers must be sorted and unique")
    try:
        peers = frozenset(PeerId.from_bytes(p) for p in commit.peers)
    except ValueError as exc:
        raise DecodeError("round commit lists a malformed peer id") from exc
    signer.verify(commit.signature, _commit_input(commit.round, signer, commit.peers))
    return peers


def edge_active(me: PeerId, my_commit: RoundCommit, peer: PeerId, peer_commit: RoundCommit | None) -> bool:
    """Whether edge (me, peer) adds its pairwise term in ``my_commit.round``:
    both commits are for the same round and list each other. Pure; commits
    must already be verified."""
    if peer_commit is None or peer_commit.round != my_commit.round:
        return False
    return peer.raw in my_commit.peers and me.raw in peer_commit.peers


def active_peers(
    me: PeerId, my_commit: RoundCommit, peer_commits: Mapping[PeerId, RoundCommit]
) -> frozenset[PeerId]:
    return frozenset(p for p, c in peer_commits.items() if edge_active(me, my_commit, p, c))


# --------------------------------------------------------------------------- noise


def clip_to_norm(delta: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C/‖Δ‖)·Δ (a new tensor)."""
    norm = torch.linalg.vector_norm(delta)
    scale = torch.clamp(clip / (norm + 1e-12), max=1.0)
    return delta * scale


@dataclass(frozen=True)
class DropoutReport:
    """Un-cancelled pairwise noise left by committed peers that never delivered."""

    round: int
    missing: tuple[PeerId, ...]
    variance: float  # expected ‖Σ v‖² = d · Σ s_ij²
    norm: float  # the actual ‖Σ_{missing} v_ij‖ (the sender can regenerate it)


def fresh_generator(device: torch.device) -> torch.Generator:
    """A generator for local noise, seeded from the OS: local noise must be
    unpredictable to every peer, unlike the pairwise terms, which both ends
    of an edge derive from their shared secret."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "big"))
    return gen


class PrivacyNoise:
    """Privatises one node's outgoing delta. Local noise comes from a torch
    generator seeded from ``os.urandom`` (never from a shared seed)."""

    def __init__(
        self,
        me: PeerId,
        config: NoiseConfig,
        secrets: Mapping[PeerId, EdgeSecret],
        device: torch.device | str = "cpu",
    ) -> None:
        self.me = me
        self.config = config
        self._secrets = secrets
        self.device = torch.device(device)
        self._local = fresh_generator(self.device)

    def _edge(self, peer: PeerId, round_: int, dim: int) -> torch.Tensor:
        std = self.config.edge_scale.std(self.me, peer)
        return edge_noise(self._secrets[peer], round_, dim, std, self.me, peer, self.device)

    def pairwise(self, round_: int, peers: Collection[PeerId], dim: int) -> torch.Tensor:
        """Σ_{j ∈ peers} v_ij^t (peers must have secrets)."""
        total = torch.zeros(dim, dtype=torch.float32, device=self.device)
        for peer in sorted(peers):
            total += self._edge(peer, round_, dim)
        return total

    def local(self, dim: int) -> torch.Tensor:
        noise = torch.randn(dim, generator=self._local, dtype=torch.float32, device=self.device)
        return noise * self.config.sigma_cdp

    def privatize(self, delta: torch.Tensor, round_: int, active: Collection[PeerId]) -> torch.Tensor:
        """Δ̃ = clip(Δ, C) + Σ_{active} v_ij^t + N(0, σ_cdp² I)."""
        flat = delta.detach().to(self.device, torch.float32).reshape(-1)
        missing = [p for p in active if p not in self._secrets]
        if missing:
            raise KeyError(f"no edge secret for {len(missing)} committed peer(s)")
        dim = flat.numel()
        return clip_to_norm(flat, self.config.clip) + self.pairwise(round_, active, dim) + self.local(dim)

    def sent_variance_per_coord(self, active: Iterable[PeerId]) -> float:
        """Variance per coordinate of the noise in what is sent."""
        return self.config.sigma_cdp**2 + sum(self.config.edge_scale.std(self.me, p) ** 2 for p in active)

    def uncancelled(
        self, round_: int, active: Collection[PeerId], delivered: Collection[PeerId], dim: int
    ) -> DropoutReport:
        """Noise of ``round_`` that will not cancel because a committed peer's
        delta never arrived: Σ_{j ∈ active∖delivered} v_ij^t."""
        gone = tuple(sorted(set(active) - set(delivered)))
        var = float(dim) * sum(self.config.edge_scale.std(self.me, p) ** 2 for p in gone)
        norm = float(torch.linalg.vector_norm(self.pairwise(round_, gone, dim))) if gone else 0.0
        return DropoutReport(round_, gone, var, norm)
