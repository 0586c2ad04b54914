"""History records are checkable and small: a record carries its subject's
digest and sketch, the subject's own signed statement of both, and its
observer's signature (node/records.py). Known answers with real Ed25519
keys and real encoding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from murmur.errors import DecodeError, SignatureError
from murmur.learning.sketch import model_sketch
from murmur.node.records import (
    HeldRecord,
    RecordBook,
    Statement,
    check_record,
    describe,
    observe,
    read_statement,
    sign_statement,
    sketch_bytes,
    states_model,
)
from murmur.protocol import messages as m
from murmur.protocol.identity import Identity

SUBJECT = Identity.from_seed(b"s" * 32)
OBSERVER = Identity.from_seed(b"o" * 32)
SYBIL = Identity.from_seed(b"x" * 32)
MODEL = np.arange(16, dtype=np.float32)
BIG = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)


def _statement(round_: int = 7, model: np.ndarray = MODEL, identity: Identity = SUBJECT) -> Statement:
    digest, sketch = describe(model)
    return Statement(round_, sign_statement(identity, round_, digest, sketch), sketch)


def _record(round_: int = 7, model: np.ndarray = MODEL) -> m.HistoryRecord:
    record = observe(OBSERVER, SUBJECT.peer_id, round_, model.copy(), _statement(round_, model))
    assert record is not None
    return record


def test_a_record_of_what_the_subject_stated_checks_and_survives_the_wire() -> None:
    record = _record()
    decoded = m.decode(m.encode(record))
    assert isinstance(decoded, m.HistoryRecord)
    np.testing.assert_array_equal(check_record(decoded), model_sketch(torch.from_numpy(MODEL)).numpy())
    assert (decoded.subject, decoded.observer, decoded.round, decoded.distance) == (SUBJECT.peer_id, OBSERVER.peer_id, 7, 1)


def test_a_record_of_a_big_model_is_small() -> None:
    """A record of a 1M-parameter model used to carry its 4 MB; now its
    digest and sketch: the same ~1.3 KB at any size."""
    small, big = len(m.encode(_record(model=MODEL))), len(m.encode(_record(model=BIG)))
    assert small == big and big < 1500 < BIG.nbytes // 1000


def test_a_small_models_sketch_keeps_its_distances_exactly_and_a_big_ones_about() -> None:
    a, b = torch.from_numpy(MODEL), torch.from_numpy(MODEL[::-1].copy())
    assert torch.isclose(torch.linalg.vector_norm(model_sketch(a) - model_sketch(b)), torch.linalg.vector_norm(a - b))
    x, y = torch.from_numpy(BIG), torch.from_numpy(BIG[::-1].copy())
    ratio = float(torch.linalg.vector_norm(model_sketch(x) - model_sketch(y)) / torch.linalg.vector_norm(x - y))
    assert 0.8 < ratio < 1.2
    assert torch.equal(model_sketch(x), model_sketch(x.clone()))  # clones: distance 0


def test_forged_subject_a_model_the_subject_never_stated_is_refused() -> None:
    """A Sybil observer cannot put another model (digest or sketch) in an
    honest peer's mouth: it can sign as observer, not as the subject."""
    honest = _record()
    forged_digest, forged_sketch = describe(MODEL + 1.0)
    for forged in (replace(honest, digest=forged_digest), replace(honest, sketch=forged_sketch)):
        with pytest.raises(SignatureError):
            check_record(forged)
    # nor state it for another round than the one it signed
    with pytest.raises(SignatureError):
        check_record(replace(honest, round=8))


def test_a_sketch_of_the_wrong_size_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        check_record(replace(_record(), sketch=np.zeros(3, np.float32)))


