"""The multiformats unsigned varint, sans-IO: what multistream-select and
binary multiaddrs prefix their lengths and codes with.

LEB128, least significant group first, with the multiformats rules on top:
at most 9 bytes (63 bits) and minimal encoding only, so one number has one
encoding and a stranger cannot make a parser spin over padding bytes.
Every failure raises the fault class the caller names (a
:class:`~murmur.errors.PeerFault` for bytes off the wire).
"""

from __future__ import annotations

from murmur.errors import DecodeError, PeerFault

MAX_BYTES = 9
MAX_VALUE = 2**63 - 1


def encode(value: int) -> bytes:
    if not 0 <= value <= MAX_VALUE:
        raise ValueError(f"uvarint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_partial(
    buf: bytes | bytearray | memoryview, pos: int = 0, fault: type[PeerFault] = DecodeError
) -> tuple[int, int] | None:
    """``(value, next_pos)``, or ``None`` while the varint is still incomplete.

    Raises ``fault`` for a varint longer than 9 bytes or not minimally encoded:
    both are decided from the bytes already here, so a stream of ``0x80``
    bytes is refused at the tenth, not buffered."""
    value = 0
    for i in range(MAX_BYTES):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise fault("non-minimal varint")
            return value, pos + i + 1
    raise fault(f"varint longer than {MAX_BYTES} bytes")


def decode(buf: bytes | bytearray | memoryview, pos: int = 0, fault: type[PeerFault] = DecodeError) -> tuple[int, int]:
    """Like :func:`decode_partial`, but a truncated varint is a ``fault`` too."""
    got = decode_partial(buf, pos, fault)
    if got is None:
        raise fault("truncated varint")
    return got


def bounded_length(prefix: bytes | bytearray, limit: int, what: str) -> tuple[int, int] | None:
    """A uvarint length prefix: ``(length, prefix_bytes)`` once ``prefix``
    holds the whole uvarint, else ``None``. A length over ``limit`` is a
    :class:`DecodeError` naming ``what`` before any of its body is read."""
    got = decode_partial(prefix, 0, DecodeError)
    if got is not None and got[0] > limit:
        raise DecodeError(f"{what} of {got[0]} bytes exceeds {limit}")
    return got
