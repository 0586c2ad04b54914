"""identity.key: a checked format, so a damaged key is refused instead of becoming another peer."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from murmur.errors import StateDamaged
from murmur.protocol.identity import (
    KEY_FILE_LEN,
    KEY_FILE_NAME,
    KEY_HEADER_LEN,
    KEY_SEED_LEN,
    Identity,
)


def _flip(path: Path, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return bytes(data)


def _region(byte: int) -> str:
    if byte < KEY_HEADER_LEN:
        return "header"
    if byte < KEY_HEADER_LEN + KEY_SEED_LEN:
        return "seed"
    return "peer id" if byte < KEY_FILE_LEN - 32 else "checksum"


def test_every_single_bit_flip_is_refused_and_the_file_left_alone(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    good = path.read_bytes()
    assert len(good) == KEY_FILE_LEN
    seen = set()
    for bit in range(KEY_FILE_LEN * 8):
        path.write_bytes(good)
        damaged = _flip(path, bit)
        with pytest.raises(StateDamaged) as info:
            Identity.load_or_create(tmp_path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "damaged" in message, message
        assert path.read_bytes() == damaged  # never "repaired" into a new identity
        seen.add(_region(bit // 8))
    assert seen == {"header", "seed", "peer id", "checksum"}
    path.write_bytes(good)
    assert Identity.load_or_create(tmp_path).private_bytes() == good[KEY_HEADER_LEN:KEY_HEADER_LEN + KEY_SEED_LEN]


@pytest.mark.parametrize("size", [0, 1, KEY_FILE_LEN - 1, KEY_FILE_LEN + 1, 64])
def test_truncated_or_extended_key_is_refused(tmp_path: Path, size: int) -> None:
    Identity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes((path.read_bytes() * 2)[:size])
    with pytest.raises(StateDamaged, match=f"{size} bytes, expected {KEY_FILE_LEN}"):
        Identity.load_or_create(tmp_path)


def test_a_format_1_seed_is_read_once_and_rewritten_with_its_check(tmp_path: Path) -> None:
    legacy = Identity.generate()
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(legacy.private_bytes())
    path.chmod(0o600)
    assert Identity.load_or_create(tmp_path).peer_id == legacy.peer_id
    assert len(path.read_bytes()) == KEY_FILE_LEN and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(tmp_path).peer_id == legacy.peer_id
    _flip(path, (KEY_HEADER_LEN + 3) * 8)  # now checked: a flip in the seed is refused
    with pytest.raises(StateDamaged, match="checksum mismatch"):
        Identity.load_or_create(tmp_path)
