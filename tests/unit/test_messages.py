from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, ClassVar

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from murmur.errors import DecodeError
from murmur.protocol import messages as m
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.serializer import pack
from tests.sealing import sealed_tail

PEERS = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(1, 4)]
P = PEERS[0]

# --------------------------------------------------------------------------- strategies from the schema


def strategy_for(spec: m.Spec) -> st.SearchStrategy[Any]:
    """Derive a value strategy by walking a field's Spec, so every kind and every
    field is covered without a hand-written generator per message."""
    if isinstance(spec, m.IntSpec):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, m.FloatSpec):
        lo = None if math.isinf(spec.lo) else spec.lo
        hi = None if math.isinf(spec.hi) else spec.hi
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if isinstance(spec, m.StrSpec):
        if spec.choices is not None:
            return st.sampled_from(sorted(spec.choices))
        return st.text(max_size=min(spec.max_len, 40))
    if isinstance(spec, m.BytesSpec):
        return st.binary(min_size=spec.min_len, max_size=max(spec.min_len, min(spec.max_len, 80)))
    if isinstance(spec, m.PeerSpec):
        return st.sampled_from(PEERS)
    if isinstance(spec, m.EnumSpec):
        return st.sampled_from(list(spec.enum))
    if isinstance(spec, m.ListSpec):
        return st.lists(strategy_for(spec.item), min_size=spec.min_items, max_size=min(spec.max_items, 4)).map(tuple)
    if isinstance(spec, m.TupleSpec):
        return st.tuples(*(strategy_for(s) for s in spec.items))
    if isinstance(spec, m.NdarraySpec):
        return st.sampled_from(sorted(spec.dtypes)).flatmap(
            lambda name: hnp.arrays(
                np.dtype(name),
                st.integers(0, 16),
                elements=st.floats(-1e3, 1e3, width=16 if name == "float16" else 32) if name.startswith("float") else None,
            )
        )
    if isinstance(spec, m.MetaSpec):
        scalars = st.one_of(
            st.booleans(),
            st.integers(m.I64_MIN, m.I64_MAX),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=20),
            st.binary(max_size=20),
        )
        return st.dictionaries(st.text(max_size=10), scalars, max_size=4)
    raise AssertionError(f"no strategy for {spec!r}")


def message_strategy(kind: m.MessageKind) -> st.SearchStrategy[Any]:
    cls = m.REGISTRY.message_class(kind)
    schema = m.REGISTRY.schema(kind)
    return st.fixed_dictionaries({name: strategy_for(spec) for name, spec in schema.items()}).map(lambda kw: cls(**kw))


any_message = st.sampled_from(m.REGISTRY.kinds()).flatmap(message_strategy)


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, (bytearray, memoryview)):
            assert bytes(x) == y
        else:
            assert dict(x) == dict(y) if f.name == "meta" else x == y


# --------------------------------------------------------------------------- round trips


def test_every_kind_is_registered_once_with_a_spec_per_field() -> None:
    assert set(m.REGISTRY.kinds()) == set(m.MessageKind)
    for kind in m.REGISTRY.kinds():
        cls = m.REGISTRY.message_class(kind)
        assert cls.KIND is kind
        assert set(m.REGISTRY.schema(kind)) == {f.name for f in fields(cls)}


def test_registry_is_frozen_after_import() -> None:
    with pytest.raises(RuntimeError):
        m.REGISTRY.register(m.Goodbye)


