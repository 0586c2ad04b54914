"""``/noise`` exactly per libp2p-noise: the handshake against the `noiseprotocol`
reference byte for byte, the payload protobuf, and the 2-byte-framed channel."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from murmur.errors import DecryptError, FrameError, HandshakeError, IdentityMismatch, PeerFault
from murmur.protocol import pb
from murmur.protocol.identity import Identity
from murmur.protocol.noise import HandshakePayload, StandardNoiseHandshake, encode_public_key
from murmur.protocol.noise_channel import (
    MAX_NOISE_MESSAGE,
    MAX_PLAINTEXT,
    NoiseChannel,
    NoiseHandshakeDriver,
    NoiseReader,
    frame,
)


def _priv(seed: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _reference(initiator: bool, static: X25519PrivateKey, ephemeral: X25519PrivateKey) -> NoiseConnection:
    """The spec's protocol name, no prologue: what every libp2p-noise peer runs."""
    ref = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    ref.set_keypair_from_private_bytes(Keypair.STATIC, _raw(static))
    ref.set_keypair_from_private_bytes(Keypair.EPHEMERAL, _raw(ephemeral))
    ref.set_as_initiator() if initiator else ref.set_as_responder()
    ref.start_handshake()
    return ref


ALICE = Identity.from_seed(bytes([7]) * 32)
BOB = Identity.from_seed(bytes([8]) * 32)


def test_known_answer_transcript_both_roles_against_reference() -> None:
    """Fixed keys (Ed25519 signatures are deterministic): every message of ours
    equals the reference implementation's with the same payload, and the
    reference accepts ours: this is Noise_XX_25519_ChaChaPoly_SHA256 with an
    empty prologue, as the spec's "Noise Protocol Name" section requires."""
    ours_i = StandardNoiseHandshake(ALICE, True, static=_priv(1), ephemeral=_priv(2), expected=BOB.peer_id)
    ours_r = StandardNoiseHandshake(BOB, False, static=_priv(3), ephemeral=_priv(4))
    ref_i, ref_r = _reference(True, _priv(1), _priv(2)), _reference(False, _priv(3), _priv(4))
    bob_payload = HandshakePayload.sign(BOB, _priv(3).public_key().public_bytes_raw()).encode()
    alice_payload = HandshakePayload.sign(ALICE, _priv(1).public_key().public_bytes_raw()).encode()

    m1 = ours_i.start()
    assert m1 == ref_i.write_message(b"") and len(m1) == 32
    ref_r.read_message(m1)
    m2 = ours_r.receive(m1)
    assert m2 == ref_r.write_message(bob_payload)
    ref_i.read_message(m2)
    m3 = ours_i.receive(m2)
    assert m3 == ref_i.write_message(alice_payload)
    assert ref_r.read_message(m3) == alice_payload
    assert ours_r.receive(m3) is None
    assert ours_i.remote_peer == BOB.peer_id and ours_r.remote_peer == ALICE.peer_id
    # transport keys agree with the reference both ways
    (send, recv), (r_send, _) = ours_i.split(), ours_r.split()
    assert ref_r.decrypt(send.encrypt_with_ad(b"", b"hello")) == b"hello"
    assert recv.decrypt_with_ad(b"", ref_r.encrypt(b"back")) == b"back"
    assert r_send.encrypt_with_ad(b"", b"z") != b"z"


def test_payload_with_extensions_and_unknown_fields_is_accepted_by_noise_only() -> None:
    """A js/go peer's payload carries extensions (field 4) and may carry fields
    from a newer schema; /noise reads them, murmur's strict fast path does not."""
    static = _priv(5).public_key().public_bytes_raw()
    payload = HandshakePayload.sign(ALICE, static, stream_muxers=["/yamux/1.0.0"])
    encoded = payload.encode()
    msg = pb.NoiseHandshakePayload()
    msg.ParseFromString(encoded)
    assert list(msg.extensions.stream_muxers) == ["/yamux/1.0.0"]
    with_unknown = encoded + b"\x2a\x03abc"  # field 5, bytes
    decoded = HandshakePayload.decode(with_unknown, strict=False)
    assert decoded.stream_muxers == ("/yamux/1.0.0",) and decoded.verify(static) == ALICE.peer_id
    with pytest.raises(HandshakeError, match="canonical"):
        HandshakePayload.decode(with_unknown)


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # neither field
        b"\x0a\x24" + encode_public_key(bytes(32)),  # no signature
        b"\x0a\x00\x12\x40" + bytes(64),  # empty key
        b"\x0a\xff",  # truncated
        b"\x22\x02\x12\x01",  # extensions with a truncated muxer name
    ],
)
def test_malformed_noise_payloads_are_handshake_errors(payload: bytes) -> None:
    with pytest.raises(HandshakeError):
        HandshakePayload.decode(payload, strict=False).verify(bytes(32))


