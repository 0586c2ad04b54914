"""Circuit relay v2 messages: encodings checked byte for byte against the
spec's proto2 schema, and every malformed input a typed DecodeError."""

import pytest

from murmur.errors import DecodeError
from murmur.protocol import circuit, uvarint
from murmur.protocol.circuit import HopMessage, HopType, Limit, PeerInfo, Reservation, Status, StopMessage, StopType
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import AnyMultiaddr

PEER = Identity.generate().peer_id


def _body(framed: bytes) -> bytes:
    length, pos = uvarint.decode_partial(framed)
    assert len(framed) - pos == length
    return framed[pos:]


def test_reserve_is_two_bytes():
    # HopMessage{type: RESERVE}: field 1 varint 0, behind its length
    assert HopMessage(HopType.RESERVE).encode() == bytes([0x02, 0x08, 0x00])


def test_status_with_reservation_and_limit_known_encoding():
    addr = AnyMultiaddr.parse("/ip4/198.18.0.1/tcp/4001")
    msg = HopMessage(HopType.STATUS, reservation=Reservation(1_700_000_000, (addr,)),
                     limit=Limit(120, 131072), status=Status.OK)
    a = addr.to_bytes()
    expire = uvarint.encode(1_700_000_000)
    res = bytes([0x08]) + expire + bytes([0x12, len(a)]) + a
    lim = bytes([0x08, 120, 0x10]) + uvarint.encode(131072)
    want = (bytes([0x08, 0x02, 0x1A, len(res)]) + res + bytes([0x22, len(lim)]) + lim + bytes([0x28, 100]))
    framed = msg.encode()
    assert _body(framed) == want
    assert circuit.decode_hop(want) == msg


def test_connect_roundtrips_with_peer():
    msg = HopMessage(HopType.CONNECT, peer=PeerInfo(PEER))
    body = _body(msg.encode())
    assert body == bytes([0x08, 0x01, 0x12, 2 + len(PEER.raw), 0x0A, len(PEER.raw)]) + PEER.raw
    assert circuit.decode_hop(body) == msg


def test_stop_messages_roundtrip():
    connect = StopMessage(StopType.CONNECT, peer=PeerInfo(PEER), limit=Limit(120, 1 << 17))
    assert circuit.decode_stop(_body(connect.encode())) == connect
    status = StopMessage(StopType.STATUS, status=Status.OK)
    assert _body(status.encode()) == bytes([0x08, 0x01, 0x20, 100])
    assert circuit.decode_stop(_body(status.encode())) == status


def test_unlimited_limit_is_present_but_empty():
    msg = HopMessage(HopType.STATUS, limit=Limit(), status=Status.OK)
    assert _body(msg.encode()) == bytes([0x08, 0x02, 0x22, 0x00, 0x28, 100])
    assert circuit.decode_hop(_body(msg.encode())).limit == Limit()


def test_unparseable_addresses_are_skipped_and_counted():
    good = AnyMultiaddr.parse("/ip4/1.2.3.4/tcp/5").to_bytes()
    peer = bytes([0x0A, len(PEER.raw)]) + PEER.raw + bytes([0x12, 2, 0xFF, 0x01]) + bytes([0x12, len(good)]) + good
    body = bytes([0x08, 0x01, 0x12, len(peer)]) + peer
    msg = circuit.decode_hop(body)
    assert msg.peer.addrs == (AnyMultiaddr.from_bytes(good),)
    assert msg.skipped_addrs == 1


@pytest.mark.parametrize("body, why", [
    (b"", "required type missing"),
    (bytes([0x08, 0x07]), "unknown hop type"),
    (bytes([0x08, 0x02, 0x28, 0xE7, 0x07]), "unknown status"),
    (bytes([0x08, 0x02, 0x28, 0x00]), "status UNUSED"),
    (bytes([0x08]), "truncated"),
    (bytes([0x08, 0x01, 0x12, 0x05, 0x0A, 0x03, 1, 2, 3]), "peer id not a peer id"),
    (bytes([0x08, 0x01, 0x12, 0x02, 0x12, 0x00]), "peer without its required id"),
    (bytes([0x08, 0x02, 0x1A, 0x00]), "reservation without its required expire"),
    (bytes([0x0A, 0x01, 0x00]), "type with the wrong wire type"),
    (bytes([0x08, 0x00]) + bytes(circuit.MAX_MESSAGE), "over the size limit"),
])
def test_malformed_hop_is_decode_error(body, why):
    with pytest.raises(DecodeError):
        circuit.decode_hop(body)


@pytest.mark.parametrize("body", [b"", bytes([0x08, 0x02]), bytes([0x08, 0x01, 0x20, 0x2A])])
def test_malformed_stop_is_decode_error(body):
    with pytest.raises(DecodeError):
        circuit.decode_stop(body)


def test_too_many_addresses_is_decode_error():
    a = AnyMultiaddr.parse("/ip4/1.2.3.4/tcp/5").to_bytes()
    res = bytes([0x08, 0x01]) + (bytes([0x12, len(a)]) + a) * (circuit.MAX_ADDRS + 1)
    with pytest.raises(DecodeError):
        circuit.decode_hop(bytes([0x08, 0x02, 0x1A]) + uvarint.encode(len(res)) + res)


def test_length_prefix_over_the_limit_refused_before_the_body():
    assert circuit.message_length(bytearray([0x80])) is None
    assert circuit.message_length(bytearray(uvarint.encode(circuit.MAX_MESSAGE))) == (circuit.MAX_MESSAGE, 2)
    with pytest.raises(DecodeError):
        circuit.message_length(bytearray(uvarint.encode(circuit.MAX_MESSAGE + 1)))
    with pytest.raises(DecodeError):
        circuit.message_length(bytearray([0x80] * 10))
