"""Binary multiaddrs (known bytes from the multicodec table) and identify messages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import DecodeError, IdentityMismatch
from murmur.protocol import pb, uvarint
from murmur.protocol.identify import (
    MAX_IDENTIFY_BYTES,
    IdentifyInfo,
    decode_identify,
    identify_length,
    make_identify,
)
from murmur.protocol.identity import Identity
from murmur.protocol.discovery import resolve
from murmur.protocol.multiaddr import AnyMultiaddr, DialAddr, Multiaddr

PEER = Identity.from_seed(bytes([3]) * 32).peer_id


@pytest.mark.parametrize(
    ("text", "hexbytes"),
    [
        ("/ip4/127.0.0.1/tcp/4001", "04 7f000001 06 0fa1"),
        ("/ip6/::1/tcp/4001", "29 00000000000000000000000000000001 06 0fa1"),
        ("/dns4/example.com/tcp/443", "36 0b 6578616d706c652e636f6d 06 01bb"),
        ("/dns6/example.com/tcp/443", "37 0b 6578616d706c652e636f6d 06 01bb"),
        ("/ip4/1.2.3.4/udp/4001/quic-v1", "04 01020304 9102 0fa1 cd03"),
        ("/p2p-circuit", "a202"),
        ("/ip4/1.2.3.4/tcp/80/ws", "04 01020304 06 0050 dd03"),
    ],
)
def test_known_binary_forms(text: str, hexbytes: str) -> None:
    addr = AnyMultiaddr.parse(text)
    assert addr.to_bytes() == bytes.fromhex(hexbytes)
    assert AnyMultiaddr.from_bytes(bytes.fromhex(hexbytes)) == addr
    assert str(addr) == text


def test_p2p_and_circuit_addresses() -> None:
    relay = Identity.from_seed(bytes([4]) * 32).peer_id
    text = f"/ip4/192.0.2.0/tcp/5002/p2p/{relay}/p2p-circuit/p2p/{PEER}"
    addr = AnyMultiaddr.parse(text)
    assert str(addr) == text and addr.is_circuit and addr.peer_id == PEER and addr.to_tcp() is None
    raw = addr.to_bytes()
    # /p2p is code 0x01a5 (varint a5 03), then the multihash with its length
    assert bytes.fromhex("a503") + bytes([len(relay.raw)]) + relay.raw in raw
    assert AnyMultiaddr.from_bytes(raw) == addr
    assert AnyMultiaddr.parse(f"/ip4/1.2.3.4/tcp/1/ipfs/{PEER}") == AnyMultiaddr.parse(f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}")
    # a peer id murmur cannot verify (an RSA "Qm…" one) is kept as bytes, not as a PeerId
    rsa = AnyMultiaddr.parse("/p2p/QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC")
    assert rsa.peer_id is None and AnyMultiaddr.from_bytes(rsa.to_bytes()) == rsa


def test_dial_addresses_as_libp2p_writes_them() -> None:
    """What an operator may write as a bootstrap address: TCP on an IP or a DNS
    name, an optional /p2p, or a relay circuit (kept, not dialled yet)."""
    peer, relay = Identity.generate().peer_id, Identity.generate().peer_id
    direct = DialAddr.parse(f"/ip6/::1/tcp/4001/p2p/{peer}")
    assert direct.direct() == Multiaddr("::1", 4001, peer) and not direct.dns and direct.relay is None
    named = DialAddr.parse(f"/dns4/boot.example.org/tcp/4001/p2p/{peer}")
    assert (named.host, named.port, named.peer_id, named.dns, named.direct()) == (
        "boot.example.org", 4001, peer, True, None)
    assert str(named) == f"/dns4/boot.example.org/tcp/4001/p2p/{peer}"
    circuit = DialAddr.parse(f"/dns6/relay.example.org/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{peer}")
    assert circuit.is_circuit and circuit.relay == relay and circuit.peer_id == peer and circuit.direct() is None
    assert DialAddr.parse(f"/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit").peer_id is None  # any peer behind the relay
    for bad in ("/ip4/10.0.0.1/udp/1/quic-v1", "/ip4/10.0.0.1/tcp/0", "/tcp/1", "/ip4/10.0.0.1/tcp/1/p2p-circuit",
                "/ip4/10.0.0.1/tcp/1/ws", f"/ip4/10.0.0.1/tcp/1/p2p/{peer}/p2p/{peer}",
                "/ip4/10.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"):  # an RSA peer
        with pytest.raises(ValueError):
            DialAddr.parse(bad)


async def test_dns_names_resolve_to_the_family_asked_for() -> None:
    peer = Identity.generate().peer_id
    v4 = await resolve(DialAddr.parse(f"/dns4/localhost/tcp/4001/p2p/{peer}"))
    assert Multiaddr("127.0.0.1", 4001, peer) in v4 and all(":" not in a.host for a in v4)
    assert await resolve(DialAddr.parse("/ip4/10.0.0.1/tcp/5")) == [Multiaddr("10.0.0.1", 5)]
    assert await resolve(DialAddr.parse(f"/ip4/10.0.0.1/tcp/5/p2p/{peer}/p2p-circuit")) == []
    with pytest.raises(OSError):
        await resolve(DialAddr.parse("/dns4/no-such-host.invalid/tcp/1"))


def test_tcp_multiaddr_keeps_its_api_and_gains_binary() -> None:
    addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}")
    assert (addr.host, addr.port, addr.peer_id, addr.family) == ("127.0.0.1", 4001, PEER, "ip4")
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert AnyMultiaddr.parse(str(addr)).to_tcp() == addr
    assert AnyMultiaddr.parse("/dns4/example.com/tcp/1").to_tcp() is None
    with pytest.raises(ValueError):
        Multiaddr.from_bytes(AnyMultiaddr.parse("/dns4/example.com/tcp/1").to_bytes())


@pytest.mark.parametrize(
    "bad",
    ["", "ip4/1.2.3.4", "/ip4/1.2.3.4.5/tcp/1", "/ip4/::1/tcp/1", "/ip4/1.2.3.4/tcp/70000", "/tcp",
     "/unknown/1", "/p2p-circuit/x", "/p2p/0OIl"],
)
def test_bad_text_is_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        AnyMultiaddr.parse(bad)


@pytest.mark.parametrize(
    "hexbytes",
    ["", "04 7f00", "06 0f", "36 0b 6578", "36 00", "a503 00", "ff ff ff ff ff ff ff ff ff ff", "8080 00",
     "36 02 c328"],
)
def test_bad_binary_is_value_error(hexbytes: str) -> None:
    with pytest.raises(ValueError):
        AnyMultiaddr.from_bytes(bytes.fromhex(hexbytes))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_binary_parser_only_value_errors(data: bytes) -> None:
    try:
        addr = AnyMultiaddr.from_bytes(data)
    except ValueError:
        return
    assert AnyMultiaddr.from_bytes(addr.to_bytes()) == addr


# --- identify -----------------------------------------------------------------------------


def _info() -> IdentifyInfo:
    return make_identify(
        PEER.public_key_bytes,
        ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"],
        [AnyMultiaddr.parse("/ip4/127.0.0.1/tcp/4001")],
        AnyMultiaddr.parse("/ip4/127.0.0.1/tcp/55555"),
        "murmur/0.1.0",
        "ipfs/0.1.0",
    )


def test_identify_known_bytes_and_roundtrip() -> None:
    encoded = _info().encode()
    length, used = identify_length(encoded)  # type: ignore[misc]
    body = encoded[used:]
    assert len(body) == length
    msg = pb.Identify()
    msg.ParseFromString(body)
    # field numbers of the identify spec
    assert body.startswith(b"\x0a\x24\x08\x01\x12\x20" + PEER.public_key_bytes)  # publicKey = 1
    assert msg.listenAddrs[0] == bytes.fromhex("047f000001060fa1")
    assert msg.observedAddr == bytes.fromhex("047f00000106d903")
    assert (msg.protocolVersion, msg.agentVersion) == ("ipfs/0.1.0", "murmur/0.1.0")
    info = decode_identify(body, expected=PEER)
    assert info == _info() and info.peer_id() == PEER


def test_identify_skips_unknown_addresses_and_reads_extra_fields() -> None:
    msg = pb.Identify(protocols=["/a"], listenAddrs=[bytes.fromhex("047f000001060fa1"), b"\xff\xff\x03"],
                      signedPeerRecord=b"opaque envelope")
    info = decode_identify(pb.serialize(msg) + b"\x52\x01x")  # plus an unknown field 10
    assert [str(a) for a in info.listen_addrs] == ["/ip4/127.0.0.1/tcp/4001"] and info.skipped_addrs == 1


def test_identify_push_merges_only_what_it_carries() -> None:
    base = _info()
    push = decode_identify(pb.serialize(pb.Identify(protocols=["/new/1.0.0"])))
    merged = base.merged(push)
    assert merged.protocols == ("/new/1.0.0",) and merged.agent_version == "murmur/0.1.0"
    assert merged.listen_addrs == base.listen_addrs


def test_identify_faults() -> None:
    with pytest.raises(DecodeError):
        decode_identify(b"\x0a\xff")
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_identify(b"\x1a\x02\xc3\x28")
    with pytest.raises(DecodeError):
        decode_identify(pb.serialize(pb.Identify(protocols=["/x"] * 300)))
    with pytest.raises(DecodeError, match="exceeds"):
        identify_length(uvarint.encode(MAX_IDENTIFY_BYTES + 1))
    encoded = _info().encode()
    _, used = identify_length(encoded)  # type: ignore[misc]
    with pytest.raises(IdentityMismatch):
        decode_identify(encoded[used:], expected=Identity.generate().peer_id)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_identify_only_decode_errors(data: bytes) -> None:
    try:
        decode_identify(data)
    except DecodeError:
        pass
