"""Compressed round payloads (protocol/sparse.py) and their path through a
signed, streamed transfer: layouts that size them, masks both ends derive,
and every malformed payload a typed DecodeError."""

from __future__ import annotations

import struct

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import DecodeError, LimitExceeded, PeerFault
from murmur.protocol import codecs
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.delta import AssemblerLimits, DeltaAssembler, DeltaSender, PreparedDelta
from murmur.protocol.identity import Identity
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.messages import DeltaChunk, DeltaEnd, DeltaStart, decode
from murmur.protocol.sparse import (
    INDEX_BYTES,
    MaskScope,
    RoundFormat,
    SparseDecodeError,
    Sparsifier,
    random_mask,
)

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
D = 1000
TOPK = RoundFormat(Sparsifier.TOPK, 0.05)
RANDK = RoundFormat(Sparsifier.RANDK, 0.05, MaskScope.SENDER, seed=11)


def topk_payload(indices: list[int], values: list[float]) -> bytes:
    """An fp32 top-k payload written by hand (RoundFormat.encode refuses bad indices and values)."""
    return np.array(indices, "<u4").tobytes() + np.array(values, "<f4").tobytes()


# --------------------------------------------------------------------------- masks


def test_the_shared_mask_is_identical_at_both_ends_and_differs_per_round_and_sender() -> None:
    k = RANDK.count(D)
    sender_side = RANDK.mask(D, 7, ALICE.peer_id.raw)
    receiver_side = RoundFormat(Sparsifier.RANDK, 0.05, MaskScope.SENDER, seed=11).mask(D, 7, ALICE.peer_id.raw)
    np.testing.assert_array_equal(sender_side, receiver_side)
    assert sender_side.shape == (k,) and len(np.unique(sender_side)) == k
    assert (np.diff(sender_side) > 0).all() and 0 <= sender_side[0] and sender_side[-1] < D
    next_round = RANDK.mask(D, 8, ALICE.peer_id.raw)
    other_sender = RANDK.mask(D, 7, BOB.peer_id.raw)
    other_network = RoundFormat(Sparsifier.RANDK, 0.05, MaskScope.SENDER, seed=12).mask(D, 7, ALICE.peer_id.raw)
    for other in (next_round, other_sender, other_network):
        assert len(np.intersect1d(other, sender_side)) < k // 2  # independent draws overlap by ~k²/D


def test_a_network_mask_is_the_same_for_every_sender() -> None:
    shared = RoundFormat(Sparsifier.RANDK, 0.05, MaskScope.NETWORK, seed=3)
    np.testing.assert_array_equal(shared.mask(D, 4, ALICE.peer_id.raw), shared.mask(D, 4, BOB.peer_id.raw))
    assert not np.array_equal(shared.mask(D, 4, b""), shared.mask(D, 5, b""))


@pytest.mark.parametrize("k", [0, 1, 499, 500, 501, 999, 1000])
def test_masks_of_any_size_are_distinct_sorted_and_in_range(k: int) -> None:
    mask = random_mask(1, 2, b"x", D, k)
    assert mask.shape == (k,) and len(np.unique(mask)) == k and (np.diff(mask) > 0).all()
    assert k == 0 or (mask[0] >= 0 and mask[-1] < D)


def test_the_mask_is_pinned_to_its_derivation() -> None:
    """The mask is wire format: a change to how it is drawn splits networks.
    First coordinates for a fixed seed, checked against BLAKE3 by hand."""
    words = np.frombuffer(blake3.blake3(b"murmur-randk-v1" + struct.pack(">QQ", 9, 4) + b"s").digest(8 * 8), "<u8")
    first = []
    for w in (words % np.uint64(10**6)).tolist():
        if w not in first:
            first.append(w)
    mask = random_mask(9, 4, b"s", 10**6, 3)
    np.testing.assert_array_equal(mask, np.sort(first[:3]))


def _first_distinct_by_hand(seed: int, round_: int, sender: bytes, d: int, k: int) -> list[int]:
    """The mask's definition, one word at a time: the first k distinct words mod d."""
    stream = blake3.blake3(b"murmur-randk-v1" + struct.pack(">QQ", seed, round_) + sender)
    seen: set[int] = set()
    offset = 0
    while len(seen) < k:
        word = int.from_bytes(stream.digest(8, seek=offset), "little") % d
        offset += 8
        seen.add(word)
    return sorted(seen)


@pytest.mark.parametrize("k", [62, 63, 200, 499, 500])  # both sides of the sort / scatter switch (d / 16)
def test_large_masks_keep_their_derivation(k: int) -> None:
    """Large masks are drawn another way (a scatter, not a sort): still the
    first k distinct words of the same stream, or networks split."""
    np.testing.assert_array_equal(random_mask(5, 6, b"peer", D, k), _first_distinct_by_hand(5, 6, b"peer", D, k))


# --------------------------------------------------------------------------- sizes and round trips


