"""Node identity: an Ed25519 key pair and its libp2p-style peer id.

The peer id is the libp2p encoding: the public key as the libp2p protobuf
``PublicKey{Type=Ed25519, Data=<32 bytes>}``, wrapped in an *identity*
multihash (the key is short enough to be inlined), then base58btc. For Ed25519
keys that always renders as ``12D3KooW...``, which is what users of ipfs and
libp2p recognise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from murmur.errors import SignatureError, StateError
from murmur.fsutil import atomic_write_bytes

KEY_FILE_NAME = "identity.key"
KEY_FILE_MODE = 0o600
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # field1=KeyType.Ed25519, field2 len 32
_MULTIHASH_IDENTITY = 0x00
_PEER_ID_LEN = 2 + len(_PROTOBUF_ED25519_PREFIX) + 32
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
        """Load ``identity.key`` from ``state_dir``, creating it (mode 0600) on first start."""
        path = Path(state_dir) / KEY_FILE_NAME
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise StateError(f"{path} has mode {mode:o}; it must not be readable by others (chmod 600)")
            data = path.read_bytes()
            if len(data) != 32:
                raise StateError(f"{path} is not a 32-byte Ed25519 seed ({len(data)} bytes)")
            return cls.from_seed(data)
        identity = cls.generate()
        atomic_write_bytes(path, identity.private_bytes(), mode=KEY_FILE_MODE)
        return identity
