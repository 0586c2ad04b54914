"""A node started from ``murmur config default`` learns, or says loudly why not.

Real ``murmur node start`` processes on loopback, seen from outside: the
status API and the JSON log. A node needs no hand-assigned data index: it
draws its share from its peer id, the same share after a restart.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from murmur.node.config import DEFAULT_NUM_NODES, auto_node_index
from murmur.node.state import StateDir
from murmur.protocol.identity import PeerId
from tests.integration.cluster import wait_until

MURMUR = [sys.executable, "-m", "murmur.node.cli"]
START_S = 30.0  # an interpreter importing torch and building a trainer on a shared 2-core box
EXIT_S = 10.0


class Daemon:
    """One ``murmur node start`` from a config file; owns its process."""

    def __init__(self, root: Path, config: Path, *extra: str) -> None:
        self.data_dir = root / "state"
        self.log = root / "node.log"
        self.args = [*MURMUR, "node", "start", "--config", str(config), "--data-dir", str(self.data_dir),
                     "--listen", "/ip4/127.0.0.1/tcp/0", "--log-format", "json", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        StateDir(self.data_dir).api_path.unlink(missing_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(EXIT_S) == 0, self.log.read_text()[-2000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(EXIT_S)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    async def status(self) -> dict[str, Any]:
        state = StateDir(self.data_dir)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            return state.api_path.exists()

        await wait_until(up, START_S, "api.json")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(f"{state.read_api_info().url}/status") as resp:
                return dict(await resp.json())


@pytest.fixture
def default_config(tmp_path: Path) -> Path:
    out = subprocess.run([*MURMUR, "config", "default"], capture_output=True, text=True, timeout=30, check=True)
    path = tmp_path / "node.toml"
    path.write_text(out.stdout)
    return path


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


async def test_node_from_config_default_learns_on_its_own_data_share(tmp_path: Path, default_config: Path,
                                                                     daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, default_config)
    daemons.append(daemon)
    daemon.start()
    status = await daemon.status()
    assert status["learning_off"] is None
    learning = status["learning"]
    assert learning is not None and learning["mode"] == "dsgd" and learning["role"] == "honest"
    assert learning["aggregator"] == "sybilwall"  # Sybil-resilient without a word in the config
    peer = PeerId.from_string(status["peer_id"])
    share = auto_node_index(peer, DEFAULT_NUM_NODES)

    def learning_line() -> dict[str, Any] | None:
        return next((line for line in daemon.lines() if line.get("event") == "learning"), None)

    await wait_until(lambda: learning_line() is not None, START_S, "the learning log line")
    line = learning_line()
    assert line is not None
    assert (line["trainer"], line["node_index"], line["num_nodes"], line["auto_index"], line["aggregator"]) == (
        "digits-mlp", share, DEFAULT_NUM_NODES, True, "sybilwall")
    assert line["msg"].endswith(", aggregating with sybilwall")
    assert not [entry for entry in daemon.lines() if entry["level"] in ("warning", "error")]
    daemon.stop()

    daemon.start()  # the same identity, so the same share: nobody hands out indices
    assert (await daemon.status())["peer_id"] == str(peer)
    await wait_until(lambda: learning_line() is not None, START_S, "the learning log line after a restart")
    again = learning_line()
    assert again is not None and again["node_index"] == share
    daemon.stop()


async def test_node_with_learning_off_says_so_once(tmp_path: Path, default_config: Path,
                                                   daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, default_config, "--set", "learning.enabled=false")
    daemons.append(daemon)
    daemon.start()
    status = await daemon.status()
    assert status["learning"] is None
    assert status["learning_off"].startswith("learning.enabled = false: ")

    def warnings() -> list[dict[str, Any]]:
        return [entry for entry in daemon.lines() if entry["level"] == "warning"]

    await wait_until(lambda: bool(warnings()), START_S, "the learning-off warning")
    (warning,) = warnings()
    assert warning["event"] == "learning_off" and warning["msg"].startswith("learning is off (learning.enabled = false")
    daemon.stop()