@pytest.mark.parametrize("codec", list(DeltaCodec))
@pytest.mark.parametrize("fmt", [RoundFormat(), TOPK, RANDK], ids=["dense", "topk", "randk"])
def test_round_trip_every_format_and_codec(fmt: RoundFormat, codec: DeltaCodec) -> None:
    rng = np.random.default_rng(0)
    k = fmt.count(D)
    if fmt.sparsifier is Sparsifier.TOPK:
        indices = np.sort(rng.choice(D, k, replace=False))
    elif fmt.sparsifier is Sparsifier.RANDK:
        indices = fmt.mask(D, 3, ALICE.peer_id.raw)
    else:
        indices = None
    values = rng.standard_normal(k).astype(np.float32)
    payload, decoded = fmt.encode(indices, values, codec, D)
    assert len(payload) == fmt.nbytes(codec, D)
    got_indices, got = fmt.decode(bytes(payload), codec, D, 3, ALICE.peer_id.raw)
    np.testing.assert_array_equal(got, decoded)
    if indices is not None:
        np.testing.assert_array_equal(got_indices, indices)
    dense = fmt.decode_dense(bytes(payload), codec, D, 3, ALICE.peer_id.raw)
    assert dense.shape == (D,) and np.count_nonzero(dense) <= k


def test_random_k_costs_no_index_bytes_and_top_k_four_per_index() -> None:
    k = TOPK.count(D)
    assert RANDK.nbytes(DeltaCodec.INT4, D) == codecs.encoded_nbytes(DeltaCodec.INT4, k)
    assert TOPK.nbytes(DeltaCodec.FP32, D) == (INDEX_BYTES + 4) * k
    assert RoundFormat().nbytes(DeltaCodec.FP16, D) == 2 * D


# --------------------------------------------------------------------------- malformed payloads


@pytest.mark.parametrize(
    ("indices", "problem"),
    [
        ([3, 3] + list(range(10, 58)), "repeated"),
        ([5, 4] + list(range(10, 58)), "out of order"),
        (list(range(49)) + [D], "out of range"),
        (list(range(49)) + [2**32 - 1], "out of range"),
    ],
)
def test_bad_top_k_indices_are_decode_errors(indices: list[int], problem: str) -> None:
    payload = topk_payload(indices, [1.0] * len(indices))
    with pytest.raises(SparseDecodeError, match=problem):
        TOPK.decode(payload, DeltaCodec.FP32, D, 0, b"")


@pytest.mark.parametrize("fmt", [TOPK, RANDK, RoundFormat()], ids=["topk", "randk", "dense"])
@pytest.mark.parametrize("change", [-1, 1, -INDEX_BYTES])
def test_a_wrong_count_is_a_decode_error(fmt: RoundFormat, change: int) -> None:
    size = fmt.nbytes(DeltaCodec.FP32, D) + change
    with pytest.raises(SparseDecodeError, match="expected"):
        fmt.decode(bytes(max(0, size)), DeltaCodec.FP32, D, 0, b"")


def test_non_finite_values_in_a_sparse_payload_are_decode_errors() -> None:
    payload = topk_payload(list(range(50)), [1.0] * 49 + [float("nan")])
    with pytest.raises(DecodeError):
        TOPK.decode(payload, DeltaCodec.FP32, D, 0, b"")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([TOPK, RANDK, RoundFormat(Sparsifier.TOPK, 0.003)]),
    st.sampled_from(list(DeltaCodec)),
    st.binary(min_size=0, max_size=600),
)
def test_fuzzed_sparse_payloads_decode_valid_or_raise_decode_error(fmt: RoundFormat, codec: DeltaCodec, data: bytes) -> None:
    size = fmt.nbytes(codec, D)
    payload = (data * (size // max(1, len(data)) + 1))[:size] if data and len(data) % 7 else data
    try:
        indices, values = fmt.decode(payload, codec, D, 0, b"s")
    except DecodeError:
        return
    k = fmt.count(D)
    assert values.shape == (k,) and np.isfinite(values).all()
    assert indices is not None and indices.shape == (k,)
    assert (np.diff(indices) > 0).all() and indices[0] >= 0 and indices[-1] < D


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=50, max_size=50))
def test_any_index_list_decodes_only_if_valid(indices: list[int]) -> None:
    """Every list of 50 uint32 indices: accepted exactly when strictly increasing and below D."""
    payload = topk_payload(indices, [0.5] * 50)
    valid = all(b > a for a, b in zip(indices, indices[1:], strict=False)) and max(indices) < D
    try:
        got, _ = TOPK.decode(payload, DeltaCodec.FP32, D, 0, b"")
    except SparseDecodeError:
        assert not valid
        return
    assert valid
    np.testing.assert_array_equal(got, indices)


def test_the_sender_refuses_bad_indices_and_counts() -> None:
    values = np.ones(50, np.float32)
    with pytest.raises(ValueError):
        TOPK.encode(np.arange(50)[::-1].copy(), values, DeltaCodec.FP32, D)
    with pytest.raises(ValueError):
        TOPK.encode(np.arange(49), values[:49], DeltaCodec.FP32, D)


