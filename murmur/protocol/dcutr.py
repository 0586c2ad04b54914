"""DCUtR messages (``/libp2p/dcutr``, Direct Connection Upgrade through Relay), sans-IO.

The protocol exchanges uvarint-length-prefixed ``HolePunch`` protobufs
(schema in :mod:`murmur.protocol.pb`): a ``CONNECT`` each way carrying the
sender's observed (public) addresses, then a ``SYNC`` from the side that
opened the stream; the run of the protocol is in
:mod:`murmur.protocol.libp2p.dcutr`.

Everything off the wire is checked here, once: a message over
:data:`MAX_MESSAGE` bytes (the spec's 4 KiB), one that does not parse, a type
missing or unknown, more than :data:`MAX_ADDRS` addresses, or a SYNC that
carries addresses is a :class:`~murmur.errors.DecodeError`. Addresses murmur
cannot parse or dial (not TCP, a circuit, a port 0, a loopback, link-local or
wildcard IP) are skipped and counted: a peer may speak transports we do not,
and what we would dial must be an address another machine can reach.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.unknown_fields import UnknownFieldSet

from murmur.errors import DecodeError
from murmur.protocol import pb, uvarint
from murmur.protocol.addresses import REACHABLE_FROM_ELSEWHERE, Scope, scope
from murmur.protocol.multiaddr import AnyMultiaddr, Multiaddr

PROTOCOL = "/libp2p/dcutr"
MAX_MESSAGE = 4096  # bytes of one message, length prefix excluded (the spec's SHOULD)
MAX_ADDRS = 32  # addresses one CONNECT may carry at all; more is a DecodeError
_TYPE_FIELD = 1


class HolePunchType(enum.IntEnum):
    CONNECT = 100
    SYNC = 300


@dataclass(frozen=True)
class HolePunch:
    type: HolePunchType
    addrs: tuple[Multiaddr, ...] = ()  # the dialable TCP ones among what was sent
    skipped_addrs: int = 0  # sent, but not ones we would dial

    def encode(self) -> bytes:
        msg = pb.HolePunch(type=int(self.type))
        msg.ObsAddrs.extend(a.without_peer().to_bytes() for a in self.addrs)
        return pb.framed(msg, MAX_MESSAGE, "HolePunch")


def connect(addrs: Sequence[Multiaddr]) -> HolePunch:
    return HolePunch(HolePunchType.CONNECT, tuple(addrs))


SYNC = HolePunch(HolePunchType.SYNC)


def message_length(prefix: bytes | bytearray) -> tuple[int, int] | None:
    """``(length, prefix_bytes)`` once ``prefix`` holds the whole uvarint, else ``None``.
    A length over :data:`MAX_MESSAGE` is a :class:`DecodeError` before its body is read."""
    return uvarint.bounded_length(prefix, MAX_MESSAGE, "HolePunch")


def decode(body: bytes | bytearray | memoryview, allow_loopback: bool = False) -> HolePunch:
    if len(body) > MAX_MESSAGE:
        raise DecodeError(f"HolePunch of {len(body)} bytes exceeds {MAX_MESSAGE}")
    msg = pb.parse(pb.HolePunch, body, DecodeError, "HolePunch")
    if not msg.HasField("type"):
        # proto2 keeps an unknown enum value as an unknown field: the field reads as absent
        known = any(f.field_number == _TYPE_FIELD for f in UnknownFieldSet(msg))  # type: ignore[arg-type]
        raise DecodeError("unknown HolePunch type" if known else "HolePunch without a type")
    kind = HolePunchType(msg.type)
    raw = list(msg.ObsAddrs)
    if len(raw) > MAX_ADDRS:
        raise DecodeError(f"HolePunch with {len(raw)} addresses, more than {MAX_ADDRS}")
    if kind is HolePunchType.SYNC and raw:
        raise DecodeError("a SYNC carries no addresses")
    addrs: list[Multiaddr] = []
    skipped = 0
    for data in raw:
        addr = dialable(data, allow_loopback)
        if addr is None or addr in addrs:
            skipped += 1
        else:
            addrs.append(addr)
    return HolePunch(kind, tuple(addrs), skipped)


def dialable(data: bytes, allow_loopback: bool = False) -> Multiaddr | None:
    """The TCP address in ``data`` if it is one another machine could dial
    (or, with ``allow_loopback``, for nodes sharing one machine in tests, a
    loopback one), else ``None``."""
    try:
        addr = AnyMultiaddr.from_bytes(data).to_tcp()
    except ValueError:
        return None
    if addr is None or addr.port == 0:
        return None
    try:
        where = scope(addr.host)
        reachable = where in REACHABLE_FROM_ELSEWHERE or (allow_loopback and where is Scope.LOOPBACK)
    except ValueError:
        return None
    return addr.without_peer() if reachable else None
