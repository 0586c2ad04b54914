"""Circuit relay v2 messages (``/libp2p/circuit/relay/0.2.0/hop`` and ``/stop``), sans-IO.

Both protocols exchange uvarint-length-prefixed protobufs (schemas in
:mod:`murmur.protocol.pb`): a client sends a ``HopMessage`` (RESERVE or
CONNECT) to the relay and gets a ``HopMessage`` STATUS back; the relay sends
a ``StopMessage`` CONNECT to the reserved peer and gets a ``StopMessage``
STATUS back. After an OK to a CONNECT the stream carries the relayed
connection's bytes.

Everything off the wire is checked here, once: a message over
:data:`MAX_MESSAGE` bytes, one that does not parse, a required field missing,
a type or status this version does not know, or a peer id that is not a
valid Ed25519 identity is a :class:`~murmur.errors.DecodeError` (the relay
answers it with ``MALFORMED_MESSAGE``). Addresses murmur cannot parse are
skipped and counted, as identify does, since peers speak transports we do not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.unknown_fields import UnknownFieldSet

from murmur.errors import DecodeError
from murmur.protocol import pb, uvarint
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import AnyMultiaddr

HOP = "/libp2p/circuit/relay/0.2.0/hop"
STOP = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE = 4096  # bytes of one message (go-libp2p's maxMessageSize)
MAX_ADDRS = 32  # addresses kept from one Peer or Reservation
MAX_VOUCHER = 2048
_STATUS_FIELD = {"HopMessage": 5, "StopMessage": 4}


class HopType(enum.IntEnum):
    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(enum.IntEnum):
    CONNECT = 0
    STATUS = 1


class Status(enum.IntEnum):
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


@dataclass(frozen=True)
class Limit:
    """What the relay lets one circuit carry: ``None`` is unlimited."""

    duration_s: int | None = None
    data_bytes: int | None = None


@dataclass(frozen=True)
class Reservation:
    expire: int  # Unix seconds (UTC)
    addrs: tuple[AnyMultiaddr, ...] = ()
    voucher: bytes | None = None


@dataclass(frozen=True)
class PeerInfo:
    peer_id: PeerId
    addrs: tuple[AnyMultiaddr, ...] = ()


@dataclass(frozen=True)
class HopMessage:
    type: HopType
    peer: PeerInfo | None = None
    reservation: Reservation | None = None
    limit: Limit | None = None
    status: Status | None = None
    skipped_addrs: int = 0

    def encode(self) -> bytes:
        msg = pb.HopMessage(type=int(self.type))
        if self.peer is not None:
            _put_peer(msg.peer, self.peer)
        if self.reservation is not None:
            res = self.reservation
            msg.reservation.expire = res.expire
            msg.reservation.addrs.extend(a.to_bytes() for a in res.addrs)
            if res.voucher is not None:
                msg.reservation.voucher = res.voucher
        if self.limit is not None:
            _put_limit(msg.limit, self.limit)
        if self.status is not None:
            msg.status = int(self.status)
        return _framed(msg)


@dataclass(frozen=True)
class StopMessage:
    type: StopType
    peer: PeerInfo | None = None
    limit: Limit | None = None
    status: Status | None = None
    skipped_addrs: int = 0

    def encode(self) -> bytes:
        msg = pb.StopMessage(type=int(self.type))
        if self.peer is not None:
            _put_peer(msg.peer, self.peer)
        if self.limit is not None:
            _put_limit(msg.limit, self.limit)
        if self.status is not None:
            msg.status = int(self.status)
        return _framed(msg)


def _framed(msg: object) -> bytes:
    return pb.framed(msg, MAX_MESSAGE, "circuit message")  # type: ignore[arg-type]


def _put_peer(field: object, peer: PeerInfo) -> None:
    field.id = peer.peer_id.raw  # type: ignore[attr-defined]
    field.addrs.extend(a.to_bytes() for a in peer.addrs)  # type: ignore[attr-defined]


def _put_limit(field: object, limit: Limit) -> None:
    field.SetInParent()  # type: ignore[attr-defined]  # an empty Limit (unlimited) is still present
    if limit.duration_s is not None:
        field.duration = limit.duration_s  # type: ignore[attr-defined]
    if limit.data_bytes is not None:
        field.data = limit.data_bytes  # type: ignore[attr-defined]


# --- decoding -------------------------------------------------------------------------


def message_length(prefix: bytes | bytearray) -> tuple[int, int] | None:
    """``(length, prefix_bytes)`` once ``prefix`` holds the whole uvarint, else ``None``.
    A length over :data:`MAX_MESSAGE` is a :class:`DecodeError` before its body is read."""
    return uvarint.bounded_length(prefix, MAX_MESSAGE, "circuit message")


def decode_hop(body: bytes | bytearray | memoryview) -> HopMessage:
    _check_size(body)
    msg = pb.parse(pb.HopMessage, body, DecodeError, "HopMessage")
    peer, skipped = _peer(msg) if msg.HasField("peer") else (None, 0)
    reservation = None
    if msg.HasField("reservation"):
        res = msg.reservation
        addrs, more = _addrs(res.addrs, "reservation")
        skipped += more
        voucher = bytes(res.voucher) if res.HasField("voucher") else None
        if voucher is not None and len(voucher) > MAX_VOUCHER:
            raise DecodeError(f"reservation voucher of {len(voucher)} bytes exceeds {MAX_VOUCHER}")
        reservation = Reservation(int(res.expire), addrs, voucher)
    return HopMessage(HopType(msg.type), peer, reservation, _limit(msg), _status(msg), skipped)


def decode_stop(body: bytes | bytearray | memoryview) -> StopMessage:
    _check_size(body)
    msg = pb.parse(pb.StopMessage, body, DecodeError, "StopMessage")
    peer, skipped = _peer(msg) if msg.HasField("peer") else (None, 0)
    return StopMessage(StopType(msg.type), peer, _limit(msg), _status(msg), skipped)


def _check_size(body: bytes | bytearray | memoryview) -> None:
    if len(body) > MAX_MESSAGE:
        raise DecodeError(f"circuit message of {len(body)} bytes exceeds {MAX_MESSAGE}")


def _peer(msg: object) -> tuple[PeerInfo, int]:
    field = msg.peer  # type: ignore[attr-defined]
    try:
        peer_id = PeerId.from_bytes(bytes(field.id))
    except ValueError as exc:
        raise DecodeError(f"circuit peer id: {exc}") from None
    addrs, skipped = _addrs(field.addrs, "peer")
    return PeerInfo(peer_id, addrs), skipped


def _addrs(raw: Sequence[bytes], what: str) -> tuple[tuple[AnyMultiaddr, ...], int]:
    if len(raw) > MAX_ADDRS:
        raise DecodeError(f"{len(raw)} {what} addresses, more than {MAX_ADDRS}")
    addrs, skipped = [], 0
    for data in raw:
        try:
            addrs.append(AnyMultiaddr.from_bytes(data))
        except ValueError:
            skipped += 1
    return tuple(addrs), skipped


def _limit(msg: object) -> Limit | None:
    if not msg.HasField("limit"):  # type: ignore[attr-defined]
        return None
    field = msg.limit  # type: ignore[attr-defined]
    return Limit(int(field.duration) if field.HasField("duration") else None,
                 int(field.data) if field.HasField("data") else None)


def _status(msg: object) -> Status | None:
    if not msg.HasField("status"):  # type: ignore[attr-defined]
        # proto2 keeps an unknown enum value as an unknown field: the field reads as absent
        if any(f.field_number == _STATUS_FIELD[msg.DESCRIPTOR.name]  # type: ignore[attr-defined]
               for f in UnknownFieldSet(msg)):  # type: ignore[arg-type]
            raise DecodeError("unknown circuit status")
        return None
    try:
        return Status(msg.status)  # type: ignore[attr-defined]
    except ValueError:
        raise DecodeError(f"unknown circuit status {msg.status}") from None  # type: ignore[attr-defined]
