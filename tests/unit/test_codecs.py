from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from murmur.errors import DecodeError
from murmur.protocol.codecs import (
    FP16_MAX,
    INT8_BLOCK,
    INT8_FLUSH,
    PACKED_BLOCK,
    CodecParams,
    DeltaCodec,
    LandingDecoder,
    Rounding,
    decode,
    encode,
    encoded_nbytes,
    roundtrip,
)

FP16_MIN_NORMAL = 2.0**-14
PACKED_QMAX = {DeltaCodec.INT4: 7, DeltaCodec.INT2: 1}


def round_trip(x: np.ndarray, codec: DeltaCodec) -> np.ndarray:
    payload, params = encode(x, codec)
    assert len(payload) == encoded_nbytes(codec, x.size)
    return decode(bytearray(payload), params)


@pytest.fixture
def wide() -> np.ndarray:
    """Values over many binades, both signs, plus exact zeros."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3 * INT8_BLOCK + 123).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 4, x.size).astype(np.float32)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("codec", list(DeltaCodec))
@pytest.mark.parametrize("n", [0, 1, INT8_BLOCK - 1, INT8_BLOCK, INT8_BLOCK + 1])
def test_round_trip_shape_and_dtype(codec: DeltaCodec, n: int) -> None:
    x = np.linspace(-1, 1, n, dtype=np.float32)
    y = round_trip(x, codec)
    assert y.dtype == np.float32 and y.shape == (n,)


def test_fp32_is_exact_and_zero_copy_both_ways(wide: np.ndarray) -> None:
    payload, params = encode(wide, DeltaCodec.FP32)
    assert np.shares_memory(np.frombuffer(payload, np.uint8), wide)
    buf = bytearray(payload)
    y = decode(buf, params)
    np.testing.assert_array_equal(y, wide)
    assert np.shares_memory(y, np.frombuffer(buf, np.uint8))


def test_fp16_relative_error_bound_in_normal_range(wide: np.ndarray) -> None:
    x = wide[(np.abs(wide) >= FP16_MIN_NORMAL) & (np.abs(wide) <= FP16_MAX)]
    assert x.size > 1000
    y = round_trip(x, DeltaCodec.FP16)
    rel = np.abs(y.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= 2.0**-11
    assert rel.max() > 2.0**-13  # the bound is tight enough to mean something


def test_fp16_absolute_error_bound_below_normal_range() -> None:
    x = np.linspace(-FP16_MIN_NORMAL, FP16_MIN_NORMAL, 10001, dtype=np.float32)
    y = round_trip(x, DeltaCodec.FP16)
    assert np.abs(y.astype(np.float64) - x).max() <= 2.0**-25


def test_fp16_max_is_representable_but_beyond_is_an_encode_error() -> None:
    edge = np.array([FP16_MAX, -FP16_MAX], dtype=np.float32)
    np.testing.assert_array_equal(round_trip(edge, DeltaCodec.FP16), edge)
    for bad in (65505.0, -65505.0, 1e6):
        with pytest.raises(ValueError):
            encode(np.array([0.0, bad], dtype=np.float32), DeltaCodec.FP16)


def test_bf16_relative_error_bound(wide: np.ndarray) -> None:
    x = wide[wide != 0]
    y = round_trip(x, DeltaCodec.BF16)
    rel = np.abs(y.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= 2.0**-8
    assert rel.max() > 2.0**-10


def test_bf16_rounds_to_nearest_even_on_the_bit_pattern() -> None:
    # 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even (1.0);
    # 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even): goes up.
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20], dtype=np.float32)
    y = round_trip(x, DeltaCodec.BF16)
    assert y.tolist() == [1.0, 1 + 2.0**-6, 1 + 2.0**-7]


def test_bf16_overflow_to_inf_is_an_encode_error() -> None:
    with pytest.raises(ValueError):
        encode(np.array([np.finfo(np.float32).max], dtype=np.float32), DeltaCodec.BF16)


def test_int8_absolute_error_is_at_most_blockmax_over_254(wide: np.ndarray) -> None:
    y = round_trip(wide, DeltaCodec.INT8)
    for start in range(0, wide.size, INT8_BLOCK):
        block = wide[start : start + INT8_BLOCK].astype(np.float64)
        blockmax = np.abs(block).max()
        err = np.abs(y[start : start + INT8_BLOCK] - block).max()
        # half a quantisation step, plus float32 rounding of the scale and product
        assert err <= blockmax / 254 + blockmax * 2.0**-22
    # the tail block keeps its own scale: a tiny tail is not crushed by a huge head
    x = np.concatenate([np.full(INT8_BLOCK, 1000.0, np.float32), np.array([1e-3, -2e-3], np.float32)])
    np.testing.assert_allclose(round_trip(x, DeltaCodec.INT8)[-2:], [1e-3, -2e-3], rtol=1e-2)


def test_int8_all_zero_block_decodes_to_zeros() -> None:
    np.testing.assert_array_equal(round_trip(np.zeros(10, np.float32), DeltaCodec.INT8), np.zeros(10))


@pytest.mark.parametrize("codec", list(DeltaCodec))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_an_encode_error(codec: DeltaCodec, bad: float) -> None:
    x = np.ones(INT8_BLOCK + 5, dtype=np.float32)
    x[-1] = bad
    with pytest.raises(ValueError):
        encode(x, codec)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(width=32)))
def test_fp32_accepts_exactly_the_finite_arrays(x: np.ndarray) -> None:
    """The finiteness check is a sum of squares (one pass), which overflows on
    huge finite values: those must still pass, and every NaN/Inf must not."""
    if np.isfinite(x).all():
        back = decode(*encode(x, DeltaCodec.FP32))
        np.testing.assert_array_equal(back, x)
    else:
        with pytest.raises(ValueError):
            encode(x, DeltaCodec.FP32)


def test_huge_finite_values_overflow_the_fast_check_but_pass() -> None:
    x = np.full(1000, 3e38, dtype=np.float32)  # x·x overflows float32
    np.testing.assert_array_equal(decode(*encode(x, DeltaCodec.FP32)), x)


def test_encode_requires_float32() -> None:
    with pytest.raises(TypeError):
        encode(np.ones(3, dtype=np.float64), DeltaCodec.FP32)


def _payload_with(codec: DeltaCodec, n: int, patch: bytes, at: int) -> tuple[bytearray, CodecParams]:
    payload, params = encode(np.ones(n, np.float32), codec)
    buf = bytearray(payload)
    buf[at : at + len(patch)] = patch
    return buf, params


@pytest.mark.parametrize(
    "codec, patch, at",
    [
        (DeltaCodec.FP32, np.float32(np.nan).tobytes(), 4),
        (DeltaCodec.FP32, np.float32(np.inf).tobytes(), 0),
        (DeltaCodec.FP16, np.float16(np.inf).tobytes(), 2),
        (DeltaCodec.FP16, np.float16(np.nan).tobytes(), 0),
        (DeltaCodec.BF16, b"\x80\x7f", 2),  # bf16 +inf
        (DeltaCodec.BF16, b"\xc0\xff", 0),  # bf16 nan
        (DeltaCodec.INT8, np.float32(np.nan).tobytes(), 0),  # scale nan
        (DeltaCodec.INT8, np.float32(-1.0).tobytes(), 0),  # negative scale
        (DeltaCodec.INT8, np.float32(3e38).tobytes(), 0),  # finite scale, q*scale overflows
    ],
)
def test_non_finite_payload_is_a_decode_error(codec: DeltaCodec, patch: bytes, at: int) -> None:
    buf, params = _payload_with(codec, 8, patch, at)
    with pytest.raises(DecodeError):
        decode(buf, params)


@pytest.mark.parametrize("codec", list(DeltaCodec))
def test_wrong_payload_length_is_a_decode_error(codec: DeltaCodec) -> None:
    payload, params = encode(np.ones(100, np.float32), codec)
    for buf in (bytes(payload)[:-1], bytes(payload) + b"\x00"):
        with pytest.raises(DecodeError):
            decode(buf, params)


def test_encoded_nbytes_matches_layout() -> None:
    n = 2 * INT8_BLOCK + 1
    assert encoded_nbytes(DeltaCodec.FP32, n) == 4 * n
    assert encoded_nbytes(DeltaCodec.FP16, n) == 2 * n
    assert encoded_nbytes(DeltaCodec.BF16, n) == 2 * n
    assert encoded_nbytes(DeltaCodec.INT8, n) == n + 3 * 4
    m = 2 * PACKED_BLOCK + 3
    assert encoded_nbytes(DeltaCodec.INT4, m) == 3 * 4 + (m + 1) // 2
    assert encoded_nbytes(DeltaCodec.INT2, m) == 3 * 4 + (m + 3) // 4


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(DeltaCodec)),
    hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(-1e4, 1e4, width=32)),
)
def test_property_round_trip_within_codec_bounds(codec: DeltaCodec, x: np.ndarray) -> None:
    y = round_trip(x, codec)
    err = np.abs(y.astype(np.float64) - x)
    ax = np.abs(x.astype(np.float64))
    if codec is DeltaCodec.FP32:
        assert (err == 0).all()
    elif codec is DeltaCodec.FP16:
        assert (err <= np.maximum(ax * 2.0**-11, 2.0**-25)).all()
    elif codec is DeltaCodec.BF16:
        assert (err <= np.maximum(ax * 2.0**-8, 2.0**-134)).all()
    elif codec in PACKED_QMAX:
        qmax = PACKED_QMAX[codec]
        for start in range(0, x.size, PACKED_BLOCK):  # every block within half a level of its own scale
            block = slice(start, start + PACKED_BLOCK)
            blockmax = ax[block].max()
            if blockmax < qmax * INT8_FLUSH / 127:
                assert (y[block] == 0).all()
            else:
                assert (err[block] <= blockmax / (2 * qmax) + blockmax * 2.0**-21).all()
    else:
        blockmax = ax.max() if x.size else 0.0  # x fits one block
        if blockmax < INT8_FLUSH:  # documented flush to zero: the error is the value itself
            assert (y == 0).all()
        else:
            assert (err <= blockmax / 254 + blockmax * 2.0**-22).all()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(DeltaCodec)), st.integers(0, 64), st.binary(max_size=400))
def test_fuzzed_payloads_decode_finite_or_raise_decode_error(codec: DeltaCodec, n: int, data: bytes) -> None:
    try:
        y = decode(data, CodecParams(codec, n))
    except DecodeError:
        return
    assert y.shape == (n,) and np.isfinite(y).all()


@pytest.mark.parametrize("codec", list(DeltaCodec))
@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(0, 3 * INT8_BLOCK + 5),
                    elements=st.floats(-6e4, 6e4, width=32, allow_nan=False, allow_infinity=False)))
def test_every_codec_is_idempotent_on_its_own_output(codec: DeltaCodec, x: np.ndarray) -> None:
    """A sender advances its mirrored state by roundtrip(x) and then sends
    those values: receivers must decode exactly them again."""
    once = roundtrip(x, codec)
    assert once.shape == x.shape
    np.testing.assert_array_equal(round_trip(np.ascontiguousarray(once), codec), once.reshape(-1))


def test_roundtrip_keeps_shape_and_fp32_is_the_array_itself() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert roundtrip(x, DeltaCodec.FP32) is x
    assert roundtrip(x, DeltaCodec.FP16).shape == (2, 6)


@pytest.mark.parametrize("codec", [DeltaCodec.INT8, DeltaCodec.INT4, DeltaCodec.INT2])
def test_stochastic_rounding_is_unbiased_and_stays_on_the_levels(codec: DeltaCodec) -> None:
    """E[decode(encode(x))] = x: the mean of many stochastic encodings
    converges to x (nearest rounding keeps a bias of up to half a level),
    and every decoding is still a level of the block's scale."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(2 * PACKED_BLOCK).astype(np.float32)
    nearest = round_trip(x, codec)
    draws = np.stack([
        decode(bytearray(encode(x, codec, Rounding.STOCHASTIC, rng)[0]), CodecParams(codec, x.size))
        for _ in range(400)
    ])
    qmax = PACKED_QMAX.get(codec, 127)
    step = np.abs(x).max() / qmax * 1.0001  # the widest block's level spacing
    assert np.abs(draws.mean(axis=0) - x).max() < step / 5
    assert np.abs(draws.mean(axis=0) - x).mean() < np.abs(nearest - x).mean() / 3 or codec is DeltaCodec.INT8
    assert (np.abs(draws - x) <= step).all()