def test_formats_that_size_messages_differently_never_describe_alike() -> None:
    """The description enters the model fingerprint: two nodes whose formats
    would size a message differently must not agree on it, or every message
    between them is a malformed transfer (a peer fault) and not one refused
    link. 1/3 and 0.333333 read alike to six digits; at 10M parameters they
    carry 3333333 and 3333330 values."""
    d = 10_000_000
    for sparsifier in (Sparsifier.TOPK, Sparsifier.RANDK):
        generated, typed = RoundFormat(sparsifier, 1 / 3), RoundFormat(sparsifier, 0.333333)
        assert generated.nbytes(DeltaCodec.FP32, d) != typed.nbytes(DeltaCodec.FP32, d)
        assert generated.describe() != typed.describe()
    # What networks already run with describes as it did (fingerprints unchanged).
    assert [RoundFormat(Sparsifier.TOPK, r).describe() for r in (0.01, 1.0, 0.5, 1e-06)] == [
        "topk(0.01)", "topk(1)", "topk(0.5)", "topk(1e-06)"]


# --------------------------------------------------------------------------- through a transfer


def _layout(fmt: RoundFormat) -> TransferLayout:
    return TransferLayout.for_model(D, 1, fmt)


def _assembler(fmt: RoundFormat) -> DeltaAssembler:
    layout = _layout(fmt)
    return DeltaAssembler(BOB.peer_id, AssemblerLimits.for_layout(layout, peers=4), layout=layout)


def _stream(payload: bytes, codec: DeltaCodec, round_: int = 5, nbytes: int | None = None) -> list[object]:
    digest = blake3.blake3(payload).digest()
    signed = b"murmur-delta-v1" + digest + struct.pack(">Q", round_) + ALICE.peer_id.raw + BOB.peer_id.raw
    return [
        DeltaStart(9, round_, ALICE.peer_id, BOB.peer_id, codec, "float32", (1, D),
                   len(payload) if nbytes is None else nbytes, {"kind": "round"}),
        DeltaChunk(9, 0, payload),
        DeltaEnd(9, digest, ALICE.sign(signed)),
    ]


@pytest.mark.parametrize("fmt", [TOPK, RANDK], ids=["topk", "randk"])
def test_a_compressed_round_message_streams_signed_and_decodes_to_what_the_sender_applied(fmt: RoundFormat) -> None:
    rng = np.random.default_rng(2)
    k = fmt.count(D)
    indices = (np.sort(rng.choice(D, k, replace=False)) if fmt.sparsifier is Sparsifier.TOPK
               else fmt.mask(D, 5, ALICE.peer_id.raw))
    payload, decoded = fmt.encode(indices, rng.standard_normal(k).astype(np.float32), DeltaCodec.INT4, D)
    layout = _layout(fmt)
    prepared = PreparedDelta.of_payload(payload, DeltaCodec.INT4, (1, D))
    sender = DeltaSender(ALICE, BOB.peer_id, 5, prepared, meta=layout.meta(TransferKind.ROUND), chunk_bytes=64)
    assembler = _assembler(fmt)
    done = None
    for parts in sender:
        done = assembler.feed(ALICE.peer_id, decode(b"".join(parts)))
    assert done is not None and done.array.shape == (1, D)
    expected = np.zeros(D, np.float32)
    expected[indices] = decoded
    np.testing.assert_array_equal(done.array[0], expected)
    assert layout.payload_bytes(TransferKind.ROUND, DeltaCodec.INT4) == len(payload) < 4 * D // 10


def test_a_malformed_sparse_payload_costs_the_transfer_as_a_peer_fault() -> None:
    assembler = _assembler(TOPK)
    msgs = _stream(topk_payload([3, 3] + list(range(10, 58)), [1.0] * 50), DeltaCodec.FP32)
    with pytest.raises(SparseDecodeError) as caught:
        for msg in msgs:
            assembler.feed(ALICE.peer_id, msg)
    assert isinstance(caught.value, PeerFault)
    assert assembler.active() == 0 and assembler.buffered_bytes == 0


def test_a_compressed_transfer_of_the_dense_size_is_refused_before_allocating() -> None:
    """The receiver's format fixes the size: a sender that announces the
    dense size (another format, or a lie) is refused at DeltaStart."""
    assembler = _assembler(RANDK)
    start = _stream(b"\0" * 4 * D, DeltaCodec.FP32)[0]
    with pytest.raises(DecodeError, match="bytes, not"):
        assembler.feed(ALICE.peer_id, start)
    assert assembler.buffered_bytes == 0


def test_the_layout_sizes_compressed_rounds_but_keeps_room_for_whole_models() -> None:
    layout = _layout(RANDK)
    assert layout.payload_bytes(TransferKind.ROUND, DeltaCodec.FP32) == 4 * RANDK.count(D)
    assert layout.max_payload_bytes() == 4 * D  # a public model asked for with ModelRequest is still dense fp32
    with pytest.raises(LimitExceeded):
        layout.check_incoming({"kind": "round"}, (1, D), 4 * D + 1, layout.max_payload_bytes())
