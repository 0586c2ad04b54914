"""Identity, peer ids, multiaddrs and atomic writes."""

import os
import stat

import pytest

from murmur.errors import SignatureError, StateError
from murmur.fsutil import atomic_write_bytes
from murmur.protocol.identity import Identity, PeerId, b58decode, b58encode
from murmur.protocol.multiaddr import Multiaddr


def test_peer_id_is_libp2p_ed25519_form():
    ident = Identity.from_seed(bytes(32))
    text = str(ident.peer_id)
    assert text.startswith("12D3KooW")
    assert PeerId.from_string(text) == ident.peer_id
    assert PeerId.from_string(text).public_key_bytes == ident.peer_id.public_key_bytes


def test_peer_id_rejects_garbage():
    with pytest.raises(ValueError):
        PeerId.from_string("QmNotAnEd25519Key")
    with pytest.raises(ValueError):
        PeerId.from_bytes(b"\x00\x24" + b"\x01" * 36)


def test_base58_roundtrip_with_leading_zeros():
    for data in (b"", b"\0", b"\0\0abc", os.urandom(40)):
        assert b58decode(b58encode(data)) == data


def test_signature_verify_and_reject():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    ident.peer_id.verify(sig, b"hello")
    with pytest.raises(SignatureError):
        ident.peer_id.verify(sig, b"hellO")
    with pytest.raises(SignatureError):
        Identity.generate().peer_id.verify(sig, b"hello")


def test_identity_persisted_with_mode_0600(tmp_path):
    first = Identity.load_or_create(tmp_path)
    key = tmp_path / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Identity.load_or_create(tmp_path).peer_id == first.peer_id
    key.chmod(0o644)
    with pytest.raises(StateError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


def test_multiaddr_roundtrip_and_errors():
    pid = Identity.from_seed(b"\1" * 32).peer_id
    text = f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"
    addr = Multiaddr.parse(text)
    assert (addr.host, addr.port, addr.peer_id) == ("127.0.0.1", 4001, pid)
    assert str(addr) == text
    assert str(Multiaddr.parse("/ip6/::1/tcp/9")) == "/ip6/::1/tcp/9"
    for bad in ("/ip4/1.2.3/tcp/1", "/ip4/127.0.0.1/udp/1", "/ip6/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/70000", "ip4/x"):
        with pytest.raises(ValueError):
            Multiaddr.parse(bad)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(target, b"a" * 100)
    atomic_write_bytes(target, b"b" * 10, mode=0o600)
    assert target.read_bytes() == b"b" * 10
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.bin"]


def test_a_refused_rename_leaves_no_temp_file(tmp_path):
    target = tmp_path / "api.json"
    target.mkdir()  # a file cannot be renamed over a directory
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(target, b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["api.json"]
