"""Pairwise noise seeds: X25519 agreement → edge secret → per-round Philox noise.

Threat model: peers are honest-but-curious and may collude (Sybils included).
A coalition knows the seeds of every edge that touches one of its members, and
nothing else. Each edge (i, j) therefore needs a secret that only i and j can
derive, agreed over an authenticated channel, and fresh per-round noise that
both ends regenerate bit-for-bit so the two copies cancel exactly in the
network average (v_ji = −v_ij).

Chain of derivations (all domain-separated):

* key share: a per-session X25519 public key, signed by the node's Ed25519
  identity over ``b"murmur-keyshare-v1" || x25519_pub || own_peer_raw ||
  peer_raw``. Binding both ids stops a share for one edge being replayed on
  another edge or in the reverse direction.
* edge secret: HKDF-SHA256(X25519(a, B), salt = min(raw_a, raw_b) ||
  max(raw_a, raw_b), info = ``b"murmur-edge-secret-v1"``). Both ends compute
  the same salt, so the same secret.
* round key: HKDF-SHA256(edge secret, info = ``b"round" || u64(round)``) →
  128-bit key for numpy's counter-based Philox, so any round's noise is
  available without replaying earlier rounds.
* sign: +1 at the peer with the bytewise smaller id, −1 at the other.

Secrets are wrapped in :class:`EdgeSecret`, whose repr never shows the bytes,
so a stray log line or traceback cannot leak a seed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from murmur.errors import DecodeError
from murmur.protocol.identity import Identity, PeerId

KEYSHARE_DOMAIN = b"murmur-keyshare-v1"
EDGE_SECRET_INFO = b"murmur-edge-secret-v1"
ROUND_INFO_PREFIX = b"round"
X25519_KEY_LEN = 32
EDGE_SECRET_LEN = 32
ROUND_KEY_LEN = 16  # 128-bit Philox key
_U64 = struct.Struct(">Q")


def _hkdf(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


class EdgeSecret:
    """The 32-byte secret of one edge. ``repr``/``str`` hide it on purpose."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != EDGE_SECRET_LEN:
            raise ValueError(f"edge secret must be {EDGE_SECRET_LEN} bytes")
        self._secret = bytes(secret)

    def round_key(self, round_: int) -> int:
        """128-bit Philox key for ``round_`` (independent of every other round)."""
        if not 0 <= round_ < 2**64:
            raise ValueError(f"round {round_} out of u64 range")
        key = _hkdf(self._secret, salt=None, info=ROUND_INFO_PREFIX + _U64.pack(round_), length=ROUND_KEY_LEN)
        return int.from_bytes(key, "big")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EdgeSecret) and self._secret == other._secret

    def __hash__(self) -> int:
        return hash(self._secret)

    def __repr__(self) -> str:
        return "EdgeSecret(<hidden>)"

    __str__ = __repr__


