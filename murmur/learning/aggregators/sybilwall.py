"""SybilWall: Sybil-resilient similarity aggregation for decentralized learning (SPECS section 2).

Werthenbach & Pouwelse, "Towards Sybil Resilience in Decentralized Learning"
(2023). This implements the paper's intended behaviour, not the reference
code's quirks (histories are sums of deltas, not telescoped models; the own
weight is 1 and is not mis-assigned by zip truncation).

State, one *record* per known peer: (peer id, round, hop distance, H), H the
accumulated history (sum of that peer's deltas). All H live in the rows of one
:class:`HistoryMatrix`; row 0 is the own history H_self.

- Direct observation: a neighbour j's delta arrives -> H_j += delta_j, distance 1.
  A direct observation replaces any gossiped record of j (we start counting
  from what we saw ourselves) and gossip never overwrites it.
- Record gossip: :meth:`records_to_send` draws, once per neighbour per round,
  one record with probability proportional to lambda * exp(-lambda * (d - 1))
  (lambda = 0.8), never the neighbour's own record and never one received
  from or observed by that neighbour. The own record goes out with distance 1.
  :meth:`receive_record` stores a record at distance d + 1 if the peer is
  unknown, or if it is newer than a stored *gossiped* record (distance > 1).
- Scores: the FoolsGold core (:mod:`.similarity`) over every stored history
  except the own one - this round's neighbours, gossiped records, and direct
  records of former neighbours (what we know about a peer does not expire when
  the sampler rotates it out). Only this round's neighbours and self are
  averaged, own weight 1, renormalised:
  ``result = (own + sum_j w_j delta_j) / (1 + sum_j w_j)``.
- Bounded memory: at most ``max_records`` records besides the own one. When a
  new record needs room, the oldest record (lowest round; among equals the
  farthest) that is not one of this round's senders is evicted; a gossiped
  record that would itself be that victim is dropped instead. This round's
  neighbours always get a row, even over the cap.

Record signing and transport are the node's job (``HistoryRecord`` messages);
:meth:`receive_record` validates content and raises ``DecodeError`` (a
``PeerFault``) for malformed records.

Rounds: records are stamped with the round being aggregated. The node calls
:meth:`begin_round` with the network round; without it a local counter that
:meth:`aggregate` advances is used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from murmur.errors import ConfigError, DecodeError
from murmur.learning.aggregators.base import (
    DTYPE,
    SELF,
    AggregationResult,
    Aggregator,
    PeerUpdate,
    check_inputs,
    register_aggregator,
    require,
)
from murmur.learning.aggregators.history import HistoryMatrix
from murmur.learning.aggregators.similarity import (
    DEFAULT_KAPPA,
    cosine_from_gram,
    foolsgold_weights,
    gram_matrix,
)

GOSSIP_LAMBDA = 0.8
DIRECT_DISTANCE = 1  # neighbours, and the own record as sent
DEFAULT_MAX_RECORDS = 128  # 128 x 4 MB for a 1M-parameter model
DEFAULT_MAX_DISTANCE = 8  # exp(-0.8 * 7) ~ 0.4%: farther records are noise
DEFAULT_MAX_ROUND_SKEW = 16  # records claiming rounds this far ahead are ignored


@dataclass(frozen=True)
class HistoryRecordData:
    """One record as gossiped between neighbours (unsigned; the node signs/verifies)."""

    peer: str  # whose history
    round: int  # round of the last update folded into ``history``
    distance: int  # hop distance at the sender (>= 1)
    history: torch.Tensor  # flat float32, the sum of ``peer``'s deltas
    observer: str  # the peer that observed it directly


@dataclass(frozen=True)
class RecordInfo:
    """Metadata of a stored record (read-only view for the node and tests)."""

    round: int
    distance: int
    observer: str
    received_from: str | None  # None for direct observations


@dataclass(frozen=True)
class SybilWallOptions:
    self_id: str | None = None  # own peer id text; required for record gossip
    gossip_lambda: float = GOSSIP_LAMBDA
    kappa: float = DEFAULT_KAPPA
    max_records: int = DEFAULT_MAX_RECORDS
    max_distance: int = DEFAULT_MAX_DISTANCE
    max_round_skew: int = DEFAULT_MAX_ROUND_SKEW
    seed: int = 0  # default rng of records_to_send

    def validate(self) -> None:
        require(self.self_id is None or (self.self_id != "" and self.self_id != SELF),
                "sybilwall: self_id must be a peer id")
        require(self.gossip_lambda > 0, "sybilwall: gossip_lambda must be > 0")
        require(self.kappa > 0, "sybilwall: kappa must be > 0")
        require(self.max_records >= 1, "sybilwall: max_records must be >= 1")
        require(self.max_distance >= 2, "sybilwall: max_distance must be >= 2")
        require(self.max_round_skew >= 0, "sybilwall: max_round_skew must be >= 0")


@register_aggregator("sybilwall")
class SybilWallAggregator(Aggregator):
    Options = SybilWallOptions
    options: SybilWallOptions

    def __init__(self, options: SybilWallOptions | None = None) -> None:
        super().__init__(options)
        self._hist: HistoryMatrix | None = None  # row 0: own history
        self._meta: dict[str, RecordInfo] = {}
        self._own_round: int | None = None  # None until the own history has content
        self._round = 0
        self._sent: set[str] = set()  # neighbours served a record this round
        self._rng = random.Random(self.options.seed)

    # rounds ----------------------------------------------------------------

    @property
    def round(self) -> int:
        return self._round

    def begin_round(self, round_: int) -> None:
        """Align with the network round (stamps records; one gossip record per neighbour)."""
        if round_ < 0:
            raise ValueError("round must be >= 0")
        if round_ != self._round:
            self._sent.clear()
        self._round = round_

    # aggregation -------------------------------------------------------------

    def aggregate(
        self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int
    ) -> AggregationResult:
        weights = self.weigh(own, updates, own_degree)
        delta = own * weights[SELF]
        for u in updates:
            delta.add_(u.delta, alpha=weights[u.peer])
        return AggregationResult(delta, weights)

    def weigh(self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int) -> dict[str, float]:
        """Fold this round's updates into the histories and score them.

        Each update is added to its history row in place (no (n, d) stacking:
        at 64 peers x 1M parameters the stack alone cost as much as the Gram
        matmul), then one Gram matmul over all stored histories scores them."""
        check_inputs(own, updates)
        hist = self._histories(own)
        peers = [u.peer for u in updates]
        if self.options.self_id is not None and self.options.self_id in peers:
            raise ValueError("an update claims to come from this node")
        for p in peers:
            self._observe_directly(p, protect=peers)
        hist.get(SELF).add_(own)
        self._own_round = self._round
        if not updates:
            self._advance()
            return {SELF: 1.0}
        rows = hist.rows_of(peers)
        for row, u in zip(rows.tolist(), updates, strict=True):
            hist.add_to_row(row, u.delta)
        self._advance()

        scores = self.scores()  # over rows 1.. of the history matrix
        w = scores[rows - 1]
        total = 1.0 + float(w.sum())
        weights = {SELF: 1.0 / total}
        weights.update(zip(peers, (float(x) / total for x in w.tolist()), strict=True))
        return weights

    def scores(self) -> torch.Tensor:
        """FoolsGold-core weight of every stored non-own history, in row order (rows 1..)."""
        if self._hist is None or len(self._hist) < 2:
            return torch.ones(0, dtype=torch.float64)
        others = self._hist.matrix()[1:]  # contiguous view, no copy
        return foolsgold_weights(cosine_from_gram(gram_matrix(others)), self.options.kappa)

    def score_of(self) -> dict[str, float]:
        """Peer id -> current score (diagnostics)."""
        if self._hist is None:
            return {}
        return dict(zip(self._hist.ids()[1:], self.scores().tolist(), strict=True))

    # record gossip -------------------------------------------------------------

    def records_to_send(
        self, neighbour: str, rng: random.Random | None = None
    ) -> HistoryRecordData | None:
        """At most one record for ``neighbour`` this round, drawn with p ~ lambda*exp(-lambda(d-1)).

        Returns None when nothing is eligible or this neighbour was already
        served this round. The history is a copy (safe to serialise later).
        """
        self_id = self._require_self_id()
        if neighbour in self._sent or self._hist is None:
            return None
        candidates: list[str] = []
        distances: list[int] = []
        if self._own_round is not None:
            candidates.append(SELF)
            distances.append(DIRECT_DISTANCE)
        for peer, info in self._meta.items():
            if peer == neighbour or neighbour in (info.received_from, info.observer):
                continue
            candidates.append(peer)
            distances.append(info.distance)
        if not candidates:
            return None
        lam = self.options.gossip_lambda
        weights = [lam * math.exp(-lam * (d - 1)) for d in distances]
        chosen = (rng or self._rng).choices(candidates, weights)[0]
        self._sent.add(neighbour)
        history = self._hist.get(chosen).clone()
        if chosen == SELF:
            assert self._own_round is not None
            return HistoryRecordData(self_id, self._own_round, DIRECT_DISTANCE, history, self_id)
        info = self._meta[chosen]
        return HistoryRecordData(chosen, info.round, info.distance, history, info.observer)

    def receive_record(self, from_peer: str, record: HistoryRecordData) -> bool:
        """Store a gossiped record at distance d + 1 if the rules allow; return whether it was kept.

        Raises DecodeError for a malformed record (wrong type, shape, dtype,
        non-finite values, distance < 1, negative round).
        """
        self_id = self._require_self_id()
        self._check_record(record)
        if self._hist is None:
            return False  # model dimension not known yet: nothing to compare with
        if record.history.numel() != self._hist.dim:
            raise DecodeError(
                f"history record of {record.peer!r}: {record.history.numel()} values, "
                f"model has {self._hist.dim}"
            )
        if from_peer == self_id or record.peer in (self_id, SELF):
            return False  # records about ourselves carry nothing we do not know
        distance = record.distance + 1
        if distance > self.options.max_distance:
            return False
        if record.round > self._round + self.options.max_round_skew:
            return False  # would pin a record forever against honest newer rounds
        info = RecordInfo(record.round, distance, record.observer, from_peer)
        stored = self._meta.get(record.peer)
        if stored is None:
            if not self._make_room(protect=(), candidate=info):
                return False
            self._hist.add(record.peer, record.history.to(self._hist.device))
        elif stored.distance > DIRECT_DISTANCE and record.round > stored.round:
            self._hist.set(record.peer, record.history.to(self._hist.device))
        else:
            return False
        self._meta[record.peer] = info
        return True

    # inspection ------------------------------------------------------------------

    def known_peers(self) -> list[str]:
        return list(self._meta)

    def record_info(self, peer: str) -> RecordInfo | None:
        return self._meta.get(peer)

    def history(self, peer: str) -> torch.Tensor:
        """Copy of a stored history (``SELF`` for the own one)."""
        if self._hist is None or (peer != SELF and peer not in self._meta):
            raise KeyError(peer)
        return self._hist.get(peer).clone()

    # internals ---------------------------------------------------------------------

    def _require_self_id(self) -> str:
        if self.options.self_id is None:
            raise ConfigError("sybilwall: record gossip needs the self_id option")
        return self.options.self_id

    def _advance(self) -> None:
        self._round += 1
        self._sent.clear()

    def _histories(self, own: torch.Tensor) -> HistoryMatrix:
        if self._hist is None:
            self._hist = HistoryMatrix(own.numel(), own.device)
            self._hist.add(SELF)
        if self._hist.dim != own.numel() or self._hist.device != own.device:
            raise ValueError("sybilwall: model dimension or device changed")
        return self._hist

    def _observe_directly(self, peer: str, protect: Sequence[str]) -> None:
        """Make ``peer``'s record a direct one (a gossiped history is discarded)."""
        assert self._hist is not None
        info = RecordInfo(self._round, DIRECT_DISTANCE, self.options.self_id or SELF, None)
        stored = self._meta.get(peer)
        if stored is None:
            self._make_room(protect=protect, candidate=None)
            self._hist.add(peer)
        elif stored.distance > DIRECT_DISTANCE:
            self._hist.set(peer, None)
        self._meta[peer] = info

    def _make_room(self, protect: Sequence[str], candidate: RecordInfo | None) -> bool:
        """Evict until one more record fits. False: ``candidate`` is the worst, keep it out."""
        if len(self._meta) < self.options.max_records:
            return True
        protected = set(protect)
        victims = [(info.round, -info.distance, p) for p, info in self._meta.items() if p not in protected]
        if not victims:
            return True  # only this round's senders: they always get a row
        rnd, neg_dist, victim = min(victims)
        if candidate is not None and (candidate.round, -candidate.distance) <= (rnd, neg_dist):
            return False
        assert self._hist is not None
        self._hist.remove(victim)
        del self._meta[victim]
        return True

    @staticmethod
    def _check_record(record: HistoryRecordData) -> None:
        if not isinstance(record, HistoryRecordData):
            raise DecodeError("history record has the wrong type")
        if not isinstance(record.peer, str) or not record.peer or not isinstance(record.observer, str):
            raise DecodeError("history record: bad peer or observer id")
        if isinstance(record.round, bool) or not isinstance(record.round, int) or record.round < 0:
            raise DecodeError("history record: bad round")
        if (
            isinstance(record.distance, bool)
            or not isinstance(record.distance, int)
            or record.distance < DIRECT_DISTANCE
        ):
            raise DecodeError("history record: distance must be an int >= 1")
        h = record.history
        if not isinstance(h, torch.Tensor) or h.dtype != DTYPE or h.dim() != 1:
            raise DecodeError("history record: history must be a 1-D float32 tensor")
        if not bool(torch.isfinite(h).all()):
            raise DecodeError("history record: non-finite history")

    # checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self._round, "own_round": -1 if self._own_round is None else self._own_round}
        if self._hist is None:
            return state
        ids = self._hist.ids()[1:]
        state.update(
            ids=ids,
            histories=self._hist.matrix().clone(),  # row 0 = own
            rounds=[self._meta[p].round for p in ids],
            distances=[self._meta[p].distance for p in ids],
            observers=[self._meta[p].observer for p in ids],
            received_from=[self._meta[p].received_from or "" for p in ids],
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._round = int(state["round"])
        own_round = int(state["own_round"])
        self._own_round = None if own_round < 0 else own_round
        self._sent.clear()
        self._meta = {}
        self._hist = None
        if "ids" not in state:
            return
        ids = [str(p) for p in state["ids"]]
        self._hist = HistoryMatrix.from_state({"ids": [SELF, *ids], "histories": state["histories"]})
        for i, p in enumerate(ids):
            src = str(state["received_from"][i])
            self._meta[p] = RecordInfo(
                int(state["rounds"][i]), int(state["distances"][i]), str(state["observers"][i]), src or None
            )
