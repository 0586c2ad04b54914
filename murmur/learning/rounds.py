"""The D-SGD round engine and the asynchronous gossip-learning merge.

Sources: D-SGD (Lian et al., NeurIPS 2017) and gossip learning (Ormándi, Hegedűs,
Jelasity 2013); see also docs/ARCHITECTURE.md, "Round semantics".

Deltas on the wire, models in the mix. Averaging neighbours' *deltas* alone
never brings models together: each delta was computed at another model, the
models drift apart and the average of their steps stops being a descent
direction (measured: 8 nodes, degree 6, non-IID digits, accuracy falls to 0.5
while a complete graph reaches 0.94). So each node also keeps a **public
model** s_i, built only from what it sent, and exact **replicas** of its
neighbours' public models (as CHOCO-SGD does with exact communication):

* round t: train from the private model x_i, giving Δ_i; send one vector,
  ``Message(increment=q_i)`` with q_i = c_i^{t-1} + Δ̃_i, where Δ̃_i is Δ_i
  clipped and noised by the privacy stage (the kept Δ_i never is) and
  c_i^{t-1} the consensus step we took last round. Sender and receivers both
  advance the public model: s_i += q_i.
* aggregate: the aggregator scores what it mixes, each peer's public model
  ŝ_j relative to the point our last round mixed to, r_i = s_i^{t-1} + c_i^{t-1}
  (SybilWall keeps a moving average of these offsets per peer), and the
  engine averages public models with those weights, or (for median, trimmed
  mean, clipped gossip) the aggregator combines the models directly. Nothing
  a peer sends, nor anything a re-sync of its replica installs, is mixed
  unscored. The consensus step is c_i^t = agg(ŝ_j) − s_i. The private model
  takes the same weights with *itself* (own update clean) in place of s_i:
  x_i ← (x_i + Δ_i) + Σ_j w_ij (ŝ_j − (x_i + Δ_i)).

With privacy off, x_i = s_i and this is exactly D-SGD with Metropolis–Hastings
mixing. With privacy on, what crosses the wire (Δ̃ plus c, a function of
public models only) is post-processing of noisy updates. The private model
never contains the node's own noise; its gap to s_i shrinks by W_ii each
round rather than accumulating (an earlier x_i = s_i − Σ own noise kept a
random walk of the node's own uncancelled pairwise terms: DECOR private
accuracy 0.16 at ε = 0.1, bench/privacy.py). Example-level DP-SGD must train
from the public model instead (``RoundConfig.train_from``, :class:`TrainFrom`).

Compressed gossip (CHOCO-SGD, Koloskova et al., ICML 2019; :mod:`murmur.learning.compression`):
with a compressor the message is q_i = C(e_i + c_i^{t-1} + Δ̃_i) and the
node keeps the residual e_i ← e_i + c_i^{t-1} + Δ̃_i − q_i, so what was not
sent goes out in later rounds; both ends still advance by exactly q_i. With
privacy and a random-k mask, the privacy stage clips and noises only the
coordinates sent (the pairwise terms cancel on them when every node draws
the same mask), and the clean remainder it did not send is carried to the
next round (user level; example level drops it, see :meth:`open_round`).
``RoundConfig.consensus_step`` (CHOCO's γ) scales the consensus step, which
harsh compression needs below 1. An outer optimizer
(:mod:`murmur.learning.outer`, DiLoCo) turns each round's total move into
the step actually taken.

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

from murmur.learning.aggregators.base import (
    AggregationResult,
    Aggregator,
    Combine,
    MixingAware,
    NoiseAware,
    PeerUpdate,
    Probed,
)
from murmur.learning.compression import Compressed, Compressor
from murmur.learning.fingerprint import model_digest
from murmur.learning.heap import release_free_heap
from murmur.learning.outer import OuterOptimizer
from murmur.learning.probe import ProbeResult
from murmur.learning.sketch import model_sketch
from murmur.learning.trainers.base import EvalStats, Trainer
from murmur.learning.trainers.checked import checked
from murmur.ratelog import Streak

log = logging.getLogger(__name__)

DIVERGED_LOG_EVERY = 100  # rounds in a row of diverged training between two ERROR lines
MAX_FUTURE_ROUNDS = 2
"""How far ahead of us a neighbour may be and still have its delta buffered.
A faster peer is normal (it closed its round at quorum before we did); one
further ahead is either broken or lying about rounds."""


REFERENCE_ROUNDS = 3
"""How many rounds' references (the point each round scored against) the
engine keeps, so a gossiped record of a peer's public model a round or two
old is scored against the reference of its own round, not today's: the
shared drift between the two would make stale records look alike. Past
rounds' references are kept as their record sketches only (a record carries
a sketch, never a model): whole ones were two more model copies per node."""


class Offer(enum.Enum):
    """What the engine did with an offered message."""

    ACCEPTED = "accepted"
    BUFFERED = "buffered"  # for a future round, kept until that round begins
    LATE = "late"  # for a round already closed: replica advanced, not aggregated
    DUPLICATE = "duplicate"  # a round we already have from this peer
    TOO_EARLY = "too_early"  # further ahead than max_future_rounds: we are behind
    NOT_NEIGHBOUR = "not_neighbour"  # sender is not a neighbour this round
    BAD_SHAPE = "bad_shape"  # wrong length or dtype, non-finite values, or a model they overflow
    NEEDS_SYNC = "needs_sync"  # no replica of this peer or a gap: fetch its public model


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, as the codecs check what goes
    on the wire (:func:`murmur.protocol.codecs._all_finite`): a sum of
    squares is NaN or Inf when any value is, in one BLAS pass, 29 times
    faster than ``isfinite(t).all()`` on 10 M parameters (1.6 ms against
    46 ms, one thread): it runs on every increment and replica a round
    offers. A finite model beyond ~1e19 overflows the sum; only then does
    the exact check run."""
    flat = t.reshape(-1)
    if flat.numel() == 0 or math.isfinite(float(torch.dot(flat, flat))):
        return True
    return bool(torch.isfinite(flat).all())


