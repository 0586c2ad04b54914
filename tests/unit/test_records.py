"""History records are checkable: a record carries its subject's own signed
statement of its public model and its observer's signature (node/records.py).
Known answers with real Ed25519 keys and real encoding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from murmur.errors import SignatureError
from murmur.node.records import HeldRecord, RecordBook, check_record, observe, sign_statement
from murmur.protocol import messages as m
from murmur.protocol.identity import Identity

SUBJECT = Identity.from_seed(b"s" * 32)
OBSERVER = Identity.from_seed(b"o" * 32)
SYBIL = Identity.from_seed(b"x" * 32)
MODEL = np.arange(16, dtype=np.float32)


def _record(round_: int = 7) -> m.HistoryRecord:
    statement = sign_statement(SUBJECT, round_, MODEL)
    record = observe(OBSERVER, SUBJECT.peer_id, round_, MODEL.copy(), statement)
    assert record is not None
    return record


def test_a_record_of_what_the_subject_stated_checks_and_survives_the_wire() -> None:
    record = _record()
    decoded = m.decode(m.encode(record))
    assert isinstance(decoded, m.HistoryRecord)
    np.testing.assert_array_equal(check_record(decoded), MODEL)
    assert (decoded.subject, decoded.observer, decoded.round, decoded.distance) == (SUBJECT.peer_id, OBSERVER.peer_id, 7, 1)


def test_forged_subject_a_model_the_subject_never_stated_is_refused() -> None:
    """A Sybil observer cannot put another model in an honest peer's mouth:
    it can sign as observer, not as the subject."""
    statement = sign_statement(SUBJECT, 7, MODEL)
    forged_model = MODEL + 1.0
    forged = m.HistoryRecord(
        subject=SUBJECT.peer_id, observer=SYBIL.peer_id, round=7, distance=1, model=forged_model,
        subject_sig=statement,
        observer_sig=observe(SYBIL, SUBJECT.peer_id, 7, MODEL.copy(), statement).observer_sig,  # type: ignore[union-attr]
    )
    with pytest.raises(SignatureError):
        check_record(forged)
    # nor state it for another round than the one it signed
    with pytest.raises(SignatureError):
        check_record(replace(_record(7), round=8))


def test_an_observer_signs_only_what_its_subject_stated() -> None:
    statement = sign_statement(SUBJECT, 7, MODEL)
    assert observe(OBSERVER, SUBJECT.peer_id, 7, MODEL + 1.0, statement) is None  # replica differs from the statement
    assert observe(OBSERVER, SYBIL.peer_id, 7, MODEL.copy(), statement) is None  # someone else's statement


def test_a_relay_cannot_pass_itself_off_as_the_observer() -> None:
    """The first hop is the observer's signature: a relay that rewrites the
    observer to itself (to look first-hand, at a lower hop count) fails it."""
    relayed = replace(_record(), observer=SYBIL.peer_id)
    with pytest.raises(SignatureError):
        check_record(relayed)
    # the claimed distance is not signed: the receiver's aggregator sets it (test_sybilwall)
    check_record(replace(_record(), distance=1))


def test_record_book_keeps_newest_statements_and_prunes_records() -> None:
    book = RecordBook()
    book.note_statement(SUBJECT.peer_id, 5, b"a" * 64)
    book.note_statement(SUBJECT.peer_id, 4, b"b" * 64)  # older: ignored
    assert book.statement(SUBJECT.peer_id, 5) == b"a" * 64 and book.statement(SUBJECT.peer_id, 4) is None
    record = _record()
    book.keep(HeldRecord(record.subject, record.observer, record.round, MODEL, record.subject_sig, record.observer_sig))
    assert book.record(str(SUBJECT.peer_id)) is not None and len(book) == 1
    book.prune(set())
    assert book.record(str(SUBJECT.peer_id)) is None and len(book) == 0


def test_a_flood_from_one_sender_is_dropped_unchecked_beyond_two_a_round() -> None:
    """The aggregator counts only records it keeps, one per sender per round;
    refused ones (future rounds, peers we observe) would cost two signature
    checks and a model hash each without end. Known answer: two a round."""
    book = RecordBook()
    flooder, other = SYBIL.peer_id, OBSERVER.peer_id
    assert [book.take_intake(flooder, 5) for _ in range(4)] == [True, True, False, False]
    assert book.take_intake(other, 5)  # another sender has its own budget
    assert [book.take_intake(flooder, 6) for _ in range(3)] == [True, True, False]  # a new round, a new budget
    book.forget(flooder)
    assert book.take_intake(flooder, 6)
