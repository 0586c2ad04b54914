"""DCUtR messages: encodings checked byte for byte against the spec's proto2
schema, and every malformed input a typed DecodeError; addresses that are
not ones to dial are skipped and counted."""

import pytest

from murmur.errors import DecodeError
from murmur.protocol import dcutr, pb, uvarint
from murmur.protocol.dcutr import HolePunch, HolePunchType
from murmur.protocol.multiaddr import AnyMultiaddr, Multiaddr

PUBLIC = Multiaddr("198.18.1.1", 4001)


def _body(framed: bytes) -> bytes:
    length, pos = uvarint.decode_partial(framed)
    assert len(framed) - pos == length
    return framed[pos:]


def test_sync_and_connect_known_encodings():
    # HolePunch{type: SYNC}: field 1 varint 300 (0xAC 0x02)
    assert dcutr.SYNC.encode() == bytes([0x03, 0x08, 0xAC, 0x02])
    a = PUBLIC.to_bytes()
    assert _body(dcutr.connect([PUBLIC]).encode()) == bytes([0x08, 0x64, 0x12, len(a)]) + a
    assert dcutr.decode(_body(dcutr.connect([PUBLIC]).encode())) == HolePunch(HolePunchType.CONNECT, (PUBLIC,))


def test_undialable_addresses_are_skipped_and_counted():
    raw = [PUBLIC.to_bytes(), Multiaddr("10.1.0.2", 4001).to_bytes(),  # private: kept (a LAN peer may dial it)
           Multiaddr("127.0.0.1", 4001).to_bytes(), Multiaddr("0.0.0.0", 4001).to_bytes(),
           Multiaddr("198.18.1.1", 0).to_bytes(), PUBLIC.to_bytes(),  # a duplicate
           AnyMultiaddr.parse("/ip4/198.18.1.1/udp/4001").to_bytes(), b"\x00garbage"]
    msg = pb.HolePunch(type=100)
    msg.ObsAddrs.extend(raw)
    got = dcutr.decode(pb.serialize(msg))
    assert got.addrs == (PUBLIC, Multiaddr("10.1.0.2", 4001)) and got.skipped_addrs == 6
    loopback = dcutr.decode(pb.serialize(msg), allow_loopback=True)
    assert Multiaddr("127.0.0.1", 4001) in loopback.addrs


@pytest.mark.parametrize(("body", "match"), [
    (b"\xff\xff", "malformed"),
    (bytes([0x08, 0xC8, 0x01]), "unknown HolePunch type"),
    (b"", "without a type"),
    (bytes([0x08, 0xAC, 0x02, 0x12, 0x00]), "SYNC carries no addresses"),
    (b"\x00" * (dcutr.MAX_MESSAGE + 1), "exceeds"),
])
def test_malformed_messages_are_decode_errors(body, match):
    with pytest.raises(DecodeError, match=match):
        dcutr.decode(body)


def test_too_many_addresses_and_oversized_prefixes_are_decode_errors():
    msg = pb.HolePunch(type=100)
    msg.ObsAddrs.extend(Multiaddr("198.18.1.1", 1000 + i).to_bytes() for i in range(dcutr.MAX_ADDRS + 1))
    with pytest.raises(DecodeError, match="more than"):
        dcutr.decode(pb.serialize(msg))
    with pytest.raises(DecodeError, match="exceeds"):
        dcutr.message_length(uvarint.encode(dcutr.MAX_MESSAGE + 1))
    assert dcutr.message_length(uvarint.encode(300)) == (300, 2)