@pytest.mark.parametrize("kind", list(m.MessageKind), ids=lambda k: k.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_kind(kind: m.MessageKind, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(kind))
    wire = m.encode(msg)
    back = m.decode(wire)
    assert_same(msg, back)
    assert m.encode(back) == wire
    # a sender routes the encoded message to its protocol's stream without decoding it
    assert m.protocol_of_envelope(m.encode_parts(msg)[0]) == m.protocol_of(type(msg)) == m.KIND_PROTOCOLS[kind]


def test_every_kind_travels_on_one_murmur_protocol_and_order_sensitive_ones_share() -> None:
    assert set(m.KIND_PROTOCOLS) == set(m.MessageKind)
    assert all(p.startswith("/murmur/") for p in m.MurmurProtocol)
    hello = {k for k, p in m.KIND_PROTOCOLS.items() if p is m.MurmurProtocol.HELLO}
    assert {m.MessageKind.HELLO, m.MessageKind.LINK, m.MessageKind.LEARNER_INFO} <= hello  # a Link after LearnerInfo
    delta = {k for k, p in m.KIND_PROTOCOLS.items() if p is m.MurmurProtocol.DELTA}
    assert {m.MessageKind.DELTA_START, m.MessageKind.DELTA_CHUNK, m.MessageKind.DELTA_END} <= delta
    with pytest.raises(ValueError):
        m.protocol_of_envelope(b"\x92\x02\x01")  # not an envelope of ours


def test_envelope_layout_matches_architecture() -> None:
    version, kind, body = msgpack.unpackb(m.encode(m.ModelRequest(round=7)))
    assert (version, kind, body) == (m.WIRE_VERSION, int(m.MessageKind.MODEL_REQUEST), {"round": 7})
    start = m.DeltaStart(1, 2, P, PEERS[1], DeltaCodec.INT8, "float32", (3, 4), 16, {"kind": "model"})
    body = msgpack.unpackb(m.encode(start))[2]
    assert body["sender"] == P.raw and len(body["sender"]) == m.PEER_ID_LEN
    assert body["codec"] == 3 and body["meta"] == {"kind": "model"}


def test_chunk_payload_is_a_tail_never_copied_by_either_side() -> None:
    data = np.arange(1000, dtype=np.float32)
    head, tail = m.encode_parts(m.DeltaChunk(transfer_id=5, seq=0, data=memoryview(data).cast("B")))
    assert np.shares_memory(np.frombuffer(tail, np.float32), data)  # the sender gathers a view
    assert len(head) < m.MAX_TAILED_HEAD and msgpack.unpackb(head)[2] == {"transfer_id": 5, "seq": 0}
    wire = head + bytes(tail)
    back = m.decode(wire)
    assert back.data == data.tobytes() and back.data.readonly
    assert back.data.obj is wire  # a view of the received message, not a copy


def test_a_split_chunk_decodes_to_its_sealed_tail_and_only_a_tailed_kind_may_come_split() -> None:
    data = bytes(range(256)) * 300
    head, _ = m.encode_parts(m.DeltaChunk(transfer_id=5, seq=3, data=data))
    tail = sealed_tail(data)
    back = m.decode(head, tail)
    assert (back.transfer_id, back.seq) == (5, 3) and back.data is tail and len(back.data) == len(data)
    with pytest.raises(m.SchemaError, match="no tail"):
        m.decode(m.encode(GOSSIP), sealed_tail(b"x" * 100))
    with pytest.raises(DecodeError, match="extra data"):  # the head of a split message is its envelope alone
        m.decode(head + b"more", sealed_tail(data))
    with pytest.raises(m.SchemaError, match="outside"):  # the tail's length is checked like a received one's
        m.decode(head, sealed_tail(bytes(m.MAX_CHUNK_BYTES + 1)))


def test_a_tail_on_an_untailed_kind_is_refused() -> None:
    with pytest.raises(DecodeError, match="extra data"):
        m.decode(m.encode_parts(GOSSIP)[0] + b"extra")  # the tail parser runs only where the kind has one
    gossip_with_faked_kind = bytearray(m.encode(GOSSIP))
    gossip_with_faked_kind[2] = m.MessageKind.DELTA_CHUNK  # claims a tailed kind, carries a Gossip body
    with pytest.raises(DecodeError):
        m.decode(bytes(gossip_with_faked_kind))


def test_a_tailed_kind_needs_its_tail_and_a_short_head() -> None:
    head, _ = m.encode_parts(m.DeltaChunk(transfer_id=5, seq=0, data=b"x"))
    with pytest.raises(m.SchemaError, match="outside"):
        m.decode(head)  # no payload at all
    padded = raw_envelope(int(m.MessageKind.DELTA_CHUNK), {"transfer_id": 5, "seq": 0, "pad": "y" * 300})
    with pytest.raises(DecodeError, match="does not end within"):
        m.decode(padded + b"payload")
    with pytest.raises(DecodeError):
        m.decode(head[:-1])  # a head cut short


def test_a_kind_with_two_tails_is_refused_at_registration() -> None:
    @dataclass(frozen=True)
    class TwoTails:
        KIND: ClassVar[m.MessageKind] = m.MessageKind.DELTA_CHUNK
        a: Annotated[bytes, m.TailSpec(0, 8)]
        b: Annotated[bytes, m.TailSpec(0, 8)]

    with pytest.raises(TypeError, match="at most one"):
        m.MessageRegistry().register(TwoTails)


# --------------------------------------------------------------------------- hostile input


def raw_envelope(kind: int, body: Any, version: Any = m.WIRE_VERSION) -> bytes:
    return pack((version, kind, body))


def body_of(msg: Any) -> dict[str, Any]:
    return dict(msgpack.unpackb(m.encode_parts(msg)[0], ext_hook=lambda c, d: msgpack.ExtType(c, d))[2])


GOSSIP = m.Gossip(msg_id=b"id", origin=P, ttl=3, topic="t", payload=b"x")


def test_wrong_version_and_unknown_kind() -> None:
    body = body_of(GOSSIP)
    with pytest.raises(m.WrongVersion):
        m.decode(raw_envelope(int(m.MessageKind.GOSSIP), body, version=m.WIRE_VERSION + 1))
    with pytest.raises(m.WrongVersion):
        m.decode(raw_envelope(int(m.MessageKind.GOSSIP), body, version=True))
    with pytest.raises(m.WrongVersion):  # an array where an int belongs must not reach ==
        m.decode(raw_envelope(int(m.MessageKind.GOSSIP), body, version=np.ones(2, np.float32)))
    with pytest.raises(m.UnknownKind):
        m.decode(raw_envelope(np.ones(2, np.uint8), body))  # type: ignore[arg-type]
    with pytest.raises(m.UnknownKind):
        m.decode(raw_envelope(99, body))
    with pytest.raises(m.UnknownKind):
        m.decode(raw_envelope("7", body))  # type: ignore[arg-type]
    for bad in (pack([1, 7]), pack({"v": 1}), pack([1, 7, [1, 2]])):
        with pytest.raises(DecodeError):
            m.decode(bad)


def test_missing_and_extra_fields() -> None:
    body = body_of(GOSSIP)
    missing = {k: v for k, v in body.items() if k != "ttl"}
    with pytest.raises(m.SchemaError, match="ttl"):
        m.decode(raw_envelope(int(m.MessageKind.GOSSIP), missing))
    with pytest.raises(m.SchemaError, match="evil"):
        m.decode(raw_envelope(int(m.MessageKind.GOSSIP), {**body, "evil": 1}))


BAD_FIELDS = [
    (GOSSIP, "ttl", 256),
    (GOSSIP, "ttl", -1),
    (GOSSIP, "ttl", True),  # bool is not an int on the wire
    (GOSSIP, "ttl", 1.0),
    (GOSSIP, "origin", P.raw[:-1]),  # 37 bytes
    (GOSSIP, "origin", b"\x01" + P.raw[1:]),  # 38 bytes, not an identity multihash
    (GOSSIP, "origin", P.text),  # text, not raw
    (GOSSIP, "msg_id", b""),
    (GOSSIP, "topic", "t" * (m.MAX_TOPIC_LEN + 1)),
    (GOSSIP, "topic", b"bytes-not-str"),
    (m.Hello(("/ip4/1.2.3.4/tcp/1",), "a", 0, 1), "listen_addrs", ["a"] * (m.MAX_ADDRS_PER_PEER + 1)),
    (m.Hello(("/ip4/1.2.3.4/tcp/1",), "a", 0, 1), "round", -1),
    (m.PeerExchangeRequest(5), "max_peers", 0),
    (m.PeerExchangeResponse(((P, ("a",)),)), "peers", [[P.raw]]),  # record of the wrong arity
    (m.ShuffleRequest(((P, ("a",), 1),)), "entries", [[P.raw, ["a"], -1]]),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "codec", 9),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "dtype", "object"),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "shape", [1] * 9),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "meta", {"k": [1, 2]}),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "meta", {"k": float("nan")}),
    (m.DeltaStart(1, 1, P, P, DeltaCodec.FP32, "float32", (4,), 16, {}), "meta", {f"k{i}": 1 for i in range(33)}),
    (m.DeltaEnd(1, b"h" * 32, b"s" * 64), "content_hash", b"h" * 31),
    (m.DeltaEnd(1, b"h" * 32, b"s" * 64), "signature", b"s" * 65),
    (m.KeyShare(b"k" * 32, b"s" * 64), "x25519_pub", None),
    (m.RoundCommit(1, (P,), b"s" * 64), "peers", [P.raw] * (m.MAX_COMMIT_PEERS + 1)),
]


