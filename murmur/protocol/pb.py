"""The libp2p protobuf messages murmur speaks, built from descriptors in code.

Google's ``protobuf`` runtime does the encoding and parsing; only the
schemas are written here, as the ``FileDescriptorProto`` that ``protoc``
would have produced from this file (proto2, as the specs define them)::

    package murmur.libp2p;
    enum KeyType { RSA = 0; Ed25519 = 1; Secp256k1 = 2; ECDSA = 3; }
    message PublicKey { required KeyType Type = 1; required bytes Data = 2; }       // peer-ids spec
    message NoiseExtensions {                                                     // noise spec
      repeated bytes webtransport_certhashes = 1; repeated string stream_muxers = 2; }
    message NoiseHandshakePayload {
      optional bytes identity_key = 1; optional bytes identity_sig = 2; optional NoiseExtensions extensions = 4; }
    message Identify {                                                            // identify spec
      optional string protocolVersion = 5; optional string agentVersion = 6; optional bytes publicKey = 1;
      repeated bytes listenAddrs = 2; optional bytes observedAddr = 4; repeated string protocols = 3;
      optional bytes signedPeerRecord = 8; }
    enum HopType { RESERVE = 0; CONNECT = 1; STATUS = 2; }                        // circuit relay v2 spec
    enum StopType { CONNECT = 0; STATUS = 1; }   // (nested in HopMessage/StopMessage there: same wire format)
    enum Status { UNUSED = 0; OK = 100; RESERVATION_REFUSED = 200; RESOURCE_LIMIT_EXCEEDED = 201;
      PERMISSION_DENIED = 202; CONNECTION_FAILED = 203; NO_RESERVATION = 204; MALFORMED_MESSAGE = 400;
      UNEXPECTED_MESSAGE = 401; }
    message Peer { required bytes id = 1; repeated bytes addrs = 2; }
    message Reservation { required uint64 expire = 1; repeated bytes addrs = 2; optional bytes voucher = 3; }
    message Limit { optional uint32 duration = 1; optional uint64 data = 2; }
    message HopMessage { required HopType type = 1; optional Peer peer = 2; optional Reservation reservation = 3;
      optional Limit limit = 4; optional Status status = 5; }
    message StopMessage { required StopType type = 1; optional Peer peer = 2; optional Limit limit = 3;
      optional Status status = 4; }
    enum HolePunchType { CONNECT = 100; SYNC = 300; }   // DCUtR spec (nested in HolePunch there)
    message HolePunch { optional HolePunchType type = 1; repeated bytes ObsAddrs = 2; }
    message DialRequest { repeated bytes addrs = 1; optional fixed64 nonce = 2; }       // autonat v2 spec
    message DialResponse { optional uint32 status = 1; optional uint32 addrIdx = 2; optional uint32 dialStatus = 3; }
    message DialDataRequest { optional uint32 addrIdx = 1; optional uint64 numBytes = 2; }
    message DialDataResponse { optional bytes data = 1; }
    message AutonatMessage { optional DialRequest dialRequest = 1; optional DialResponse dialResponse = 2;
      optional DialDataRequest dialDataRequest = 3; optional DialDataResponse dialDataResponse = 4; }
    message DialBack { optional fixed64 nonce = 1; }
    message DialBackResponse { optional uint32 status = 1; }

The AutoNAT v2 spec writes proto3 with a ``oneof`` and enums; on the wire
that is the optional fields above (a oneof is its members, an enum a
varint). Statuses are read as integers so that one this version does not
know is seen and discarded (the spec's MUST), not silently parsed as unset.

Why descriptors in code rather than generated ``*_pb2.py`` files: there is
no ``protoc`` to regenerate them with on the machines murmur is built on, and
generated modules are tied to the runtime version that generated them.

:func:`parse` is the one way bytes off the wire become a message: any
failure of the runtime (truncation, a wrong wire type, a missing required
field, invalid UTF-8 in a string) is the caller's typed fault.
"""

from __future__ import annotations

import enum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as _PbDecodeError
from google.protobuf.message import Message

from murmur.errors import PeerFault
from murmur.protocol import uvarint

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "murmur.libp2p"


