"""What makes a SybilWall history record checkable and small, and what a node keeps to send them.

A record tells a neighbour of a third peer's public model (SybilWall's history
gossip, Werthenbach & Pouwelse 2023; :mod:`murmur.learning.aggregators.sybilwall`
scores it). It carries no model: the model's BLAKE3 digest and its sketch
(:mod:`murmur.learning.sketch`, ``SKETCH_ELEMENTS`` float32s: distances
between models survive it), about 1.3 KB with both signatures whatever the
model's size (a whole fp32 model per neighbour per round wiped out
compressed gossip's savings). Two signatures make it hard to forge:

* the **statement**: every round a node signs its public model's digest and
  sketch right after advancing it (``DeltaStart.meta["statement"]``, with
  the sketch itself in ``meta["sketch"]``, of its round message). Its
  neighbours' replicas are bit-exact copies, so an observer checks the
  statement against its replica (the digest exactly, the sketch to rounding)
  before vouching, and anyone a record reaches checks that digest and sketch
  are what its subject stated: a Sybil cannot put a made-up model (or a
  made-up sketch) in an honest peer's mouth;
* the **observation**: the peer that holds the replica signs that it
  observed that model. A relay cannot sign for the observer, so the receiver
  knows a first-hand record from a relayed one whatever hop count it claims.

:class:`RecordBook` keeps the statements of our neighbours (to describe them)
and the records our aggregator holds (to relay them), bounded by what the
aggregator holds, and bounds what a sender may make us check: checking a
record costs two signature checks, and the aggregator's
one-record-per-sender-per-round rule counts only records it keeps, so
records it refuses (a future round, a peer we observe) would otherwise cost
us without limit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from murmur.errors import DecodeError, PeerFault
from murmur.learning.fingerprint import model_digest
from murmur.learning.sketch import model_sketch, sketches_agree
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import SKETCH_ELEMENTS, HistoryRecord

STATEMENT_DOMAIN = b"murmur-public-model-v2"
OBSERVATION_DOMAIN = b"murmur-observed-model-v2"
STATEMENT_META_KEY = "statement"
SKETCH_META_KEY = "sketch"
RECORDS_CHECKED_PER_SENDER_PER_ROUND = 2
"""Records of one sender we check in one of our rounds: an honest neighbour
sends one a round, two when its round is one ahead of ours."""
_U64 = struct.Struct(">Q")


def sketch_bytes(sketch: np.ndarray) -> bytes:
    return np.ascontiguousarray(sketch, dtype=np.float32).tobytes()


def statement_input(subject: PeerId, round_: int, digest: bytes, sketch: np.ndarray) -> bytes:
    """What ``subject`` signs of its own public model after its message ``round_``."""
    return b"".join([STATEMENT_DOMAIN, subject.raw, _U64.pack(round_), digest, sketch_bytes(sketch)])


def observation_input(observer: PeerId, subject: PeerId, round_: int, digest: bytes, sketch: np.ndarray) -> bytes:
    """What ``observer`` signs of ``subject``'s public model it holds for ``round_``."""
    return b"".join([OBSERVATION_DOMAIN, observer.raw, subject.raw, _U64.pack(round_), digest, sketch_bytes(sketch)])