class SessionKeyPair:
    """A node's X25519 key pair for one session (never persisted)."""

    def __init__(self, private_key: X25519PrivateKey | None = None) -> None:
        self._private = private_key if private_key is not None else X25519PrivateKey.generate()
        self.public_bytes: bytes = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def exchange(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret; :class:`DecodeError` for a malformed or
        low-order peer key (cryptography rejects an all-zero result)."""
        if len(peer_public) != X25519_KEY_LEN:
            raise DecodeError(f"X25519 key must be {X25519_KEY_LEN} bytes, got {len(peer_public)}")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise DecodeError("degenerate X25519 public key") from exc

    def __repr__(self) -> str:
        return "SessionKeyPair(<hidden>)"


@dataclass(frozen=True)
class SignedKeyShare:
    """What travels in a ``KeyShare`` message: the X25519 public key and the
    sender's Ed25519 signature binding it to (sender, recipient)."""

    x25519_pub: bytes
    signature: bytes


def _keyshare_input(x25519_pub: bytes, sender: PeerId, recipient: PeerId) -> bytes:
    return KEYSHARE_DOMAIN + x25519_pub + sender.raw + recipient.raw


def make_keyshare(identity: Identity, keypair: SessionKeyPair, peer: PeerId) -> SignedKeyShare:
    """Sign our session X25519 key for the edge to ``peer``."""
    data = _keyshare_input(keypair.public_bytes, identity.peer_id, peer)
    return SignedKeyShare(keypair.public_bytes, identity.sign(data))


def verify_keyshare(share: SignedKeyShare, sender: PeerId, me: PeerId) -> bytes:
    """Return the sender's X25519 key if ``share`` is ``sender``'s signature for
    the edge (sender → me); :class:`SignatureError` otherwise."""
    if len(share.x25519_pub) != X25519_KEY_LEN:
        raise DecodeError(f"X25519 key must be {X25519_KEY_LEN} bytes, got {len(share.x25519_pub)}")
    sender.verify(share.signature, _keyshare_input(share.x25519_pub, sender, me))
    return share.x25519_pub


def derive_edge_secret(keypair: SessionKeyPair, peer_public: bytes, me: PeerId, peer: PeerId) -> EdgeSecret:
    """Both ends get the same secret: the salt is the two ids in byte order."""
    if me == peer:
        raise ValueError("an edge needs two distinct peers")
    lo, hi = sorted((me.raw, peer.raw))
    shared = keypair.exchange(peer_public)
    return EdgeSecret(_hkdf(shared, salt=lo + hi, info=EDGE_SECRET_INFO, length=EDGE_SECRET_LEN))


def edge_sign(me: PeerId, peer: PeerId) -> int:
    """+1 at the bytewise smaller id, −1 at the other: v_ji = −v_ij."""
    if me == peer:
        raise ValueError("an edge needs two distinct peers")
    return 1 if me.raw < peer.raw else -1


def edge_noise_np(secret: EdgeSecret, round_: int, dim: int, std: float, me: PeerId, peer: PeerId) -> np.ndarray:
    """v_ij^t ~ N(0, std² I_dim) as float32, signed for ``me``'s end of the edge.

    The sign is applied after sampling (negation is exact in IEEE floats), so
    the two ends' vectors are exact negatives of each other.
    """
    if std < 0:
        raise ValueError("std must be non-negative")
    gen = np.random.Generator(np.random.Philox(key=secret.round_key(round_)))
    v = gen.standard_normal(dim, dtype=np.float32)
    v *= np.float32(std)
    if edge_sign(me, peer) < 0:
        np.negative(v, out=v)
    return v


def edge_noise(
    secret: EdgeSecret,
    round_: int,
    dim: int,
    std: float,
    me: PeerId,
    peer: PeerId,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`edge_noise_np` as a float32 torch tensor on ``device``."""
    return torch.from_numpy(edge_noise_np(secret, round_, dim, std, me, peer)).to(device)


@dataclass
class PairwiseSeeds:
    """A node's edge secrets for one session, keyed by neighbour.

    ``accept_share`` verifies the neighbour's signed share and derives the
    secret; secrets of departed neighbours are dropped with ``forget``.
    """

    identity: Identity
    keypair: SessionKeyPair = field(default_factory=SessionKeyPair)
    _secrets: dict[PeerId, EdgeSecret] = field(default_factory=dict, repr=False)

    @property
    def me(self) -> PeerId:
        return self.identity.peer_id

    def share_for(self, peer: PeerId) -> SignedKeyShare:
        return make_keyshare(self.identity, self.keypair, peer)

    def accept_share(self, sender: PeerId, share: SignedKeyShare) -> EdgeSecret:
        peer_pub = verify_keyshare(share, sender, self.me)
        secret = derive_edge_secret(self.keypair, peer_pub, self.me, sender)
        self._secrets[sender] = secret
        return secret

    def secret(self, peer: PeerId) -> EdgeSecret:
        return self._secrets[peer]

    def has(self, peer: PeerId) -> bool:
        return peer in self._secrets

    def forget(self, peer: PeerId) -> None:
        self._secrets.pop(peer, None)

    def peers(self) -> list[PeerId]:
        return sorted(self._secrets)
