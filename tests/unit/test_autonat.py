"""AutoNAT v2 messages and the server's choice of address: known answers
for the wire format, every malformed case a typed error, and the rules a
server dials by (public only, one family, the amplification price)."""

from __future__ import annotations

import pytest

from murmur.errors import DecodeError
from murmur.protocol import autonat, pb, uvarint
from murmur.protocol.autonat import (
    DialDataRequest,
    DialDataResponse,
    DialRequest,
    DialResponse,
    DialStatus,
    ResponseStatus,
    UnknownStatus,
)
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr


def _body(framed: bytes) -> bytes:
    length, used = uvarint.decode_partial(framed, 0, DecodeError)  # type: ignore[misc]
    assert len(framed) == used + length
    return framed[used:]


def test_a_dial_request_has_the_specs_bytes() -> None:
    """Message{dialRequest(1){addrs(1): /ip4/1.2.3.4/tcp/80, nonce(2): fixed64 1}}."""
    addr = Multiaddr("1.2.3.4", 80).to_bytes()
    assert addr == bytes.fromhex("040102030406" "0050")
    inner = b"\x0a" + bytes([len(addr)]) + addr + b"\x11" + (1).to_bytes(8, "little")
    expected = b"\x0a" + bytes([len(inner)]) + inner
    assert _body(autonat.encode(DialRequest((addr,), 1))) == expected
    assert autonat.decode(expected) == DialRequest((addr,), 1)


@pytest.mark.parametrize("msg", [
    DialResponse(ResponseStatus.OK, 2, DialStatus.E_DIAL_ERROR),
    DialResponse(ResponseStatus.E_REQUEST_REJECTED),
    DialDataRequest(1, 40_000),
    DialRequest((b"\x04\x7f\x00\x00\x01\x06\x00\x01",) * 3, 2**64 - 1),
])
def test_every_message_round_trips(msg: autonat.Message) -> None:
    assert autonat.decode(_body(autonat.encode(msg))) == msg


def test_data_counts_only_its_size_and_is_bounded() -> None:
    assert autonat.decode(_body(autonat.encode(bytes(4096)))) == DialDataResponse(4096)
    with pytest.raises(ValueError):
        autonat.encode(bytes(4097))
    big = pb.AutonatMessage()
    big.dialDataResponse.data = bytes(4097)
    with pytest.raises(DecodeError, match="4097"):
        autonat.decode(pb.serialize(big))


def test_a_message_must_be_exactly_one_kind() -> None:
    with pytest.raises(DecodeError, match="0 kinds"):
        autonat.decode(b"")
    two = pb.AutonatMessage()
    two.dialDataRequest.addrIdx = 0
    two.dialDataResponse.data = b"x"
    with pytest.raises(DecodeError, match="2 kinds"):
        autonat.decode(pb.serialize(two))
    with pytest.raises(DecodeError, match="malformed"):
        autonat.decode(b"\x0a\xff")  # a truncated length


def test_requests_are_bounded_and_need_a_nonce() -> None:
    many = pb.AutonatMessage()
    many.dialRequest.addrs.extend([b"x"] * (autonat.MAX_ADDRS + 1))
    many.dialRequest.nonce = 1
    with pytest.raises(DecodeError, match="addresses"):
        autonat.decode(pb.serialize(many))
    no_nonce = pb.AutonatMessage()
    no_nonce.dialRequest.addrs.append(b"x")
    with pytest.raises(DecodeError, match="nonce"):
        autonat.decode(pb.serialize(no_nonce))
    with pytest.raises(DecodeError, match="exceeds"):
        autonat.message_length(bytearray(uvarint.encode(autonat.MAX_MESSAGE + 1)))
    assert autonat.message_length(bytearray(b"\x80")) is None  # the uvarint is not whole yet


def test_a_status_this_version_does_not_know_is_discarded() -> None:
    odd = pb.AutonatMessage()
    odd.dialResponse.status = 300
    with pytest.raises(UnknownStatus):
        autonat.decode(pb.serialize(odd))
    odd_dial = pb.AutonatMessage()
    odd_dial.dialResponse.status = 200
    odd_dial.dialResponse.dialStatus = 7
    with pytest.raises(UnknownStatus):
        autonat.decode(pb.serialize(odd_dial))
    with pytest.raises(UnknownStatus):
        autonat.decode_dial_back_response(b"\x08\x01")


def test_dial_back_round_trips_and_needs_its_nonce() -> None:
    assert autonat.decode_dial_back(_body(autonat.encode_dial_back(7))) == 7
    with pytest.raises(DecodeError, match="nonce"):
        autonat.decode_dial_back(b"")
    autonat.decode_dial_back_response(_body(autonat.encode_dial_back_response()))


def _addrs(*texts: str) -> list[bytes]:
    out = []
    for text in texts:
        host, port = text.rsplit(":", 1)
        out.append(Multiaddr(host.strip("[]"), int(port)).to_bytes())
    return out


def test_the_server_dials_the_first_public_address_of_a_family_it_has() -> None:
    addrs = [b"garbage", *_addrs("10.0.0.5:4001", "[2001:db8::1]:4001", "198.18.0.7:4001", "198.18.0.8:4001")]
    choice = autonat.choose(addrs, "198.18.0.7", families=frozenset({4}))
    assert choice is not None and choice.index == 3 and choice.addr == Multiaddr("198.18.0.7", 4001)
    assert not choice.needs_data  # the requester's own IP: no price
    v6 = autonat.choose(addrs, "198.18.0.7", families=frozenset({4, 6}))
    assert v6 is not None and v6.index == 2 and v6.needs_data  # another IP than the request's: pay first


def test_private_and_loopback_addresses_are_refused_unless_allowed() -> None:
    private = _addrs("192.168.1.2:4001", "100.64.0.1:4001")
    assert autonat.choose(private, "198.18.0.7") is None
    allowed = autonat.choose(private, "198.18.0.7", allow_private=True)
    assert allowed is not None and allowed.index == 0
    loop = _addrs("127.0.0.1:4001", "0.0.0.0:4001")
    assert autonat.choose(loop, "198.18.0.7", allow_private=True) is None  # it would dial itself
    assert autonat.choose(loop, "127.0.0.1") is None
    local = autonat.choose(loop, "127.0.0.1", allow_private=True)  # a loopback test network
    assert local is not None and local.index == 0 and not local.needs_data


def test_circuits_and_portless_addresses_are_never_dialled_back() -> None:
    relay = Identity.generate().peer_id
    circuit = (Multiaddr("198.18.0.9", 4001, relay).to_any().to_bytes() + bytes([0xa2, 0x02]))  # /p2p-circuit
    assert autonat.choose([circuit, *_addrs("198.18.0.7:0")], "198.18.0.7") is None