def test_stochastic_rounding_needs_a_generator() -> None:
    with pytest.raises(ValueError):
        encode(np.ones(4, np.float32), DeltaCodec.INT4, Rounding.STOCHASTIC)


@pytest.mark.parametrize("codec", [DeltaCodec.INT4, DeltaCodec.INT2])
def test_packed_codecs_pack_several_values_a_byte(codec: DeltaCodec) -> None:
    x = np.array([1.0, -1.0, 0.0, 1.0, -1.0], np.float32)
    payload, params = encode(x, codec)
    assert len(payload) == 4 + (3 if codec is DeltaCodec.INT4 else 2)
    np.testing.assert_array_equal(decode(bytes(payload), params), x)


def test_landing_decoder_checks_fp32_values_as_they_land_and_decodes_in_place() -> None:
    values = np.arange(10, dtype=np.float32)
    buffer = memoryview(bytearray(values.nbytes))
    decoder = LandingDecoder(CodecParams(DeltaCodec.FP32, values.size), buffer)
    raw = values.tobytes()
    for end in (3, 17, 40):  # pieces that split values: only whole ones are checked
        buffer[:end] = raw[:end]
        decoder.landed(end)
    decoded = decoder.decode()
    assert decoded.tolist() == values.tolist()
    assert np.shares_memory(decoded, np.frombuffer(buffer.obj, np.uint8))  # a view, not a copy