@runtime_checkable
class TakesRecords(Protocol):
    """Aggregators that score gossiped history records (SybilWall): the
    engine keeps its past references' sketches for them."""

    def receive_record(self, from_peer: str, record: Any) -> Any: ...


@runtime_checkable
class RoundAware(Protocol):
    """Aggregators that keep per-round state (SybilWall stamps its records)."""

    def begin_round(self, round_: int) -> None: ...


@dataclass(frozen=True)
class LocalUpdate:
    delta: torch.Tensor
    loss: float
    from_data: bool = True  # False: a mixing-only round's zero step, which reveals nothing
    diverged: bool = False  # True: training gave a non-finite step, replaced by a zero one

    @classmethod
    def mixing_only(cls, num_params: int, device: torch.device | str = "cpu") -> LocalUpdate:
        """No training: the round only mixes public models (see :meth:`RoundEngine.begin_mixing_round`)."""
        return cls(torch.zeros(num_params, device=device), math.nan, from_data=False)


@dataclass(frozen=True)
class Message:
    """What a node sends each round: the increment of its public model,
    q_i = c_i^{t-1} + Δ̃_i (the consensus step it took last round plus its
    noised update), as the receivers decode it.

    One vector, and the only way anything of a peer reaches our models: the
    replica of its public model advances by it, and the aggregators score it.
    An earlier layout sent (Δ̃, c) and scored only Δ̃, so Sybils could send
    clean updates and carry their poison in the unscored consensus step."""

    ROWS: ClassVar[int] = 1  # vectors in the wire layout: what a receiver sizes its buffers for
    increment: torch.Tensor
    # With a compressor: the increment's wire bytes, exactly what receivers
    # decode to ``increment`` (the node sends these, never a re-encoding).
    compressed: Compressed | None = None

    def stacked(self) -> torch.Tensor:
        """One (ROWS, d) tensor, the wire layout."""
        return self.increment.unsqueeze(0)


Wire = Callable[[torch.Tensor], torch.Tensor]
"""What receivers decode of a stacked (ROWS, d) message (a lossy codec's round trip).

The public model is mirrored by every neighbour's replica, so the sender must
advance it by exactly the decoded values; advancing by the exact ones lets
sender and replicas drift apart by the accumulated rounding (with fp16 and
large pairwise noise, by more than the model's own scale over a run)."""


