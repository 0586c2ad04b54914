"""Pairwise seeds: signed X25519 shares, HKDF edge secrets, per-round Philox noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from murmur.errors import DecodeError, SignatureError
from murmur.learning.privacy.seeds import (
    EdgeSecret,
    PairwiseSeeds,
    SessionKeyPair,
    SignedKeyShare,
    derive_edge_secret,
    edge_noise,
    edge_noise_np,
    edge_sign,
    make_keyshare,
    verify_keyshare,
)
from murmur.protocol.identity import Identity


@pytest.fixture
def pair() -> tuple[PairwiseSeeds, PairwiseSeeds]:
    a, b = PairwiseSeeds(Identity.generate()), PairwiseSeeds(Identity.generate())
    a.accept_share(b.me, b.share_for(a.me))
    b.accept_share(a.me, a.share_for(b.me))
    return a, b


def test_both_ends_derive_the_same_secret_from_independent_key_pairs(pair) -> None:
    a, b = pair
    assert a.keypair.public_bytes != b.keypair.public_bytes
    assert a.secret(b.me) == b.secret(a.me)


def test_edge_noise_is_exact_negative_at_the_other_end(pair) -> None:
    a, b = pair
    va = edge_noise(a.secret(b.me), 7, 10_000, 3.0, a.me, b.me)
    vb = edge_noise(b.secret(a.me), 7, 10_000, 3.0, b.me, a.me)
    assert va.dtype == torch.float32 and va.shape == (10_000,)
    assert torch.equal(va, -vb)
    assert edge_sign(a.me, b.me) == -edge_sign(b.me, a.me)
    assert edge_sign(a.me, b.me) == (1 if a.me.raw < b.me.raw else -1)


def test_noise_is_fresh_per_round_deterministic_and_has_the_asked_std(pair) -> None:
    a, b = pair
    s = a.secret(b.me)
    r1 = edge_noise_np(s, 1, 200_000, 2.5, a.me, b.me)
    r1_again = edge_noise_np(s, 1, 200_000, 2.5, a.me, b.me)
    r2 = edge_noise_np(s, 2, 200_000, 2.5, a.me, b.me)
    assert np.array_equal(r1, r1_again)
    assert abs(np.corrcoef(r1, r2)[0, 1]) < 0.01
    assert r1.std() == pytest.approx(2.5, rel=0.01)
    assert abs(r1.mean()) < 0.02


def test_different_edges_get_different_secrets() -> None:
    a, b, c = (PairwiseSeeds(Identity.generate()) for _ in range(3))
    a.accept_share(b.me, b.share_for(a.me))
    a.accept_share(c.me, c.share_for(a.me))
    assert a.secret(b.me) != a.secret(c.me)


def test_share_is_bound_to_both_ids() -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    kp = SessionKeyPair()
    share = make_keyshare(alice, kp, bob.peer_id)
    assert verify_keyshare(share, alice.peer_id, bob.peer_id) == kp.public_bytes
    with pytest.raises(SignatureError):  # replayed to another recipient
        verify_keyshare(share, alice.peer_id, carol.peer_id)
    with pytest.raises(SignatureError):  # claimed by someone else
        verify_keyshare(share, carol.peer_id, bob.peer_id)
    with pytest.raises(SignatureError):  # key swapped under the signature
        verify_keyshare(SignedKeyShare(SessionKeyPair().public_bytes, share.signature), alice.peer_id, bob.peer_id)
    with pytest.raises(DecodeError):
        verify_keyshare(SignedKeyShare(b"\x01" * 31, share.signature), alice.peer_id, bob.peer_id)


def test_low_order_point_is_rejected() -> None:
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(DecodeError):
        derive_edge_secret(SessionKeyPair(), b"\x00" * 32, a.peer_id, b.peer_id)


def test_secrets_never_show_in_repr(pair) -> None:
    a, b = pair
    secret = a.secret(b.me)
    raw = secret._secret  # noqa: SLF001 - the test needs the bytes to look for them
    for text in (repr(secret), str(secret), repr(a), repr(a.keypair)):
        assert raw.hex() not in text and repr(raw) not in text
    assert "hidden" in repr(secret)


def test_round_key_is_128_bit_and_round_checked() -> None:
    s = EdgeSecret(b"\x07" * 32)
    assert 0 <= s.round_key(0) < 2**128
    assert s.round_key(0) != s.round_key(1)
    with pytest.raises(ValueError):
        s.round_key(-1)
