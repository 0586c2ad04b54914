"""Per-peer accumulated update histories in one preallocated matrix.

FoolsGold and SybilWall compare histories H_k = sum of peer k's deltas. With
d in the millions, a dict of separate tensors would force a fresh stack (an
(n, d) copy) every round before the similarity matmul. Instead all histories
live in the rows of one ``(capacity, d)`` matrix, kept dense in rows
``[0, len)``: the similarity step multiplies a *view*, accumulation is one
``index_add_``. Capacity grows by doubling (amortised O(1) copies per row);
removal moves the last row into the hole so the live rows stay contiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

INITIAL_CAPACITY = 8


class HistoryMatrix:
    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = INITIAL_CAPACITY,
    ) -> None:
        if dim < 1:
            raise ValueError("history dimension must be >= 1")
        self.dim = dim
        self._data = torch.zeros((max(1, initial_capacity), dim), dtype=dtype, device=device)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self._data.device

    @property
    def capacity(self) -> int:
        return self._data.shape[0]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, peer: object) -> bool:
        return peer in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def ids(self) -> list[str]:
        """Peer ids in row order."""
        return list(self._ids)

    def row(self, peer: str) -> int:
        return self._rows[peer]

    def rows_of(self, peers: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._rows[p] for p in peers], dtype=torch.long, device=self.device)

    def matrix(self) -> torch.Tensor:
        """View of the live rows (no copy); invalidated by add/remove."""
        return self._data[: len(self._ids)]

    def get(self, peer: str) -> torch.Tensor:
        """View of one history row."""
        return self._data[self._rows[peer]]

    def add(self, peer: str, initial: torch.Tensor | None = None) -> int:
        """Append a row for a new peer (zero, or a copy of ``initial``)."""
        if peer in self._rows:
            raise KeyError(f"history for {peer!r} exists")
        n = len(self._ids)
        if n == self.capacity:
            self._grow(2 * self.capacity)
        self._ids.append(peer)
        self._rows[peer] = n
        self.set(peer, initial)
        return n

    def set(self, peer: str, value: torch.Tensor | None) -> None:
        """Overwrite one history (zero when ``value`` is None)."""
        row = self._data[self._rows[peer]]
        if value is None:
            row.zero_()
        else:
            row.copy_(value)

    def remove(self, peer: str) -> None:
        row = self._rows.pop(peer)
        last = len(self._ids) - 1
        moved = self._ids.pop()
        if row != last:
            self._data[row].copy_(self._data[last])
            self._ids[row] = moved
            self._rows[moved] = row

    def add_to_row(self, row: int, delta: torch.Tensor) -> None:
        """H[row] += delta, in place."""
        self._data[row].add_(delta)

    def accumulate(self, rows: torch.Tensor, deltas: torch.Tensor) -> None:
        """H[rows[i]] += deltas[i] for all i in one kernel (rows must be distinct)."""
        self._data.index_add_(0, rows, deltas)

    def _grow(self, capacity: int) -> None:
        new = torch.empty((capacity, self.dim), dtype=self._data.dtype, device=self.device)
        n = len(self._ids)
        new[:n].copy_(self._data[:n])
        self._data = new

    # checkpointing -------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        return {"ids": list(self._ids), "histories": self.matrix().clone()}

    @classmethod
    def from_state(
        cls, state: dict[str, object], device: torch.device | str | None = None
    ) -> HistoryMatrix:
        ids = list(state["ids"])  # type: ignore[call-overload]
        hist = state["histories"]
        if not isinstance(hist, torch.Tensor) or hist.dim() != 2 or hist.shape[0] != len(ids):
            raise ValueError("history checkpoint: histories must be (len(ids), d)")
        out = cls(hist.shape[1], hist.device if device is None else device, hist.dtype, initial_capacity=max(len(ids), INITIAL_CAPACITY))
        for i, peer in enumerate(ids):
            out.add(str(peer), hist[i])
        return out
