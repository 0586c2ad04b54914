"""Sealed tails as a split frame delivers them, for tests of their readers."""

from __future__ import annotations

from murmur.protocol.framing import FrameDecoder, FrameEncoder, FrameType
from murmur.protocol.noise import CipherState
from murmur.protocol.sealed import SealedTail

MAX_FRAME = 8 * 1024 * 1024  # over the largest chunk: tests send one past it


def sealed_tail(data: bytes, forged: bool = False) -> SealedTail:
    """``data`` as the tail of a split frame, sealed, framed and decoded for
    real (``forged``: one bit of its tag flipped on the wire)."""
    key = bytes(range(32))
    wire = FrameEncoder(CipherState(key), MAX_FRAME).encode(FrameType.DATA, 1, b"head", tail=data)
    if forged:
        wire[-1] ^= 1
    (frame,) = FrameDecoder(CipherState(key), MAX_FRAME).feed(wire)
    assert frame.tail is not None
    return frame.tail