@pytest.mark.parametrize("msg, field, value", BAD_FIELDS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_field_values_are_schema_errors(msg: Any, field: str, value: Any) -> None:
    body = {**body_of(msg), field: value}
    with pytest.raises(m.SchemaError):
        m.decode(raw_envelope(int(msg.KIND), body))


@pytest.mark.parametrize(
    "history",
    [
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([np.inf], dtype=np.float32),
        np.zeros(3, dtype=np.float64),  # dtype allowed by the serializer, not by this field
        np.zeros((2, 2), dtype=np.float32),  # 2-D
        np.zeros(m.SKETCH_ELEMENTS + 1, dtype=np.float32),  # a record carries a sketch, never a model
    ],
)
def test_bad_history_arrays_are_schema_errors(history: np.ndarray) -> None:
    record = m.HistoryRecord(P, P, 1, 1, b"d" * 32, np.zeros(2, np.float32), b"s" * 64, b"o" * 64)
    body = {**body_of(record), "sketch": history}
    with pytest.raises(DecodeError):
        m.decode(raw_envelope(int(m.MessageKind.HISTORY_RECORD), body))


def test_encoding_an_invalid_message_is_a_local_error_not_a_wire_error() -> None:
    with pytest.raises(ValueError):
        m.encode(replace(GOSSIP, ttl=300))
    with pytest.raises(TypeError):
        m.encode(replace(GOSSIP, origin=P.raw))


def test_oversized_buffer_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError):
        m.decode(b"\x93" + b"\x00" * (m.MAX_MESSAGE_BYTES + 1))


