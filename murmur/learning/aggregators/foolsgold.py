"""FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020) applied by a node to its neighbours.

The node plays the FoolsGold server for the peers whose deltas reached it: it
keeps H_k = sum of peer k's deltas, scores this round's senders with the shared
similarity core (:mod:`.similarity`) over their histories, gives its own delta
weight 1 and renormalises:

    result = (own + sum_j w_j delta_j) / (1 + sum_j w_j)

Options (the paper's memory window and importance feature mask, and variants):
- ``memory``: None sums every past update; k sums only the last k (a ring
  buffer of k deltas per peer, so it costs k * d floats per peer - opt in).
- ``feature_mask``: fixed non-negative per-coordinate weights of the inner
  product (e.g. 1 on the output layer's slice, the paper's importance idea
  with the layout supplied by the trainer).
- ``importance_fraction``: data-driven hard importance: only the top fraction of
  coordinates by |sum of the scored histories| enters the similarity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from murmur.learning.aggregators.base import (
    SELF,
    AggregationResult,
    Aggregator,
    PeerUpdate,
    check_inputs,
    register_aggregator,
    require,
    stack_rows,
)
from murmur.learning.aggregators.history import HistoryMatrix
from murmur.learning.aggregators.similarity import (
    DEFAULT_KAPPA,
    cosine_matrix,
    foolsgold_weights,
)

DEFAULT_MAX_PEERS = 1024


@dataclass(frozen=True)
class FoolsGoldOptions:
    memory: int | None = None
    feature_mask: torch.Tensor | None = None
    importance_fraction: float | None = None
    kappa: float = DEFAULT_KAPPA
    max_peers: int = DEFAULT_MAX_PEERS  # least recently seen peers are forgotten beyond this

    def validate(self) -> None:
        require(self.memory is None or self.memory >= 1, "foolsgold: memory must be >= 1")
        require(self.kappa > 0, "foolsgold: kappa must be > 0")
        require(self.max_peers >= 1, "foolsgold: max_peers must be >= 1")
        require(
            self.importance_fraction is None or 0.0 < self.importance_fraction <= 1.0,
            "foolsgold: importance_fraction must be in (0, 1]",
        )
        require(
            self.feature_mask is None or self.importance_fraction is None,
            "foolsgold: give feature_mask or importance_fraction, not both",
        )
        m = self.feature_mask
        if m is not None:
            require(
                isinstance(m, torch.Tensor) and m.dim() == 1 and m.is_floating_point(),
                "foolsgold: feature_mask must be a 1-D float tensor",
            )
            require(bool(torch.isfinite(m).all()) and bool((m >= 0).all()),
                    "foolsgold: feature_mask must be finite and >= 0")


@register_aggregator("foolsgold")
class FoolsGoldAggregator(Aggregator):
    Options = FoolsGoldOptions
    options: FoolsGoldOptions

    def __init__(self, options: FoolsGoldOptions | None = None) -> None:
        super().__init__(options)
        self._hist: HistoryMatrix | None = None
        self._window: HistoryMatrix | None = None  # row k: last `memory` deltas of peer k
        self._count: dict[str, int] = {}  # deltas seen per peer (ring slot = count % memory)
        self._last_seen: dict[str, int] = {}
        self._round = 0

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        check_inputs(own, updates)
        if not updates:
            self._round += 1
            return AggregationResult(own.clone(), {SELF: 1.0})
        hist = self._histories(own)
        peers = [u.peer for u in updates]
        self._admit(peers)
        rows = hist.rows_of(peers)
        deltas = stack_rows([u.delta for u in updates])
        self._accumulate(peers, rows, deltas)
        for p in peers:
            self._last_seen[p] = self._round
        self._round += 1

        scored = hist.matrix()[rows]
        w = foolsgold_weights(cosine_matrix(scored, self._feature_weights(scored)), self.options.kappa)
        total = 1.0 + float(w.sum())
        delta = (own + w.to(deltas.dtype) @ deltas) / total
        weights = {SELF: 1.0 / total}
        weights.update(zip(peers, (float(x) / total for x in w.tolist()), strict=True))
        return AggregationResult(delta, weights)

    # internals -----------------------------------------------------------

    def _histories(self, own: torch.Tensor) -> HistoryMatrix:
        if self._hist is None:
            self._hist = HistoryMatrix(own.numel(), own.device)
            if self.options.memory is not None:
                self._window = HistoryMatrix(own.numel() * self.options.memory, own.device)
        if self._hist.dim != own.numel() or self._hist.device != own.device:
            raise ValueError("foolsgold: model dimension or device changed")
        mask = self.options.feature_mask
        if mask is not None and mask.numel() != own.numel():
            raise ValueError("foolsgold: feature_mask length differs from the model")
        return self._hist

    def _admit(self, peers: Sequence[str]) -> None:
        """Give new peers a zero history; forget least recently seen ones over the cap."""
        assert self._hist is not None
        fresh = [p for p in peers if p not in self._hist]
        overflow = len(self._hist) + len(fresh) - self.options.max_peers
        if overflow > 0:
            current = set(peers)
            stale = sorted((r, p) for p, r in self._last_seen.items() if p not in current)
            for _, p in stale[:overflow]:
                self._forget(p)
        for p in fresh:
            self._hist.add(p)
            self._count[p] = 0
            if self._window is not None:
                self._window.add(p)

    def _forget(self, peer: str) -> None:
        assert self._hist is not None
        self._hist.remove(peer)
        if self._window is not None:
            self._window.remove(peer)
        self._count.pop(peer, None)
        self._last_seen.pop(peer, None)

    def _accumulate(self, peers: Sequence[str], rows: torch.Tensor, deltas: torch.Tensor) -> None:
        assert self._hist is not None
        if self._window is None:
            self._hist.accumulate(rows, deltas)
            return
        k = self.options.memory
        assert k is not None
        ring = self._window.matrix().view(len(self._window), k, self._hist.dim)
        slots = torch.tensor([self._count[p] % k for p in peers], device=rows.device)
        old = ring[rows, slots]
        self._hist.accumulate(rows, deltas - old)
        ring[rows, slots] = deltas
        for p in peers:
            self._count[p] += 1

    def _feature_weights(self, scored: torch.Tensor) -> torch.Tensor | None:
        if self.options.feature_mask is not None:
            return self.options.feature_mask.to(device=scored.device, dtype=scored.dtype)
        frac = self.options.importance_fraction
        if frac is None or frac >= 1.0:
            return None
        magnitude = scored.sum(dim=0).abs()
        keep = max(1, int(frac * magnitude.numel()))
        mask = torch.zeros_like(magnitude)
        mask[magnitude.topk(keep).indices] = 1.0
        return mask

    # checkpointing -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._hist is None:
            return {"round": self._round}
        state: dict[str, Any] = {
            "round": self._round,
            "ids": self._hist.ids(),
            "histories": self._hist.matrix().clone(),
            "count": [self._count[p] for p in self._hist.ids()],
            "last_seen": [self._last_seen.get(p, -1) for p in self._hist.ids()],
        }
        if self._window is not None:
            state["window"] = self._window.matrix().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, all or nothing: a malformed
        state, or one written with another ``memory``, raises ValueError
        and leaves this aggregator as it was (the node then starts without
        it). Loading part of one made every later round raise."""
        round_ = int(state["round"])
        if "ids" not in state:
            self._hist, self._window, self._count, self._last_seen, self._round = None, None, {}, {}, round_
            return
        ids = [str(p) for p in state["ids"]]
        hist = HistoryMatrix.from_state({"ids": ids, "histories": state["histories"]})
        if not bool(torch.isfinite(hist.matrix()).all()):
            raise ValueError("foolsgold checkpoint: histories must be finite")
        window = None
        if self.options.memory is not None:
            if "window" not in state:
                raise ValueError("foolsgold checkpoint lacks the memory window")
            window = HistoryMatrix.from_state({"ids": ids, "histories": state["window"]})
            if window.dim != self.options.memory * hist.dim or not bool(torch.isfinite(window.matrix()).all()):
                raise ValueError(f"foolsgold checkpoint: a finite window of memory={self.options.memory} rounds "
                                 "expected (written with another memory?)")
        count = [int(c) for c in state["count"]]
        last_seen = [int(r) for r in state["last_seen"]]
        if len(count) != len(ids) or len(last_seen) != len(ids) or any(c < 0 for c in count):
            raise ValueError("foolsgold checkpoint: one count >= 0 and one last round per peer")
        self._round, self._hist, self._window = round_, hist, window
        self._count = dict(zip(ids, count, strict=True))
        self._last_seen = {p: r for p, r in zip(ids, last_seen, strict=True) if r >= 0}
