"""SybilWall: Sybil-resilient aggregation for decentralized learning,
scored on what is mixed, with every identity's influence bounded.

Werthenbach & Pouwelse, "Towards Sybil Resilience in Decentralized Learning"
(2023): one attacker's Sybils push the model the same way, so what they
contribute looks alike, while honest peers with different data do not; the
FoolsGold core (:mod:`.similarity`) turns that into a weight in [0, 1].

What is compared. The round engine hands a WEIGHTS aggregator each
neighbour's public model as an offset from the point our last round mixed
to (``PeerUpdate.delta``; see :mod:`murmur.learning.rounds`): the very thing
it then mixes, so nothing a peer sends, nor anything a re-sync of its
replica installs, reaches our model without being judged. Peers are
compared by the *distance between their models at the same round*, not by
a cosine of histories, and two of them are alike when they are much nearer
each other than either is to our own model of that round
(:func:`.similarity.anchored_similarity`; the same for their steps and
moving averages, against ours):

* histories of updates no longer exist (a round message is one public
  increment, consensus step included), and sums of increments or of offsets
  depend on which rounds a peer was seen in (a Sybil seen in other rounds
  than its twin looked different);
* a cosine of offsets from our own point shares our own displacement: once
  we mixed in some of a Sybil's model, every honest offset points back from
  it, honest peers look alike and lose weight to the Sybil, which moves our
  point further. Distances between models do not depend on our point.
* the yardstick is ours: honest peers with data of their own are about as
  far from each other as from us. Measured against the rows' own scale (the
  median distance to the nearest other row), Sybils that keep apart by
  offsets of their own set it when they were most of a node's neighbours,
  and that node's two honest neighbours were the one close pair: scored as
  clones, muted, and the node learned alone (bench/sybil.py --quick, 8
  diversified label-flip Sybils: mean 0.853, one node at 0.70; anchored:
  0.893, worst node 0.82).

Clones (one attacker's identities sending one model) are at distance 0.
Memory is kept in the score instead: a peer's ``trust`` drops to its score
at once and climbs back by ``1 / recovery_rounds`` a round, and a peer met
for the first time starts at ``initial_trust`` and earns the rest
(MeritRank's point: influence is built with time, not granted per
identity). A peer caught as a *clone* (its model of a round within
``CLONE_SIMILARITY`` of another identity's, ours or a trusted record's) in
two rounds at least ``CLONE_STRIKE_GAP`` apart starts climbing back only
``clone_hold_rounds`` rounds after the last such evidence. Honest models
coincide once in a while and then part: every node still at the common
initial model in the first rounds, a restarted node and the neighbour whose
model it adopted; one attacker's identities coincide every time they are
compared. A lone Sybil
among our neighbours meets its twin only when a record of the twin reaches
us, every ten to twenty rounds in the default testnet; climbing back at
once between such records, it held 0.1-0.4 of an honest node's weight most
of the time (weight to Sybils 0.02-0.10 over the network).

Bounded influence. Similarity is not enough: a Sybil that adds its own
offset looks as different as it likes. Every offset is therefore clipped to a
robust radius of the round (``clip`` times the (lower) median distance from our
model of the peers the similarity test passed; ClippedGossip, He et al. 2022):
whatever a peer sends moves our model by at most its weight times that
radius, and an attacker that diversifies pays with the share of its pull that
points where it wants. ``probe_margin`` (off by default) adds a check of
loss: a peer whose model does worse on our own data than ours
(:class:`ModelProbe`, mean cross-entropy on a fixed sample of the node's
training data) by up to the margin keeps its weight, by twice the margin or
more gets none, linear between. It was on (0.6) while it was the only
behavioural check, and then held the backdoor (attack rate 0.16-0.93
without it, <= 0.006 with it up to 4 Sybils). With the functional view, the
coordinate bound and anchored similarity it adds no defence and costs
honest peers on other data their weight: bench/sybil.py, every tactic at 0,
2, 4 and 8 Sybils, with it / without it: digits no attack 0.887 / 0.901,
lowest row 0.865 / 0.897, worst attack rate 0.035 / 0.029; mnist-cnn no
attack 0.906 / 0.921, lowest row 0.906 / 0.917, worst attack 0.007 / 0.005.
The behavioural check kept is what peers predict on our data (below).

What peers predict. Distances between models are fooled by an attacker who
adds a random offset of its own to each Sybil: a random direction in
parameter space moves a model's predictions little, so Sybils far apart in
parameters still predict alike, while honest peers trained on other data do
not. With ``functional`` (on by default; one probe call a round serves it and,
when on, the probe margin) each round's neighbours are also compared by their centred
logits on our probe sample, two of them alike when they are much closer to
each other than either is to our own model (:func:`.similarity.anchored_similarity`;
the larger of this and the other views counts). bench/sybil.py --quick, 8
honest digits nodes, the diversified attacker tuned against the old wall
(boost 0.5, diversify 1, fresh 0.5): attack rate at label flip 4 and 8,
backdoor 4 and 8 Sybils 0.000/0.112/0.639/0.871 -> 0.000/0.000/0.205/0.081
(a lone Sybil among our neighbours has no twin to resemble); mnist-cnn
0.000/0.000/0.232/0.703 -> 0.000/0.000/0.039/0.005; no-attack accuracy
unchanged (0.905, 0.926). Re-tuned against it (--tune), the attacker makes
its offsets large enough to show in predictions too (diversify 4, fresh 1:
mean 0.18 on digits, backdoor 0.32 and 0.39; 0.005 on mnist-cnn, where a
node with most of its neighbours Sybils loses accuracy instead).

What a lone Sybil moves alone. A node with one Sybil neighbour has no twin to
compare it with, and a backdoor lives on coordinates honest data never
trains (a trigger's input weights), where nothing pulls it back once mixed
in. With ``coordinate_bound`` (on by default) each neighbour's pull is bounded
coordinate by coordinate on the coordinates most neighbours barely move: only
the way most neighbours pull, about as far (:mod:`.coordinate_bound`;
:meth:`mixed_offsets`, which the engine mixes). bench/sybil.py --quick, tuned
diversified attacker, backdoor at 2 / 4 / 8 Sybils 0.350 / 0.236 / 0.154 ->
0.035 / 0.033 / 0.029, no attack 0.901 -> 0.890 (seeds 0-2: <= 0.035, no
attack 1.1 points lower on average).

Records (history gossip). Each round a node tells each neighbour of one
public model it knows: one of its own neighbours' (distance 1 at the sender)
or a record it was told (relayed), drawn with p ~ lambda*exp(-lambda(d-1)).
A record carries the model's sketch, not the model
(:mod:`murmur.learning.sketch`: distances survive it), with the subject's
own signed statement of digest and sketch (checked before
:meth:`receive_record`), so a record cannot put words in an honest peer's
mouth. We compare it with the sketches of our neighbours' models of the same
round (neighbours among themselves keep their exact distances): a lone Sybil
among our neighbours meets its twins this way. Rules
(each a :class:`RecordVerdict`): records only from a peer we learn from, one
per sender per round, never for a future round nor one too old to compare,
never about ourselves or the sender, never replacing our own observation of
a peer; the hop distance is ours to set (2 from the record's observer, at
least 3 through a relay, whatever the relay claims); one observer vouches
for at most ``records_per_observer`` subjects at a time, and its records
count as evidence only as far as the observer is trusted, and against at
most ``flags_per_observer`` of our neighbours: a gossiped record never
outweighs our own observation of the peer who sent it, and a Sybil that
forges twins of our honest neighbours can mute only a bounded few of them.

Forged twins. A Sybil signs as its made-up twin and as the twin's observer,
so every signature of a forged record holds; only who vouches for it tells
it apart. A record catch holds the accused for ``clone_hold_rounds`` only
on evidence vouched for independently (our own, or two observers'): the
twin one observer alone vouches for may be its own invention, and a Sybil
that forged an honest neighbour's twin twice held it for the whole hold.
On records alone the hold lasts ``record_hold_rounds`` after the last
catch: true records are told again every round, a forger must forge again
and pay for it each time.
All records together count against at most ``record_share`` of our
neighbours (at least one) within recovery_rounds, the observers we have
observed longest first, and a discredited observer's flags free their share:
Sybils around us that each forge a twin of another honest neighbour mute a
bounded share of them, and an honest observer's true record still gets
through. ``vouch_rounds`` (0 by default) makes an observer wait that many
rounds after we first observed it, and again after each record of its that
made one of our neighbours look like a clone.

bench/sybil.py, the tuned forged_records attacker (diversify 2, fresh 2, 2
twins a round), one run per cell, before -> after: digits over 60 rounds, 8
Sybils, label flip accuracy 0.893 -> 0.922 (0.950 without attack), backdoor
attack at 4 and 8 Sybils 0.655 -> 0.017 and 0.769 -> 0.064; --quick (20
rounds) label flip 8 Sybils accuracy 0.833 -> 0.864 (0.901 without attack),
backdoor 8 attack 0.377 -> 0.154; the privacy row (Fashion-MNIST, eps 10,
100 rounds, 4 Sybils) accuracy 0.486 / 0.489 -> 0.651 / 0.648 (0.650
without attack), attack 0.039 / 0.089 -> 0.016 / 0.016 (on digits 0.105 /
0.110 -> 0.444 / 0.293, 0.53 / 0.50 without attack); mnist-cnn (20 rounds)
at 8 Sybils 0.863 / 0.862 -> 0.858 / 0.863 against 0.921, where the
attacker's far-off models isolating a node with mostly Sybil neighbours
cost the most (the same plan without forging: 0.874). A lone Sybil among
identical ones is caught by honest records as before (60 rounds, backdoor at
4 / 8 Sybils: 0.095 / 0.002 -> 0.101 / 0.002). vouch_rounds 20 stops every record in a 20-round
run, but lets that lone Sybil through in a longer one (0.665 / 0.244; 3
rounds: 0.494 / 0.020): an honest observer must be heard again and again to
hold it.

Result: ``(own + sum_j w_j delta_j) / (1 + sum_j w_j)`` over this round's
neighbours (own weight 1, as in the paper).

Rounds: the node calls :meth:`begin_round` with the network round; without
it a local counter that :meth:`weigh` advances is used.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from murmur.errors import ConfigError, DecodeError
from murmur.learning.aggregators.averages import FORGET_ROUNDS, PeerAverages
from murmur.learning.aggregators.base import (
    DTYPE,
    SELF,
    AggregationResult,
    Aggregator,
    ModelProbe,
    PeerUpdate,
    check_inputs,
    falloff,
    register_aggregator,
    require,
)
from murmur.learning.aggregators.coordinate_bound import DEFAULT_COORDINATE_BOUND, bound_offsets
from murmur.learning.aggregators.noise_bound import DEFAULT_NOISE_FLOOR, DEFAULT_NOISE_RATIO, noise_scales
from murmur.learning.aggregators.persistence import DEFAULT_PERSISTENCE, PULLS_KEY, PersistentPull
from murmur.learning.aggregators.similarity import (
    DEFAULT_KAPPA,
    anchored_similarity,
    distance_similarity,
    foolsgold_weights,
    gram_matrix,
    pairwise_gram,
)
from murmur.learning.probe import ProbeResult
from murmur.learning.sketch import LOCAL_SKETCH_ELEMENTS, local_sketch, model_sketch
from murmur.protocol.messages import SKETCH_ELEMENTS

DEFAULT_MEMORY = 0.9  # ~10 rounds
DEFAULT_CLIP = 1.0  # radius = this x the median distance of the peers the similarity test passed
DEFAULT_RECOVERY_ROUNDS = 10  # rounds a muted peer needs to climb back to full trust
DEFAULT_INITIAL_TRUST = 1.0
DEFAULT_CLONE_HOLD_ROUNDS = 50  # rounds a caught clone's trust stays down after the last evidence
DEFAULT_RECORD_HOLD_ROUNDS = 10  # the same, where the evidence is records alone (_held_as_clone)
CLONE_STRIKE_GAP = 3  # rounds between two catches that make a peer a clone (a round is compared in two)
CLONE_SIMILARITY = 0.99  # a distance under 1% of the pair's yardstick (anchored_similarity): the same model
SUSPECT_BOOST = 4.0  # a muted peer we observe is told of 5x as often as a trusted one (records_to_send)
CLONE_WORTH = 0.5  # a record counts as clone evidence when we trust its observer at least this much
# Mean cross-entropy over ours on our data at which a peer starts to lose
# weight; None: off (the module doc says why; 0.6 when it was on).
DEFAULT_PROBE_MARGIN: float | None = None
# Mean cross-entropy over ours on our probe sample past which the tellers of
# records that twin a neighbour go free (:meth:`SybilWallAggregator._guilty`).
DEFAULT_EXEMPT_MARGIN: float | None = 0.6
DEFAULT_MAX_RECORDS = 64  # records held per round compared (each a sketch: 1 KB)
DEFAULT_RECORDS_PER_OBSERVER = 8  # subjects one observer may vouch for at a time
DEFAULT_FLAGS_PER_OBSERVER = 2  # our neighbours one observer's records may count against
DEFAULT_VOUCH_ROUNDS = 0  # rounds we must have observed an observer (and it twinned no one) before its records count
DEFAULT_RECORD_SHARE = 0.25  # share of our neighbours records together may count against (at least one)
DEFAULT_MAX_DISTANCE = 4
GOSSIP_LAMBDA = 0.8
RECORDS_PER_SENDER_PER_ROUND = 1
NEIGHBOUR_MEMORY_ROUNDS = 2  # a peer we aggregated this many rounds ago still counts as a neighbour for records
MEMORY_FORGET_ROUNDS = FORGET_ROUNDS  # a neighbour's moving average outlives its last round by this many
MEMORY_PREFIX = "memory_"  # the memory view's keys in the checkpoint state (its rows under "memory")
COMPARED_ROUNDS = 2  # a record is compared with our neighbours' models of its own round: this one or the last
FLAG_SIMILARITY = 0.5  # a record this close to one of our neighbours counts against it (flags_per_observer)
DIRECT = 1  # hop distance of our own observations
OWN_EVIDENCE = ""  # a clone catch on our own observations (a twin among our neighbours), not on a record
FIRST_HAND = 2  # a record from its observer (the observer signed it)
RELAYED = 3  # the least distance of a relayed record: a relay cannot claim less than that


@dataclass(frozen=True)
class HistoryRecordData:
    """One record, as the node hands it over after checking signatures:
    the sketch of ``subject``'s public model as of its message ``round`` (the
    subject's own signed statement), as the sketch of its offset from our
    reference of that round (:meth:`RoundEngine.relative_sketch`);
    ``observer`` (who signed that it saw it) and the hop ``distance`` the
    sender claims (1: the sender is the observer)."""

    subject: str
    round: int
    offset: torch.Tensor  # float32, SKETCH_ELEMENTS entries: model_sketch(model - reference)
    observer: str
    distance: int = DIRECT


@dataclass(frozen=True)
class RecordChoice:
    """A record to send: whose, and at what distance we hold it (1: we observe it)."""

    subject: str
    distance: int


class RecordVerdict(enum.Enum):
    """What :meth:`SybilWallAggregator.receive_record` did with a record."""

    KEPT = "kept"
    NOT_NEIGHBOUR = "not_neighbour"  # the sender is not a peer we learn from
    FLOOD = "flood"  # the sender already gave us its record this round (refused, not penalised: see misbehaviour)
    ABOUT_US = "about_us"  # about ourselves, or the sender about itself
    FUTURE = "future"  # a round after ours
    STALE = "stale"  # a round too old to compare, or not newer than what we hold
    TOO_FAR = "too_far"  # more hops away than max_distance
    DIRECT = "direct"  # about a peer we observe ourselves
    OBSERVER_FULL = "observer_full"  # the observer already vouches for as many subjects as it may
    NO_ROOM = "no_room"  # as many records held as max_records

    @property
    def misbehaviour(self) -> bool:
        """Whether an honest node never sends this (the node penalises it).
        Not FLOOD: a neighbour whose round is one ahead of ours honestly sends
        two records within one of our rounds (the node drops any more unread,
        :class:`murmur.node.records.RecordBook`)."""
        return self is RecordVerdict.ABOUT_US


@dataclass(frozen=True)
class RecordInfo:
    """Metadata of a held model (read-only view for the node and tests)."""

    round: int
    distance: int  # DIRECT, FIRST_HAND or more (relayed)
    observer: str
    received_from: str | None = None  # None for our own observations


@dataclass(frozen=True)
class SybilWallOptions:
    self_id: str | None = None  # own peer id text; required for record gossip
    kappa: float = DEFAULT_KAPPA
    clip: float | None = DEFAULT_CLIP  # None: no clipping (the paper's SybilWall)
    probe_margin: float | None = DEFAULT_PROBE_MARGIN  # None: no probe; else the loss excess weight starts to go
    # None: every teller of a record that twins one of our neighbours pays (accuser_pays); else
    # not where that neighbour's model does this much worse than ours on our probe sample (:meth:`_guilty`)
    exempt_margin: float | None = DEFAULT_EXEMPT_MARGIN
    functional: bool = True  # also compare neighbours by their outputs on our probe sample (needs a probe)
    persistence: float | None = DEFAULT_PERSISTENCE  # None: no bound on persistent pull (.persistence)
    noise_ratio: float | None = DEFAULT_NOISE_RATIO  # under privacy: pull <= this x our own step (.noise_bound)
    # under privacy (with noise_ratio): offset >= this x the shorter of our step and the median offset (.noise_bound)
    noise_floor: float | None = DEFAULT_NOISE_FLOOR
    coordinate_bound: float | None = DEFAULT_COORDINATE_BOUND  # None: mix whole models (.coordinate_bound)
    recovery_rounds: int = DEFAULT_RECOVERY_ROUNDS
    initial_trust: float = DEFAULT_INITIAL_TRUST
    clone_hold_rounds: int = DEFAULT_CLONE_HOLD_ROUNDS
    record_hold_rounds: int | None = DEFAULT_RECORD_HOLD_ROUNDS  # None: records hold as long as our own evidence
    max_records: int = DEFAULT_MAX_RECORDS
    records_per_observer: int = DEFAULT_RECORDS_PER_OBSERVER
    flags_per_observer: int = DEFAULT_FLAGS_PER_OBSERVER
    vouch_rounds: int = DEFAULT_VOUCH_ROUNDS
    record_share: float = DEFAULT_RECORD_SHARE
    accuser_pays: bool = True
    memory: float = DEFAULT_MEMORY  # weight of the past in each neighbour's moving average of offsets (0: off)
    gossip_lambda: float = GOSSIP_LAMBDA
    max_distance: int = DEFAULT_MAX_DISTANCE
    seed: int = 0  # default rng of records_to_send

    def validate(self) -> None:
        require(self.self_id is None or (self.self_id != "" and self.self_id != SELF),
                "sybilwall: self_id must be a peer id")
        require(self.kappa > 0, "sybilwall: kappa must be > 0")
        require(0.0 <= self.memory < 1.0, "sybilwall: memory must be in [0, 1)")
        require(self.clip is None or self.clip > 0, "sybilwall: clip must be > 0")
        require(self.probe_margin is None or self.probe_margin > 0, "sybilwall: probe_margin must be > 0")
        require(self.exempt_margin is None or self.exempt_margin > 0, "sybilwall: exempt_margin must be > 0")
        require(self.persistence is None or 0.0 <= self.persistence < 1.0, "sybilwall: persistence must be in [0, 1)")
        require(self.noise_ratio is None or self.noise_ratio > 0, "sybilwall: noise_ratio must be > 0")
        require(self.noise_floor is None or 0 < self.noise_floor < (self.noise_ratio or math.inf),
                "sybilwall: noise_floor must be > 0 and below noise_ratio")
        require(self.coordinate_bound is None or self.coordinate_bound > 0, "sybilwall: coordinate_bound must be > 0")
        require(self.recovery_rounds >= 1, "sybilwall: recovery_rounds must be >= 1")
        require(0.0 <= self.initial_trust <= 1.0, "sybilwall: initial_trust must be in [0, 1]")
        require(self.clone_hold_rounds >= 0, "sybilwall: clone_hold_rounds must be >= 0")
        require(self.record_hold_rounds is None or self.record_hold_rounds >= 0,
                "sybilwall: record_hold_rounds must be >= 0")
        require(self.max_records >= 0, "sybilwall: max_records must be >= 0")
        require(self.records_per_observer >= 0, "sybilwall: records_per_observer must be >= 0")
        require(self.flags_per_observer >= 0, "sybilwall: flags_per_observer must be >= 0")
        require(self.vouch_rounds >= 0, "sybilwall: vouch_rounds must be >= 0")
        require(0.0 < self.record_share <= 1.0, "sybilwall: record_share must be in (0, 1]")
        require(self.gossip_lambda > 0, "sybilwall: gossip_lambda must be > 0")
        require(self.max_distance >= FIRST_HAND, "sybilwall: max_distance must be >= 2")


@dataclass
class _Standing:
    """What we know of one neighbour."""

    last_seen: int  # round of our last direct observation
    trust: float  # weight factor: drops to the score at once, climbs back by 1/recovery_rounds a round
    score: float = 1.0  # its similarity weight the last time we scored it
    vouched_from: int = 0  # its records count from this round on (observed vouch_rounds, twinned no one since)


@dataclass
class _Held:
    """One model of one round: a neighbour's or ours (direct: its offset while
    its round is scored, its local sketch after, and its record sketch) or a
    record's (its record sketch only).

    Past its round a direct model is kept as its local sketch alone
    (:data:`~murmur.learning.sketch.local_sketch`, 128 KB): holding the
    offsets of the last round, each neighbour's moving average and
    persistent pull in full took 11 model copies with 3 neighbours, 420 MB
    for a 10M-parameter model, on top of what the engine holds. The sketch
    is linear, so the steps and averages of sketches are the sketches of the
    steps and averages, and it embeds models of up to 32768 parameters
    exactly."""

    offset: torch.Tensor | None  # the round's offset while it is scored; None past it, and for a record
    sketch: torch.Tensor  # model_sketch: what a record carries
    info: RecordInfo
    local: torch.Tensor | None = None  # local_sketch of a direct model; None for a record

    @property
    def direct(self) -> bool:
        return self.local is not None

    @property
    def kept(self) -> torch.Tensor:
        """Its local sketch (direct models only)."""
        assert self.local is not None, "a record has no local sketch"
        return self.local

    @property
    def exact(self) -> torch.Tensor:
        """The offset while its round is scored, its local sketch after (direct models only)."""
        return self.kept if self.offset is None else self.offset


@dataclass
class _Round:
    """Per-round bookkeeping of record intake and output."""

    round: int
    records_from: dict[str, int] = field(default_factory=dict)  # sender -> records taken this round
    served: set[str] = field(default_factory=set)  # neighbours we sent a record to this round


@register_aggregator("sybilwall")
class SybilWallAggregator(Aggregator):
    Options = SybilWallOptions
    options: SybilWallOptions

    def __init__(self, options: SybilWallOptions | None = None) -> None:
        super().__init__(options)
        self._forget_all()
        self._dim: int | None = None
        self._rng = random.Random(self.options.seed)
        self.probe: ModelProbe | None = None  # set by the round engine when its trainer can probe
        self.noised = False  # set by the round engine: whether messages are noised (privacy on)
        self.mixing = False  # set by the round engine: a mixing-only round (see _kept_trust)

    def _forget_all(self) -> None:
        """What a checkpoint restores, fresh (a new aggregator, or a checkpoint that failed to load)."""
        self._standing: dict[str, _Standing] = {}
        self._held: dict[int, dict[str, _Held]] = {}  # round -> subject -> its model of that round
        self._own: dict[int, _Held] = {}  # round -> our own model of that round (the similarity's anchor)
        self._own_memory: torch.Tensor | None = None  # our own moving average, as _memory's
        # neighbour -> moving average of its offsets' local sketches (a plain one: it compares directions)
        self._memory = PeerAverages(self.options.memory, warm_up=False, forget_rounds=MEMORY_FORGET_ROUNDS,
                                    name="sybilwall memory")
        # peer -> round it was caught as a clone -> whose evidence (OWN_EVIDENCE or a record's observer)
        self._catches: dict[str, dict[int, set[str]]] = {}
        # observer -> our neighbours its records resembled -> round first seen (flags_per_observer)
        self._flags: dict[str, dict[str, int]] = {}
        # neighbour -> observer of a record that counted and resembled it -> last round it did (record_share)
        self._record_flagged: dict[str, dict[str, int]] = {}
        self._round = _Round(0)
        self._pull = None if self.options.persistence is None else PersistentPull(self.options.persistence)

    # rounds ----------------------------------------------------------------

    @property
    def round(self) -> int:
        return self._round.round

    def begin_round(self, round_: int) -> None:
        """Align with the network round (stamps observations; per-round record budgets)."""
        if round_ < 0:
            raise ValueError("round must be >= 0")
        if round_ != self._round.round:
            self._round = _Round(round_)
            self._forget_old_rounds()

    def _forget_old_rounds(self) -> None:
        for r in [r for r in self._held if r <= self._round.round - COMPARED_ROUNDS]:
            del self._held[r]
        for r in [r for r in self._own if r <= self._round.round - COMPARED_ROUNDS]:
            del self._own[r]

    # aggregation -------------------------------------------------------------

    def aggregate(self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int) -> AggregationResult:
        weights = self.weigh(own, updates, own_degree)
        bounded = self.mixed_offsets(own, updates)
        offsets = [u.delta for u in updates] if bounded is None else bounded
        delta = own * weights[SELF]
        for u, offset in zip(updates, offsets, strict=True):
            delta.add_(offset, alpha=weights[u.peer])
        return AggregationResult(delta, weights)

    def mixed_offsets(self, own: torch.Tensor, updates: Sequence[PeerUpdate]) -> list[torch.Tensor] | None:
        """Each neighbour's offset with its pull on our model bounded
        coordinate by coordinate (``coordinate_bound``, see
        :mod:`.coordinate_bound`): what a lone Sybil moves alone, a backdoor
        trigger's weights, is cut however its whole model scores."""
        if self.options.coordinate_bound is None:
            return None
        return bound_offsets(own, [u.delta for u in updates], self.options.coordinate_bound)

    def mix_offsets_in_place(self, own: torch.Tensor, updates: Sequence[PeerUpdate]) -> bool:
        """:meth:`mixed_offsets` into the updates' own deltas (no copy per neighbour)."""
        if self.options.coordinate_bound is None:
            return False
        bound_offsets(own, [u.delta for u in updates], self.options.coordinate_bound, in_place=True)
        return True

    def weigh(self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int) -> dict[str, float]:
        """Score this round's neighbours (similarity, trust, clip, probe) and weigh them."""
        check_inputs(own, updates)
        peers = [u.peer for u in updates]
        if self.options.self_id is not None and self.options.self_id in peers:
            raise ValueError("an update claims to come from this node")
        if self._dim is None:
            self._dim = own.numel()
        elif self._dim != own.numel():
            raise ValueError("sybilwall: model dimension changed")
        now = self._round.round
        held = self._held.setdefault(now, {})
        info = RecordInfo(now, DIRECT, self.options.self_id or SELF)
        own_local, kept = local_sketch(own), {u.peer: local_sketch(u.delta) for u in updates}
        for u in updates:
            held[u.peer] = _Held(u.delta, model_sketch(u.delta), info, kept[u.peer])
        own_held = self._own[now] = _Held(own, model_sketch(own), info, own_local)
        self._fold_memory(own_local, kept)
        if self._pull is not None:  # on local sketches: only each pull's length is used
            self._pull.observe(own_local, [PeerUpdate(p, sketch) for p, sketch in kept.items()])
        if self.mixing:
            trust, probed = self._kept_trust(peers, now), None
        else:
            probed = self._run_probe(own, updates)
            trust = self._update_trust(peers, self._score(peers, probed), now)
        for h in (*held.values(), own_held):
            h.offset = None  # past its round a model is its local sketch: the offsets are the engine's
        self._round = _Round(now + 1)
        self._forget_old_rounds()
        if not updates:
            return {SELF: 1.0}
        factors = trust.clone()
        noise_ratio = self.options.noise_ratio if self.noised else None
        if noise_ratio is not None:
            # Replaces the round's clip: honest noised offsets bunch around
            # the median, which cut those above it every round (no attack,
            # epsilon 1: 0.689 with both, 0.734 without the clip).
            factors *= noise_scales(own, updates, noise_ratio, self.options.noise_floor)
        elif self.options.clip is not None:
            factors *= self._clip_scales(own, updates, trust)
        if self._pull is not None:
            factors *= self._pull.scales(updates, trust)
        if self.options.probe_margin is not None and probed is not None:
            factors *= self._probe_scales(probed)
        total = 1.0 + float(factors.sum())
        weights = {SELF: 1.0 / total}
        weights.update(zip(peers, (float(x) / total for x in factors.tolist()), strict=True))
        return weights

    def _score(self, peers: Sequence[str], probed: ProbeResult | None = None) -> torch.Tensor:
        """Each peer's FoolsGold-core weight over the models held for this
        round and the last: similarity of two subjects is that of their
        models of the same round (the larger of the two rounds'), or of what
        they predict on our data (``functional``), whichever is larger."""
        if not peers:
            return torch.ones(0, dtype=torch.float64)
        subjects = sorted({s for held in self._held.values() for s in held})
        index = {s: i for i, s in enumerate(subjects)}
        groups = [(held, names, self._similarity(held, names, self._own.get(r)))
                  for r, held in self._held.items() if len(names := list(held)) >= 2]
        discredited, flagging = self._note_flags(groups)
        guilty = self._guilty(peers, probed)
        cs = torch.zeros(len(subjects), len(subjects), dtype=torch.float64)
        self._forget_record_flags(discredited)
        for held, names, sim in groups:
            worth = torch.tensor([self._worth(held[s].info, discredited) for s in names], dtype=torch.float64)
            worth = self._ration(held, names, sim, worth, len(peers))
            self._note_clones(held, names, sim, worth)
            sim = sim * worth[:, None] * worth[None, :]
            idx = torch.tensor([index[s] for s in names])
            cs[idx[:, None], idx[None, :]] = torch.maximum(cs[idx[:, None], idx[None, :]], sim)
            if self.options.accuser_pays:
                self._implicate(cs, index, held, names, sim, guilty)
        self._spend_vouching(flagging)
        for sim, names in self._direct_signals(peers):
            idx = torch.tensor([index[s] for s in names])
            cs[idx[:, None], idx[None, :]] = torch.maximum(cs[idx[:, None], idx[None, :]], sim)
        if self.options.functional and probed is not None and len(peers) >= 2:
            idx = torch.tensor([index[p] for p in peers])
            cs[idx[:, None], idx[None, :]] = torch.maximum(cs[idx[:, None], idx[None, :]], _functional(probed))
        weights = foolsgold_weights(cs, self.options.kappa)
        return weights[torch.tensor([index[p] for p in peers])]

    @staticmethod
    def _similarity(held: Mapping[str, _Held], names: Sequence[str], own: _Held | None) -> torch.Tensor:
        """Distance similarity of one round's models: exact between our
        neighbours alone; with records among them, over everyone's sketches,
        then the neighbours' pairs set from their exact distances. Anchored
        on our own model of that round where we have it
        (:func:`anchored_similarity`)."""
        direct = [i for i, s in enumerate(names) if held[s].direct]
        if len(direct) == len(names):
            return _alike([held[s].exact for s in names], None if own is None else own.exact)
        sim = _alike([held[s].sketch for s in names], None if own is None else own.sketch)
        if len(direct) >= 2:
            exact = _alike([held[names[i]].exact for i in direct], None if own is None else own.exact)
            idx = torch.tensor(direct)
            sim[idx[:, None], idx[None, :]] = exact
        return sim

    def _note_clones(self, held: Mapping[str, _Held], names: Sequence[str], sim: torch.Tensor,
                     worth: torch.Tensor) -> None:
        """Mark the neighbours whose model of a round is another identity's:
        compared with our own neighbours' or with records whose observer we
        trust at least CLONE_WORTH. Not the neighbour who told the record
        (``accuser_pays`` costs it that round's score only): honest peers
        relay true records of Sybil twins all the time, and held with the
        accused they lost their weight for the whole hold (113 of 1304
        honest weights zero in a default testnet run). Same-round models
        only: the steps and averages of honest peers can come that close,
        their models do not. Each catch keeps whose evidence it was (ours,
        or the record's observer) for :meth:`_held_as_clone`."""
        now = self._round.round
        n = len(names)
        close = (sim >= CLONE_SIMILARITY) & (worth[:, None] >= CLONE_WORTH) & (worth[None, :] >= CLONE_WORTH)
        close &= ~torch.eye(n, dtype=torch.bool)
        for i, j in close.nonzero().tolist():
            accused, twin = held[names[i]].info, held[names[j]].info
            if accused.distance == DIRECT:
                source = OWN_EVIDENCE if twin.distance == DIRECT else twin.observer
                self._catches.setdefault(names[i], {}).setdefault(now, set()).add(source)
        hold = self.options.clone_hold_rounds
        for peer, rounds in list(self._catches.items()):
            last = max(rounds)
            if last <= now - hold:
                del self._catches[peer]
                continue
            for r in [r for r in rounds if r < last - hold]:
                del rounds[r]

    def _held_as_clone(self, peer: str, now: int) -> bool:
        """Caught in two rounds CLONE_STRIKE_GAP apart, the later one less
        than clone_hold_rounds ago (and the earlier within that of it), on
        evidence vouched for independently: our own (a twin among our
        neighbours) or the records of two observers. One observer alone,
        however often it tells, only costs the accused its score in those
        rounds: a Sybil that forged twins of an honest neighbour twice held
        it for the whole hold, and no one vouched for the twin but the
        Sybil.

        Records alone hold for ``record_hold_rounds`` after their last
        catch, our own evidence for the whole ``clone_hold_rounds``. Honest
        observers tell a real Sybil's twin again every round, so its hold is
        renewed as long as it lasts; a forger must forge again to keep its
        victim muted, and pays for each twin (``accuser_pays``) until its
        records no longer count. Under privacy, where muting an honest
        neighbour also leaves its pairwise noise uncancelled, 8 forging
        Sybils cost honest nodes 22 points with the long hold
        (bench/sybil.py --privacy 1: 0.48-0.51 against 0.73) and 4-5 with
        this (0.68-0.69 against 0.73-0.74, three runs); a lone identical
        backdoor Sybil stays held (attack 0.027-0.037 at 4 Sybils)."""
        rounds = self._catches.get(peer)
        record_hold = self.options.record_hold_rounds
        if rounds and record_hold is not None:
            rounds = {r: kept for r, sources in rounds.items()
                      if (kept := {s for s in sources if s == OWN_EVIDENCE or r > now - record_hold})}
        if not rounds or max(rounds) <= now - self.options.clone_hold_rounds:
            return False
        if max(rounds) - min(rounds) < CLONE_STRIKE_GAP:
            return False
        sources = set().union(*rounds.values())
        return OWN_EVIDENCE in sources or len(sources) >= 2

    def _fold_memory(self, own: torch.Tensor, offsets: Mapping[str, torch.Tensor]) -> None:
        """Each neighbour's moving average of its offsets (``memory``), and
        ours: of their local sketches, the sketches of the averages."""
        beta = self.options.memory
        if beta <= 0:
            return
        now = self._round.round
        for peer, offset in offsets.items():
            self._memory.fold(peer, offset, now)
        self._memory.forget(now)  # a peer gone this long starts afresh when it returns; churn does not grow it
        if self._own_memory is None:
            self._own_memory = own.clone()
        else:
            self._own_memory.mul_(beta).add_(own, alpha=1.0 - beta)

    def _direct_signals(self, peers: Sequence[str]) -> list[tuple[torch.Tensor, list[str]]]:
        """Two more views of this round's neighbours, each compared by distance:
        their steps (how far each model moved since last round: a Sybil with a
        fixed offset of its own moves exactly as its twins do) and their
        moving averages (fresh noise each round averages out there, a
        direction they all share does not). An attacker must dodge all three."""
        out: list[tuple[torch.Tensor, list[str]]] = []
        now = self._round.round
        current, last = self._held.get(now, {}), self._held.get(now - 1, {})
        stepped = [p for p in peers if p in last and last[p].direct]
        own_now, own_last = self._own.get(now), self._own.get(now - 1)
        own_step = None if own_now is None or own_last is None else own_now.kept - own_last.kept
        if len(stepped) >= 2:  # on local sketches: the last round's offsets are not kept
            out.append((_alike([current[p].kept - last[p].kept for p in stepped], own_step), stepped))
        remembered = [p for p in peers if p in self._memory]
        if self.options.memory > 0 and len(remembered) >= 2:
            out.append((_alike([self._memory[p] for p in remembered], self._own_memory), remembered))
        return out

    @staticmethod
    def _implicate(cs: torch.Tensor, index: Mapping[str, int], held: Mapping[str, _Held], names: Sequence[str],
                   sim: torch.Tensor, guilty: frozenset[str]) -> None:
        """A record that makes one of our neighbours look like a clone
        implicates the neighbour who told it as much as the accused: either
        the accused is one of an attacker's clones, or the teller made the
        twin up. A gossiped record never weighs more than the direct
        observation of the peer who brought it. Not where we already hold
        the accused ``guilty`` (:meth:`_guilty`)."""
        for i, subject in enumerate(names):
            info = held[subject].info
            teller = info.received_from
            if info.distance == DIRECT or teller is None or teller not in index:
                continue
            for j, other in enumerate(names):
                if held[other].info.distance == DIRECT and other != teller and other not in guilty:
                    a, b = index[teller], index[other]
                    value = float(sim[i, j])
                    if value > cs[a, b]:
                        cs[a, b] = cs[b, a] = value

    def _note_flags(self, groups: Sequence[tuple[Mapping[str, _Held], list[str], torch.Tensor]]
                    ) -> tuple[set[str], set[str]]:
        """Observers whose records resembled more than flags_per_observer of
        our own neighbours within recovery_rounds (twins forged to mute honest
        peers mute a bounded few, then their observer is no longer heard),
        and the observers whose records resemble one of our neighbours now
        (:meth:`_spend_vouching`)."""
        now = self._round.round
        flagging: set[str] = set()
        for held, names, sim in groups:
            own = [j for j, s in enumerate(names) if held[s].info.distance == DIRECT]
            for i, subject in enumerate(names):
                info = held[subject].info
                if info.distance == DIRECT:
                    continue
                flags = self._flags.setdefault(info.observer, {})
                for j in own:
                    if float(sim[i, j]) > FLAG_SIMILARITY:
                        flags.setdefault(names[j], now)
                    if float(sim[i, j]) >= CLONE_SIMILARITY:
                        flagging.add(info.observer)
        for observer, flags in list(self._flags.items()):
            for peer in [p for p, r in flags.items() if r <= now - self.options.recovery_rounds]:
                del flags[peer]
            if not flags:
                del self._flags[observer]
        discredited = {o for o, flags in self._flags.items() if len(flags) > self.options.flags_per_observer}
        return discredited, flagging

    def _forget_record_flags(self, discredited: set[str]) -> None:
        """Neighbours a counted record resembled more than recovery_rounds ago,
        or only records of observers no longer heard, no longer take up the
        share (:meth:`_ration`): a Sybil discredited for its flags frees
        what it took, for an honest observer's true record."""
        now = self._round.round
        for peer, observers in list(self._record_flagged.items()):
            for observer in [o for o, r in observers.items()
                             if r <= now - self.options.recovery_rounds or o in discredited]:
                del observers[observer]
            if not observers:
                del self._record_flagged[peer]

    def _ration(self, held: Mapping[str, _Held], names: Sequence[str], sim: torch.Tensor, worth: torch.Tensor,
                neighbours: int) -> torch.Tensor:
        """``worth`` with the records beyond the share set to 0: records
        together count against at most ``record_share`` of our neighbours (at
        least one) within recovery_rounds, the records of the observers
        vouched for longest (observed longest, no twin told since) first. The
        per-observer bounds hold each attack edge; this holds them all
        together: Sybils around us that each forge a twin of another honest
        neighbour in one round mute a bounded share of them, and an honest
        observer's true record still gets through once a discredited
        observer's flags have freed their share."""
        now = self._round.round
        budget = max(1, math.floor(self.options.record_share * neighbours))
        own = [j for j, s in enumerate(names) if held[s].info.distance == DIRECT]
        counted = [i for i, s in enumerate(names) if held[s].info.distance != DIRECT and float(worth[i]) > 0]
        counted.sort(key=lambda i: (self._standing[held[names[i]].info.observer].vouched_from, names[i]))
        out = worth.clone()
        for i in counted:
            targets = {names[j] for j in own if float(sim[i, j]) > FLAG_SIMILARITY}
            if len(self._record_flagged.keys() | targets) > budget:
                out[i] = 0.0
                continue
            for target in targets:
                self._record_flagged.setdefault(target, {})[held[names[i]].info.observer] = now
        return out

    def _spend_vouching(self, flagging: set[str]) -> None:
        """An observer whose record made one of our neighbours look like a
        clone (the same model) has spent its vouching: its records count
        again only after ``vouch_rounds`` more rounds. With vouch_rounds > 0
        one observer (one attack edge) mutes at most one neighbour per
        vouch_rounds."""
        again = self._round.round + 1 + self.options.vouch_rounds
        for observer in flagging:
            standing = self._standing.get(observer)
            if standing is not None:
                standing.vouched_from = max(standing.vouched_from, again)

    def _worth(self, info: RecordInfo, discredited: set[str]) -> float:
        """How much a held model counts as evidence: ours fully; a record as
        far as its observer is trusted once vouched for (observed for
        ``vouch_rounds`` rounds, and no twin it told in that time), not at
        all from a discredited one or one we do not observe ourselves."""
        if info.distance == DIRECT:
            return 1.0
        observer = self._standing.get(info.observer)
        if observer is None or info.observer in discredited or self._round.round < observer.vouched_from:
            return 0.0
        return observer.trust

    def _kept_trust(self, peers: Sequence[str], now: int) -> torch.Tensor:
        """Trust as training left it, in a mixing-only round: no one trains
        or adds noise and honest models only converge, and converging models
        look alike, to the clone test most of all. Scored, honest neighbours
        that had converged together were muted as clones while Sybils with
        a fresh offset each round stood out as unlike: a default testnet node
        gave its two Sybils 0.67 of its weight in the last mixing rounds. Nor
        does trust climb back: a muted peer stays muted. A peer first met now
        starts at ``initial_trust``, as in training."""
        out = []
        for peer in peers:
            standing, _ = self._standing_of(peer, now)
            standing.last_seen = now
            out.append(standing.trust)
        return torch.tensor(out, dtype=torch.float64)

    def _standing_of(self, peer: str, now: int) -> tuple[_Standing, bool]:
        """``peer``'s standing, and whether we met it only now (then at ``initial_trust``)."""
        standing = self._standing.get(peer)
        if standing is not None:
            return standing, False
        standing = self._standing[peer] = _Standing(now, self.options.initial_trust,
                                                    vouched_from=now + self.options.vouch_rounds)
        return standing, True

    def _update_trust(self, peers: Sequence[str], scores: torch.Tensor, now: int) -> torch.Tensor:
        step = 1.0 / self.options.recovery_rounds
        out = []
        for peer, score in zip(peers, scores.tolist(), strict=True):
            standing, new = self._standing_of(peer, now)
            if not new and not self._held_as_clone(peer, now):  # a clone climbs back only clone_hold_rounds after
                standing.trust = min(1.0, standing.trust + step)
            standing.trust = min(standing.trust, score)
            standing.score = score
            standing.last_seen = now
            out.append(standing.trust)
        return torch.tensor(out, dtype=torch.float64)

    def _clip_scales(self, own: torch.Tensor, updates: Sequence[PeerUpdate], trust: torch.Tensor) -> torch.Tensor:
        """min(1, tau / |offset_j - own|): each peer's pull on our model is at
        most its weight times tau, tau the median pull of the peers we trust
        at all (of every peer when we trust none)."""
        assert self.options.clip is not None
        distances = torch.stack([torch.linalg.vector_norm(u.delta - own) for u in updates]).to(torch.float64).cpu()
        trusted = distances[trust > 0]
        tau = self.options.clip * float((trusted if trusted.numel() else distances).median())
        return torch.where(distances > tau, tau / distances.clamp_min(1e-300), 1.0)

    def _guilty(self, peers: Sequence[str], probed: ProbeResult | None) -> frozenset[str]:
        """Neighbours we already hold guilty, so that a record twinning one of
        them implicates no teller (:meth:`_implicate`): those held as clones
        on independent evidence (:meth:`_held_as_clone`: ours, or two
        observers'), and those whose model does more than ``exempt_margin``
        worse than ours on our probe sample (what our own data says).

        Held clones: such a record tells us nothing we do not hold already,
        and under privacy, where there is no probe, it was what an honest
        teller paid for. Next to a lone Sybil of ours, honest neighbours who
        observe its twins tell of them most rounds (a muted subject is told
        of SUSPECT_BOOST times as often), and each telling cost the teller
        that round's score: trust 0.39-0.41 on average at the two nodes with
        one Sybil neighbour, and under noise an honest neighbour weighed
        down also leaves its pairwise noise uncancelled (bench/sybil.py
        --privacy 1, 8 identical label-flip Sybils: accuracy 0.670 against
        0.73 without attack; 0.734 with this). A forger whose twins reach
        the hold (two Sybils around us forging the same victim) then goes
        free too, but what it holds stays bounded by ``record_share`` and
        ``flags_per_observer``, and its records lapse ``record_hold_rounds``
        after it stops: 8 forging Sybils, label flip 0.684 -> 0.691, backdoor
        0.698 -> 0.684 (within the +-0.03 DECOR's fresh secrets give runs).

        The probe: an honest peer whose neighbours include an attacker's identical
        Sybils tells us of their twins every round, and paid for each telling
        with that round's score, so next to a lone Sybil of ours it lost most
        of its weight for the whole run (bench/sybil.py --quick --seed 2,
        8 identical label-flip Sybils: honest trust 0.02-0.7 at the five
        nodes with one Sybil neighbour, accuracy 0.907 against 0.931 without
        attack; 0.925 with this at a margin of 0.3 to 1.0, 0.920 at 1.5;
        with 8 identical backdoor Sybils, the grid's worst row then, 0.920 at
        0.6 and 0.911 at 1.0).

        The loss is a weak signal, so it only spares a teller, never mutes
        anyone. One round's excess over ours on that grid: a label-flip
        Sybil's median 2.0 (over 0.6 in every round), a backdoor Sybil's 1.15
        (over 0.6 in 85%), an honest neighbour's 0.7 with other data (over
        0.6 in 55%). So a forger that twins an honest neighbour goes free in
        about half its rounds too; what its twins can mute stays bounded by
        the record rules (``flags_per_observer``, ``record_share``), and the
        forged_records rows did not move (2, 4 and 8 Sybils, three seeds).
        Never under privacy: the round engine gives no probe there (weights
        may depend on released data only), and only held clones spare a teller."""
        now = self._round.round
        held = {p for p in peers if self._held_as_clone(p, now)}
        margin = self.options.exempt_margin
        if margin is None or probed is None:
            return frozenset(held)
        ours = probed.losses[0]
        return frozenset(held | {p for p, loss in zip(peers, probed.losses[1:], strict=True) if loss - ours > margin})

    def _run_probe(self, own: torch.Tensor, updates: Sequence[PeerUpdate]) -> ProbeResult | None:
        """Our model's and each neighbour's losses and outputs on our probe
        sample (one probe a round, for both of its uses), or None when off."""
        if self.probe is None or not updates or (self.options.probe_margin is None and not self.options.functional):
            return None
        return self.probe([own, *(u.delta for u in updates)])

    def _probe_scales(self, probed: ProbeResult) -> torch.Tensor:
        """Full weight while a peer's model does at most ``probe_margin`` worse
        (mean cross-entropy) on our own data than our own model, none from
        twice that on, linear between: honest neighbours trained on other
        data do somewhat worse on ours, a flipped label does much worse."""
        assert self.options.probe_margin is not None
        ours, theirs = probed.losses[0], torch.tensor(probed.losses[1:], dtype=torch.float64)
        excess = theirs - ours
        return falloff(excess / self.options.probe_margin)

    def score_of(self) -> dict[str, float]:
        """Neighbour id -> current trust (diagnostics)."""
        return {p: s.trust for p, s in self._standing.items()}

    # record gossip -------------------------------------------------------------

    def records_to_send(self, neighbour: str, rng: random.Random | None = None) -> RecordChoice | None:
        """At most one record for ``neighbour`` this round: a peer we observed
        last round or a record we hold, drawn with p ~ lambda*exp(-lambda(d-1))
        (SybilWall's history gossip, Werthenbach & Pouwelse 2023) times :meth:`_suspicion`, never
        about ``neighbour`` and never one it told us or observed; None when nothing is eligible or
        it was served this round. The node sends the subject's public model with the subject's
        signed statement of it and, for a peer we observe, our signature as
        its observer."""
        self._require_self_id()
        if neighbour in self._round.served:
            return None
        latest: dict[str, RecordInfo] = {}
        for r in sorted(self._held):
            for subject, held in self._held[r].items():
                latest[subject] = held.info
        candidates = [
            RecordChoice(subject, info.distance)
            for subject, info in sorted(latest.items())
            if subject != neighbour and neighbour not in (info.observer, info.received_from)
            and info.distance < self.options.max_distance
        ]
        if not candidates:
            return None
        lam = self.options.gossip_lambda
        weights = [lam * math.exp(-lam * (c.distance - 1)) * self._suspicion(c) for c in candidates]
        self._round.served.add(neighbour)
        return (rng or self._rng).choices(candidates, weights)[0]

    def _suspicion(self, choice: RecordChoice) -> float:
        """How much more often to tell of a peer we observe the less we trust
        it: 1 for one we trust fully, 1 + SUSPECT_BOOST for one we muted. A
        lone Sybil's other neighbours need a record of its *twin* to catch
        it, and the peers that muted the twin are the ones who can tell;
        drawn by distance alone, such a record reached a lone Sybil's
        neighbour too seldom (one held 0.25 of its weight for 45 rounds in a
        default testnet run)."""
        if choice.distance != DIRECT:
            return 1.0
        standing = self._standing.get(choice.subject)
        return 1.0 if standing is None else 1.0 + SUSPECT_BOOST * (1.0 - standing.trust)

    def receive_record(self, from_peer: str, record: HistoryRecordData) -> RecordVerdict:
        """Hold a record from ``from_peer`` if the rules allow (see the module doc).

        Raises DecodeError for a malformed record (wrong type, shape, dtype,
        non-finite values, negative round, distance < 1).
        """
        self_id = self._require_self_id()
        self._check_record(record)
        verdict = self._admit_record(self_id, from_peer, record)
        if verdict is not RecordVerdict.KEPT:
            return verdict
        info = RecordInfo(record.round, self._distance(from_peer, record), record.observer, from_peer)
        self._held.setdefault(record.round, {})[record.subject] = _Held(None, record.offset, info)
        self._round.records_from[from_peer] = self._round.records_from.get(from_peer, 0) + 1
        return RecordVerdict.KEPT

    @staticmethod
    def _distance(from_peer: str, record: HistoryRecordData) -> int:
        """Our hop distance to the record's subject. The first hop is proven
        (the observer signed the record, and only the observer can send a
        first-hand one); what a relay claims beyond it is not, so a relayed
        record is never nearer than RELAYED, whatever it says."""
        if record.observer == from_peer:
            return FIRST_HAND
        return max(record.distance + 1, RELAYED)

    def _admit_record(self, self_id: str, from_peer: str, record: HistoryRecordData) -> RecordVerdict:
        now = self._round.round
        standing = self._standing.get(from_peer)
        if standing is None or standing.last_seen < now - NEIGHBOUR_MEMORY_ROUNDS:
            return RecordVerdict.NOT_NEIGHBOUR
        if record.subject in (self_id, SELF, from_peer) or record.observer in (self_id, SELF):
            return RecordVerdict.ABOUT_US
        if self._round.records_from.get(from_peer, 0) >= RECORDS_PER_SENDER_PER_ROUND:
            return RecordVerdict.FLOOD
        if record.round > now:
            return RecordVerdict.FUTURE
        if record.round <= now - COMPARED_ROUNDS:
            return RecordVerdict.STALE
        if self._distance(from_peer, record) > self.options.max_distance:
            return RecordVerdict.TOO_FAR
        if record.offset.numel() != SKETCH_ELEMENTS:
            raise DecodeError(f"history record of {record.subject!r}: wrong size")
        held = self._held.get(record.round, {})
        same = held.get(record.subject)
        if record.subject in self._standing and self._standing[record.subject].last_seen >= now - 1:
            return RecordVerdict.DIRECT
        if same is not None:
            return RecordVerdict.STALE
        vouched = {s for h in self._held.values() for s, x in h.items()
                   if x.info.distance > DIRECT and x.info.observer == record.observer}
        if record.subject not in vouched and len(vouched) >= self.options.records_per_observer:
            return RecordVerdict.OBSERVER_FULL
        records = sum(1 for h in self._held.values() for x in h.values() if x.info.distance > DIRECT)
        if records >= self.options.max_records:
            return RecordVerdict.NO_ROOM
        return RecordVerdict.KEPT

    # inspection ------------------------------------------------------------------

    def known_peers(self) -> list[str]:
        """Subjects of the records we hold (what the node keeps statements for)."""
        return sorted({s for h in self._held.values() for s, x in h.items() if x.info.distance > DIRECT})

    def record_info(self, peer: str) -> RecordInfo | None:
        """The newest model we hold of ``peer`` (ours or a record)."""
        for r in sorted(self._held, reverse=True):
            held = self._held[r].get(peer)
            if held is not None:
                return held.info
        return None

    def trust(self, peer: str) -> float | None:
        standing = self._standing.get(peer)
        return None if standing is None else standing.trust

    # internals ---------------------------------------------------------------------

    def _require_self_id(self) -> str:
        if self.options.self_id is None:
            raise ConfigError("sybilwall: record gossip needs the self_id option")
        return self.options.self_id

    @staticmethod
    def _check_record(record: HistoryRecordData) -> None:
        if not isinstance(record, HistoryRecordData):
            raise DecodeError("history record has the wrong type")
        if not isinstance(record.subject, str) or not record.subject or not isinstance(record.observer, str):
            raise DecodeError("history record: bad subject or observer id")
        if isinstance(record.round, bool) or not isinstance(record.round, int) or record.round < 0:
            raise DecodeError("history record: bad round")
        if isinstance(record.distance, bool) or not isinstance(record.distance, int) or record.distance < DIRECT:
            raise DecodeError("history record: distance must be an int >= 1")
        h = record.offset
        if not isinstance(h, torch.Tensor) or h.dtype != DTYPE or h.dim() != 1:
            raise DecodeError("history record: offset must be a 1-D float32 tensor (a sketch)")
        if not bool(torch.isfinite(h).all()):
            raise DecodeError("history record: non-finite offset")

    # checkpointing ---------------------------------------------------------------

    STATE_VERSION = 6
    """6: the persistent pulls are local sketches (:class:`_Held`); older
    checkpoints' whole-model pulls are sketched as they load (the sketch is linear).
    And ``memory``'s moving averages, local sketches too (a restarted node's
    averages took ~1 / (1 - memory) rounds to mean anything again).
    5: also the record rules' memory: which of our neighbours each observer's records resembled, and
    which observers' counted records take up the share (``_flags``, ``_record_flagged``). Without them a
    restarted node heard a discredited observer again and gave forged records a fresh share: a forger
    that made its victim restart (a crash, an update) muted more honest peers each time.
    4: each clone catch with whose evidence it was, and when each peer's records count. v3 and v4 still
    load (v3: its catches as our own evidence, every peer vouched for; both: no flags yet).
    Not kept: the models of the last COMPARED_ROUNDS rounds."""

    def state_dict(self) -> dict[str, Any]:
        peers = sorted(self._standing)
        return {
            "version": self.STATE_VERSION,
            "round": self._round.round,
            "peers": peers,
            "last_seen": [self._standing[p].last_seen for p in peers],
            "trust": [self._standing[p].trust for p in peers],
            "scores": [self._standing[p].score for p in peers],
            "vouched_from": [self._standing[p].vouched_from for p in peers],
            "clone_catches": {p: [[r, sorted(sources)] for r, sources in sorted(rounds.items())]
                              for p, rounds in sorted(self._catches.items())},
            "record_flags": _nested(self._flags),
            "record_flagged": _nested(self._record_flagged),
            **self._memory_state(),
            **({} if self._pull is None else self._pull.state_dict()),
        }

    def _memory_state(self) -> dict[str, Any]:
        state = self._memory.state_dict(MEMORY_PREFIX, "memory")
        if self._own_memory is not None:
            state["own_memory"] = self._own_memory.clone()
        return state

    def _load_memory(self, state: Mapping[str, Any]) -> None:
        """``memory``'s averages as :meth:`_memory_state` wrote them; none
        from a checkpoint before version 6 (they start afresh)."""
        self._own_memory = None
        self._memory.load_state_dict(state, MEMORY_PREFIX, "memory", width=LOCAL_SKETCH_ELEMENTS)
        own = state.get("own_memory")
        if isinstance(own, torch.Tensor):
            if own.shape != (LOCAL_SKETCH_ELEMENTS,) or not bool(torch.isfinite(own).all()):
                raise ValueError("sybilwall: own memory must be one finite local sketch")
            self._own_memory = own.to(torch.float32).clone()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (or an older version's), all or
        nothing: a malformed state raises and leaves the aggregator fresh."""
        try:
            self._load(state)
        except Exception:
            self._forget_all()
            raise

    def _load(self, state: Mapping[str, Any]) -> None:
        version = int(state.get("version", 1))
        if version not in (3, 4, 5, self.STATE_VERSION):
            raise ValueError("sybilwall: state of another version")
        self._round = _Round(int(state["round"]))
        self._held, self._own = {}, {}
        catches = dict(state.get("clone_catches", {}))
        if version == 3:
            self._catches = {str(p): {int(r): {OWN_EVIDENCE} for r in rounds} for p, rounds in catches.items()}
        else:
            self._catches = {str(p): {int(r): {str(s) for s in sources} for r, sources in rounds}
                             for p, rounds in catches.items()}
        peers = state["peers"]
        vouched = state["vouched_from"] if version >= 4 else [0] * len(peers)
        self._standing = {
            str(p): _Standing(int(seen), float(trust), float(score), int(since))
            for p, seen, trust, score, since in zip(peers, state["last_seen"], state["trust"], state["scores"],
                                                    vouched, strict=True)
        }
        if not all(0.0 <= s.trust <= 1.0 and 0.0 <= s.score <= 1.0 for s in self._standing.values()):
            # A trust of -5 gave negative self weights and 2.7 to one peer, every round.
            raise ValueError("sybilwall checkpoint: trust and scores must be in [0, 1]")
        self._flags = _nested(state.get("record_flags", {}))
        self._record_flagged = _nested(state.get("record_flagged", {}))
        self._load_memory(state)
        if self._pull is not None:
            pulls = state.get(PULLS_KEY)
            if version < 6 and isinstance(pulls, torch.Tensor) and pulls.dim() == 2:
                state = {**state, PULLS_KEY: torch.stack([local_sketch(row) for row in pulls])}
            self._pull.load_state_dict(state)


def _alike(rows: Sequence[torch.Tensor], anchor: torch.Tensor | None) -> torch.Tensor:
    """Pairwise similarity of ``rows`` (models, steps or averages of one
    kind), anchored on ours of the same kind when we have it: two peers are
    alike when they are much nearer each other than either is to us
    (:func:`anchored_similarity`). Unanchored, the scale was the median
    nearest-neighbour distance among the rows themselves, and Sybils that
    keep apart by offsets of their own, when they were most of our
    neighbours, set it: our two honest neighbours, as near each other as
    to us, were then the one close pair, scored as clones, and we learned
    alone (bench/sybil.py --quick, 8 diversified Sybils: a node at 0.70)."""
    if anchor is None:
        return distance_similarity(pairwise_gram(list(rows))).cpu()
    return anchored_similarity(pairwise_gram([anchor, *rows])).cpu()


def _nested(rounds: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """``peer -> peer -> round`` (the record rules' bookkeeping) as plain,
    sorted dicts of str and int: what a checkpoint stores and reads back."""
    return {str(a): {str(b): int(r) for b, r in sorted(inner.items())} for a, inner in sorted(rounds.items())}


def _functional(probed: ProbeResult) -> torch.Tensor:
    """Similarity of this round's neighbours by what their models predict on
    our probe sample (``outputs[1:]``), with our own model's (``outputs[0]``)
    as the yardstick (:func:`anchored_similarity`); each row of logits
    centred first (a softmax does not see a shift)."""
    rows = torch.stack([(o - o.mean(dim=-1, keepdim=True)).flatten() for o in probed.outputs]).to(torch.float64)
    return anchored_similarity(gram_matrix(rows)).cpu()
