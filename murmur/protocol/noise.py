"""Noise_XX_25519_{AESGCM,ChaChaPoly}_SHA256 with the libp2p-noise identity payload, sans-IO.

Two layers, each usable on its own:

* :class:`HandshakeState` is plain Noise (revision 34) for the XX pattern, built
  on the ``cryptography`` primitives. It knows nothing about sockets or
  identities; it turns payloads into handshake messages and back. The interop
  tests run it against the ``noiseprotocol`` package byte for byte, which is
  how we know it is standard Noise rather than something Noise-shaped.
* Two handshakes drive a ``HandshakeState`` the way libp2p-noise does: the
  responder's message 2 and the initiator's message 3 carry a
  ``NoiseHandshakePayload`` protobuf with the sender's Ed25519 identity key
  and its signature over ``b"noise-libp2p-static-key:" + static_pub``. A
  peer's identity is therefore proved by the same handshake that creates the
  session keys; there is no unauthenticated window.

  - :class:`StandardNoiseHandshake` is ``/noise`` exactly per the spec
    (ChaChaPoly, empty prologue), what any libp2p peer speaks;
  - :class:`Libp2pNoiseHandshake` is murmur's fast path: it negotiates the
    cipher inside the handshake, bound into the prologue, at no extra round
    trip (see the class docstring), and accepts only the canonical encoding
    of the payload's two identity fields.

The protobuf messages are encoded and parsed by Google's runtime
(:mod:`murmur.protocol.pb`); strictness is a re-encoding check on top, and
every failure is a typed :class:`~murmur.errors.HandshakeError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from murmur.errors import HandshakeError, IdentityMismatch, SignatureError
from murmur.protocol import pb
from murmur.protocol.identity import Identity, PeerId

HASH_LEN = 32
DH_LEN = 32
KEY_LEN = 32
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the Noise spec; never used for encryption
NOISE_MAX_MESSAGE = 65535
STATIC_KEY_SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
ED25519_KEY_LEN = 32
ED25519_SIG_LEN = 64
LIBP2P_KEY_TYPE_ED25519 = pb.KeyType.ED25519



class NoiseCipher(enum.Enum):
    """The Noise cipher functions murmur speaks; the value is the wire id in
    the negotiation (see :class:`Libp2pNoiseHandshake`).

    ChaChaPoly is what libp2p-noise fixes; AESGCM is the other cipher the
    Noise spec defines (section 12.4) and runs about twice as fast where the
    CPU has AES instructions, which matters when the AEAD is a third of the
    per-byte cost of a model-delta stream.
    """

    CHACHAPOLY = 1
    AESGCM = 2

    @property
    def protocol_name(self) -> bytes:
        return b"Noise_XX_25519_" + _CIPHER_NAMES[self] + b"_SHA256"


_CIPHER_NAMES = {NoiseCipher.CHACHAPOLY: b"ChaChaPoly", NoiseCipher.AESGCM: b"AESGCM"}
# Noise section 12: ChaChaPoly's nonce is 32 zero bits + the 64-bit counter
# little-endian, AESGCM's the same counter big-endian.
_NONCES = {NoiseCipher.CHACHAPOLY: struct.Struct("<4xQ"), NoiseCipher.AESGCM: struct.Struct(">4xQ")}
_AEADS: dict[NoiseCipher, type[ChaCha20Poly1305] | type[AESGCM]] = {
    NoiseCipher.CHACHAPOLY: ChaCha20Poly1305,
    NoiseCipher.AESGCM: AESGCM,
}
PROTOCOL_NAME = NoiseCipher.CHACHAPOLY.protocol_name  # libp2p-noise's, kept for reference tests
# CPUs where AES-GCM has hardware support as a rule (AES-NI + CLMUL, ARMv8 crypto).
_AES_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})


def default_ciphers() -> tuple[NoiseCipher, ...]:
    """Preference order for this machine: AESGCM first where AES is in hardware."""
    if platform.machine().lower() in _AES_MACHINES:
        return (NoiseCipher.AESGCM, NoiseCipher.CHACHAPOLY)
    return (NoiseCipher.CHACHAPOLY, NoiseCipher.AESGCM)


def _raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (spec section 4.3): HMAC-SHA256 extract, then 2 or 3 expand blocks."""
    temp = _hmac(chaining_key, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp, out2 + b"\x03")