def test_the_largest_messages_fit_the_object_budget() -> None:
    addrs = tuple(f"/ip4/198.18.0.{i}/tcp/4001" for i in range(m.MAX_ADDRS_PER_PEER))
    full = m.ShuffleRequest(tuple((P, addrs, 7) for _ in range(m.MAX_PEERS_PER_MESSAGE)))
    assert_same(m.decode(m.encode(full)), full)
    commit_peers = tuple(Identity.from_seed(i.to_bytes(32, "big")).peer_id for i in range(1, m.MAX_COMMIT_PEERS + 1))
    commit = m.RoundCommit(round=3, peers=commit_peers, signature=b"s" * m.SIGNATURE_LEN)
    assert_same(m.decode(m.encode(commit)), commit)


def test_a_frame_of_tiny_containers_is_refused_before_it_is_built() -> None:
    """4 MiB of empty maps in arrays (one byte each on the wire, ~64 as a
    dict) within every per-container cap: refused by the object budget,
    not decoded into ~4 million dicts (288 MiB, 2.2 s before the budget)."""
    inner = b"\xdc" + (4096).to_bytes(2, "big") + b"\x80" * 4096
    n = (m.MAX_MESSAGE_BYTES - 16) // len(inner)
    buf = b"\x93\x02\x01\xdc" + n.to_bytes(2, "big") + inner * n
    with pytest.raises(DecodeError, match="too many objects"):
        m.decode(buf)


def check_decode(buf: bytes) -> None:
    """The fuzz property: a valid message (which re-encodes) or DecodeError."""
    try:
        msg = m.decode(buf)
    except DecodeError:
        return
    assert type(msg) in {m.REGISTRY.message_class(k) for k in m.REGISTRY.kinds()}
    assert_same(m.decode(m.encode(msg)), msg)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(buf: bytes) -> None:
    check_decode(buf)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bodies_behind_a_valid_header(tail: bytes) -> None:
    for kind in (1, 7, 8, 12):
        check_decode(bytes([0x93, m.WIRE_VERSION, kind]) + tail)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def mutate(buf: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(buf)
    for op, pos, val in ops:
        if not out:
            break
        pos %= len(out)
        if op == "flip":
            out[pos] ^= val
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out.insert(pos, val)
        else:
            del out[pos]
    return bytes(out)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message, st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_encodings(msg: Any, ops: list[tuple[str, int, int]]) -> None:
    check_decode(mutate(m.encode(msg), ops))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    any_message,
    st.data(),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**64), 2**64 - 1)
        | st.floats()
        | st.text(max_size=5)
        | st.binary(max_size=40)
        | hnp.arrays(st.sampled_from(["float32", "float64", "uint16", "int8"]), st.integers(0, 3)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=6,
    ),
)
def test_fuzz_one_field_replaced_by_any_value(msg: Any, data: st.DataObject, value: Any) -> None:
    body = body_of(msg)
    field = data.draw(st.sampled_from(sorted(body)))
    try:
        buf = raw_envelope(int(msg.KIND), {**body, field: value})
    except (OverflowError, TypeError):
        return  # msgpack itself cannot carry it
    check_decode(buf)


def test_peer_fields_decode_to_peer_ids() -> None:
    back = m.decode(m.encode(GOSSIP))
    assert isinstance(back.origin, PeerId) and back.origin == P
