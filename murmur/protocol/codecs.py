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

The integer codecs (INT8, INT4, INT2) round to nearest by default; a sender
may ask for stochastic rounding instead (:class:`Rounding`), which is
unbiased (E[decode(encode(x))] = x), what error feedback with coarse levels
wants. Rounding is the encoder's choice and not on the wire: the decoder is
the same.
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
    "Rounding",
    "LandingDecoder",
    "INT8_BLOCK",
    "PACKED_BLOCK",
    "FP16_MAX",
    "encode",
    "decode",
    "encoded_nbytes",
]

FP16_MAX = 65504.0
INT8_BLOCK = 4096  # values per absmax scale; part of the INT8 codec's definition
INT8_FLUSH = 127 * float(np.finfo(np.float32).tiny)  # blocks below this encode as zeros
_INT8_QMAX = 127
PACKED_BLOCK = 128  # values per absmax scale of INT4 and INT2: 0.25 bit of scale per value
_CANONICAL_TRIES = 4  # ulp nudges that make a packed codec's scale a fixed point (see _canonical_scales)
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")


class DeltaCodec(IntEnum):
    """Wire ids of the delta codecs. Never renumber."""

    FP32 = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3
    INT4 = 4
    INT2 = 5


class Rounding(IntEnum):
    """How the integer codecs round a scaled value to a level (encoder side only)."""

    NEAREST = 0
    STOCHASTIC = 1  # floor(x / s + u), u ~ U[0, 1): unbiased, needs a generator


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
    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview: ...
    def decode(self, payload: Payload, count: int) -> np.ndarray: ...


class _Rounder:
    """Scaled values to integer levels, in place: nearest, or stochastic with ``rng``."""

    def __init__(self, rounding: Rounding = Rounding.NEAREST, rng: np.random.Generator | None = None) -> None:
        if rounding is Rounding.STOCHASTIC and rng is None:
            raise ValueError("stochastic rounding needs a random generator")
        self.rounding = rounding
        self.rng = rng

    def __call__(self, scaled: np.ndarray) -> None:
        if self.rounding is Rounding.NEAREST:
            np.rint(scaled, out=scaled)
            return
        assert self.rng is not None
        scaled += self.rng.random(scaled.shape, dtype=np.float32)
        np.floor(scaled, out=scaled)


_NEAREST = _Rounder()


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

    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview:
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

    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview:
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

    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview:
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

    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview:
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
            rounder(scaled)
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


