"""The D-SGD round engine and the asynchronous gossip-learning merge (SPECS §1).

The engine is *sans-IO*: it never waits, sleeps or opens a socket. The node
daemon (real network) and :mod:`murmur.learning.simulate` (many nodes in one
process, for benchmarks) drive the same code:

1. ``begin_round(neighbours)`` trains locally, computes the delta and returns
   the vector to send (clipped and noised by the privacy stage when one is
   configured; the kept delta is never noised).
2. ``offer(peer, round, delta)`` files what arrives. Deltas for past rounds are
   refused as LATE, deltas for a near-future round are buffered (bounded), the
   rest are refused; nothing ever blocks on a peer.
3. ``quorum_reached()`` tells the driver it may close the round early; the
   driver closes it anyway at its deadline.
4. ``finish_round()`` aggregates what arrived and applies it to the model.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from murmur.learning.aggregators.base import AggregationResult, Aggregator, PeerUpdate
from murmur.learning.trainers.base import EvalStats, Trainer

log = logging.getLogger(__name__)

MAX_FUTURE_ROUNDS = 2
"""How far ahead of us a neighbour may be and still have its delta buffered.
A faster peer is normal (it closed its round at quorum before we did); one
further ahead is either broken or lying about rounds."""


class Offer(enum.Enum):
    """What the engine did with an offered delta."""

    ACCEPTED = "accepted"
    BUFFERED = "buffered"  # for a future round, kept until that round begins
    LATE = "late"  # for a round already closed: dropped
    DUPLICATE = "duplicate"  # second delta from the same peer for the same round
    TOO_EARLY = "too_early"  # further ahead than MAX_FUTURE_ROUNDS
    NOT_NEIGHBOUR = "not_neighbour"  # sender is not a neighbour this round
    BAD_SHAPE = "bad_shape"  # wrong length or dtype, or non-finite values


@runtime_checkable
class RoundAware(Protocol):
    """Aggregators that keep per-round state (SybilWall stamps its records)."""

    def begin_round(self, round_: int) -> None: ...


@dataclass(frozen=True)
class LocalUpdate:
    delta: torch.Tensor
    loss: float


class Perturber(Protocol):
    """The privacy stage: turns the kept delta into what is sent."""

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class RoundConfig:
    local_steps: int | None = None  # None: the trainer's own default
    quorum: float = 1.0  # fraction of this round's neighbours whose deltas close the round early
    max_future_rounds: int = MAX_FUTURE_ROUNDS

    def __post_init__(self) -> None:
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")


@dataclass
class RoundReport:
    round: int
    train_loss: float
    received: int
    neighbours: int
    late_dropped: int
    weights: dict[str, float]
    delta_norm: float
    eval: EvalStats | None = None


@dataclass
class _Pending:
    neighbours: dict[str, int]  # peer -> its degree
    own_delta: torch.Tensor
    train_loss: float
    received: dict[str, torch.Tensor] = field(default_factory=dict)


class RoundEngine:
    """One node's synchronous D-SGD rounds over a changing neighbourhood."""

    def __init__(
        self,
        trainer: Trainer,
        aggregator: Aggregator,
        config: RoundConfig = RoundConfig(),
        perturber: Perturber | None = None,
        start_round: int = 0,
    ) -> None:
        self.trainer = trainer
        self.aggregator = aggregator
        self.config = config
        self.perturber = perturber
        self.round = start_round
        self.num_params = trainer.num_params()
        self.late_dropped = 0
        self._pending: _Pending | None = None
        self._future: dict[int, dict[str, torch.Tensor]] = {}
        self._late_this_round = 0

    # -- the round --------------------------------------------------------------

    @property
    def in_round(self) -> bool:
        return self._pending is not None

    def local_update(self) -> LocalUpdate:
        """Train E local steps from x^t and return Δ, leaving the model at x^t.

        Touches only the trainer, never the engine's round state, so the node
        runs it in a worker thread while deltas keep arriving on the loop.
        """
        before = self.trainer.get_flat()
        stats = self.trainer.train(self.config.local_steps)
        delta = self.trainer.get_flat() - before
        # Rewind to x^t: the aggregate is applied to x^t, not to x^{t+1/2}.
        self.trainer.set_flat(before)
        return LocalUpdate(delta, float(stats.loss))

    def open_round(
        self, neighbours: Mapping[str, int], update: LocalUpdate, committed: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Open round ``self.round`` with ``update``; return what to send to every neighbour.

        ``neighbours`` maps each neighbour of this round to its degree (for
        Metropolis–Hastings weights). ``committed`` are the neighbours that
        agreed to add their pairwise noise term this round (default: all).
        """
        if self._pending is not None:
            raise RuntimeError(f"round {self.round} is still open")
        if isinstance(self.aggregator, RoundAware):
            self.aggregator.begin_round(self.round)
        self._pending = _Pending(dict(neighbours), update.delta, update.loss)
        for peer, delta in self._future.pop(self.round, {}).items():
            if peer in self._pending.neighbours:
                self._pending.received[peer] = delta.to(update.delta.device)
        if self.perturber is None:
            return update.delta
        peers = list(committed if committed is not None else neighbours)
        return self.perturber.perturb(update.delta, self.round, peers)

    def begin_round(self, neighbours: Mapping[str, int], committed: Sequence[str] | None = None) -> torch.Tensor:
        """:meth:`local_update` then :meth:`open_round` (single-threaded drivers)."""
        return self.open_round(neighbours, self.local_update(), committed)

    def offer(self, peer: str, round: int, delta: torch.Tensor) -> Offer:
        """File a neighbour's delta. Never raises for bad peer input."""
        if delta.dtype != torch.float32 or delta.ndim != 1 or delta.numel() != self.num_params:
            return Offer.BAD_SHAPE
        if not bool(torch.isfinite(delta).all()):
            return Offer.BAD_SHAPE
        pending = self._pending
        current = self.round
        if round < current:
            self.late_dropped += 1
            self._late_this_round += 1
            return Offer.LATE
        if round > current + self.config.max_future_rounds:
            return Offer.TOO_EARLY
        if round > current or pending is None:  # not begun yet: keep it for begin_round()
            bucket = self._future.setdefault(round, {})
            if peer in bucket:
                return Offer.DUPLICATE
            bucket[peer] = delta
            return Offer.BUFFERED
        if peer not in pending.neighbours:
            return Offer.NOT_NEIGHBOUR
        if peer in pending.received:
            return Offer.DUPLICATE
        pending.received[peer] = delta.to(pending.own_delta.device)
        return Offer.ACCEPTED

    def quorum_reached(self) -> bool:
        pending = self._pending
        if pending is None:
            return False
        if not pending.neighbours:
            return True
        need = math.ceil(self.config.quorum * len(pending.neighbours))
        return len(pending.received) >= need

    def missing(self) -> list[str]:
        """Neighbours whose delta for the open round has not arrived."""
        pending = self._pending
        return [] if pending is None else [p for p in pending.neighbours if p not in pending.received]

    def finish_round(self, evaluate: bool = False) -> RoundReport:
        """Aggregate what arrived, apply it, advance to the next round."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("no round is open")
        updates = [
            PeerUpdate(peer=peer, delta=delta, degree=pending.neighbours[peer])
            for peer, delta in pending.received.items()
        ]
        result: AggregationResult = self.aggregator.aggregate(pending.own_delta, updates, len(pending.neighbours))
        applied = result.delta
        if not bool(torch.isfinite(applied).all()):
            # An aggregator must never poison the model; keep our own step instead.
            log.error("aggregate is not finite; applying own delta only", extra={"round": self.round})
            applied = pending.own_delta
        self.trainer.set_flat(self.trainer.get_flat() + applied)
        report = RoundReport(
            round=self.round,
            train_loss=pending.train_loss,
            received=len(updates),
            neighbours=len(pending.neighbours),
            late_dropped=self._late_this_round,
            weights=dict(result.weights),
            delta_norm=float(applied.norm()),
            eval=self.trainer.evaluate() if evaluate else None,
        )
        self._pending = None
        self._late_this_round = 0
        self.round += 1
        # Anything buffered for rounds we will never run again is late now.
        for stale in [r for r in self._future if r < self.round]:
            self.late_dropped += len(self._future.pop(stale))
        return report

    # -- catch-up ---------------------------------------------------------------

    def adopt(self, model: torch.Tensor, round: int) -> None:
        """Take a neighbour's model and round (a late joiner or restarted node
        catching up). Anything buffered for older rounds is discarded."""
        if model.numel() != self.num_params:
            raise ValueError(f"model has {model.numel()} parameters, expected {self.num_params}")
        self._pending = None
        self.trainer.set_flat(model.to(torch.float32))
        self.round = round
        for stale in [r for r in self._future if r < round]:
            del self._future[stale]


@dataclass
class GossipModel:
    """Asynchronous gossip learning (SPECS §1, variant): age-weighted merge.

    ``age`` counts the local updates a model has absorbed. Merging with an
    older model moves us less than merging with a younger one, which is what
    keeps a freshly joined node from dragging the network back.
    """

    trainer: Trainer
    age: int = 0
    merge_hook: Callable[[str, float], None] | None = None

    def merge(self, peer: str, model: torch.Tensor, peer_age: int) -> None:
        if model.numel() != self.trainer.num_params() or not bool(torch.isfinite(model).all()):
            raise ValueError("gossiped model has the wrong size or non-finite values")
        if peer_age < 0:
            raise ValueError("negative model age")
        total = self.age + peer_age
        if total == 0:
            share = 0.5
        else:
            share = peer_age / total
        own = self.trainer.get_flat()
        self.trainer.set_flat(own + share * (model.to(own.device) - own))
        self.age = max(self.age, peer_age)
        if self.merge_hook:
            self.merge_hook(peer, share)

    def step(self, steps: int | None = None) -> float:
        stats = self.trainer.train(steps)
        self.age += stats.steps
        return float(stats.loss)
