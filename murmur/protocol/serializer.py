"""msgpack with strict limits and one registry of extension types.

Everything a peer sends is decoded here first, so this module is the first
line of defence: the buffer size and every container/bin/str length are capped
*before* msgpack allocates, strings must be valid UTF-8 (``raw=False``), map
keys must be str/bytes (``strict_map_key``), and the only extension types that
decode are the ones in :data:`EXT_TYPES`. Anything wrong becomes
:class:`~murmur.errors.DecodeError`; nothing is ever unpickled.

numpy arrays travel as one ext: a tiny header (dtype name from an allow-list,
shape) followed by the raw little-endian bytes. Decoding is a read-only
``np.frombuffer`` view of the ext payload, i.e. no per-element work at all.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from murmur.errors import DecodeError

__all__ = [
    "ALLOWED_DTYPES",
    "EXT_TYPES",
    "ExtCodec",
    "NDARRAY_MAX_DIMS",
    "NDARRAY_MAX_ELEMENTS",
    "UnpackLimits",
    "DEFAULT_LIMITS",
    "pack",
    "unpack",
    "unpack_head",
]

# --------------------------------------------------------------------------- limits

NDARRAY_MAX_DIMS = 8
NDARRAY_MAX_ELEMENTS = 1 << 26  # 64 Mi elements; a frame cap is usually far tighter


@dataclass(frozen=True)
class UnpackLimits:
    """Caps applied before msgpack allocates anything.

    The defaults fit one transport frame (4 MiB) with headroom; callers that
    know a tighter bound (e.g. a control-only channel) pass their own.
    """

    max_buffer_size: int = 8 * 1024 * 1024
    max_bin_len: int = 8 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_array_len: int = 64 * 1024
    max_map_len: int = 1024
    max_ext_len: int = 8 * 1024 * 1024
    # Containers and their items over the whole object. The caps above are
    # per container: 4 MiB of arrays of empty maps (one byte each on the wire,
    # ~64 as a dict) stayed within them and cost 288 MiB and 2.2 s of the
    # event loop before the schema refused the message.
    max_objects: int = 1 << 16


DEFAULT_LIMITS = UnpackLimits()

# --------------------------------------------------------------------------- ext registry


@dataclass(frozen=True)
class ExtCodec:
    """One msgpack extension type: its code, the Python type it carries, and
    the functions turning one into the other. ``unpack`` gets the ext payload
    (bytes) and must raise :class:`DecodeError` for anything malformed."""

    code: int
    py_type: type
    pack: Callable[[Any], bytes]
    unpack: Callable[[bytes], Any]


# dtype names accepted on the wire. uint16 carries bfloat16 bit patterns (numpy
# has no bf16). Always little-endian; object/void/bool/complex never decode.
ALLOWED_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        name: np.dtype(name).newbyteorder("<")
        for name in ("float32", "float16", "uint16", "int8", "uint8", "int32", "int64", "float64")
    }
)
_U8 = struct.Struct(">B")
_DIM = struct.Struct(">Q")


def _pack_ndarray(array: np.ndarray) -> bytes:
    """Header ``u8 len(dtype) | dtype | u8 ndim | ndim x u64be`` then raw bytes."""
    name = array.dtype.name
    if name not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot be serialized; allowed: {sorted(ALLOWED_DTYPES)}")
    if array.ndim > NDARRAY_MAX_DIMS or array.size > NDARRAY_MAX_ELEMENTS:
        raise ValueError(f"array too large to serialize: shape {array.shape}")
    wire = np.ascontiguousarray(array, dtype=ALLOWED_DTYPES[name])
    dtype_bytes = name.encode("ascii")
    header = b"".join(
        [_U8.pack(len(dtype_bytes)), dtype_bytes, _U8.pack(wire.ndim), *(_DIM.pack(d) for d in wire.shape)]
    )
    return header + memoryview(wire).cast("B")


def _unpack_ndarray(data: bytes) -> np.ndarray:
    """Validate header and length, then view the bytes (read-only, no copy)."""
    try:
        (name_len,) = _U8.unpack_from(data, 0)
        pos = 1 + name_len
        name = data[1:pos].decode("ascii")
        (ndim,) = _U8.unpack_from(data, pos)
        pos += 1
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError("ndarray ext: truncated or malformed header") from exc
    dtype = ALLOWED_DTYPES.get(name)
    if dtype is None:
        raise DecodeError(f"ndarray ext: dtype {name!r} not allowed")
    if ndim > NDARRAY_MAX_DIMS:
        raise DecodeError(f"ndarray ext: {ndim} dims > {NDARRAY_MAX_DIMS}")
    end = pos + ndim * _DIM.size
    if len(data) < end:
        raise DecodeError("ndarray ext: truncated shape")
    shape = tuple(_DIM.unpack_from(data, pos + i * _DIM.size)[0] for i in range(ndim))
    count = math.prod(shape)  # exact Python ints: no overflow games
    if count > NDARRAY_MAX_ELEMENTS:
        raise DecodeError(f"ndarray ext: {count} elements > {NDARRAY_MAX_ELEMENTS}")
    if len(data) - end != count * dtype.itemsize:
        raise DecodeError(
            f"ndarray ext: {len(data) - end} data bytes, expected {count} x {dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)


def _build_registry(*codecs: ExtCodec) -> Mapping[int, ExtCodec]:
    by_code: dict[int, ExtCodec] = {}
    for codec in codecs:
        if not 0 <= codec.code <= 127 or codec.code in by_code:
            raise ValueError(f"bad or duplicate ext code {codec.code}")
        by_code[codec.code] = codec
    return MappingProxyType(by_code)


# The one place where extension types are registered. Codes are wire format:
# never renumber, only append.
EXT_TYPES: Mapping[int, ExtCodec] = _build_registry(
    ExtCodec(code=1, py_type=np.ndarray, pack=_pack_ndarray, unpack=_unpack_ndarray),
)
_EXT_BY_TYPE: Mapping[type, ExtCodec] = MappingProxyType({c.py_type: c for c in EXT_TYPES.values()})

# --------------------------------------------------------------------------- pack / unpack


def _default(obj: Any) -> msgpack.ExtType:
    for py_type, codec in _EXT_BY_TYPE.items():
        if isinstance(obj, py_type):
            return msgpack.ExtType(codec.code, codec.pack(obj))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    codec = EXT_TYPES.get(code)
    if codec is None:
        raise DecodeError(f"unknown ext type {code}")
    return codec.unpack(data)


def pack(obj: Any) -> bytes:
    """Serialize ``obj``. bytes/bytearray/memoryview become msgpack bin (one
    copy, no per-element work); registered types become their ext.
    Raises TypeError for anything unserializable (a local bug, not a peer's)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=False)


_SCAN = (tuple, list, dict, msgpack.Timestamp)


def _reject_timestamps(obj: Any) -> None:
    """msgpack decodes ext -1 (timestamp) itself, bypassing ``ext_hook``; we
    register no such type, so refuse it. Iterative: nesting may be ~1000 deep.
    Plain loops, no generators: it runs on every message received."""
    stack = [obj] if isinstance(obj, _SCAN) else []
    push, pop = stack.append, stack.pop
    while stack:
        item = pop()
        if isinstance(item, msgpack.Timestamp):
            raise DecodeError("timestamp ext type is not accepted")
        for value in item.values() if isinstance(item, dict) else item:
            if isinstance(value, _SCAN):
                push(value)


class _ObjectBudget:
    """Counts what msgpack builds, as it builds it: each array or map (its
    hook runs once the container is complete) costs one plus its items, and
    past ``max_objects`` decoding stops. At most one container's items
    (``max_array_len``) are ever built beyond the budget."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def array(self, items: tuple[Any, ...]) -> tuple[Any, ...]:
        self._spend(len(items) + 1)
        return items

    def map(self, items: dict[Any, Any]) -> dict[Any, Any]:
        self._spend(2 * len(items) + 1)
        return items

    def _spend(self, objects: int) -> None:
        self.left -= objects
        if self.left < 0:
            raise DecodeError("message holds too many objects")


def _budgeted(limits: UnpackLimits, size: int) -> Mapping[str, Any]:
    """msgpack's keyword arguments for one decode of ``size`` bytes: the
    limits' options, and a fresh :class:`_ObjectBudget`'s hooks where the
    bytes could hold more than it allows. Every object takes at least a byte
    and is counted at most twice (as a container, as an item), so a buffer
    of up to half the budget needs no count (control messages: the hooks
    would add a third to their decode)."""
    if 2 * size <= limits.max_objects:
        return _unpack_options(limits)
    budget = _ObjectBudget(limits.max_objects)
    return {**_unpack_options(limits), "list_hook": budget.array, "object_hook": budget.map}


@functools.cache
def _unpack_options(limits: UnpackLimits) -> Mapping[str, Any]:
    """msgpack's keyword arguments for ``limits``, built once per limits (a
    message decode is a few microseconds; building this was one of them)."""
    return MappingProxyType({
        "raw": False,
        "use_list": False,
        "strict_map_key": True,
        "ext_hook": _ext_hook,
        "max_bin_len": limits.max_bin_len,
        "max_str_len": limits.max_str_len,
        "max_array_len": limits.max_array_len,
        "max_map_len": limits.max_map_len,
        "max_ext_len": limits.max_ext_len,
    })


# ValueError covers FormatError, StackError (nesting), ExtraData, UnicodeDecodeError,
# incomplete input and exceeded limits; TypeError covers unhashable map keys.
_MALFORMED = (ValueError, TypeError, msgpack.UnpackException, OverflowError)


def _check_size(buf: bytes | bytearray | memoryview, limits: UnpackLimits) -> None:
    if len(buf) > limits.max_buffer_size:
        raise DecodeError(f"message of {len(buf)} bytes > {limits.max_buffer_size}")


def unpack(buf: bytes | bytearray | memoryview, limits: UnpackLimits = DEFAULT_LIMITS) -> Any:
    """Decode one msgpack object; arrays decode to tuples (immutable).

    Raises :class:`DecodeError` for any malformed, oversized or trailing input.
    """
    _check_size(buf, limits)
    try:
        obj = msgpack.unpackb(buf, **_budgeted(limits, len(buf)))
    except DecodeError:
        raise
    except _MALFORMED as exc:
        raise DecodeError(f"malformed msgpack: {exc}") from exc
    _reject_timestamps(obj)
    return obj


def unpack_head(
    buf: bytes | bytearray | memoryview, max_head: int, limits: UnpackLimits = DEFAULT_LIMITS
) -> tuple[Any, int]:
    """Decode the msgpack object at the start of ``buf``, which must end within
    its first ``max_head`` bytes, and return it with its length: what follows
    is raw bytes the caller takes as a view (a message tail), which is why only
    the bounded head is ever handed to msgpack (``Unpacker.feed`` copies).

    Raises :class:`DecodeError` for a malformed or over-long head.
    """
    _check_size(buf, limits)
    unpacker = msgpack.Unpacker(max_buffer_size=max_head, **_budgeted(limits, min(len(buf), max_head)))
    try:
        unpacker.feed(buf[:max_head])
        obj = unpacker.unpack()
    except DecodeError:
        raise
    except msgpack.OutOfData:
        raise DecodeError(f"message head does not end within {max_head} bytes") from None
    except _MALFORMED as exc:
        raise DecodeError(f"malformed msgpack: {exc}") from exc
    _reject_timestamps(obj)
    return obj, unpacker.tell()