def test_landing_decoder_rejects_a_non_finite_value_when_it_lands() -> None:
    buffer = memoryview(bytearray(8))
    decoder = LandingDecoder(CodecParams(DeltaCodec.FP32, 2), buffer)
    buffer[:] = np.array([1.0, np.inf], np.float32).tobytes()
    decoder.landed(4)
    with pytest.raises(DecodeError):
        decoder.landed(8)


@pytest.mark.parametrize("codec", list(DeltaCodec))
def test_landing_decoder_without_every_byte_landed_decodes_as_decode_does(codec: DeltaCodec) -> None:
    """Nothing is skipped: a payload not seen whole by ``landed`` (or another
    codec's) gets decode()'s full checks, NaN included."""
    values = np.array([1.0, -2.0, 3.0, np.nan], np.float32)
    payload = values.tobytes() if codec is DeltaCodec.FP32 else encode(values[:3], codec)[0].tobytes()
    count = 4 if codec is DeltaCodec.FP32 else 3
    decoder = LandingDecoder(CodecParams(codec, count), memoryview(bytearray(payload)))
    decoder.landed(len(payload) // 2)
    if codec is DeltaCodec.FP32:
        with pytest.raises(DecodeError):
            decoder.decode()
    else:
        assert decoder.decode().tolist() == decode(payload, CodecParams(codec, count)).tolist()