def test_other_key_types_are_refused_with_a_clear_error() -> None:
    secp = pb.serialize(pb.PublicKey(Type=pb.KeyType.SECP256K1, Data=bytes(33)))
    payload = pb.serialize(pb.NoiseHandshakePayload(identity_key=secp, identity_sig=bytes(64)))
    with pytest.raises(HandshakeError, match="SECP256K1 is not supported"):
        HandshakePayload.decode(payload, strict=False).verify(bytes(32))


def test_dialler_checks_the_identity_before_message_3() -> None:
    init = StandardNoiseHandshake(ALICE, True, expected=Identity.generate().peer_id)
    resp = StandardNoiseHandshake(BOB, False)
    m2 = resp.receive(init.start())  # type: ignore[arg-type]
    with pytest.raises(IdentityMismatch):
        init.receive(m2)  # type: ignore[arg-type]
    assert not init.complete


def test_message_one_payload_and_out_of_turn_are_refused() -> None:
    resp = StandardNoiseHandshake(BOB, False)
    ref = _reference(True, _priv(1), _priv(2))
    with pytest.raises(HandshakeError, match="payload"):
        resp.receive(ref.write_message(b"early"))
    init = StandardNoiseHandshake(ALICE, True)
    with pytest.raises(HandshakeError):
        init.receive(bytes(100))  # before start()


# --- the framed channel --------------------------------------------------------------


def _pair() -> tuple[NoiseChannel, NoiseChannel]:
    a_reader, b_reader = NoiseReader(), NoiseReader()
    a = NoiseHandshakeDriver(StandardNoiseHandshake(ALICE, True), a_reader)
    b = NoiseHandshakeDriver(StandardNoiseHandshake(BOB, False), b_reader)
    to_b = a.start()
    assert b.start() == b""
    for _ in range(3):
        b_reader.feed(to_b)
        to_a = b.advance()
        if to_a:
            a_reader.feed(to_a)
        to_b = a.advance()
    assert a.complete and b.complete
    return a.channel(), b.channel()


def _received(channel: NoiseChannel, data: bytes) -> bytes:
    channel.reader.feed(data)
    return b"".join(bytes(p) for p in channel.decrypt_ready())


def test_handshake_messages_are_u16_framed() -> None:
    reader = NoiseReader()
    driver = NoiseHandshakeDriver(StandardNoiseHandshake(ALICE, True), reader)
    first = driver.start()
    assert first[:2] == b"\x00\x20" and len(first) == 34


def test_large_writes_split_into_spec_sized_messages() -> None:
    a, b = _pair()
    data = bytes(range(256)) * 1000  # 256000 bytes: 4 messages
    wire = a.encrypt(data)
    pos, sizes = 0, []
    while pos < len(wire):
        size = int.from_bytes(wire[pos : pos + 2], "big")
        sizes.append(size)
        pos += 2 + size
    assert sizes == [MAX_NOISE_MESSAGE] * 3 + [len(data) - 3 * MAX_PLAINTEXT + 16]
    assert _received(b, bytes(wire)) == data
    assert _received(a, bytes(b.encrypt(b"pong"))) == b"pong"
    assert _received(b, bytes(a.encrypt(b""))) == b""  # an empty write is one tag-only message


def test_bytes_after_message_3_are_the_first_transport_messages() -> None:
    a_reader, b_reader = NoiseReader(), NoiseReader()
    a = NoiseHandshakeDriver(StandardNoiseHandshake(ALICE, True), a_reader)
    b = NoiseHandshakeDriver(StandardNoiseHandshake(BOB, False), b_reader)
    b_reader.feed(a.start())
    a_reader.feed(b.advance())
    m3 = a.advance()
    channel_a = a.channel()
    b_reader.feed(m3 + bytes(channel_a.encrypt(b"early")))  # one segment
    assert b.advance() == b""
    assert b"".join(bytes(p) for p in b.channel().decrypt_ready()) == b"early"


def test_tampered_replayed_and_tagless_messages_are_typed_faults() -> None:
    a, b = _pair()
    wire = bytearray(a.encrypt(b"secret"))
    wire[5] ^= 1
    with pytest.raises(DecryptError):
        _received(b, bytes(wire))
    a, b = _pair()
    first = bytes(a.encrypt(b"one"))
    assert _received(b, first) == b"one"
    with pytest.raises(DecryptError):
        _received(b, first)  # replay: the nonce moved on
    a, b = _pair()
    with pytest.raises(FrameError, match="no tag"):
        _received(b, frame(b"short"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_channel_only_typed_errors(chunks: list[bytes]) -> None:
    _, b = _pair()
    try:
        for chunk in chunks:
            _received(b, chunk)
    except PeerFault as fault:
        assert isinstance(fault, (DecryptError, FrameError))
    assert b.reader.pending <= 2 + MAX_NOISE_MESSAGE


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_handshake_only_typed_errors(message: bytes) -> None:
    for role in (True, False):
        hs = StandardNoiseHandshake(ALICE, role)
        hs.start()
        try:
            hs.receive(message)
        except PeerFault as fault:
            assert isinstance(fault, HandshakeError)