class Perturber(Protocol):
    """The privacy stage: turns the kept delta into what is sent.

    ``perturb`` works on any vector, the whole delta or the coordinates a
    random-k message carries (then its pairwise terms are drawn for those
    coordinates only); ``clip`` is the clipping it applies, alone (the
    engine carries the clipped-off rest of a compressed round to the next)."""

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor: ...

    def clip(self, delta: torch.Tensor) -> torch.Tensor: ...


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
    # CHOCO-SGD's γ: the fraction of the step toward the neighbours' average
    # taken each round (1: plain D-SGD; harsher compression wants less).
    consensus_step: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if not 0.0 < self.consensus_step <= 1.0:
            raise ValueError(f"consensus_step must be in (0, 1], got {self.consensus_step}")


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

    def advance(self, increment: torch.Tensor) -> None:
        if self.lent:
            self.model, self.lent = self.model.clone(), False
        _advance(self.model, increment)


@dataclass
class _Contribution:
    """A neighbour's message for a round, as the round uses it: the snapshot
    of its public half-step model (see _Replica.lent), which is what the
    aggregator scores. The increment itself is not kept: it has advanced the
    replica, and holding it was one more model copy per neighbour for the
    whole round (and one more copy per offer)."""

    model: torch.Tensor


@dataclass
class _Pending:
    neighbours: dict[str, int]  # peer -> its degree
    own_delta: torch.Tensor  # clean Δ_i (kept); q_i, what we sent, is the driver's to keep
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
        compressor: Compressor | None = None,
        outer: OuterOptimizer | None = None,
    ) -> None:
        if wire is not None and compressor is not None:
            raise ValueError("a compressor encodes the message itself: give it the codec, not a wire")
        if compressor is not None and perturber is not None and compressor.data_dependent:
            raise ValueError("top-k chooses coordinates by their values, which privacy cannot allow")
        self.trainer = checked(trainer)  # every driver gets the contract checks (trainers/checked.py)
        self.aggregator = aggregator
        self.config = config
        self.perturber = perturber
        self.wire = wire
        self.compressor = compressor
        self.outer = outer
        self.round = start_round
        self.num_params = self.trainer.num_params()
        self.late_dropped = 0
        # Rounds in a row whose local step was not finite (see local_update).
        self._diverged = Streak(first=1, every=DIVERGED_LOG_EVERY)
        initial = self.trainer.get_flat()
        self._initial = initial.clone()  # every node starts here (seeded), so round-0 replicas need no sync
        self.public = initial.clone()  # s_i, as of our last message
        # r_i: the model our last round mixed to (s_i + c_i), what WEIGHTS
        # aggregators score neighbours' public models against (finish_round).
        self._reference = initial.clone()
        self._reference_round = start_round
        # Record sketches of the references of the last REFERENCE_ROUNDS
        # rounds by round, for gossiped records of a peer's public model at an
        # earlier round (relative_sketch): made once a round, not per record.
        self._reference_sketches: dict[int, torch.Tensor] = {}
        self.last_sent_round = -1
        # c_i of the last closed round, not yet published; None once the open
        # round's message published it (a zero model held all round otherwise).
        self._consensus: torch.Tensor | None = torch.zeros_like(initial)
        # With a compressor: e_i, what the messages so far left unsent (a
        # function of what was published: public models and noised updates).
        self._residual = torch.zeros_like(initial) if compressor is not None else None
        # With privacy and a random-k mask, user level: the clean update not
        # yet sent (it never leaves the node except clipped and noised).
        self._carry: torch.Tensor | None = None
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
        self._held: dict[str, tuple[int, torch.Tensor]] = {}
        # The first round each peer said it will send us (see note_next_round).
        self._next: dict[str, int] = {}
        # Peers whose message a closed round used: until then a neighbour is
        # on probation and never holds a round that a proven neighbour's
        # message already makes (see _done_with_round).
        self._proven: set[str] = set()
        # Peers whose rounds started from another model than ours (see
        # started_elsewhere): their round 0 is not replayed from our start.
        self._elsewhere: set[str] = set()
        # What neighbours compare with theirs (LearnerInfo.initial, see started_elsewhere).
        self.initial_digest = model_digest(self._initial.detach().cpu().numpy())
        self._late_this_round = 0
        if isinstance(aggregator, Probed):
            aggregator.probe = self._probe_models
        if isinstance(aggregator, NoiseAware):
            aggregator.noised = perturber is not None

    def _probe_models(self, offsets: Sequence[torch.Tensor]) -> ProbeResult | None:
        """The aggregator's probe: losses and outputs on our own data of the
        models ``reference + offset`` (the offsets it was handed this round).

        None (no probe) under privacy: the probe reads the node's private
        data, and the weights it sets shape the consensus step, which is
        published unnoised in the next message (and is where example-level
        DP-SGD takes its next gradient). Weights must then be a function of
        what was released only, or the accountant's bound would not hold."""
        if self.perturber is not None:
            return None
        return self.trainer.probe_models(ShiftedModels(self._reference, offsets))

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
        try:
            stats = self.trainer.train(self.config.local_steps)
        except BaseException:
            # The trainer's code raised mid-way (a bug on a later batch, an
            # out-of-memory): its model is wherever the failed step left it,
            # NaN even. Rewound, a retry starts from x^t and the checkpoint
            # written at stop holds x^t, not the broken model.
            self.trainer.set_flat(before)
            raise
        delta = self.trainer.get_flat()
        delta -= before  # in place: one model-sized vector less at real sizes
        # Rewind to x^t: the round's step is applied in finish_round().
        self.trainer.set_flat(before)
        if not _all_finite(delta):
            # Training diverged (a learning rate too large for the model, or a
            # model already at float32's edge): a NaN step would make our model
            # NaN for good, and every neighbour refuses what we then send.
            # Logged at the first round in a row, then once per
            # DIVERGED_LOG_EVERY: a setting that diverges does so each round
            # (307 lines in 45 s once), and the node's status counts the streak.
            if self._diverged.hit():
                log.error("local training diverged (non-finite step); this round's step is skipped",
                          extra={"event": "training_diverged", "round": self.round, "loss": stats.loss,
                                 "rounds_in_a_row": self._diverged.count})
            delta.zero_()
            return LocalUpdate(delta, float(stats.loss), diverged=True)
        self._diverged.reset()
        return LocalUpdate(delta, float(stats.loss))

    @property
    def diverged_streak(self) -> int:
        """Training rounds in a row whose local step was not finite (skipped)."""
        return self._diverged.count

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
        if isinstance(self.aggregator, NoiseAware):
            # A mixing-only round adds no noise, ours nor anyone's: a bound set
            # by our noised step would judge every neighbour by a step of ~0
            # (a lossy codec's residue) and keep none of them.
            self.aggregator.noised = self.perturber is not None and update.from_data
        if isinstance(self.aggregator, MixingAware):
            self.aggregator.mixing = not update.from_data
        peers = list(committed if committed is not None else neighbours)
        if self.compressor is not None:
            message = self._compress(update, peers)
        else:
            if self.perturber is None or not update.from_data:
                sent = update.delta
            else:
                sent = self.perturber.perturb(update.delta, self.round, peers)
            assert self._consensus is not None  # set by every close, adopt and restore
            message = Message(self._consensus + sent)
            if self.wire is not None:  # a lossy codec: advance by what the receivers' replicas will hold
                message = Message(self.wire(message.stacked())[0])
        _advance(self.public, message.increment)  # exactly as every neighbour's replica of it (offer)
        self._consensus = None  # published: nothing more to keep until the round closes
        self.last_sent_round = self.round
        self._pending = _Pending(dict(neighbours), update.delta, update.loss)
        for peer, contribution in self._future.pop(self.round, {}).items():
            if peer in self._pending.neighbours:
                self._pending.received[peer] = contribution
        return message

    def _compress(self, update: LocalUpdate, peers: Sequence[str]) -> Message:
        """q = C(e + c + Δ̃) and e ← e + c + Δ̃ − q: the message.

        With privacy, Δ̃ is built on the coordinates the message carries:
        random-k's mask is drawn before the data is looked at, the stage
        clips and noises just those values (what is sent is what is
        accounted; with a network-wide mask the pairwise terms of an edge
        land on the same coordinates at both ends and cancel), and at user
        level the clean rest (other coordinates, the clipped-off part) is
        carried to the next round. Example level drops it: a round's message
        must depend only on that round's sampled batch, at a public point.
        """
        compressor = self.compressor
        assert compressor is not None and self._residual is not None
        mask = compressor.mask(self.round, self.num_params, self.public.device)
        if self.perturber is None or not update.from_data:
            published = update.delta
        elif mask is None:
            published = self.perturber.perturb(update.delta, self.round, peers)
        else:
            clean = update.delta if self._carry is None else update.delta + self._carry
            values = clean[mask]
            published = torch.zeros_like(clean)
            published[mask] = self.perturber.perturb(values, self.round, peers)
            if self.config.train_from is TrainFrom.PRIVATE:
                clean = clean.clone() if clean is update.delta else clean
                clean[mask] -= self.perturber.clip(values)
                self._carry = clean
        assert self._consensus is not None
        v = self._residual + self._consensus
        v += published
        compressed = compressor.compress(v, self.round, mask)
        self._residual = v.sub_(compressed.dense)  # exactly what did not go out
        return Message(compressed.dense, compressed)

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

    def offer(self, peer: str, round: int, increment: torch.Tensor) -> Offer:
        """File a neighbour's round message (its public model's increment).
        Never raises for bad peer input."""
        if increment.dtype != torch.float32 or increment.ndim != 1 or increment.numel() != self.num_params:
            return Offer.BAD_SHAPE
        if not _all_finite(increment):
            return Offer.BAD_SHAPE
        self._heard[peer] = max(self._heard.get(peer, -1), round)
        replica = self._replicas.get(peer)
        if replica is None:
            if round != 0 or peer in self._elsewhere:
                return self._hold(peer, round, increment)
            replica = self._replicas[peer] = _Replica(self._initial.clone(), -1)
        if round <= replica.round:
            return Offer.DUPLICATE
        if round > replica.round + 1:
            return self._hold(peer, round, increment)
        # Added into the replica and not kept: the received buffer is the driver's to release.
        replica.advance(increment.to(replica.model.device))
        if not _all_finite(replica.model):
            # Finite increments can still sum past float32's range. A replica
            # at inf made every later consensus step non-finite, so each was
            # skipped, honest neighbours' with it: one peer cut us off from all.
            del self._replicas[peer]
            return Offer.BAD_SHAPE
        replica.round = round
        return self._file(peer, round, _Contribution(replica.snapshot()))

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

    def _hold(self, peer: str, round: int, increment: torch.Tensor) -> Offer:
        """Keep the newest message of a peer we cannot replay yet (NEEDS_SYNC)."""
        held = self._held.get(peer)
        if held is None or round > held[0]:
            self._held[peer] = (round, increment)
        return Offer.NEEDS_SYNC

    def set_replica(self, peer: str, model: torch.Tensor, round: int) -> Offer | None:
        """Install ``peer``'s public model as of its message ``round`` (after
        NEEDS_SYNC), then file the message held back for want of it: the
        model either precedes that message (replayed now, as :meth:`offer`
        would) or already contains it (filed with this model). Returns what
        filing it did, or None when nothing held was usable."""
        if model.numel() != self.num_params or not _all_finite(model):
            raise ValueError("replica has the wrong size or non-finite values")
        replica = self._replicas[peer] = _Replica(model.to(self._initial.device, torch.float32).clone(), round)
        held = self._held.pop(peer, None)
        if held is None:
            return None
        held_round, increment = held
        if held_round == round + 1:
            return self.offer(peer, held_round, increment)
        if held_round == round:
            return self._file(peer, held_round, _Contribution(replica.snapshot()))
        return None  # older than the model (it moved on) or still a gap

    def started_elsewhere(self, peer: str) -> None:
        """``peer``'s rounds started from another model than ours: its round
        0 is held for its model (NEEDS_SYNC, then :meth:`set_replica`) like
        any later round of a peer we hold no replica of, instead of replayed
        from our own start (and a replica we hold of it is dropped: built
        on our start, it would stay off by the two starts' difference)."""
        self._elsewhere.add(peer)
        self._replicas.pop(peer, None)

    def forget(self, peer: str) -> None:
        """A neighbour left: drop its replica (memory), and stop waiting for
        it in the open round unless its message is already in."""
        self._elsewhere.discard(peer)
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
        """Aggregate what arrived, apply it, advance to the next round.

        Touches only the engine, its aggregator and its trainer, and costs
        O(model size) (over a second at 10 M parameters): the node runs it
        in a worker thread, holding every other call on the engine back
        meanwhile (``murmur.node.engineguard``)."""
        report = self._close_round(evaluate)
        release_free_heap()  # the round's temporaries, all freed now, left holes the heap keeps (heap.py)
        return report

    def _close_round(self, evaluate: bool) -> RoundReport:
        pending = self._pending
        if pending is None:
            raise RuntimeError("no round is open")
        peers = list(pending.received)
        models = [pending.received[p].model for p in peers]  # ŝ_j, public half-step models
        # A separate private model exists only when what we send is noised and we train from our own model.
        separate_private = self.perturber is not None and self.config.train_from is TrainFrom.PRIVATE
        if self.aggregator.combine is Combine.VALUES:
            def combine(base: torch.Tensor) -> AggregationResult:
                offsets = [PeerUpdate(p, m - base, pending.neighbours[p]) for p, m in zip(peers, models, strict=True)]
                return self.aggregator.aggregate(torch.zeros_like(base), offsets, len(pending.neighbours))

            public_result = combine(self.public)
            consensus, weights = public_result.delta, public_result.weights
            private_half = self._private_half(pending)
            private_step = combine(private_half).delta if separate_private else consensus
        else:
            # Score what is mixed: every neighbour's public model (everything it
            # sent, and whatever a re-sync of its replica installed) relative to
            # the point our last round mixed to. Relative to that point the
            # honest offsets are each peer's own drift, so honest peers do not
            # look alike; raw increments share the network's consensus drift
            # (SybilWall gave honest peers 0.07 of the weight, accuracy 0.69),
            # and offsets from our own half step share our own update and our
            # own distance to the consensus (honest weight 0.1, accuracy 0.86
            # on a degree-5 network where this gives 0.94).
            reference = self._reference
            own = self.public - reference  # our own step this round (noised update, compression residue)
            updates = [PeerUpdate(p, m - reference, pending.neighbours[p]) for p, m in zip(peers, models, strict=True)]
            weights = self.aggregator.weigh(own, updates, len(pending.neighbours))
            # Each model with its pull on ours bounded (never the replicas themselves); not under
            # privacy: there every pull is mostly noise, and correlated noise (DECOR) cancels only
            # in whole sums (SybilWall's coordinate bound: bench/sybil.py --privacy 10, 100 rounds,
            # no attack, accuracy 0.53-0.56 -> 0.43-0.46 over three runs each).
            bounded = self.perturber is None and self.aggregator.mix_offsets_in_place(own, updates)
            if bounded:
                models = [u.delta.add_(reference) for u in updates]  # our offsets, bounded: made models in place
            del updates, own  # the offsets (unless bounded): n model copies fewer while the steps are summed
            if separate_private:
                private_half = self._private_half(pending)  # made now, not held through the scoring's peak
                consensus = _weighted_offsets(models, peers, weights, self.public)
                private_step = _weighted_offsets(models, peers, weights, private_half)
            else:
                # Bounded models are ours and summed once: each is its own scratch (see _weighted_offsets).
                consensus = private_step = _weighted_offsets(models, peers, weights, self.public, spend=bounded)
                del models  # spent: the bounded ones are freed before our half step is made
                private_half = self._private_half(pending)
        if not (_all_finite(consensus) and _all_finite(private_step)):
            # An aggregator must never poison the model; keep our own step instead.
            log.error("consensus step is not finite; skipping it", extra={"round": self.round})
            consensus = torch.zeros_like(self.public)
            private_step = consensus
        self._consensus = self._apply_round(pending, private_half, consensus, private_step, separate_private)
        self._set_reference(self.public + self._consensus, self.round + 1)
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

    def _private_half(self, pending: _Pending) -> torch.Tensor:
        """x_i + Δ_i, our own half step, never noised (a fresh vector)."""
        half = self.trainer.get_flat()
        half += pending.own_delta
        return half

    def _apply_round(
        self, pending: _Pending, private_half: torch.Tensor, consensus: torch.Tensor, private_step: torch.Tensor,
        separate_private: bool,
    ) -> torch.Tensor:
        """Move the trained model to its next round; return the consensus
        step the next message publishes.

        The private model mixes *itself* (own update clean) with the
        neighbours' public models, so its gap to our public model shrinks by
        W_ii every round instead of accumulating our own noise; the public
        model takes the same weights over public models only (what receivers
        can replay). Training from the public model, the model is s_i (+ e_i,
        what a compressed message left unsent) after this round. Both steps
        are scaled by ``consensus_step``; an outer optimizer turns the
        round's whole move into the step taken, and whatever the model moved
        beyond its half step is what the next message must publish (for the
        separate private model, the public side keeps the plain step)."""
        gamma = self.config.consensus_step
        if gamma != 1.0:
            consensus = consensus * gamma
            private_step = private_step * gamma if separate_private else consensus
        if self.config.train_from is TrainFrom.PUBLIC:
            half = self.public if self._residual is None else self.public + self._residual
            target = half + consensus
        else:
            half = private_half
            target = half + private_step
        if self.outer is None:
            self.trainer.set_flat(target)
            return consensus
        start = self.trainer.get_flat()  # the model this round began from (local_update rewound to it)
        model = self.outer.step(start, target)
        self.trainer.set_flat(model)
        return consensus if separate_private else model - half

    def _set_reference(self, reference: torch.Tensor, round: int) -> None:
        """The point round ``round`` scores against. The sketches of the last
        ``REFERENCE_ROUNDS`` of them are kept for gossiped records, made now
        for an aggregator that takes records (the whole reference is
        replaced next round), and on first use otherwise."""
        self._reference, self._reference_round = reference, round
        if isinstance(self.aggregator, TakesRecords):
            self._reference_sketches[round] = model_sketch(reference)
        for old in [r for r in self._reference_sketches if r <= round - REFERENCE_ROUNDS]:
            del self._reference_sketches[old]

    def beyond_buffer(self, round: int, slack: int = 0) -> bool:
        """Whether a message for ``round`` is further ahead than the engine
        buffers, by more than ``slack`` rounds: :meth:`offer` only advances
        the sender's replica with it (TOO_EARLY), which no round of ours uses
        soon. (A read the engine allows while a round closes in its thread.)"""
        return round > self.round + self.config.max_future_rounds + slack

    def holds(self, peer: str, round: int) -> bool:
        """Whether our replica of ``peer`` already holds its message
        ``round``: :meth:`offer` would call any message for it a duplicate,
        so a driver need not decode one."""
        replica = self._replicas.get(peer)
        return replica is not None and round <= replica.round

    def replica(self, peer: str) -> tuple[torch.Tensor, int] | None:
        """Our replica of ``peer``'s public model and the round of its last
        message in it (what a history record describes), or None."""
        replica = self._replicas.get(peer)
        if replica is None or replica.round < 0:
            return None
        return replica.model, replica.round

    def relative_sketch(self, sketch: torch.Tensor, round: int) -> torch.Tensor | None:
        """A gossiped record's sketch of a peer's public model as of its
        message ``round``, as the sketch of the offset our aggregator scores
        for that round (sketches are linear: ``sketch(model) -
        sketch(reference)``, the reference being the point we mixed to
        before that round). None when we no longer (or never) held that
        round's reference: a record older than ``REFERENCE_ROUNDS`` rounds,
        or from the future."""
        reference = self._reference_sketches.get(round)
        if reference is None and round == self._reference_round:
            reference = self._reference_sketches[round] = model_sketch(self._reference)
        if reference is None:
            return None
        return sketch.to(torch.float32) - reference

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
        if self._residual is not None:
            self._residual = torch.zeros_like(self.public)
        self._carry = None
        if self.outer is not None:
            self.outer.reset()
        self._reference_sketches.clear()
        self._set_reference(self.public.clone(), round)
        self.last_sent_round = round - 1
        self.round = round
        for stale in [r for r in self._future if r < round]:
            del self._future[stale]

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the private model (copies: the
        node writes them in a thread while the next round runs)."""
        state: dict[str, Any] = {
            "round": self.round,
            "public": self.public.clone(),
            "consensus": torch.zeros_like(self.public) if self._consensus is None else self._consensus.clone(),
            "last_sent_round": self.last_sent_round,
        }
        if self._residual is not None:
            state["residual"] = self._residual.clone()
        if self._carry is not None:
            state["carry"] = self._carry.clone()
        if self.outer is not None:
            state.update(self.outer.state())
        return state

    def restore(self, model: torch.Tensor, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state` plus the private model."""
        self._pending = None
        self.trainer.set_flat(model.to(torch.float32))
        self.public = state["public"].to(self._initial.device, torch.float32).clone()
        self._consensus = state["consensus"].to(self._initial.device, torch.float32).clone()
        self.last_sent_round = int(state["last_sent_round"])
        self.round = int(state["round"])
        device = self._initial.device
        if self._residual is not None:
            residual = state.get("residual")
            self._residual = (torch.zeros_like(self.public) if residual is None
                              else residual.to(device, torch.float32).clone())
        carry = state.get("carry")
        self._carry = None if carry is None else carry.to(device, torch.float32).clone()
        if self.outer is not None:
            self.outer.restore(dict(state), device)
        self._reference_sketches.clear()
        self._set_reference(self.public + self._consensus, self.round)