class CipherState:
    """An AEAD key (ChaChaPoly or AESGCM) with its 64-bit message counter (Noise section 5.1).

    After :meth:`HandshakeState.split` these carry the transport traffic; the
    frame layer uses :meth:`seal_into` / :meth:`open` so a multi-megabyte frame
    is encrypted straight into the buffer that goes to the socket.
    """

    __slots__ = ("_aead", "_nonce", "cipher", "n")

    def __init__(self, key: bytes | None = None, cipher: NoiseCipher = NoiseCipher.CHACHAPOLY) -> None:
        self.cipher = cipher
        self._aead: ChaCha20Poly1305 | AESGCM | None = _AEADS[cipher](key) if key is not None else None
        self._nonce = _NONCES[cipher]
        self.n = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def _next_nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise HandshakeError("Noise nonce space exhausted")  # 2^64 messages: unreachable in practice
        nonce = self._nonce.pack(self.n)
        self.n += 1
        return nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        return self._aead.encrypt(self._next_nonce(), plaintext, ad)

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Raises ``InvalidTag`` on failure; the nonce is only consumed on success (spec 5.1)."""
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= MAX_NONCE:
            raise HandshakeError("Noise nonce space exhausted")
        plaintext = self._aead.decrypt(self._nonce.pack(self.n), ciphertext, ad)
        self.n += 1
        return plaintext

    def seal_into(self, plaintext: bytes | bytearray | memoryview, out: bytearray | memoryview) -> None:
        """Encrypt ``plaintext`` (no associated data) into ``out`` (len(plaintext) + 16)."""
        assert self._aead is not None, "seal_into needs a keyed CipherState"
        self._aead.encrypt_into(self._next_nonce(), plaintext, None, out)

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt with no associated data; raises ``InvalidTag`` on failure."""
        assert self._aead is not None, "open needs a keyed CipherState"
        if self.n >= MAX_NONCE:
            raise HandshakeError("Noise nonce space exhausted")
        plaintext = self._aead.decrypt(self._nonce.pack(self.n), ciphertext, None)
        self.n += 1
        return plaintext

    def reserve(self) -> int:
        """Take the next nonce for a record opened later (:meth:`open_at`):
        a split frame's tail, which its reader opens where it wants it."""
        if self.n >= MAX_NONCE:
            raise HandshakeError("Noise nonce space exhausted")
        self.n += 1
        return self.n - 1

    def open_at(self, n: int, ciphertext: bytes | bytearray | memoryview, out: bytearray | memoryview) -> None:
        """:meth:`open_into` with a nonce :meth:`reserve` gave (the counter does not move)."""
        assert self._aead is not None, "open_at needs a keyed CipherState"
        self._aead.decrypt_into(self._nonce.pack(n), ciphertext, None, out)

    def open_into(self, ciphertext: bytes | bytearray | memoryview, out: bytearray | memoryview) -> None:
        """Decrypt (no associated data) into ``out`` (len(ciphertext) - 16).

        Raises ``InvalidTag`` on failure. The AEAD writes before it checks the
        tag, so after a failure ``out`` holds unauthenticated bytes: callers
        must treat it as garbage (the frame decoder never reads it then)."""
        assert self._aead is not None, "open_into needs a keyed CipherState"
        if self.n >= MAX_NONCE:
            raise HandshakeError("Noise nonce space exhausted")
        self._aead.decrypt_into(self._nonce.pack(self.n), ciphertext, None, out)
        self.n += 1


class SymmetricState:
    """Noise section 5.2: chaining key, handshake hash and the current cipher."""

    def __init__(self, cipher: NoiseCipher) -> None:
        protocol_name = cipher.protocol_name
        self.cipher_fn = cipher
        if len(protocol_name) <= HASH_LEN:
            self.h = protocol_name.ljust(HASH_LEN, b"\0")
        else:
            self.h = _sha256(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k[:KEY_LEN], self.cipher_fn)

    def mix_hash(self, data: bytes) -> None:
        self.h = _sha256(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        except InvalidTag:
            raise HandshakeError("handshake message failed authentication") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return CipherState(k1[:KEY_LEN], self.cipher_fn), CipherState(k2[:KEY_LEN], self.cipher_fn)


class Token(enum.Enum):
    E = "e"
    S = "s"
    EE = "ee"
    ES = "es"
    SE = "se"
    SS = "ss"


# Noise XX: -> e / <- e, ee, s, es / -> s, se
XX_PATTERN: tuple[tuple[Token, ...], ...] = (
    (Token.E,),
    (Token.E, Token.EE, Token.S, Token.ES),
    (Token.S, Token.SE),
)


def _dh(private: X25519PrivateKey, public_raw: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public_raw))
    except ValueError:  # low-order point: all-zero shared secret
        raise HandshakeError("peer sent a degenerate X25519 public key") from None