def test_an_observer_signs_only_what_its_subject_stated() -> None:
    statement = _statement()
    assert observe(OBSERVER, SUBJECT.peer_id, 7, MODEL + 1.0, statement) is None  # replica differs from the statement
    assert observe(OBSERVER, SYBIL.peer_id, 7, MODEL.copy(), statement) is None  # someone else's statement
    assert observe(OBSERVER, SUBJECT.peer_id, 8, MODEL.copy(), statement) is None  # another round's
    # a subject that signs the right digest with a made-up sketch gets no observer
    digest, sketch = describe(MODEL)
    lying = Statement(7, sign_statement(SUBJECT, 7, digest, sketch + 1.0), sketch + 1.0)
    assert observe(OBSERVER, SUBJECT.peer_id, 7, MODEL.copy(), lying) is None


def test_a_replica_is_checked_against_the_statement_its_owner_signed() -> None:
    """What the node checks of one neighbour's replica a round: exactly the
    stated model, by that subject, for that round (a bit off is off)."""
    statement = _statement()
    assert states_model(SUBJECT.peer_id, 7, MODEL.copy(), statement)
    shifted = MODEL.copy()
    shifted[3] = np.nextafter(shifted[3], np.float32(np.inf))
    assert not states_model(SUBJECT.peer_id, 7, shifted, statement)
    assert not states_model(SYBIL.peer_id, 7, MODEL.copy(), statement)
    assert not states_model(SUBJECT.peer_id, 8, MODEL.copy(), statement)


def test_a_relay_cannot_pass_itself_off_as_the_observer() -> None:
    """The first hop is the observer's signature: a relay that rewrites the
    observer to itself (to look first-hand, at a lower hop count) fails it."""
    relayed = replace(_record(), observer=SYBIL.peer_id)
    with pytest.raises(SignatureError):
        check_record(relayed)
    # the claimed distance is not signed: the receiver's aggregator sets it (test_sybilwall)
    check_record(replace(_record(), distance=1))


def test_a_statement_travels_in_the_round_messages_meta() -> None:
    statement = _statement()
    meta = {"statement": statement.signature, "sketch": sketch_bytes(statement.sketch)}
    start = m.DeltaStart(1, 7, SUBJECT.peer_id, OBSERVER.peer_id, m.DeltaCodec.FP32, "float32", (1, 16), 1, meta)
    decoded = m.decode(m.encode(start))
    assert isinstance(decoded, m.DeltaStart)
    read = read_statement(7, decoded.meta["statement"], decoded.meta["sketch"])
    assert read is not None and observe(OBSERVER, SUBJECT.peer_id, 7, MODEL.copy(), read) is not None
    assert read_statement(7, statement.signature, b"short") is None
    assert read_statement(7, None, sketch_bytes(statement.sketch)) is None


def test_record_book_keeps_newest_statements_and_prunes_records() -> None:
    book = RecordBook()
    book.note_statement(SUBJECT.peer_id, replace(_statement(5), signature=b"a" * 64))
    book.note_statement(SUBJECT.peer_id, replace(_statement(4), signature=b"b" * 64))  # older: ignored
    held = book.statement(SUBJECT.peer_id, 5)
    assert held is not None and held.signature == b"a" * 64 and book.statement(SUBJECT.peer_id, 4) is None
    record = _record()
    book.keep(HeldRecord(record.subject, record.observer, record.round, record.digest, record.sketch,
                         record.subject_sig, record.observer_sig))
    assert book.record(str(SUBJECT.peer_id)) is not None and len(book) == 1
    book.prune(set())
    assert book.record(str(SUBJECT.peer_id)) is None and len(book) == 0


def test_a_flood_from_one_sender_is_dropped_unchecked_beyond_two_a_round() -> None:
    """The aggregator counts only records it keeps, one per sender per round;
    refused ones (future rounds, peers we observe) would cost two signature
    checks each without end. Known answer: two a round."""
    book = RecordBook()
    flooder, other = SYBIL.peer_id, OBSERVER.peer_id
    assert [book.take_intake(flooder, 5) for _ in range(4)] == [True, True, False, False]
    assert book.take_intake(other, 5)  # another sender has its own budget
    assert [book.take_intake(flooder, 6) for _ in range(3)] == [True, True, False]  # a new round, a new budget
    book.forget(flooder)
    assert book.take_intake(flooder, 6)