def _advance(public: torch.Tensor, increment: torch.Tensor) -> None:
    """s += q, in place: the one float32 operation sender and receivers all
    use (sender and replicas once rounded differently, ``s + c + Δ̃`` against
    ``s += c + Δ̃``, and drifted apart by float32 rounding every round)."""
    public.add_(increment)


class ShiftedModels(Sequence[torch.Tensor]):
    """``reference + offset`` for each offset, each made as it is read: a
    trainer's probe reads one model at a time, and the whole list at once was
    one more model copy per neighbour while a round was aggregated."""

    def __init__(self, reference: torch.Tensor, offsets: Sequence[torch.Tensor]) -> None:
        self._reference = reference
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._reference + offset for offset in self._offsets[index]]
        return self._reference + self._offsets[index]


def _weighted_offsets(
    models: Sequence[torch.Tensor], peers: Sequence[str], weights: Mapping[str, float], base: torch.Tensor,
    *, spend: bool = False,
) -> torch.Tensor:
    """Σ_j w_j (model_j − base): the step that moves ``base`` to the weighted average.

    ``spend``: the models are the caller's to overwrite (SybilWall's bounded
    models, made for this round), so each holds its own offset instead of a
    scratch vector: the same operations, the same values, one model-sized
    buffer fewer when every neighbour's model is alive (bench/memory.py).
    Never for replicas, which must stay the senders' models bit for bit."""
    step = torch.zeros_like(base)
    scratch = None if spend else torch.empty_like(base)  # one scratch vector, not a temporary per neighbour
    for peer, model in zip(peers, models, strict=True):
        weight = weights.get(peer, 0.0)
        if weight:
            offset = model if scratch is None else scratch
            torch.sub(model, base, out=offset)
            step.add_(offset, alpha=weight)
    return step


@dataclass
class GossipModel:
    """Asynchronous gossip learning (Ormándi, Hegedűs, Jelasity 2013): age-weighted merge.

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
        if model.numel() != self.trainer.num_params() or not _all_finite(model):
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
        """Train in place; a ``train`` that raises leaves the model as it was
        (see :meth:`RoundEngine.local_update`)."""
        before = self.trainer.get_flat()
        try:
            stats = self.trainer.train(steps)
        except BaseException:
            self.trainer.set_flat(before)
            raise
        self.age += stats.steps
        return float(stats.loss)