class _Packed:
    """Symmetric ``bits``-bit integers with one float32 absmax scale per
    :data:`PACKED_BLOCK` values, packed ``8 // bits`` to a byte (first value
    in the low bits): q = round(x / s), s = blockmax / qmax, qmax = 2^(bits-1) − 1
    (INT4: −7..7, INT2: −1, 0, 1). A level is stored as q + 2^(bits-1); the
    one code below −qmax decodes to −qmax − 1 (a hostile payload may use it;
    it is finite). Bits past the last value in the last byte are ignored.

    Payload: ``scales (float32 × nblocks) || packed levels``. Error with
    nearest rounding: ≤ blockmax / (2·qmax) per value plus float32 rounding;
    with stochastic rounding ≤ blockmax / qmax, unbiased. Scales are
    canonical (:func:`_canonical_scales`), so the codec is idempotent on its
    own output like the others. Blocks below qmax × the smallest normal
    float32 encode as zeros, as INT8's do.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.per_byte = 8 // bits
        self.qmax = (1 << (bits - 1)) - 1
        self.offset = 1 << (bits - 1)
        self.flush = self.qmax * float(np.finfo(np.float32).tiny)

    def nblocks(self, count: int) -> int:
        return -(-count // PACKED_BLOCK)

    def nbytes(self, count: int) -> int:
        return 4 * self.nblocks(count) + -(-count // self.per_byte)

    def encode(self, flat: np.ndarray, rounder: _Rounder) -> memoryview:
        _require_finite_input(flat)
        count = flat.size
        nblocks = self.nblocks(count)
        out = np.empty(self.nbytes(count), dtype=np.uint8)
        scales = out[: 4 * nblocks].view(_F32)
        levels = np.empty(count, dtype=np.uint8)
        for values, block_scales, block_levels in _block_views(flat, scales, levels, PACKED_BLOCK):
            absmax = np.maximum(values.max(axis=1), -values.min(axis=1))
            absmax[absmax < self.flush] = 0.0
            np.divide(absmax, np.float32(self.qmax), out=block_scales)
            _canonical_scales(block_scales, self.qmax)
            inverse = np.zeros_like(block_scales)
            np.divide(np.float32(1.0), block_scales, out=inverse, where=block_scales > 0)
            scaled = values * inverse[:, None]
            rounder(scaled)
            np.clip(scaled, -self.qmax, self.qmax, out=scaled)
            scaled += self.offset
            block_levels[...] = scaled
        self._pack(levels, out[4 * nblocks :])
        return _bytes_of(out)

    def _pack(self, levels: np.ndarray, out: np.ndarray) -> None:
        padded = np.zeros(out.size * self.per_byte, dtype=np.uint8)
        padded[: levels.size] = levels
        groups = padded.reshape(-1, self.per_byte)
        out[...] = groups[:, 0]
        for i in range(1, self.per_byte):
            out |= groups[:, i] << np.uint8(i * self.bits)

    def decode(self, payload: Payload, count: int) -> np.ndarray:
        nblocks = self.nblocks(count)
        scales = np.frombuffer(payload, dtype=_F32, count=nblocks)
        rng = _finite_range(scales)
        if rng is not None and not (rng[0] >= 0.0 and math.isfinite(rng[1])):
            raise DecodeError(f"int{self.bits} scales must be finite and non-negative")
        packed = np.frombuffer(payload, dtype=np.uint8, offset=4 * nblocks)
        mask = np.uint8((1 << self.bits) - 1)
        levels = np.empty((packed.size, self.per_byte), dtype=np.int8)
        for i in range(self.per_byte):
            levels[:, i] = (packed >> np.uint8(i * self.bits)) & mask
        levels -= np.int8(self.offset)
        flat_levels = levels.reshape(-1)[:count]
        out = np.empty(count, dtype=_F32)
        with np.errstate(over="ignore"):
            for block_levels, block_scales, block_out in _block_views(flat_levels, scales, out, PACKED_BLOCK):
                np.multiply(block_levels, block_scales[:, None], out=block_out)
        return _require_finite_output(out)


def _canonical_scales(scales: np.ndarray, qmax: int) -> None:
    """Nudge each scale up by an ulp until s = fl(fl(qmax·s)/qmax), in place.

    Why: a re-encoded block's absmax is qmax·s (its largest level times the
    scale), and its new scale fl(that/qmax) differs from s for ~10% of
    float32 scales at qmax = 7, which would change every decoded value by
    an ulp: the codec would not be idempotent on its own output. A scale
    that is a fixed point of that map comes back exactly. One ulp more
    scale moves no level (the largest maps to qmax·(1 − 2^-24))."""
    q = np.float32(qmax)
    for _ in range(_CANONICAL_TRIES):
        with np.errstate(over="ignore"):
            moved = (scales * q) / q != scales
        if not moved.any():
            return
        scales[moved] = np.nextafter(scales[moved], np.float32(np.inf))


def _nblocks(count: int) -> int:
    return -(-count // INT8_BLOCK)


def _block_views(values: np.ndarray, scales: np.ndarray, other: np.ndarray, block: int = INT8_BLOCK):
    """Yield (values, scales, other) as 2-D block views: first all full blocks
    at once, then the short tail block (if any) — no padding copies."""
    full = values.size // block
    cut = full * block
    if full:
        yield values[:cut].reshape(full, block), scales[:full], other[:cut].reshape(full, block)
    if cut < values.size:
        yield values[cut:].reshape(1, -1), scales[full:], other[cut:].reshape(1, -1)


_CODECS: MappingProxyType[DeltaCodec, _Codec] = MappingProxyType(
    {
        DeltaCodec.FP32: _Fp32(),
        DeltaCodec.FP16: _Fp16(),
        DeltaCodec.BF16: _Bf16(),
        DeltaCodec.INT8: _Int8(),
        DeltaCodec.INT4: _Packed(4),
        DeltaCodec.INT2: _Packed(2),
    }
)


def encoded_nbytes(codec: DeltaCodec, count: int) -> int:
    """Exact payload size of ``count`` float32 values under ``codec``."""
    if count < 0:
        raise ValueError("negative count")
    return _CODECS[DeltaCodec(codec)].nbytes(count)


def encode(
    array: np.ndarray,
    codec: DeltaCodec,
    rounding: Rounding = Rounding.NEAREST,
    rng: np.random.Generator | None = None,
) -> tuple[memoryview, CodecParams]:
    """Encode a float32 array (any shape; flattened in C order).

    For FP32 the returned view aliases ``array``: do not mutate it while the
    payload is in use. ``rounding`` applies to the integer codecs (the float
    ones round to nearest); STOCHASTIC needs ``rng``.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise TypeError(f"expected a float32 ndarray, got {getattr(array, 'dtype', type(array))}")
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(_F32)
    codec = DeltaCodec(codec)
    rounder = _NEAREST if rounding is Rounding.NEAREST else _Rounder(rounding, rng)
    return _CODECS[codec].encode(flat, rounder), CodecParams(codec, flat.size)


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

    @property
    def ready(self) -> bool:
        """Whether :meth:`decode` is free: the payload's values, all checked as they landed."""
        values = self._values
        return values is not None and self._checked == values.size == self.params.count

    def decode(self) -> np.ndarray:
        """The payload decoded, as :func:`decode` would (same errors)."""
        if self.ready:
            assert self._values is not None
            return self._values
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

