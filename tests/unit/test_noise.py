"""Noise XX: interop with the `noiseprotocol` reference package and libp2p identity binding."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from noise.connection import Keypair, NoiseConnection

from murmur.errors import HandshakeError, IdentityMismatch
from murmur.protocol.identity import Identity
from murmur.protocol.noise import (
    PROTOCOL_NAME,
    STATIC_KEY_SIGNATURE_PREFIX,
    HandshakePayload,
    HandshakeState,
    Libp2pNoiseHandshake,
    NoiseCipher,
    decode_public_key,
    default_ciphers,
    encode_public_key,
    negotiation_prologue,
)


def _priv(seed: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _reference(
    initiator: bool,
    static: X25519PrivateKey,
    ephemeral: X25519PrivateKey | None = None,
    cipher: NoiseCipher = NoiseCipher.CHACHAPOLY,
    prologue: bytes | None = None,
) -> NoiseConnection:
    ref = NoiseConnection.from_name(cipher.protocol_name)
    if prologue is not None:
        ref.set_prologue(prologue)
    ref.set_keypair_from_private_bytes(Keypair.STATIC, _raw(static))
    if ephemeral is not None:
        ref.set_keypair_from_private_bytes(Keypair.EPHEMERAL, _raw(ephemeral))
    ref.set_as_initiator() if initiator else ref.set_as_responder()
    ref.start_handshake()
    return ref


PAYLOADS = (b"", b"responder payload", b"initiator payload " * 20)


def test_known_answer_transcript_matches_reference_byte_for_byte() -> None:
    """Same static and ephemeral keys in both implementations -> identical messages and hash."""
    ours = HandshakeState(True, _priv(1), ephemeral=_priv(2))
    ref = _reference(True, _priv(1), _priv(2))
    responder = _reference(False, _priv(3), _priv(4))
    ours_resp = HandshakeState(False, _priv(3), ephemeral=_priv(4))

    m1 = ours.write_message(PAYLOADS[0])
    assert m1 == ref.write_message(PAYLOADS[0])
    assert responder.read_message(m1) == PAYLOADS[0]
    ours_resp.read_message(m1)
    m2 = responder.write_message(PAYLOADS[1])
    assert ours_resp.write_message(PAYLOADS[1]) == m2
    assert ours.read_message(m2) == PAYLOADS[1]
    ref.read_message(m2)
    m3 = ours.write_message(PAYLOADS[2])
    assert m3 == ref.write_message(PAYLOADS[2])
    assert responder.read_message(m3) == PAYLOADS[2]
    assert ours.handshake_hash == ref.get_handshake_hash() == responder.get_handshake_hash()


@pytest.mark.parametrize("cipher", list(NoiseCipher))
@pytest.mark.parametrize("ours_initiates", [True, False])
def test_interop_with_reference_both_roles(ours_initiates: bool, cipher: NoiseCipher) -> None:
    ours = HandshakeState(ours_initiates, X25519PrivateKey.generate(), cipher=cipher)
    ref = _reference(not ours_initiates, X25519PrivateKey.generate(), cipher=cipher)
    writer_is_ours = ours_initiates
    for payload in PAYLOADS:
        if writer_is_ours:
            assert ref.read_message(ours.write_message(payload)) == payload
        else:
            assert ours.read_message(ref.write_message(payload)) == payload
        writer_is_ours = not writer_is_ours
    assert ours.complete and ref.handshake_finished
    send, recv = ours.split()
    # transport messages in both directions, several to exercise the nonce counter
    for i in range(3):
        msg = f"ours->ref {i}".encode()
        assert ref.decrypt(send.encrypt_with_ad(b"", msg)) == msg
        back = f"ref->ours {i}".encode()
        assert recv.decrypt_with_ad(b"", ref.encrypt(back)) == back


@pytest.mark.parametrize("cipher", list(NoiseCipher))
def test_libp2p_payload_travels_through_reference_responder(cipher: NoiseCipher) -> None:
    """Our libp2p initiator against a reference-Noise responder carrying a libp2p
    payload, under each cipher: the negotiated handshake is that cipher's
    standard Noise protocol with the offer and choice as its prologue."""
    alice, bob = Identity.generate(), Identity.generate()
    bob_static = X25519PrivateKey.generate()
    alice_static = X25519PrivateKey.generate()
    ours = Libp2pNoiseHandshake(alice, initiator=True, static=alice_static, expected=bob.peer_id, ciphers=[cipher])
    record1 = ours.start()
    assert record1 is not None and record1[:2] == bytes([1, cipher.value])
    offer = record1[1:2]
    ref = _reference(False, bob_static, cipher=cipher, prologue=negotiation_prologue(offer, cipher))
    ref.read_message(record1[2:])
    bob_payload = HandshakePayload.sign(bob, bob_static.public_key().public_bytes_raw()).encode()
    m3 = ours.receive(bytes([cipher.value]) + ref.write_message(bob_payload))
    assert ours.cipher is cipher
    assert ours.remote_peer == bob.peer_id
    alice_payload = HandshakePayload.decode(ref.read_message(m3))  # type: ignore[arg-type]
    assert ref.handshake_finished
    assert alice_payload.verify(alice_static.public_key().public_bytes_raw()) == alice.peer_id


def _run(init: Libp2pNoiseHandshake, resp: Libp2pNoiseHandshake) -> None:
    assert resp.start() is None
    m1 = init.start()
    assert m1 is not None
    m2 = resp.receive(m1)
    assert m2 is not None
    m3 = init.receive(m2)
    assert m3 is not None
    assert resp.receive(m3) is None


def test_libp2p_handshake_proves_both_identities() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    init, resp = Libp2pNoiseHandshake(alice, True), Libp2pNoiseHandshake(bob, False)
    _run(init, resp)
    assert init.remote_peer == bob.peer_id and resp.remote_peer == alice.peer_id
    (i_send, i_recv), (r_send, r_recv) = init.split(), resp.split()
    assert r_recv.open(_seal(i_send, b"x")) == b"x"
    assert i_recv.open(_seal(r_send, b"y")) == b"y"


def _seal(cipher, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray(len(data) + 16)
    cipher.seal_into(data, out)
    return bytes(out)


def test_dialler_rejects_unexpected_identity_before_revealing_itself() -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    init = Libp2pNoiseHandshake(alice, True, expected=carol.peer_id)
    resp = Libp2pNoiseHandshake(bob, False)
    m2 = resp.receive(init.start())  # type: ignore[arg-type]
    with pytest.raises(IdentityMismatch):
        init.receive(m2)  # type: ignore[arg-type]
    assert not init.complete


class _ForgingHandshake(Libp2pNoiseHandshake):
    """Signs some *other* static key: the identity is real, the binding is not."""

    def _payload(self) -> bytes:
        other = X25519PrivateKey.generate().public_key().public_bytes_raw()
        return HandshakePayload.sign(self.identity, other).encode()


def test_forged_static_key_signature_rejected_both_roles() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    init, resp = Libp2pNoiseHandshake(alice, True), _ForgingHandshake(mallory, False)
    with pytest.raises(IdentityMismatch):
        _run(init, resp)
    init, resp = _ForgingHandshake(mallory, True), Libp2pNoiseHandshake(alice, False)
    with pytest.raises(IdentityMismatch):
        _run(init, resp)
    assert resp.remote_peer is None
    with pytest.raises(HandshakeError):
        resp.split()


def test_tampered_handshake_message_fails_authentication() -> None:
    init, resp = Libp2pNoiseHandshake(Identity.generate(), True), Libp2pNoiseHandshake(Identity.generate(), False)
    m2 = bytearray(resp.receive(init.start()))  # type: ignore[arg-type]
    m2[40] ^= 1
    with pytest.raises(HandshakeError):
        init.receive(bytes(m2))


def test_message_one_with_payload_and_out_of_turn_messages_rejected() -> None:
    resp = Libp2pNoiseHandshake(Identity.generate(), False)
    offer = bytes([1, NoiseCipher.CHACHAPOLY.value])
    with pytest.raises(HandshakeError, match="payload"):
        resp.receive(offer + bytes(range(1, 33)) + b"early data")
    init = Libp2pNoiseHandshake(Identity.generate(), True)
    init.start()
    with pytest.raises(HandshakeError):
        init.receive(b"\x01" * 10)  # truncated message 2


def test_payload_protobuf_roundtrip_and_signature_input() -> None:
    ident = Identity.generate()
    static = X25519PrivateKey.generate().public_key().public_bytes_raw()
    payload = HandshakePayload.sign(ident, static)
    assert payload.identity_key == b"\x08\x01\x12\x20" + ident.peer_id.public_key_bytes
    encoded = payload.encode()
    assert encoded[:2] == b"\x0a\x24" and encoded[38:40] == b"\x12\x40"
    assert HandshakePayload.decode(encoded) == payload
    ident.peer_id.verify(payload.identity_sig, STATIC_KEY_SIGNATURE_PREFIX + static)
    assert payload.verify(static) == ident.peer_id


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # truncated signature
        lambda b: b + b"\x1a\x00",  # unknown field 3
        lambda b: b + b[:38],  # duplicate identity_key
        lambda b: b[38:],  # missing identity_key
        lambda b: b"\x08\x01" + b,  # field 1 as varint: wrong wire type
        lambda b: b"\x0b" + b,  # wire type 3 (group)
        lambda b: b"\x8a\x00" + b[1:],  # non-minimal tag varint
        lambda b: b"\x0a" + b"\xff" * 11,  # overlong varint
    ],
)
def test_payload_parser_is_strict(mutate) -> None:  # type: ignore[no-untyped-def]
    payload = HandshakePayload.sign(Identity.generate(), bytes(32)).encode()
    with pytest.raises(HandshakeError):
        HandshakePayload.decode(mutate(payload))


def test_public_key_parser_accepts_only_canonical_ed25519() -> None:
    key = bytes(range(32))
    assert decode_public_key(encode_public_key(key)) == key
    for bad in (
        b"\x08\x00\x12\x20" + key,  # RSA key type
        b"\x08\x01\x12\x1f" + key[:31],  # short key
        b"\x12\x20" + key + b"\x08\x01",  # fields out of canonical order
        b"\x12\x20" + key,  # missing type
    ):
        with pytest.raises(HandshakeError):
            decode_public_key(bad)


# --- cipher negotiation ------------------------------------------------------------


def _pair(init_ciphers=None, resp_ciphers=None):  # type: ignore[no-untyped-def]
    return (Libp2pNoiseHandshake(Identity.generate(), True, ciphers=init_ciphers),
            Libp2pNoiseHandshake(Identity.generate(), False, ciphers=resp_ciphers))


@pytest.mark.parametrize(
    ("init_ciphers", "resp_ciphers", "agreed"),
    [
        (None, None, default_ciphers()[0]),
        ([NoiseCipher.AESGCM, NoiseCipher.CHACHAPOLY], [NoiseCipher.CHACHAPOLY], NoiseCipher.CHACHAPOLY),
        ([NoiseCipher.CHACHAPOLY, NoiseCipher.AESGCM], [NoiseCipher.AESGCM, NoiseCipher.CHACHAPOLY],
         NoiseCipher.CHACHAPOLY),  # the initiator's preference wins among allowed ones
        ([NoiseCipher.AESGCM], None, NoiseCipher.AESGCM),
    ],
)
def test_negotiated_cipher_keys_both_directions(init_ciphers, resp_ciphers, agreed) -> None:  # type: ignore[no-untyped-def]
    init, resp = _pair(init_ciphers, resp_ciphers)
    _run(init, resp)
    assert init.cipher is resp.cipher is agreed
    (i_send, i_recv), (r_send, r_recv) = init.split(), resp.split()
    assert i_send.cipher is r_recv.cipher is agreed
    assert r_recv.open(_seal(i_send, b"x")) == b"x"
    assert i_recv.open(_seal(r_send, b"y")) == b"y"


def test_no_common_cipher_is_refused() -> None:
    init, resp = _pair([NoiseCipher.CHACHAPOLY], [NoiseCipher.AESGCM])
    with pytest.raises(HandshakeError, match="no common cipher"):
        resp.receive(init.start())  # type: ignore[arg-type]


def test_rewritten_offer_is_a_detected_downgrade() -> None:
    """An attacker strips AESGCM from the offer: the responder picks ChaChaPoly
    honestly, but the initiator's prologue holds the real offer, so message 2
    fails authentication instead of a silent downgrade."""
    init, resp = _pair([NoiseCipher.AESGCM, NoiseCipher.CHACHAPOLY], None)
    record1 = init.start()
    assert record1 is not None
    forged = bytes([1, NoiseCipher.CHACHAPOLY.value]) + record1[3:]
    record2 = resp.receive(forged)
    assert record2 is not None and record2[0] == NoiseCipher.CHACHAPOLY.value
    with pytest.raises(HandshakeError, match="authentication"):
        init.receive(record2)
    assert init.remote_peer is None


def test_rewritten_choice_is_detected() -> None:
    init, resp = _pair([NoiseCipher.AESGCM, NoiseCipher.CHACHAPOLY], None)
    record2 = bytearray(resp.receive(init.start()))  # type: ignore[arg-type]
    record2[0] = NoiseCipher.CHACHAPOLY.value if record2[0] == NoiseCipher.AESGCM.value else NoiseCipher.AESGCM.value
    with pytest.raises(HandshakeError, match="authentication"):
        init.receive(bytes(record2))


@pytest.mark.parametrize("choice", [0, 9, NoiseCipher.CHACHAPOLY.value])
def test_choice_outside_the_offer_is_refused(choice: int) -> None:
    init, resp = _pair([NoiseCipher.AESGCM], None)
    record2 = bytearray(resp.receive(init.start()))  # type: ignore[arg-type]
    record2[0] = choice
    with pytest.raises(HandshakeError):
        init.receive(bytes(record2))


@pytest.mark.parametrize("offer", [b"", b"\x00", b"\x09" + bytes(9), b"\x02\x01\x01", b"\x03\x01\x02"])
def test_malformed_offer_is_a_handshake_error(offer: bytes) -> None:
    _, resp = _pair()
    with pytest.raises(HandshakeError):
        resp.receive(offer + bytes(range(1, 33)))


def test_protocol_names_are_the_spec_names() -> None:
    assert PROTOCOL_NAME == NoiseCipher.CHACHAPOLY.protocol_name == b"Noise_XX_25519_ChaChaPoly_SHA256"
    assert NoiseCipher.AESGCM.protocol_name == b"Noise_XX_25519_AESGCM_SHA256"
