"""What makes a SybilWall history record checkable, and what a node keeps to send them.

A record tells a neighbour of a third peer's public model (SPECS section 2's
history gossip; :mod:`murmur.learning.aggregators.sybilwall` scores it). Two
signatures make it hard to forge:

* the **statement**: every round a node signs BLAKE3 of its public model
  right after advancing it (``DeltaStart.meta["statement"]`` of its round
  message). Its neighbours' replicas are bit-exact copies, so an observer
  checks the statement against its replica, and anyone a record reaches
  checks that the model it carries is the one its subject stated: a Sybil
  cannot put a made-up model in an honest peer's mouth;
* the **observation**: the peer that holds the replica signs that it
  observed that model. A relay cannot sign for the observer, so the receiver
  knows a first-hand record from a relayed one whatever hop count it claims.

:class:`RecordBook` keeps the statements of our neighbours (to describe them)
and the records our aggregator holds (to relay them), bounded by what the
aggregator holds, and bounds what a sender may make us check: checking a
record costs two signature checks and a hash of a whole model, and the
aggregator's one-record-per-sender-per-round rule counts only records it
keeps, so records it refuses (a future round, a peer we observe) would
otherwise cost us without limit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import numpy as np

from murmur.errors import PeerFault
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import HistoryRecord

STATEMENT_DOMAIN = b"murmur-public-model-v1"
OBSERVATION_DOMAIN = b"murmur-observed-model-v1"
STATEMENT_META_KEY = "statement"
RECORDS_CHECKED_PER_SENDER_PER_ROUND = 2
"""Records of one sender we check in one of our rounds: an honest neighbour
sends one a round, two when its round is one ahead of ours."""
_U64 = struct.Struct(">Q")


def model_digest(model: np.ndarray) -> bytes:
    """BLAKE3-256 of a float32 model's bytes (what statements and observations sign)."""
    return blake3.blake3(memoryview(np.ascontiguousarray(model, dtype=np.float32)).cast("B")).digest()


def statement_input(subject: PeerId, round_: int, digest: bytes) -> bytes:
    """What ``subject`` signs of its own public model after its message ``round_``."""
    return b"".join([STATEMENT_DOMAIN, subject.raw, _U64.pack(round_), digest])


def observation_input(observer: PeerId, subject: PeerId, round_: int, digest: bytes) -> bytes:
    """What ``observer`` signs of ``subject``'s public model it holds for ``round_``."""
    return b"".join([OBSERVATION_DOMAIN, observer.raw, subject.raw, _U64.pack(round_), digest])


def sign_statement(identity: Identity, round_: int, model: np.ndarray) -> bytes:
    return identity.sign(statement_input(identity.peer_id, round_, model_digest(model)))


def check_record(msg: HistoryRecord) -> np.ndarray:
    """The record's model, once both signatures hold: its subject stated
    that model for that round, and its observer signed that it observed it.
    Raises :class:`~murmur.errors.SignatureError` (a peer fault) otherwise:
    a record about an honest peer with a model it never stated, or one whose
    observer is claimed by someone else."""
    model = np.asarray(msg.model, dtype=np.float32)
    digest = model_digest(model)
    msg.subject.verify(msg.subject_sig, statement_input(msg.subject, msg.round, digest))
    msg.observer.verify(msg.observer_sig, observation_input(msg.observer, msg.subject, msg.round, digest))
    return model


def observe(observer: Identity, subject: PeerId, round_: int, model: np.ndarray, statement: bytes) -> HistoryRecord | None:
    """A first-hand record of ``subject``'s ``model`` (our replica of its
    public model after its message ``round_``), or None when its statement
    does not match the model: we vouch only for what the subject itself said."""
    digest = model_digest(model)
    try:
        subject.verify(statement, statement_input(subject, round_, digest))
    except PeerFault:
        return None
    signature = observer.sign(observation_input(observer.peer_id, subject, round_, digest))
    return HistoryRecord(subject=subject, observer=observer.peer_id, round=round_, distance=1, model=model,
                         subject_sig=statement, observer_sig=signature)


@dataclass(frozen=True)
class Statement:
    """A neighbour's signature over its public model after its message ``round``."""

    round: int
    signature: bytes


@dataclass(frozen=True)
class HeldRecord:
    """A record our aggregator holds, kept byte for byte so it can be relayed."""

    subject: PeerId
    observer: PeerId
    round: int
    model: np.ndarray
    subject_sig: bytes
    observer_sig: bytes


class RecordBook:
    """Statements of our neighbours and the records we may relay."""

    def __init__(self) -> None:
        self._statements: dict[PeerId, Statement] = {}
        self._records: dict[str, HeldRecord] = {}
        self._intake: dict[PeerId, tuple[int, int]] = {}  # sender -> (our round, records taken in it)

    def take_intake(self, sender: PeerId, round_: int) -> bool:
        """Whether to check one more record from ``sender`` in our round
        ``round_`` (at most RECORDS_CHECKED_PER_SENDER_PER_ROUND); the rest is
        dropped unread. Counts the record when it says yes."""
        held_round, count = self._intake.get(sender, (round_, 0))
        if held_round != round_:
            count = 0
        if count >= RECORDS_CHECKED_PER_SENDER_PER_ROUND:
            return False
        self._intake[sender] = (round_, count + 1)
        return True

    def note_statement(self, peer: PeerId, round_: int, signature: bytes) -> None:
        """Keep ``peer``'s newest statement (checked when it is used)."""
        held = self._statements.get(peer)
        if held is None or round_ >= held.round:
            self._statements[peer] = Statement(round_, signature)

    def statement(self, peer: PeerId, round_: int) -> bytes | None:
        held = self._statements.get(peer)
        return held.signature if held is not None and held.round == round_ else None

    def forget(self, peer: PeerId) -> None:
        self._statements.pop(peer, None)
        self._intake.pop(peer, None)

    def keep(self, record: HeldRecord) -> None:
        self._records[str(record.subject)] = record

    def record(self, subject: str) -> HeldRecord | None:
        return self._records.get(subject)

    def prune(self, held: set[str]) -> None:
        """Drop records of subjects the aggregator no longer holds."""
        for subject in [s for s in self._records if s not in held]:
            del self._records[subject]

    def __len__(self) -> int:
        return len(self._records)
