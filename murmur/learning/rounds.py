"""The D-SGD round engine and the asynchronous gossip-learning merge (SPECS §1).

Deltas on the wire, models in the mix. Averaging neighbours' *deltas* alone
never brings models together: each delta was computed at another model, the
models drift apart and the average of their steps stops being a descent
direction (measured: 8 nodes, degree 6, non-IID digits, accuracy falls to 0.5
while a complete graph reaches 0.94). So each node also keeps a **public
model** s_i, built only from what it sent, and exact **replicas** of its
neighbours' public models (as CHOCO-SGD does with exact communication):

* round t: train from the private model x_i, giving Δ_i; send
  ``Message(update=Δ̃_i, consensus=c_i^{t-1})`` where Δ̃_i is Δ_i clipped and
  noised by the privacy stage (the kept Δ_i never is) and c_i^{t-1} the
  consensus step we took last round. Sender and receivers both advance the
  public model: s_i += c_i^{t-1} + Δ̃_i.
* aggregate: the aggregator scores the peers' updates Δ̃_j (SybilWall and
  FoolsGold histories are sums of updates, as SPECS §2 intends) and the engine
  averages public models with those weights, or (for median, trimmed mean,
  clipped gossip) the aggregator combines the models directly. The consensus
  step is c_i^t = agg(ŝ_j) − s_i. The private model takes the same weights
  with *itself* (own update clean) in place of s_i:
  x_i ← (x_i + Δ_i) + Σ_j w_ij (ŝ_j − (x_i + Δ_i)).

With privacy off, x_i = s_i and this is exactly D-SGD with Metropolis–Hastings
mixing. With privacy on, what crosses the wire (Δ̃, and c which is a function
of public models only) is post-processing of noisy updates. The private model
never contains the node's own noise; its gap to s_i shrinks by W_ii each
round rather than accumulating (an earlier x_i = s_i − Σ own noise kept a
random walk of the node's own uncancelled pairwise terms: DECOR private
accuracy 0.16 at ε = 0.1, bench/privacy.py). Example-level DP-SGD must train
from the public model instead (``RoundConfig.train_from``, :class:`TrainFrom`).

The engine is *sans-IO*: it never waits, sleeps or opens a socket. The node
daemon and :mod:`murmur.learning.simulate` drive the same code: ``open_round``
returns the message, ``offer`` files what arrives (late rounds dropped, near
future buffered, a replica gap answered with NEEDS_SYNC so the driver fetches
that peer's public model), ``quorum_reached`` allows an early close, and
``finish_round`` aggregates and applies.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from murmur.learning.aggregators.base import AggregationResult, Aggregator, Combine, PeerUpdate
from murmur.learning.trainers.base import EvalStats, Trainer
from murmur.learning.trainers.checked import checked

log = logging.getLogger(__name__)

MAX_FUTURE_ROUNDS = 2
"""How far ahead of us a neighbour may be and still have its delta buffered.
A faster peer is normal (it closed its round at quorum before we did); one
further ahead is either broken or lying about rounds."""


class Offer(enum.Enum):
    """What the engine did with an offered message."""

    ACCEPTED = "accepted"
    BUFFERED = "buffered"  # for a future round, kept until that round begins
    LATE = "late"  # for a round already closed: replica advanced, not aggregated
    DUPLICATE = "duplicate"  # a round we already have from this peer
    TOO_EARLY = "too_early"  # further ahead than max_future_rounds: we are behind
    NOT_NEIGHBOUR = "not_neighbour"  # sender is not a neighbour this round
    BAD_SHAPE = "bad_shape"  # wrong length or dtype, or non-finite values
    NEEDS_SYNC = "needs_sync"  # no replica of this peer or a gap: fetch its public model


@runtime_checkable
class RoundAware(Protocol):
    """Aggregators that keep per-round state (SybilWall stamps its records)."""

    def begin_round(self, round_: int) -> None: ...


@dataclass(frozen=True)
class LocalUpdate:
    delta: torch.Tensor
    loss: float
    from_data: bool = True  # False: a mixing-only round's zero step, which reveals nothing

    @classmethod
    def mixing_only(cls, num_params: int, device: torch.device | str = "cpu") -> LocalUpdate:
        """No training: the round only mixes public models (see :meth:`RoundEngine.begin_mixing_round`)."""
        return cls(torch.zeros(num_params, device=device), math.nan, from_data=False)


@dataclass(frozen=True)
class Message:
    """What a node sends each round: its (noised) update and last consensus step."""

    ROWS: ClassVar[int] = 2  # vectors in the wire layout: what a receiver sizes its buffers for
    update: torch.Tensor
    consensus: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """One (ROWS, d) tensor, the wire layout."""
        return torch.stack([self.update, self.consensus])


Wire = Callable[[torch.Tensor], torch.Tensor]
"""What receivers decode of a stacked (2, d) message (a lossy codec's round trip).

The public model is mirrored by every neighbour's replica, so the sender must
advance it by exactly the decoded values; advancing by the exact ones lets
sender and replicas drift apart by the accumulated rounding (with fp16 and
large pairwise noise, by more than the model's own scale over a run)."""


class Perturber(Protocol):
    """The privacy stage: turns the kept delta into what is sent."""

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor: ...


class TrainFrom(enum.Enum):
    """Which model the next round's local training starts from.

    PRIVATE: the node's own model x_i (its clean update mixed with the
    neighbours' public models). Fine when privacy comes from clipping the
    whole round delta (user level): the clip bounds what is sent whatever
    point it was computed at, so adaptive composition holds.

    PUBLIC: the public model s_i, a function of released (noised) messages
    only. Required for example-level DP-SGD: the per-example sensitivity
    lr·C/B holds only when the gradient is taken at a point that does not
    itself depend on the data beyond what was released; x_i does (it keeps
    the node's un-noised updates), so two datasets differing in one example
    would train from different points and every gradient could differ.
    This is DECOR's algorithm.
    """

    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True)
class RoundConfig:
    local_steps: int | None = None  # None: the trainer's own default
    quorum: float = 1.0  # fraction of this round's neighbours whose messages close the round early
    max_future_rounds: int = MAX_FUTURE_ROUNDS
    train_from: TrainFrom = TrainFrom.PRIVATE

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
    consensus_norm: float
    eval: EvalStats | None = None
    # Neighbours without a message in the round: ``missed`` were still
    # expected when it closed (it ran to its deadline for them), ``excused``
    # had said or shown they send nothing for it (linked after their own
    # round, finished, already past it). received + missed + excused = neighbours.
    missed: int = 0
    excused: int = 0
    absent: tuple[str, ...] = ()  # the neighbours counted in missed and excused


@dataclass
class _Replica:
    model: torch.Tensor  # the peer's public model as of its message ``round``
    round: int  # -1: the network's shared initial model
    # ``model`` is also a filed contribution's snapshot: copy it before the
    # next advance instead of at every filing (copy on write). Neighbours
    # usually send round r+1 after we aggregated round r, so most rounds
    # copy nothing: one model-sized vector per neighbour less at real sizes.
    lent: bool = False

    def snapshot(self) -> torch.Tensor:
        self.lent = True
        return self.model

    def advance(self, message: Message) -> None:
        if self.lent:
            self.model, self.lent = self.model.clone(), False
        _advance(self.model, message)


@dataclass
class _Contribution:
    update: torch.Tensor  # the peer's Δ̃ for the round (its own memory, not the received message's buffer)
    model: torch.Tensor  # snapshot of its public half-step model for the round (see _Replica.lent)


@dataclass
class _Pending:
    neighbours: dict[str, int]  # peer -> its degree
    own_delta: torch.Tensor  # clean Δ_i (kept)
    sent_update: torch.Tensor  # Δ̃_i (what neighbours got)
    train_loss: float
    received: dict[str, _Contribution] = field(default_factory=dict)
    departed: list[str] = field(default_factory=list)  # left mid-round without delivering (see forget)


class RoundEngine:
    """One node's synchronous D-SGD rounds over a changing neighbourhood."""

    def __init__(
        self,
        trainer: Trainer,
        aggregator: Aggregator,
        config: RoundConfig = RoundConfig(),
        perturber: Perturber | None = None,
        start_round: int = 0,
        wire: Wire | None = None,
    ) -> None:
        self.trainer = checked(trainer)  # every driver gets the contract checks (trainers/checked.py)
        self.aggregator = aggregator
        self.config = config
        self.perturber = perturber
        self.wire = wire
        self.round = start_round
        self.num_params = self.trainer.num_params()
        self.late_dropped = 0
        initial = self.trainer.get_flat()
        self._initial = initial.clone()  # every node starts here (seeded), so round-0 replicas need no sync
        self.public = initial.clone()  # s_i, as of our last message
        self.last_sent_round = -1
        self._consensus = torch.zeros_like(initial)  # c_i of the last closed round, not yet published
        self._replicas: dict[str, _Replica] = {}
        self._pending: _Pending | None = None
        self._future: dict[int, dict[str, _Contribution]] = {}
        # The highest round each peer sent us a well-formed message for, filed
        # or not: a neighbour heard from at or past the open round has sent
        # all it will send for it (see quorum_reached).
        self._heard: dict[str, int] = {}
        # The latest message of each peer that needed a replica sync, kept to
        # be filed once its public model arrives (see set_replica): a
        # neighbour linked mid-run then counts in the round it first sends
        # for, instead of a round later. One (update, consensus) per peer.
        self._held: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        # The first round each peer said it will send us (see note_next_round).
        self._next: dict[str, int] = {}
        # Peers whose message a closed round used: until then a neighbour is
        # on probation and never holds a round that a proven neighbour's
        # message already makes (see _done_with_round).
        self._proven: set[str] = set()
        self._late_this_round = 0

    # -- the round --------------------------------------------------------------

    @property
    def in_round(self) -> bool:
        return self._pending is not None

    def local_update(self) -> LocalUpdate:
        """Train E local steps from x^t and return Δ, leaving the model at x^t.

        Touches only the trainer, never the engine's round state, so the node
        runs it in a worker thread while messages keep arriving on the loop.
        """
        before = self.trainer.get_flat()
        stats = self.trainer.train(self.config.local_steps)
        delta = self.trainer.get_flat()
        delta -= before  # in place: one model-sized vector less at real sizes
        # Rewind to x^t: the round's step is applied in finish_round().
        self.trainer.set_flat(before)
        return LocalUpdate(delta, float(stats.loss))

    def open_round(
        self, neighbours: Mapping[str, int], update: LocalUpdate, committed: Sequence[str] | None = None
    ) -> Message:
        """Open round ``self.round`` with ``update``; return the message for every neighbour.

        ``neighbours`` maps each neighbour of this round to its degree (for
        Metropolis–Hastings weights). ``committed`` are the neighbours that
        agreed to add their pairwise noise term this round (default: all).
        """
        if self._pending is not None:
            raise RuntimeError(f"round {self.round} is still open")
        if isinstance(self.aggregator, RoundAware):
            self.aggregator.begin_round(self.round)
        if self.perturber is None or not update.from_data:
            sent = update.delta
        else:
            peers = list(committed if committed is not None else neighbours)
            sent = self.perturber.perturb(update.delta, self.round, peers)
        message = Message(sent, self._consensus)
        if self.wire is not None:  # a lossy codec: advance by what the receivers' replicas will hold
            decoded = self.wire(message.stacked())
            message = Message(decoded[0], decoded[1])
        sent = message.update
        _advance(self.public, message)  # exactly as every neighbour's replica of it (offer)
        self._consensus = torch.zeros_like(self._consensus)
        self.last_sent_round = self.round
        self._pending = _Pending(dict(neighbours), update.delta, sent, update.loss)
        for peer, contribution in self._future.pop(self.round, {}).items():
            if peer in self._pending.neighbours:
                self._pending.received[peer] = contribution
        return message

    def begin_round(self, neighbours: Mapping[str, int], committed: Sequence[str] | None = None) -> Message:
        """:meth:`local_update` then :meth:`open_round` (single-threaded drivers)."""
        return self.open_round(neighbours, self.local_update(), committed)

    def begin_mixing_round(self, neighbours: Mapping[str, int]) -> Message:
        """A round that sends a zero update and only mixes public models.

        Why: after the last training round each node's model still holds the
        pairwise noise of the last rounds, which cancels only in the network
        mean. Mixing-only rounds move every node toward that mean; they use
        nothing but public models, so they cost no privacy and add no noise.
        """
        return self.open_round(neighbours, LocalUpdate.mixing_only(self.num_params, self.public.device))

    def offer(self, peer: str, round: int, update: torch.Tensor, consensus: torch.Tensor) -> Offer:
        """File a neighbour's round message. Never raises for bad peer input."""
        for vec in (update, consensus):
            if vec.dtype != torch.float32 or vec.ndim != 1 or vec.numel() != self.num_params:
                return Offer.BAD_SHAPE
            if not bool(torch.isfinite(vec).all()):
                return Offer.BAD_SHAPE
        self._heard[peer] = max(self._heard.get(peer, -1), round)
        replica = self._replicas.get(peer)
        if replica is None:
            if round != 0:
                return self._hold(peer, round, update, consensus)
            replica = self._replicas[peer] = _Replica(self._initial.clone(), -1)
        if round <= replica.round:
            return Offer.DUPLICATE
        if round > replica.round + 1:
            return self._hold(peer, round, update, consensus)
        device = replica.model.device
        replica.advance(Message(update.to(device), consensus.to(device)))
        replica.round = round
        # The update is copied so the received message (both vectors) can be
        # released now: a landing buffer goes back to the pool for the next transfer.
        return self._file(peer, round, _Contribution(update.to(device, copy=True), replica.snapshot()))

    def _file(self, peer: str, round: int, contribution: _Contribution) -> Offer:
        pending = self._pending
        if round < self.round:
            self.late_dropped += 1
            self._late_this_round += 1
            return Offer.LATE
        if round > self.round + self.config.max_future_rounds:
            return Offer.TOO_EARLY
        if round > self.round or pending is None:  # not begun yet: keep it for open_round()
            self._future.setdefault(round, {})[peer] = contribution
            return Offer.BUFFERED
        if peer not in pending.neighbours:
            # Kept in case its link reaches us after its message (add_neighbour
            # files it); dropped as late with the round otherwise.
            self._future.setdefault(round, {})[peer] = contribution
            return Offer.NOT_NEIGHBOUR
        pending.received[peer] = contribution
        return Offer.ACCEPTED

    def _hold(self, peer: str, round: int, update: torch.Tensor, consensus: torch.Tensor) -> Offer:
        """Keep the newest message of a peer we cannot replay yet (NEEDS_SYNC)."""
        held = self._held.get(peer)
        if held is None or round > held[0]:
            self._held[peer] = (round, update, consensus)
        return Offer.NEEDS_SYNC

    def set_replica(self, peer: str, model: torch.Tensor, round: int) -> Offer | None:
        """Install ``peer``'s public model as of its message ``round`` (after
        NEEDS_SYNC), then file the message held back for want of it: the
        model either precedes that message (replayed now, as :meth:`offer`
        would) or already contains it (filed with this model). Returns what
        filing it did, or None when nothing held was usable."""
        if model.numel() != self.num_params or not bool(torch.isfinite(model).all()):
            raise ValueError("replica has the wrong size or non-finite values")
        replica = self._replicas[peer] = _Replica(model.to(self._initial.device, torch.float32).clone(), round)
        held = self._held.pop(peer, None)
        if held is None:
            return None
        held_round, update, consensus = held
        if held_round == round + 1:
            return self.offer(peer, held_round, update, consensus)
        if held_round == round:
            device = replica.model.device
            return self._file(peer, held_round, _Contribution(update.to(device, copy=True), replica.snapshot()))
        return None  # older than the model (it moved on) or still a gap

    def forget(self, peer: str) -> None:
        """A neighbour left: drop its replica (memory), and stop waiting for
        it in the open round unless its message is already in."""
        self._replicas.pop(peer, None)
        self._heard.pop(peer, None)
        self._held.pop(peer, None)
        self._next.pop(peer, None)
        self._proven.discard(peer)
        self.drop_neighbour(peer)

    def drop_neighbour(self, peer: str) -> None:
        """``peer`` is no longer a neighbour (unlinked, muted, gone): the open
        round stops waiting for it unless its message is already in. Its
        replica stays (it may link again)."""
        pending = self._pending
        if pending is not None and peer not in pending.received and pending.neighbours.pop(peer, None) is not None:
            pending.departed.append(peer)  # still missing (the privacy stage reports its noise)

    def note_next_round(self, peer: str, round: int) -> None:
        """``peer`` says the first round whose message it will send us from
        now on is ``round``: it linked to us after opening an earlier one, or
        its rounds are over. Rounds before that are never waited for."""
        self._next[peer] = round

    def add_neighbour(self, peer: str, degree: int) -> None:
        """A neighbour linked while our round is open. Both ends of a new
        link add each other to the round they have open and send each other
        that round's message (the node does the sending), so the edge counts
        at once and symmetrically, instead of from the next round on."""
        pending = self._pending
        if pending is None or peer in pending.neighbours:
            return
        pending.neighbours[peer] = degree
        contribution = self._future.get(self.round, {}).pop(peer, None)
        if contribution is not None:
            pending.received[peer] = contribution

    def public_state(self) -> tuple[torch.Tensor, int]:
        """Our public model and the round of the message it reflects (what a
        neighbour's replica of us must be set to)."""
        return self.public.clone(), self.last_sent_round

    def quorum_reached(self) -> bool:
        """Whether enough neighbours are done with the open round: those whose
        message for it we hold, and those we heard from for it or a later
        round without holding it. A neighbour's messages arrive in order, so
        the second kind sent theirs and we could not use it (no replica yet,
        too far ahead of us), or they did not count us as a neighbour then:
        nothing more will come for this round, and waiting for it would only
        stretch the round to its deadline. A node that fell behind its
        neighbours would otherwise spend a full deadline on every round and,
        through its own late messages, hold them to that pace too.

        At least one message must be held, as before: a round that heard
        only from neighbours it cannot use is a round alone, and lasts its
        deadline (Sybils claiming far-ahead rounds must not make a node race
        through rounds, and on to their model, while its honest links form).
        One exception: every neighbour is already in a later round, at most
        as far ahead as we buffer (a node that just caught up, whose
        neighbours sent this round before it could file their messages). The
        round is lost; it closes now, and the next ones catch the train
        within a few rounds instead of one deadline each."""
        pending = self._pending
        if pending is None:
            return False
        if not pending.neighbours:
            return True
        need = math.ceil(self.config.quorum * len(pending.neighbours))
        done = sum(1 for p in pending.neighbours if self._done_with_round(p))
        if done >= need and pending.received:
            return True
        return not pending.received and all(
            self.round < self._heard.get(p, -1) <= self.round + self.config.max_future_rounds for p in pending.neighbours
        )

    def _done_with_round(self, peer: str) -> bool:
        """Nothing more will come from ``peer`` for the open round in time:
        its message is in, it sent for this round or a later one already, it
        said it sends nothing for this round (linked after opening its own,
        or finished), it is further behind us than we buffer ahead of it
        (a restarted node far behind adopts a model and skips our round), or
        it never delivered anything and a proven neighbour's message is in."""
        pending = self._pending
        assert pending is not None
        if peer in pending.received:
            return True
        held = self._held.get(peer)
        if held is not None and held[0] == self.round:
            return False  # its message is here, waiting for the replica it needs (being fetched)
        heard = self._heard.get(peer, -1)
        if heard >= self.round or self._next.get(peer, -1) > self.round:
            return True
        if peer not in self._proven and any(p in self._proven for p in pending.received):
            # On probation (it never delivered): used if it comes in time, but
            # a stranger that links and stays silent must not hold rounds a
            # proven neighbour already makes.
            return True
        if peer not in self._next:
            return False  # nothing known of its progress: a new neighbour still sends
        latest = max(heard, self._next[peer] - 1)  # the last round it is known to have reached
        return latest < self.round - self.config.max_future_rounds

    def proven(self, peer: str) -> bool:
        """Whether a closed round used a message of ``peer`` (else it is on probation)."""
        return peer in self._proven

    def has_neighbours(self) -> bool:
        """Whether the open round has any neighbour (linked at open or since)."""
        return self._pending is not None and bool(self._pending.neighbours)

    def missing(self) -> list[str]:
        """Neighbours whose message for the open round has not arrived, those
        that left since it opened included."""
        pending = self._pending
        if pending is None:
            return []
        return [p for p in pending.neighbours if p not in pending.received] + pending.departed

    def finish_round(self, evaluate: bool = False) -> RoundReport:
        """Aggregate what arrived, apply it, advance to the next round."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("no round is open")
        peers = list(pending.received)
        models = [pending.received[p].model for p in peers]  # ŝ_j, public half-step models
        private_half = self.trainer.get_flat()
        private_half += pending.own_delta  # x_i + Δ_i, never noised
        # A separate private model exists only when what we send is noised and we train from our own model.
        separate_private = self.perturber is not None and self.config.train_from is TrainFrom.PRIVATE
        if self.aggregator.combine is Combine.VALUES:
            def combine(base: torch.Tensor) -> AggregationResult:
                offsets = [PeerUpdate(p, m - base, pending.neighbours[p]) for p, m in zip(peers, models, strict=True)]
                return self.aggregator.aggregate(torch.zeros_like(base), offsets, len(pending.neighbours))

            public_result = combine(self.public)
            consensus, weights = public_result.delta, public_result.weights
            private_step = combine(private_half).delta if separate_private else consensus
        else:
            updates = [PeerUpdate(p, pending.received[p].update, pending.neighbours[p]) for p in peers]
            weights = self.aggregator.weigh(pending.sent_update, updates, len(pending.neighbours))
            consensus = _weighted_offsets(models, peers, weights, self.public)
            private_step = _weighted_offsets(models, peers, weights, private_half) if separate_private else consensus
        if not (bool(torch.isfinite(consensus).all()) and bool(torch.isfinite(private_step).all())):
            # An aggregator must never poison the model; keep our own step instead.
            log.error("consensus step is not finite; skipping it", extra={"round": self.round})
            consensus = torch.zeros_like(self.public)
            private_step = consensus
        # The private model mixes *itself* (own update clean) with the neighbours'
        # public models, so its gap to our public model shrinks by W_ii every
        # round instead of accumulating our own noise; the public model takes
        # the same weights over public models only (what receivers can replay).
        if self.config.train_from is TrainFrom.PUBLIC:
            self.trainer.set_flat(self.public + consensus)  # s_i after this round (public is the half step ŝ_i)
        else:
            self.trainer.set_flat(private_half + private_step)
        self._consensus = consensus
        missed = sum(1 for p in pending.neighbours if not self._done_with_round(p))
        absent = tuple(p for p in pending.neighbours if p not in pending.received)
        report = RoundReport(
            round=self.round,
            train_loss=pending.train_loss,
            received=len(peers),
            neighbours=len(pending.neighbours),
            missed=missed,
            excused=len(pending.neighbours) - len(peers) - missed,
            absent=absent,
            late_dropped=self._late_this_round,
            weights=dict(weights),
            delta_norm=float(pending.own_delta.norm()),
            consensus_norm=float(consensus.norm()),
            eval=self.trainer.evaluate() if evaluate else None,
        )
        self._pending = None
        self._late_this_round = 0
        self.round += 1
        self._proven.update(peers)
        self._return_snapshots()
        # Anything buffered for rounds we will never run again is late now.
        for stale in [r for r in self._future if r < self.round]:
            self.late_dropped += len(self._future.pop(stale))
        return report

    def _return_snapshots(self) -> None:
        """The closed round's contributions are gone: a replica whose model no
        buffered contribution still holds may be advanced in place again."""
        held = {id(c.model) for contributions in self._future.values() for c in contributions.values()}
        for replica in self._replicas.values():
            if replica.lent and id(replica.model) not in held:
                replica.lent = False

    # -- catch-up and persistence --------------------------------------------------

    def adopt(self, model: torch.Tensor, round: int) -> None:
        """Take a neighbour's public model and move to ``round`` (a late joiner
        or restarted node catching up). Our own public model restarts from it;
        neighbours' replicas of us will see a gap and re-sync."""
        if model.numel() != self.num_params:
            raise ValueError(f"model has {model.numel()} parameters, expected {self.num_params}")
        self._pending = None
        model = model.to(torch.float32)
        self.trainer.set_flat(model)
        self.public = self.trainer.get_flat()
        self._consensus = torch.zeros_like(self.public)
        self.last_sent_round = round - 1
        self.round = round
        for stale in [r for r in self._future if r < round]:
            del self._future[stale]

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the private model (copies: the
        node writes them in a thread while the next round runs)."""
        return {
            "round": self.round,
            "public": self.public.clone(),
            "consensus": self._consensus.clone(),
            "last_sent_round": self.last_sent_round,
        }

    def restore(self, model: torch.Tensor, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state` plus the private model."""
        self._pending = None
        self.trainer.set_flat(model.to(torch.float32))
        self.public = state["public"].to(self._initial.device, torch.float32).clone()
        self._consensus = state["consensus"].to(self._initial.device, torch.float32).clone()
        self.last_sent_round = int(state["last_sent_round"])
        self.round = int(state["round"])


def _advance(public: torch.Tensor, message: Message) -> None:
    """s += c + Δ̃, in place, as ((s + c) + Δ̃): the one order of float32
    additions that sender and receivers all use. The old ``s + c + Δ̃`` on one
    side and ``s += c + Δ̃`` on the other rounded differently, so replicas
    drifted from the models they mirror by float32 rounding every round."""
    public.add_(message.consensus).add_(message.update)


def _weighted_offsets(
    models: Sequence[torch.Tensor], peers: Sequence[str], weights: Mapping[str, float], base: torch.Tensor
) -> torch.Tensor:
    """Σ_j w_j (model_j − base): the step that moves ``base`` to the weighted average."""
    step = torch.zeros_like(base)
    offset = torch.empty_like(base)  # one scratch vector, not a temporary per neighbour
    for peer, model in zip(peers, models, strict=True):
        weight = weights.get(peer, 0.0)
        if weight:
            torch.sub(model, base, out=offset)
            step.add_(offset, alpha=weight)
    return step


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

    def __post_init__(self) -> None:
        self.trainer = checked(self.trainer)

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