class KeyType(enum.IntEnum):
    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


def _field(name: str, number: int, ftype: int, label: int = _F.LABEL_OPTIONAL, type_name: str = "") -> _F:
    field = _F(name=name, number=number, type=ftype, label=label)  # type: ignore[arg-type]
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    return field


def _build() -> dict[str, type[Message]]:
    proto = descriptor_pb2.FileDescriptorProto(name="murmur/libp2p.proto", package=_PACKAGE, syntax="proto2")
    key_type = proto.enum_type.add(name="KeyType")
    for member, number in (("RSA", 0), ("Ed25519", 1), ("Secp256k1", 2), ("ECDSA", 3)):
        key_type.value.add(name=member, number=number)
    # proto2 enum values share their file's scope, hence the prefixes (the wire carries only numbers)
    enums = {
        "HopType": (("HOP_RESERVE", 0), ("HOP_CONNECT", 1), ("HOP_STATUS", 2)),
        "StopType": (("STOP_CONNECT", 0), ("STOP_STATUS", 1)),
        "Status": (("UNUSED", 0), ("OK", 100), ("RESERVATION_REFUSED", 200), ("RESOURCE_LIMIT_EXCEEDED", 201),
                   ("PERMISSION_DENIED", 202), ("CONNECTION_FAILED", 203), ("NO_RESERVATION", 204),
                   ("MALFORMED_MESSAGE", 400), ("UNEXPECTED_MESSAGE", 401)),
        "HolePunchType": (("HP_CONNECT", 100), ("HP_SYNC", 300)),
    }
    for enum_name, members in enums.items():
        enum_type = proto.enum_type.add(name=enum_name)
        for member, number in members:
            enum_type.value.add(name=member, number=number)
    schemas: dict[str, list[_F]] = {
        "PublicKey": [
            _field("Type", 1, _F.TYPE_ENUM, _F.LABEL_REQUIRED, "KeyType"),
            _field("Data", 2, _F.TYPE_BYTES, _F.LABEL_REQUIRED),
        ],
        "NoiseExtensions": [
            _field("webtransport_certhashes", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED),
            _field("stream_muxers", 2, _F.TYPE_STRING, _F.LABEL_REPEATED),
        ],
        "NoiseHandshakePayload": [
            _field("identity_key", 1, _F.TYPE_BYTES),
            _field("identity_sig", 2, _F.TYPE_BYTES),
            _field("extensions", 4, _F.TYPE_MESSAGE, type_name="NoiseExtensions"),
        ],
        "Identify": [
            _field("protocolVersion", 5, _F.TYPE_STRING),
            _field("agentVersion", 6, _F.TYPE_STRING),
            _field("publicKey", 1, _F.TYPE_BYTES),
            _field("listenAddrs", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
            _field("observedAddr", 4, _F.TYPE_BYTES),
            _field("protocols", 3, _F.TYPE_STRING, _F.LABEL_REPEATED),
            _field("signedPeerRecord", 8, _F.TYPE_BYTES),
        ],
        "Peer": [
            _field("id", 1, _F.TYPE_BYTES, _F.LABEL_REQUIRED),
            _field("addrs", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
        ],
        "Reservation": [
            _field("expire", 1, _F.TYPE_UINT64, _F.LABEL_REQUIRED),
            _field("addrs", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
            _field("voucher", 3, _F.TYPE_BYTES),
        ],
        "Limit": [
            _field("duration", 1, _F.TYPE_UINT32),
            _field("data", 2, _F.TYPE_UINT64),
        ],
        "HopMessage": [
            _field("type", 1, _F.TYPE_ENUM, _F.LABEL_REQUIRED, "HopType"),
            _field("peer", 2, _F.TYPE_MESSAGE, type_name="Peer"),
            _field("reservation", 3, _F.TYPE_MESSAGE, type_name="Reservation"),
            _field("limit", 4, _F.TYPE_MESSAGE, type_name="Limit"),
            _field("status", 5, _F.TYPE_ENUM, type_name="Status"),
        ],
        "StopMessage": [
            _field("type", 1, _F.TYPE_ENUM, _F.LABEL_REQUIRED, "StopType"),
            _field("peer", 2, _F.TYPE_MESSAGE, type_name="Peer"),
            _field("limit", 3, _F.TYPE_MESSAGE, type_name="Limit"),
            _field("status", 4, _F.TYPE_ENUM, type_name="Status"),
        ],
        "DialRequest": [
            _field("addrs", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED),
            _field("nonce", 2, _F.TYPE_FIXED64),
        ],
        "DialResponse": [
            _field("status", 1, _F.TYPE_UINT32),
            _field("addrIdx", 2, _F.TYPE_UINT32),
            _field("dialStatus", 3, _F.TYPE_UINT32),
        ],
        "DialDataRequest": [
            _field("addrIdx", 1, _F.TYPE_UINT32),
            _field("numBytes", 2, _F.TYPE_UINT64),
        ],
        "DialDataResponse": [_field("data", 1, _F.TYPE_BYTES)],
        "AutonatMessage": [
            _field("dialRequest", 1, _F.TYPE_MESSAGE, type_name="DialRequest"),
            _field("dialResponse", 2, _F.TYPE_MESSAGE, type_name="DialResponse"),
            _field("dialDataRequest", 3, _F.TYPE_MESSAGE, type_name="DialDataRequest"),
            _field("dialDataResponse", 4, _F.TYPE_MESSAGE, type_name="DialDataResponse"),
        ],
        "DialBack": [_field("nonce", 1, _F.TYPE_FIXED64)],
        "DialBackResponse": [_field("status", 1, _F.TYPE_UINT32)],
        "HolePunch": [
            _field("type", 1, _F.TYPE_ENUM, type_name="HolePunchType"),
            _field("ObsAddrs", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
        ],
    }
    for name, fields in schemas.items():
        proto.message_type.add(name=name, field=fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in schemas}


_CLASSES = _build()
PublicKey: Any = _CLASSES["PublicKey"]
NoiseExtensions: Any = _CLASSES["NoiseExtensions"]
NoiseHandshakePayload: Any = _CLASSES["NoiseHandshakePayload"]
Identify: Any = _CLASSES["Identify"]
CircuitPeer: Any = _CLASSES["Peer"]
Reservation: Any = _CLASSES["Reservation"]
Limit: Any = _CLASSES["Limit"]
HopMessage: Any = _CLASSES["HopMessage"]
StopMessage: Any = _CLASSES["StopMessage"]
AutonatMessage: Any = _CLASSES["AutonatMessage"]
DialBack: Any = _CLASSES["DialBack"]
DialBackResponse: Any = _CLASSES["DialBackResponse"]
HolePunch: Any = _CLASSES["HolePunch"]


def parse(cls: Any, data: bytes | bytearray | memoryview, fault: type[PeerFault], what: str) -> Any:
    """``cls`` parsed from ``data``; ``fault`` naming ``what`` if it does not parse."""
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (_PbDecodeError, ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise fault(f"malformed {what}: {exc}") from None
    if not msg.IsInitialized():  # the runtime parses a proto2 message with required fields missing
        raise fault(f"malformed {what}: required field missing")
    return msg


def text(value: object, fault: type[PeerFault], what: str) -> str:
    """A proto2 string field's value: the runtime hands invalid UTF-8 back as
    ``bytes`` instead of refusing it, so every string read off the wire goes through here."""
    if not isinstance(value, str):
        raise fault(f"{what} is not UTF-8")
    return value


def serialize(msg: Message) -> bytes:
    """Deterministic encoding: fields in number order, minimal varints (what
    libp2p requires of keys, and what makes re-encoding a strictness check)."""
    return msg.SerializeToString(deterministic=True)


def framed(msg: Message, limit: int, what: str) -> bytes:
    """``msg`` serialised behind its uvarint length, as the libp2p protocols
    that exchange protobufs frame them; ``ValueError`` past ``limit`` bytes
    (a bug of ours: what we send is bounded like what we accept)."""
    body = serialize(msg)
    if len(body) > limit:
        raise ValueError(f"{what} of {len(body)} bytes exceeds {limit}")
    return uvarint.encode(len(body)) + body
