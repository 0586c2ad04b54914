"""Delta codecs: how a flat float32 vector becomes wire bytes and back.

All codecs are pure numpy, vectorised (no per-element Python), and
little-endian on the wire. Each is registered once in :data:`_CODECS`, keyed by
:class:`DeltaCodec`, whose integer values are wire format.

Contract shared by every codec:

* ``encode`` accepts only a float32 array with finite values; a NaN/Inf or a
  value the codec cannot represent is a *local* bug and raises ``ValueError``
  (never silently becomes inf on the wire).
* ``decode`` treats the payload as hostile: a wrong length or any non-finite
  decoded value raises :class:`~murmur.errors.DecodeError`.
* The payload length is a pure function of (codec, element count)
  (:func:`encoded_nbytes`), so a receiver can check a transfer's announced size
  before allocating anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Protocol

import numpy as np

from murmur.errors import DecodeError

__all__ = [
    "DeltaCodec",
    "CodecParams",
    "LandingDecoder",
    "INT8_BLOCK",
    "FP16_MAX",
    "encode",
    "decode",
    "encoded_nbytes",
]

FP16_MAX = 65504.0
INT8_BLOCK = 4096  # values per absmax scale; part of the INT8 codec's definition
INT8_FLUSH = 127 * float(np.finfo(np.float32).tiny)  # blocks below this encode as zeros
_INT8_QMAX = 127
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")


class DeltaCodec(IntEnum):
    """Wire ids of the delta codecs. Never renumber."""

    FP32 = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3


@dataclass(frozen=True)
class CodecParams:
    """What a decoder needs besides the payload: the codec and how many
    float32 values the payload holds. (INT8's scales travel *inside* the
    payload so they are covered by the delta's content hash and signature.)"""

    codec: DeltaCodec
    count: int


Payload = bytes | bytearray | memoryview


class _Codec(Protocol):
    def nbytes(self, count: int) -> int: ...
    def encode(self, flat: np.ndarray) -> memoryview: ...
    def decode(self, payload: Payload, count: int) -> np.ndarray: ...


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")


def _finite_range(flat: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of ``flat`` or None when empty. NaN propagates through
    min/max, so both being finite proves the whole array finite, in two
    allocation-free vectorised passes (cheaper than ``isfinite(x).all()``)."""
    if flat.size == 0:
        return None
    return float(flat.min()), float(flat.max())


def _all_finite(flat: np.ndarray) -> bool:
    """One BLAS pass, half the cost of min and max (it runs on every byte a
    node sends and receives): a sum of squares is NaN or Inf when any element
    is, since squares are never negative and nothing cancels. It also
    overflows on finite values beyond ~1e19; only then does the exact
    element-wise check run."""
    if flat.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.dot(flat, flat))):
            return True
    return bool(np.isfinite(flat).all())


def _require_finite_input(flat: np.ndarray) -> None:
    if not _all_finite(flat):
        raise ValueError("delta contains NaN or Inf; refusing to encode")


def _require_finite_output(values: np.ndarray) -> np.ndarray:
    if not _all_finite(values):
        raise DecodeError("delta decodes to NaN or Inf")
    return values


class _Fp32:
    """Exact. Encoding is zero-copy (a byte view of the input), and decoding
    is zero-copy (``np.frombuffer`` on the payload: if the payload is a
    writable bytearray the result is a writable array sharing its memory)."""

    def nbytes(self, count: int) -> int:
        return 4 * count

    def encode(self, flat: np.ndarray) -> memoryview:
        _require_finite_input(flat)
        return _bytes_of(flat)

    def decode(self, payload: Payload, count: int) -> np.ndarray:
        return _require_finite_output(np.frombuffer(payload, dtype=_F32, count=count))


class _Fp16:
    """IEEE half precision, round-to-nearest-even (numpy's cast).

    Error: relative ≤ 2^-11 for |x| in the normal range [2^-14, 65504];
    absolute ≤ 2^-25 below it (subnormals, flush to zero under 2^-25).
    |x| > 65504 raises ValueError at encode time instead of becoming inf.
    """

    def nbytes(self, count: int) -> int:
        return 2 * count

    def encode(self, flat: np.ndarray) -> memoryview:
        _require_finite_input(flat)
        rng = _finite_range(flat)
        if rng is not None and (rng[0] < -FP16_MAX or rng[1] > FP16_MAX):
            raise ValueError(f"value beyond ±{FP16_MAX:g} cannot be encoded as fp16 (range {rng})")
        return _bytes_of(flat.astype(_F16))

    def decode(self, payload: Payload, count: int) -> np.ndarray:
        return _require_finite_output(np.frombuffer(payload, dtype=_F16, count=count).astype(_F32))


class _Bf16:
    """bfloat16: the top 16 bits of the float32 pattern, rounded to nearest
    even on the bit pattern (add 0x7FFF + lsb, truncate), stored as uint16.

    Error: relative ≤ 2^-8 over the whole float32 normal range (same exponent
    range as float32); absolute ≤ 2^-134 for float32 subnormals. Values so
    close to float32 max that they round up to inf raise ValueError.
    """

    def nbytes(self, count: int) -> int:
        return 2 * count

    def encode(self, flat: np.ndarray) -> memoryview:
        _require_finite_input(flat)
        bits = flat.view(np.uint32)
        acc = bits >> 16  # one temporary, updated in place
        acc &= 1
        acc += 0x7FFF
        acc += bits  # finite input: cannot wrap (max 0x7F7FFFFF + 0x8000)
        acc >>= 16
        out = acc.astype(_U16)
        if out.size and int((out & 0x7FFF).max()) >= 0x7F80:
            raise ValueError("value rounds to inf in bf16")
        return _bytes_of(out)

    def decode(self, payload: Payload, count: int) -> np.ndarray:
        half = np.frombuffer(payload, dtype=_U16, count=count)
        bits = half.astype(np.uint32)
        bits <<= 16
        return _require_finite_output(bits.view(_F32))


class _Int8:
    """Symmetric int8 with one float32 absmax scale per block of
    :data:`INT8_BLOCK` values: q = rint(x / s), s = blockmax / 127.

    Payload: ``scales (float32 × nblocks) || q (int8 × count)``; the scales are
    inside the payload so the signature covers them. Error: absolute
    ≤ blockmax / 254 per value (half a quantisation step), plus float32
    rounding of the order 2^-22 · blockmax. A block whose blockmax is below
    :data:`INT8_FLUSH` (127 × the smallest normal float32, ~1.5e-36) encodes
    as zeros: its scale would be subnormal and lose the precision the bound
    needs; such a block's error is its blockmax.
    """

    def nbytes(self, count: int) -> int:
        return 4 * _nblocks(count) + count

    def encode(self, flat: np.ndarray) -> memoryview:
        _require_finite_input(flat)
        count = flat.size
        nblocks = _nblocks(count)
        out = np.empty(self.nbytes(count), dtype=np.uint8)
        scales = out[: 4 * nblocks].view(_F32)
        q = out[4 * nblocks :].view(np.int8)
        for values, block_scales, block_q in _block_views(flat, scales, q):
            absmax = np.maximum(values.max(axis=1), -values.min(axis=1))
            absmax[absmax < INT8_FLUSH] = 0.0  # flush blocks whose scale would be subnormal
            np.divide(absmax, _INT8_QMAX, out=block_scales)
            inverse = np.zeros_like(block_scales)
            np.divide(_INT8_QMAX, absmax, out=inverse, where=absmax > 0)
            scaled = values * inverse[:, None]
            np.rint(scaled, out=scaled)
            np.clip(scaled, -_INT8_QMAX, _INT8_QMAX, out=scaled)
            block_q[...] = scaled  # float32 -> int8, values already integral
        return _bytes_of(out)

    def decode(self, payload: Payload, count: int) -> np.ndarray:
        nblocks = _nblocks(count)
        scales = np.frombuffer(payload, dtype=_F32, count=nblocks)
        rng = _finite_range(scales)
        if rng is not None and not (rng[0] >= 0.0 and math.isfinite(rng[1])):
            raise DecodeError("int8 scales must be finite and non-negative")
        q = np.frombuffer(payload, dtype=np.int8, count=count, offset=4 * nblocks)
        out = np.empty(count, dtype=_F32)
        with np.errstate(over="ignore"):  # a hostile scale may overflow; caught just below
            for block_q, block_scales, block_out in _block_views(q, scales, out):
                np.multiply(block_q, block_scales[:, None], out=block_out)
        return _require_finite_output(out)


def _nblocks(count: int) -> int:
    return -(-count // INT8_BLOCK)


def _block_views(values: np.ndarray, scales: np.ndarray, other: np.ndarray):
    """Yield (values, scales, other) as 2-D block views: first all full blocks
    at once, then the short tail block (if any) — no padding copies."""
    full = values.size // INT8_BLOCK
    cut = full * INT8_BLOCK
    if full:
        yield values[:cut].reshape(full, INT8_BLOCK), scales[:full], other[:cut].reshape(full, INT8_BLOCK)
    if cut < values.size:
        yield values[cut:].reshape(1, -1), scales[full:], other[cut:].reshape(1, -1)


_CODECS: MappingProxyType[DeltaCodec, _Codec] = MappingProxyType(
    {
        DeltaCodec.FP32: _Fp32(),
        DeltaCodec.FP16: _Fp16(),
        DeltaCodec.BF16: _Bf16(),
        DeltaCodec.INT8: _Int8(),
    }
)


def encoded_nbytes(codec: DeltaCodec, count: int) -> int:
    """Exact payload size of ``count`` float32 values under ``codec``."""
    if count < 0:
        raise ValueError("negative count")
    return _CODECS[DeltaCodec(codec)].nbytes(count)


def encode(array: np.ndarray, codec: DeltaCodec) -> tuple[memoryview, CodecParams]:
    """Encode a float32 array (any shape; flattened in C order).

    For FP32 the returned view aliases ``array``: do not mutate it while the
    payload is in use.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise TypeError(f"expected a float32 ndarray, got {getattr(array, 'dtype', type(array))}")
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(_F32)
    codec = DeltaCodec(codec)
    return _CODECS[codec].encode(flat), CodecParams(codec, flat.size)


def decode(payload: Payload, params: CodecParams) -> np.ndarray:
    """Decode a payload to a flat float32 array; raises DecodeError for a
    wrong length or non-finite values. FP32 returns a view of ``payload``."""
    impl = _CODECS[params.codec]
    expected = impl.nbytes(params.count)
    size = memoryview(payload).nbytes
    if size != expected:
        raise DecodeError(f"{params.codec.name} payload of {size} bytes, expected {expected}")
    return impl.decode(payload, params.count)


class LandingDecoder:
    """:func:`decode` for a payload that arrives piece by piece into one
    buffer: :meth:`landed` checks each piece's values while it is still in
    cache, so :meth:`decode` need not read the whole payload again.

    That applies to FP32, whose payload bytes are the values: the end-of-
    transfer finiteness check was a second pass over every byte received,
    from memory long since evicted (a few percent of a delta's receive
    work). Other codecs decode into a fresh array, which :meth:`decode`
    checks as :func:`decode` does. Nothing is skipped: a payload decodes
    without its full check only if :meth:`landed` saw every byte of it.
    """

    def __init__(self, params: CodecParams, payload: memoryview) -> None:
        self.params = params
        self._payload = payload
        # FP32: the payload as float32 values, and how many are checked (a prefix).
        fp32 = params.codec is DeltaCodec.FP32 and memoryview(payload).nbytes == _F32.itemsize * params.count
        self._values = np.frombuffer(payload, dtype=_F32) if fp32 else None  # else decode() judges it
        self._checked = 0

    def landed(self, end: int) -> None:
        """Bytes ``[0, end)`` of the payload are final. Raises
        :class:`~murmur.errors.DecodeError` as soon as a value among them is
        not finite."""
        if self._values is None:
            return
        stop = end // _F32.itemsize
        if stop > self._checked:
            _require_finite_output(self._values[self._checked : stop])
            self._checked = stop

    def decode(self) -> np.ndarray:
        """The payload decoded, as :func:`decode` would (same errors)."""
        values = self._values
        if values is not None and self._checked == values.size == self.params.count:
            return values
        return decode(self._payload, self.params)


def roundtrip(array: np.ndarray, codec: DeltaCodec) -> np.ndarray:
    """What a receiver decodes of ``array`` sent with ``codec`` (same shape).

    Why: a node that keeps state mirrored by its receivers (the round
    engine's public model) must advance it by these values, not by the exact
    ones, or sender and replicas drift apart by the accumulated rounding.
    Every codec is idempotent on its own output (tested), so re-encoding the
    result for the wire sends exactly these values. FP32 returns ``array``.
    """
    if DeltaCodec(codec) is DeltaCodec.FP32:
        return array
    payload, params = encode(array, codec)
    return decode(payload, params).reshape(array.shape)