class HandshakeState:
    """Noise section 5.3 for the XX pattern; sans-IO.

    ``ephemeral`` may be fixed for known-answer tests; in production it is
    generated when message 1 or 2 is written.
    """

    def __init__(
        self,
        initiator: bool,
        static: X25519PrivateKey,
        prologue: bytes = b"",
        ephemeral: X25519PrivateKey | None = None,
        cipher: NoiseCipher = NoiseCipher.CHACHAPOLY,
    ) -> None:
        self.initiator = initiator
        self.cipher = cipher
        self.s = static
        self.s_pub = _raw_public(static)
        self.e = ephemeral
        self.rs: bytes | None = None
        self.re: bytes | None = None
        self._sym = SymmetricState(cipher)
        self._sym.mix_hash(prologue)
        self._index = 0

    @property
    def complete(self) -> bool:
        return self._index == len(XX_PATTERN)

    @property
    def handshake_hash(self) -> bytes:
        return self._sym.h

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    def write_message(self, payload: bytes = b"") -> bytes:
        if self.complete or not self._my_turn():
            raise HandshakeError("not our turn to write a handshake message")
        sym = self._sym
        out = bytearray()
        for token in XX_PATTERN[self._index]:
            if token is Token.E:
                if self.e is None:
                    self.e = X25519PrivateKey.generate()
                e_pub = _raw_public(self.e)
                out += e_pub
                sym.mix_hash(e_pub)
            elif token is Token.S:
                out += sym.encrypt_and_hash(self.s_pub)
            else:
                sym.mix_key(self._dh_token(token))
        out += sym.encrypt_and_hash(payload)
        self._index += 1
        if len(out) > NOISE_MAX_MESSAGE:
            raise HandshakeError("handshake message exceeds the Noise maximum")
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Consume a peer message and return its payload; raises :class:`HandshakeError`."""
        if self.complete or self._my_turn():
            raise HandshakeError("unexpected handshake message")
        if len(message) > NOISE_MAX_MESSAGE:
            raise HandshakeError("handshake message exceeds the Noise maximum")
        sym = self._sym
        view = memoryview(message)
        pos = 0
        for token in XX_PATTERN[self._index]:
            if token is Token.E:
                if len(view) - pos < DH_LEN:
                    raise HandshakeError("truncated handshake message (ephemeral key)")
                self.re = bytes(view[pos : pos + DH_LEN])
                pos += DH_LEN
                sym.mix_hash(self.re)
            elif token is Token.S:
                need = DH_LEN + (TAG_LEN if sym.cipher.has_key() else 0)
                if len(view) - pos < need:
                    raise HandshakeError("truncated handshake message (static key)")
                self.rs = sym.decrypt_and_hash(bytes(view[pos : pos + need]))
                pos += need
            else:
                sym.mix_key(self._dh_token(token))
        rest = bytes(view[pos:])
        if sym.cipher.has_key() and len(rest) < TAG_LEN:
            raise HandshakeError("truncated handshake message (payload tag)")
        payload = sym.decrypt_and_hash(rest)
        self._index += 1
        return payload

    def _dh_token(self, token: Token) -> bytes:
        """Resolve ee/es/se to (our key, their key) per the initiator/responder roles."""
        local_e, local_s = self.e, self.s
        if token is Token.EE:
            mine, theirs = local_e, self.re
        elif token is Token.ES:
            mine, theirs = (local_e, self.rs) if self.initiator else (local_s, self.re)
        elif token is Token.SE:
            mine, theirs = (local_s, self.re) if self.initiator else (local_e, self.rs)
        else:
            mine, theirs = local_s, self.rs
        if mine is None or theirs is None:
            raise HandshakeError(f"handshake token {token.value} before its keys are known")
        return _dh(mine, theirs)

    def split(self) -> tuple[CipherState, CipherState]:
        """Return ``(send, receive)`` CipherStates for this side."""
        if not self.complete:
            raise HandshakeError("handshake is not complete")
        c1, c2 = self._sym.split()
        return (c1, c2) if self.initiator else (c2, c1)


# --- libp2p NoiseHandshakePayload -------------------------------------------------


def encode_public_key(ed25519_raw: bytes) -> bytes:
    """libp2p ``PublicKey{Type=Ed25519, Data=key}`` (deterministic encoding)."""
    return pb.serialize(pb.PublicKey(Type=pb.KeyType.ED25519, Data=ed25519_raw))


def decode_public_key(buf: bytes) -> bytes:
    """Parse a libp2p ``PublicKey``; only Ed25519 is accepted. Returns the raw 32 bytes.

    The peer-ids spec requires the deterministic encoding (it is hashed into
    the peer id), so anything that does not re-encode to the same bytes
    (unknown or repeated fields, other field order, padded varints) is refused."""
    key = pb.parse(pb.PublicKey, buf, HandshakeError, "identity key")
    if key.Type != pb.KeyType.ED25519:
        name = pb.KeyType(key.Type).name if key.Type in pb.KeyType._value2member_map_ else str(key.Type)
        raise HandshakeError(f"identity key type {name} is not supported (Ed25519 only)")
    if len(key.Data) != ED25519_KEY_LEN:
        raise HandshakeError("Ed25519 identity key must be 32 bytes")
    if encode_public_key(key.Data) != bytes(buf):
        raise HandshakeError("identity key is not deterministically encoded")
    return bytes(key.Data)


@dataclass(frozen=True)
class HandshakePayload:
    """libp2p ``NoiseHandshakePayload``: identity_key (1), identity_sig (2),
    and the extensions (4) the libp2p-noise spec defines; of those murmur
    reads ``stream_muxers`` (early muxer negotiation, not used yet)."""

    identity_key: bytes  # libp2p PublicKey protobuf
    identity_sig: bytes
    stream_muxers: tuple[str, ...] = ()

    def encode(self) -> bytes:
        msg = pb.NoiseHandshakePayload(identity_key=self.identity_key, identity_sig=self.identity_sig)
        if self.stream_muxers:
            msg.extensions.stream_muxers.extend(self.stream_muxers)
        return pb.serialize(msg)

    @classmethod
    def decode(cls, buf: bytes, strict: bool = True) -> HandshakePayload:
        """Parse a payload. ``strict`` (murmur's own handshake) accepts only
        the canonical encoding of the two identity fields; otherwise (the
        standard ``/noise``) any well-formed payload with both fields, its
        extensions read and unknown fields ignored, as proto2 parsers do."""
        msg = pb.parse(pb.NoiseHandshakePayload, buf, HandshakeError, "handshake payload")
        if not (msg.HasField("identity_key") and msg.HasField("identity_sig")):
            raise HandshakeError("handshake payload lacks the identity key or its signature")
        if len(msg.identity_sig) != ED25519_SIG_LEN:
            raise HandshakeError("identity signature must be 64 bytes")
        muxers = tuple(pb.text(m, HandshakeError, "a stream muxer name") for m in msg.extensions.stream_muxers)
        payload = cls(bytes(msg.identity_key), bytes(msg.identity_sig), muxers)
        if strict and cls(payload.identity_key, payload.identity_sig).encode() != bytes(buf):
            raise HandshakeError("handshake payload is not the canonical encoding of its two fields")
        return payload

    @classmethod
    def sign(cls, identity: Identity, static_pub: bytes, stream_muxers: Sequence[str] = ()) -> HandshakePayload:
        return cls(
            encode_public_key(identity.peer_id.public_key_bytes),
            identity.sign(STATIC_KEY_SIGNATURE_PREFIX + static_pub),
            tuple(stream_muxers),
        )

    def verify(self, static_pub: bytes) -> PeerId:
        """Return the peer id this payload proves for ``static_pub``; else :class:`IdentityMismatch`."""
        peer = PeerId.from_public_key(decode_public_key(self.identity_key))
        try:
            peer.verify(self.identity_sig, STATIC_KEY_SIGNATURE_PREFIX + static_pub)
        except SignatureError:
            raise IdentityMismatch(f"{peer.short()} did not sign its Noise static key") from None
        return peer


class _IdentityHandshake:
    """What every libp2p-noise handshake shares: a fresh static key, the
    signed identity payload, proving the peer's payload against its static
    key (and against the dialled peer id before we reveal ourselves), and the
    split. Subclasses drive the three XX messages their own way."""

    strict_payload = True

    def __init__(
        self,
        identity: Identity,
        initiator: bool,
        static: X25519PrivateKey | None = None,
        expected: PeerId | None = None,
    ) -> None:
        self.identity = identity
        self.initiator = initiator
        self.expected = expected
        self._static = static or X25519PrivateKey.generate()
        self._hs: HandshakeState | None = None
        self.remote_peer: PeerId | None = None
        self.remote_payload: HandshakePayload | None = None

    @property
    def complete(self) -> bool:
        return self._hs is not None and self._hs.complete and self.remote_peer is not None

    def _payload(self) -> bytes:
        return HandshakePayload.sign(self.identity, _raw_public(self._static)).encode()

    def _prove(self, payload: bytes) -> None:
        assert self._hs is not None and self._hs.rs is not None
        decoded = HandshakePayload.decode(payload, strict=self.strict_payload)
        peer = decoded.verify(self._hs.rs)
        if self.expected is not None and peer != self.expected:
            raise IdentityMismatch(f"expected {self.expected.short()}, peer proved {peer.short()}")
        self.remote_payload = decoded
        self.remote_peer = peer

    def split(self) -> tuple[CipherState, CipherState]:
        """``(send, receive)`` CipherStates; only after the peer's identity is proved."""
        if not self.complete:
            raise HandshakeError("handshake is not complete")
        assert self._hs is not None
        return self._hs.split()


class StandardNoiseHandshake(_IdentityHandshake):
    """``/noise`` exactly as the libp2p-noise spec has it, sans-IO:
    ``Noise_XX_25519_ChaChaPoly_SHA256``, empty prologue, an empty message 1,
    the signed ``NoiseHandshakePayload`` in messages 2 and 3 (extensions
    parsed, unknown fields ignored). Messages are bare Noise messages; the
    caller frames them with a 2-byte big-endian length. Same driving as
    :class:`Libp2pNoiseHandshake`: ``start()``, then ``receive(msg)``.
    """

    strict_payload = False

    def __init__(
        self,
        identity: Identity,
        initiator: bool,
        static: X25519PrivateKey | None = None,
        expected: PeerId | None = None,
        ephemeral: X25519PrivateKey | None = None,  # fixed only in known-answer tests
    ) -> None:
        super().__init__(identity, initiator, static, expected)
        self._hs = HandshakeState(initiator, self._static, b"", ephemeral, NoiseCipher.CHACHAPOLY)
        self._started = False

    def start(self) -> bytes | None:
        if not self.initiator:
            return None
        if self._started:
            raise HandshakeError("handshake already started")
        self._started = True
        assert self._hs is not None
        return self._hs.write_message(b"")

    def receive(self, message: bytes) -> bytes | None:
        hs = self._hs
        assert hs is not None
        if self.initiator:
            if not self._started or hs.complete:
                raise HandshakeError("unexpected handshake message")
            self._prove(hs.read_message(message))  # message 2
            return hs.write_message(self._payload())  # message 3
        if hs.re is None:  # message 1: the ephemeral key, no payload
            if hs.read_message(message):
                raise HandshakeError("message 1 carries a payload")
            return hs.write_message(self._payload())
        self._prove(hs.read_message(message))  # message 3
        return None


# --- cipher negotiation ----------------------------------------------------------

NEGOTIATION_DOMAIN = b"murmur-noise-negotiation-v1"
MAX_OFFERED_CIPHERS = 8


def negotiation_prologue(offer: bytes, choice: NoiseCipher) -> bytes:
    """The Noise prologue both sides mix in: the initiator's offer (as sent)
    and the responder's choice. An attacker who rewrites either makes the two
    handshake hashes differ, so message 2 fails authentication: no silent
    downgrade."""
    return NEGOTIATION_DOMAIN + bytes([len(offer)]) + offer + bytes([choice.value])


def _encode_offer(ciphers: Sequence[NoiseCipher]) -> bytes:
    if not 1 <= len(ciphers) <= MAX_OFFERED_CIPHERS or len(set(ciphers)) != len(ciphers):
        raise ValueError("offer 1 to 8 distinct ciphers")
    return bytes(c.value for c in ciphers)


def _split_offer(record: bytes) -> tuple[bytes, bytes]:
    """Record 1 is ``n:u8 | n cipher ids | Noise message 1``."""
    if not record:
        raise HandshakeError("empty handshake record")
    n = record[0]
    if not 1 <= n <= MAX_OFFERED_CIPHERS or len(record) < 1 + n:
        raise HandshakeError(f"bad cipher offer of {n} entries")
    offer = record[1 : 1 + n]
    if len(set(offer)) != n:
        raise HandshakeError("cipher offer repeats an entry")
    return offer, record[1 + n :]


class Libp2pNoiseHandshake(_IdentityHandshake):
    """murmur's fast-path variant of the libp2p-noise XX handshake, with Noise cipher negotiation, as a sans-IO state machine.

    Drive it with ``start()`` then ``receive(msg)`` for every handshake message
    that arrives; both return the next message to send (or ``None``). When
    ``complete`` is true, ``remote_peer`` is the proved identity, ``cipher``
    the negotiated cipher and ``split()`` gives the transport CipherStates.

    ``expected`` (a dialler's target) is checked the moment the responder's
    identity is proved, *before* message 3 reveals our own identity to a peer
    we did not mean to talk to.

    Negotiation costs no round trip. The initiator prefixes message 1 with
    its offer (``ciphers``, most preferred first); the responder takes the
    first offered cipher it also allows and prefixes message 2 with it. Both
    then run ``Noise_XX_25519_<cipher>_SHA256`` with the offer and the choice
    in the prologue (:func:`negotiation_prologue`). XX message 1 is just the
    ephemeral key with an empty, unencrypted payload, so its bytes do not
    depend on the cipher: the initiator sends it before it knows the choice
    and replays it under the chosen protocol when message 2 arrives, with the
    same ephemeral key (checked to give the same bytes).
    """

    def __init__(
        self,
        identity: Identity,
        initiator: bool,
        static: X25519PrivateKey | None = None,
        expected: PeerId | None = None,
        ciphers: Sequence[NoiseCipher] | None = None,
    ) -> None:
        super().__init__(identity, initiator, static, expected)
        self.ciphers = tuple(ciphers) if ciphers is not None else default_ciphers()
        self._offer = _encode_offer(self.ciphers)
        self._ephemeral: X25519PrivateKey | None = None
        self._message1: bytes | None = None

    @property
    def cipher(self) -> NoiseCipher | None:
        return self._hs.cipher if self._hs is not None else None

    def _state(self, offer: bytes, choice: NoiseCipher) -> HandshakeState:
        return HandshakeState(
            self.initiator, self._static, negotiation_prologue(offer, choice), self._ephemeral, choice
        )

    def start(self) -> bytes | None:
        """Record 1 (initiator: offer + message 1) or ``None`` (responder waits)."""
        if not self.initiator:
            return None
        if self._message1 is not None:
            raise HandshakeError("handshake already started")
        self._ephemeral = X25519PrivateKey.generate()
        # Any cipher gives the same message 1; it is rebuilt under the chosen one.
        self._message1 = self._state(self._offer, self.ciphers[0]).write_message(b"")
        return bytes([len(self._offer)]) + self._offer + self._message1

    def receive(self, message: bytes) -> bytes | None:
        if self.initiator:
            return self._initiator_receive(message)
        return self._responder_receive(message)

    def _initiator_receive(self, record: bytes) -> bytes | None:
        if self._message1 is None or self._hs is not None:
            raise HandshakeError("unexpected handshake message")
        if not record:
            raise HandshakeError("empty handshake record")
        try:
            choice = NoiseCipher(record[0])
        except ValueError:
            raise HandshakeError(f"responder chose unknown cipher {record[0]}") from None
        if choice not in self.ciphers:
            raise HandshakeError(f"responder chose {choice.name}, which we did not offer")
        hs = self._hs = self._state(self._offer, choice)
        if hs.write_message(b"") != self._message1:  # same ephemeral key: cannot differ
            raise HandshakeError("message 1 does not replay under the chosen cipher")
        self._prove(hs.read_message(record[1:]))  # got message 2: verify the responder
        return hs.write_message(self._payload())  # answer with message 3

    def _responder_receive(self, record: bytes) -> bytes | None:
        if self._hs is None:  # record 1: offer + message 1, whose payload must be empty
            offer, message1 = _split_offer(record)
            allowed = {c.value for c in self.ciphers}
            chosen = next((c for c in offer if c in allowed), None)
            if chosen is None:
                raise HandshakeError(f"no common cipher: offered {list(offer)}, allowed {sorted(allowed)}")
            choice = NoiseCipher(chosen)
            hs = self._hs = self._state(offer, choice)
            if hs.read_message(message1):
                raise HandshakeError("message 1 carries a payload")
            return bytes([choice.value]) + hs.write_message(self._payload())
        self._prove(self._hs.read_message(record))  # got message 3
        return None
