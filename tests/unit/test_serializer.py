from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import DecodeError
from murmur.protocol.serializer import (
    ALLOWED_DTYPES,
    EXT_TYPES,
    NDARRAY_MAX_DIMS,
    NDARRAY_MAX_ELEMENTS,
    UnpackLimits,
    pack,
    unpack,
)

NDARRAY_CODE = next(code for code, c in EXT_TYPES.items() if c.py_type is np.ndarray)


def ndarray_ext(name: str, shape: tuple[int, ...], data: bytes) -> bytes:
    """Hand-build an ndarray ext payload, independent of the packer."""
    header = bytes([len(name)]) + name.encode() + bytes([len(shape)]) + b"".join(struct.pack(">Q", d) for d in shape)
    return msgpack.packb(msgpack.ExtType(NDARRAY_CODE, header + data))


@pytest.mark.parametrize("name", sorted(ALLOWED_DTYPES))
def test_ndarray_round_trip_every_allowed_dtype(name: str) -> None:
    array = (np.arange(24) % 7).astype(name).reshape(2, 3, 4)
    out = unpack(pack({"a": array}))["a"]
    assert out.dtype == np.dtype(name)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_ndarray_decode_is_a_read_only_view_of_the_message() -> None:
    array = np.arange(1000, dtype=np.float32)
    out = unpack(pack(array))
    assert not out.flags.writeable
    assert not out.flags.owndata  # a view on the ext bytes, no element copy
    with pytest.raises(ValueError):
        out[0] = 1.0


def test_non_contiguous_and_big_endian_arrays_pack_as_little_endian() -> None:
    base = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    out = unpack(pack(base))
    np.testing.assert_array_equal(out, base)
    assert out.dtype.byteorder in ("<", "=")


def test_scalars_and_containers_round_trip_with_lists_as_tuples() -> None:
    obj = {"i": -5, "f": 1.5, "s": "héllo", "b": b"\x00\xff", "l": [1, [2, 3]], "n": None, "t": True}
    out = unpack(pack(obj))
    assert out == {"i": -5, "f": 1.5, "s": "héllo", "b": b"\x00\xff", "l": (1, (2, 3)), "n": None, "t": True}


def test_memoryview_packs_as_bin() -> None:
    data = np.arange(10, dtype=np.uint8)
    assert unpack(pack(memoryview(data))) == bytes(range(10))


@pytest.mark.parametrize("bad", [np.zeros(3, dtype=bool), np.zeros(3, dtype=np.complex64), np.array([object()])])
def test_disallowed_dtypes_do_not_pack(bad: np.ndarray) -> None:
    with pytest.raises(TypeError):
        pack(bad)


def test_unknown_python_types_do_not_pack() -> None:
    with pytest.raises(TypeError):
        pack({1, 2})


@pytest.mark.parametrize(
    "name, shape, nbytes",
    [
        ("float32", (3,), 8),  # too few bytes
        ("float32", (3,), 16),  # too many bytes
        ("bool", (3,), 3),  # dtype outside the allow-list
        ("object", (1,), 8),
        ("<f4", (1,), 4),  # allow-list is by name, not numpy's parser
        ("float32", (1,) * (NDARRAY_MAX_DIMS + 1), 4),
        ("uint8", (NDARRAY_MAX_ELEMENTS + 1,), 0),  # element cap checked before any length math
        ("uint8", (1 << 62, 1 << 62), 0),  # product overflowing int64 must not wrap
    ],
)
def test_malformed_ndarray_ext_is_decode_error(name: str, shape: tuple[int, ...], nbytes: int) -> None:
    with pytest.raises(DecodeError):
        unpack(ndarray_ext(name, shape, b"\x00" * nbytes))


def test_truncated_ndarray_headers_are_decode_errors() -> None:
    full = ndarray_ext("float32", (2, 2), b"\x00" * 16)
    ext_payload = msgpack.unpackb(full).data
    for cut in range(len(ext_payload) - 16):
        with pytest.raises(DecodeError):
            unpack(msgpack.packb(msgpack.ExtType(NDARRAY_CODE, ext_payload[:cut])))


def test_valid_hand_built_ext_decodes() -> None:
    out = unpack(ndarray_ext("int32", (2,), struct.pack("<ii", 7, -1)))
    assert out.tolist() == [7, -1]


@pytest.mark.parametrize(
    "buf",
    [
        msgpack.packb(msgpack.ExtType(42, b"x")),  # unregistered ext
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext, decoded by msgpack itself
        msgpack.packb([1, {"a": msgpack.Timestamp(1)}]),
        b"\xa2\xff\xfe",  # invalid utf-8
        msgpack.packb({1: 2}),  # non-str map key
        b"\xc1",  # reserved byte
        b"\x92\x01",  # truncated
        b"\x01\x02",  # trailing data
        b"\x91" * 5000,  # nesting deeper than msgpack's stack
        b"",
    ],
)
def test_malformed_msgpack_is_decode_error(buf: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack(buf)


def test_limits_are_enforced_before_allocation() -> None:
    limits = UnpackLimits(max_buffer_size=100, max_bin_len=10, max_str_len=10, max_array_len=3, max_map_len=2)
    assert unpack(pack([b"x" * 10, "y" * 10]), limits) == (b"x" * 10, "y" * 10)
    for obj in ([b"x" * 11], ["y" * 11], [1, 2, 3, 4], {"a": 1, "b": 2, "c": 3}, b"z" * 200):
        with pytest.raises(DecodeError):
            unpack(pack(obj), limits)
    # a bin header announcing 4 GiB with no body: refused, not allocated
    with pytest.raises(DecodeError):
        unpack(b"\xc6\xff\xff\xff\xff", limits)


def test_the_object_budget_counts_containers_and_items_over_the_whole_object() -> None:
    limits = UnpackLimits(max_objects=10)
    # (1, (2, 3), {"a": 4}): the inner array 1+2, the map 1+2, the outer 1+3 = 10
    assert unpack(pack([1, [2, 3], {"a": 4}]), limits) == (1, (2, 3), {"a": 4})
    with pytest.raises(DecodeError, match="too many objects"):
        unpack(pack([1, [2, 3], {"a": 4}, 5]), limits)
    # every container within the per-container caps, their total over the budget
    many_empty_maps = b"\xdc" + struct.pack(">H", 4096) + b"\x80" * 4096
    with pytest.raises(DecodeError, match="too many objects"):
        unpack(many_empty_maps, UnpackLimits(max_objects=4096))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(buf: bytes) -> None:
    try:
        unpack(buf)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(ALLOWED_DTYPES)),
    st.lists(st.integers(0, 4), max_size=3),
    st.binary(max_size=64),
)
def test_fuzzed_ndarray_ext_is_valid_or_decode_error(name: str, shape: list[int], data: bytes) -> None:
    try:
        out = unpack(ndarray_ext(name, tuple(shape), data))
    except DecodeError:
        return
    assert out.shape == tuple(shape)
    assert out.nbytes == len(data)
