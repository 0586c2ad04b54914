"""Per-peer moving averages: one vector per neighbour, folded in each round
it is heard, forgotten once it has been away for a while.

Why one store. SybilWall keeps two such views of its neighbours: the
similarity's ``memory`` (each neighbour's offsets averaged over ~10 rounds,
where fresh noise averages out and a direction Sybils share does not) and
the persistence bound's means of each pull over ~50 rounds
(:mod:`.persistence`). Both need the same bookkeeping: start a peer's
average at its first value, fold each later one in, start afresh when it
returns after ``forget_rounds``, drop it then so that churn does not grow
the store, and carry it all through a checkpoint. They differ in one rule:
the persistence bound's mean weighs its first rounds alike until it covers
``1 / (1 - beta)`` of them (``warm_up``), because it judges a peer by its
length from its 10th round on and a first offset weighed at ``beta ** n``
would dominate that length; the memory view compares directions and starts
at its first value as a plain moving average does.

What is kept per peer: the average (float32, the folded values' shape), the
last round folded in, and with ``warm_up`` the number of rounds folded in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

FORGET_ROUNDS = 50  # a peer unseen this long starts a fresh average when it returns


class PeerAverages:
    """Moving averages of one vector per peer (see the module doc)."""

    def __init__(self, beta: float, *, warm_up: bool, forget_rounds: int = FORGET_ROUNDS, name: str = "averages") -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: beta must be in [0, 1)")
        if forget_rounds < 1:
            raise ValueError(f"{name}: forget_rounds must be >= 1")
        self.beta = beta
        self.warm_up = warm_up
        self.forget_rounds = forget_rounds
        self.name = name  # in the errors of a refused checkpoint
        self._rows: dict[str, torch.Tensor] = {}
        self._seen: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def fold(self, peer: str, value: torch.Tensor, now: int) -> None:
        """Fold ``value`` into ``peer``'s average in round ``now``; a peer met
        for the first time, or back after ``forget_rounds``, starts at it."""
        row = self._rows.get(peer)
        if row is None or self._seen[peer] < now - self.forget_rounds:
            self._rows[peer] = value.detach().to(torch.float32).clone()
            self._count[peer] = 1
        else:
            count = self._count[peer] = self._count[peer] + 1
            fresh = max(1.0 - self.beta, 1.0 / count) if self.warm_up else 1.0 - self.beta
            row.mul_(1.0 - fresh).add_(value, alpha=fresh)
        self._seen[peer] = now

    def forget(self, now: int) -> None:
        """Drop every peer unseen since before ``now - forget_rounds``."""
        for peer in [p for p, seen in self._seen.items() if seen < now - self.forget_rounds]:
            del self._rows[peer], self._seen[peer], self._count[peer]

    def get(self, peer: str) -> torch.Tensor | None:
        return self._rows.get(peer)

    def __getitem__(self, peer: str) -> torch.Tensor:
        return self._rows[peer]

    def count(self, peer: str) -> int:
        """Rounds folded into ``peer``'s average since it (re)started; 0 when none."""
        return self._count.get(peer, 0)

    def __contains__(self, peer: object) -> bool:
        return peer in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    # checkpointing -------------------------------------------------------

    def state_dict(self, prefix: str, rows_key: str) -> dict[str, Any]:
        """The averages as keys of the owner's checkpoint: ``{prefix}peers``,
        ``{prefix}seen``, with ``warm_up`` ``{prefix}count``, and the rows
        stacked under ``rows_key`` (absent when there are none)."""
        peers = sorted(self._rows)
        state: dict[str, Any] = {f"{prefix}peers": peers, f"{prefix}seen": [self._seen[p] for p in peers]}
        if self.warm_up:
            state[f"{prefix}count"] = [self._count[p] for p in peers]
        if peers:
            state[rows_key] = torch.stack([self._rows[p] for p in peers]).clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any], prefix: str, rows_key: str, width: int | None = None) -> None:
        """Restore what :meth:`state_dict` wrote; a state without these keys
        (a checkpoint from before they were kept) starts every average afresh.
        ``width``: the length each row must have. A malformed state raises
        ValueError and leaves the store empty."""
        self._rows, self._seen, self._count = {}, {}, {}
        peers = [str(p) for p in state.get(f"{prefix}peers", ())]
        if not peers:
            return
        rows = state.get(rows_key)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != len(peers) \
                or (width is not None and rows.shape[1] != width) or not bool(torch.isfinite(rows).all()):
            raise ValueError(f"{self.name} checkpoint: one finite row per peer"
                             + ("" if width is None else f", each of {width} values"))
        seen = [int(r) for r in state.get(f"{prefix}seen", ())]
        count = [int(c) for c in state.get(f"{prefix}count", ())] if self.warm_up else [1] * len(peers)
        if len(seen) != len(peers) or len(count) != len(peers) or min(count) < 1:
            raise ValueError(f"{self.name} checkpoint: seen (and count) must give each peer a round (and a count >= 1)")
        self._rows = {p: rows[i].to(torch.float32).clone() for i, p in enumerate(peers)}
        self._seen = dict(zip(peers, seen, strict=True))
        self._count = dict(zip(peers, count, strict=True))
