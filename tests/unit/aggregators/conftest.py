from __future__ import annotations

import torch

from murmur.learning.aggregators import PeerUpdate


def orthogonalish(n: int, dim: int, seed: int) -> list[torch.Tensor]:
    """n random directions in high dimension: pairwise cosine ~ 1/sqrt(dim)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, generator=g) for _ in range(n)]


def updates(deltas: dict[str, torch.Tensor], degree: int = 1) -> list[PeerUpdate]:
    return [PeerUpdate(p, d, degree) for p, d in deltas.items()]
