"""A damaged identity.key stops `murmur node start` and `murmur id` with one line and exit 2.

Real processes: the key is written by a first `murmur id`, one bit of it is
flipped in each part of the file, and the daemon (a real ``murmur node
start``) and ``murmur id`` must refuse it, leave it as it is, and never come
up under another peer id.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from murmur.protocol.identity import KEY_FILE_LEN, KEY_FILE_NAME, KEY_HEADER_LEN
from tests.integration.daemons import MURMUR, DaemonPool

EXIT_CONFIG = 2
EXIT_S = 30.0  # an interpreter starting on a shared 2-core box
#: one bit in each part of the file: header, Ed25519 seed, stored peer id, checksum
FLIPS = {"header": 2 * 8 + 1, "seed": (KEY_HEADER_LEN + 9) * 8 + 4,
         "peer id": (KEY_FILE_LEN - 40) * 8, "checksum": KEY_FILE_LEN * 8 - 1}
SECTIONS = {
    "node": {"listen": ["/ip4/127.0.0.1/tcp/0"], "log_level": "info"},
    "api": {"port": 0},
    "learning": {"enabled": False},
}


def _murmur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MURMUR, *args], capture_output=True, text=True, timeout=EXIT_S, check=False)


def _flip(path: Path, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return bytes(data)


def _one_refusal(text: str, key: Path) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith(f"murmur: identity key {key} is damaged ("), lines[0]
    return lines[0]


@pytest.mark.parametrize("part", list(FLIPS))
def test_damaged_key_stops_daemon_and_id_with_one_line(pool: DaemonPool, part: str) -> None:
    daemon = pool.add(SECTIONS)
    first = _murmur("id", "--config", str(daemon.config))
    assert first.returncode == 0, first.stderr
    peer = json.loads(first.stdout)["ID"]
    key = daemon.data_dir / KEY_FILE_NAME
    damaged = _flip(key, FLIPS[part])

    again = _murmur("id", "--config", str(daemon.config))
    assert (again.returncode, again.stdout) == (EXIT_CONFIG, ""), (again.returncode, again.stdout, peer)
    _one_refusal(again.stderr, key)

    pool.spawn(daemon)
    assert daemon.proc is not None
    assert daemon.proc.wait(EXIT_S) == EXIT_CONFIG
    _one_refusal(daemon.log[-1].read_text(), key)  # stdout and stderr together: nothing else
    assert not daemon.state.api_path.exists()  # it never came up
    assert key.read_bytes() == damaged  # and never replaced the key with a new one
