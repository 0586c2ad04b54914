"""Node identity: an Ed25519 key pair and its libp2p-style peer id.

The peer id is the libp2p encoding: the public key as the libp2p protobuf
``PublicKey{Type=Ed25519, Data=<32 bytes>}``, wrapped in an *identity*
multihash (the key is short enough to be inlined), then base58btc. For Ed25519
keys that always renders as ``12D3KooW...``, which is what users of ipfs and
libp2p recognise.

Key file (``identity.key``, mode 0600), format 2, 110 bytes::

    b"MURMKEY" | version u8 (2) | Ed25519 seed (32) | peer id raw (38) | BLAKE2b-256 of all before (32)

Why a checksum and the peer id: any 32 bytes are a valid Ed25519 seed, so a
bare seed (format 1, what murmur wrote before) with one flipped bit loads
fine and the node silently comes up as a different peer, losing its
reputation, its data share and its neighbours' trust. A damaged file is now a
:class:`~murmur.errors.StateDamaged` naming the file; the node stops instead
of becoming someone else. A format-1 file is read once and rewritten
atomically in format 2.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from murmur.errors import SignatureError, StateDamaged
from murmur.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

KEY_FILE_NAME = "identity.key"
KEY_FILE_MODE = 0o600
KEY_FILE_MAGIC = b"MURMKEY"
KEY_FILE_VERSION = 2
KEY_SEED_LEN = 32
LEGACY_KEY_FILE_LEN = KEY_SEED_LEN  # format 1: the bare seed, no check
_KEY_DIGEST_LEN = 32
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # field1=KeyType.Ed25519, field2 len 32
_MULTIHASH_IDENTITY = 0x00
_PEER_ID_LEN = 2 + len(_PROTOBUF_ED25519_PREFIX) + 32
KEY_HEADER_LEN = len(KEY_FILE_MAGIC) + 1
KEY_FILE_LEN = KEY_HEADER_LEN + KEY_SEED_LEN + _PEER_ID_LEN + _KEY_DIGEST_LEN
KEY_DAMAGED_ADVICE = "refusing to run as a different peer; restore it from a backup, or move it away to start as a new peer"
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (what multibase calls base58btc)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        try:
            n = n * 58 + _B58_INDEX[ch]
        except KeyError:
            raise ValueError(f"invalid base58 character {ch!r}") from None
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


@dataclass(frozen=True, order=True)
class PeerId:
    """A peer's id: the raw multihash bytes. Ordered bytewise, which is the
    order used wherever two peers must agree on a role (e.g. noise signs)."""

    raw: bytes

    @classmethod
    def from_public_key(cls, key: Ed25519PublicKey | bytes) -> PeerId:
        raw_key = key if isinstance(key, bytes) else key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if len(raw_key) != 32:
            raise ValueError("Ed25519 public key must be 32 bytes")
        body = _PROTOBUF_ED25519_PREFIX + raw_key
        return cls(bytes([_MULTIHASH_IDENTITY, len(body)]) + body)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse ``12D3KooW...``; raises ValueError for anything else."""
        raw = b58decode(text)
        peer = cls(raw)
        peer.public_key_bytes  # validates the layout
        return peer

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerId:
        """Parse raw multihash bytes (as carried on the wire)."""
        peer = cls(bytes(raw))
        peer.public_key_bytes
        return peer

    @cached_property
    def public_key_bytes(self) -> bytes:
        raw = self.raw
        if (
            len(raw) != _PEER_ID_LEN
            or raw[0] != _MULTIHASH_IDENTITY
            or raw[1] != _PEER_ID_LEN - 2
            or raw[2:6] != _PROTOBUF_ED25519_PREFIX
        ):
            raise ValueError("not an Ed25519 identity-multihash peer id")
        return raw[6:]

    @cached_property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key_bytes)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is this peer's over ``data``."""
        try:
            self.public_key.verify(signature, data)
        except (InvalidSignature, ValueError) as exc:
            raise SignatureError(f"bad signature from {self.short()}") from exc

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        return b58encode(self.raw)

    def short(self) -> str:
        """Compact form for logs: the last 8 characters, as libp2p tools print."""
        return "…" + self.text[-8:]

    def __repr__(self) -> str:
        return f"PeerId({self.text})"


class Identity:
    """The node's own Ed25519 key pair."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests, simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> Identity:
        """Load ``identity.key`` from ``state_dir``, creating it (mode 0600) on
        first start. A damaged file raises :class:`StateDamaged`; a format-1
        file (bare seed) is rewritten in the checked format."""
        path = Path(state_dir) / KEY_FILE_NAME
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise StateDamaged(f"{path} has mode {mode:o}; it must not be readable by others (chmod 600)")
            data = path.read_bytes()
            if len(data) == LEGACY_KEY_FILE_LEN:
                identity = cls.from_seed(data)
                atomic_write_bytes(path, encode_key_file(identity), mode=KEY_FILE_MODE)
                log.info("identity key rewritten with an integrity check",
                         extra={"event": "key_upgraded", "path": str(path), "peer": identity.peer_id.text})
                return identity
            return decode_key_file(data, path)
        identity = cls.generate()
        atomic_write_bytes(path, encode_key_file(identity), mode=KEY_FILE_MODE)
        return identity


def _key_digest(covered: bytes) -> bytes:
    return hashlib.blake2b(covered, digest_size=_KEY_DIGEST_LEN).digest()


def encode_key_file(identity: Identity) -> bytes:
    """``identity`` as a format-2 key file (see the module docstring)."""
    covered = KEY_FILE_MAGIC + bytes([KEY_FILE_VERSION]) + identity.private_bytes() + identity.peer_id.raw
    return covered + _key_digest(covered)


def decode_key_file(data: bytes, path: Path) -> Identity:
    """The identity in a format-2 key file; :class:`StateDamaged` (one line
    naming ``path`` and what is wrong) unless every byte checks out."""

    def damaged(problem: str) -> StateDamaged:
        return StateDamaged(f"identity key {path} is damaged ({problem}); {KEY_DAMAGED_ADVICE}")

    if len(data) != KEY_FILE_LEN:
        raise damaged(f"{len(data)} bytes, expected {KEY_FILE_LEN}")
    if not data.startswith(KEY_FILE_MAGIC):
        raise damaged("bad header: not a murmur key file")
    covered, digest = data[:-_KEY_DIGEST_LEN], data[-_KEY_DIGEST_LEN:]
    if _key_digest(covered) != digest:
        raise damaged("checksum mismatch")
    version = data[len(KEY_FILE_MAGIC)]
    if version != KEY_FILE_VERSION:
        raise damaged(f"format version {version}, this murmur reads {KEY_FILE_VERSION}")
    seed = data[KEY_HEADER_LEN : KEY_HEADER_LEN + KEY_SEED_LEN]
    stored = data[KEY_HEADER_LEN + KEY_SEED_LEN : -_KEY_DIGEST_LEN]
    identity = Identity.from_seed(seed)
    if identity.peer_id.raw != stored:
        raise damaged("the stored peer id is not the key's")
    return identity