def describe(model: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A model's digest and sketch (what a statement and a record carry)."""
    flat = np.ascontiguousarray(model, dtype=np.float32).reshape(-1)
    return model_digest(flat), model_sketch(torch.from_numpy(flat)).numpy()


@dataclass(frozen=True)
class Statement:
    """A node's signature over its public model's digest and sketch after its message ``round``."""

    round: int
    signature: bytes
    sketch: np.ndarray  # what the subject stated (checked against our replica before we vouch)


def sign_statement(identity: Identity, round_: int, digest: bytes, sketch: np.ndarray) -> bytes:
    """Our signed statement of our public model (``describe``'s digest and
    sketch) after our message ``round_``."""
    return identity.sign(statement_input(identity.peer_id, round_, digest, sketch))


def read_statement(round_: int, signature: object, sketch: object) -> Statement | None:
    """A neighbour's statement from its round message's meta, or None when
    it carries none or one of the wrong shape (a peer that states nothing
    is only never vouched for)."""
    if not isinstance(signature, bytes) or not isinstance(sketch, bytes) or len(sketch) != 4 * SKETCH_ELEMENTS:
        return None
    return Statement(round_, signature, np.frombuffer(sketch, dtype=np.float32).copy())


def check_record(msg: HistoryRecord) -> np.ndarray:
    """The record's sketch, once both signatures hold: its subject stated
    that digest and sketch for that round, and its observer signed that it
    observed that model. Raises :class:`~murmur.errors.SignatureError` (a
    peer fault) otherwise: a record about an honest peer with a model it
    never stated, or one whose observer is claimed by someone else; a
    sketch of the wrong size is a :class:`~murmur.errors.DecodeError`."""
    sketch = np.asarray(msg.sketch, dtype=np.float32)
    if sketch.shape != (SKETCH_ELEMENTS,):
        raise DecodeError(f"history record: sketch of {sketch.size} entries, expected {SKETCH_ELEMENTS}")
    msg.subject.verify(msg.subject_sig, statement_input(msg.subject, msg.round, msg.digest, sketch))
    msg.observer.verify(msg.observer_sig, observation_input(msg.observer, msg.subject, msg.round, msg.digest, sketch))
    return sketch


def _signed(subject: PeerId, round_: int, digest: bytes, sketch: np.ndarray, signature: bytes) -> bool:
    try:
        subject.verify(signature, statement_input(subject, round_, digest, sketch))
    except PeerFault:
        return False
    return True


def states_model(subject: PeerId, round_: int, model: np.ndarray, statement: Statement) -> bool:
    """Whether ``statement`` is ``subject``'s signature of exactly ``model``
    (our replica of its public model after its message ``round_``). Only the
    digest is ours to compute; the sketch is the one it stated, checked by
    the signature (ours would cost a quarter of a second at 10 M parameters)."""
    return statement.round == round_ and _signed(subject, round_, model_digest(model), statement.sketch,
                                                 statement.signature)


def observe(observer: Identity, subject: PeerId, round_: int, model: np.ndarray,
            statement: Statement) -> HistoryRecord | None:
    """A first-hand record of ``subject``'s ``model`` (our replica of its
    public model after its message ``round_``), or None when its statement
    does not match the model (digest exactly, sketch to rounding): we vouch
    only for what the subject itself said of the model we hold."""
    digest, ours = describe(model)
    stated = np.asarray(statement.sketch, dtype=np.float32)
    if statement.round != round_ or not sketches_agree(torch.from_numpy(stated), torch.from_numpy(ours)):
        return None
    if not _signed(subject, round_, digest, stated, statement.signature):
        return None
    signature = observer.sign(observation_input(observer.peer_id, subject, round_, digest, stated))
    return HistoryRecord(subject=subject, observer=observer.peer_id, round=round_, distance=1, digest=digest,
                         sketch=stated, subject_sig=statement.signature, observer_sig=signature)


@dataclass(frozen=True)
class HeldRecord:
    """A record our aggregator holds, kept byte for byte so it can be relayed."""

    subject: PeerId
    observer: PeerId
    round: int
    digest: bytes
    sketch: np.ndarray
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

    def note_statement(self, peer: PeerId, statement: Statement) -> None:
        """Keep ``peer``'s newest statement (checked when it is used)."""
        held = self._statements.get(peer)
        if held is None or statement.round >= held.round:
            self._statements[peer] = statement

    def statement(self, peer: PeerId, round_: int) -> Statement | None:
        held = self._statements.get(peer)
        return held if held is not None and held.round == round_ else None

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
