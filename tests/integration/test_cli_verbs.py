"""The verbs an operator reaches for, against a real ``murmur node start``
process: ``node stop``, ``logs`` (and ``-f`` across a rotation), ``status``
and ``peers`` for a person, ``--version``, shell completion."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from murmur import __version__
from murmur.node.operate import daemon_running
from tests.integration.daemons import MURMUR, DaemonPool

CLI_TIMEOUT_S = 60
STOP_S = 15.0
LINE_TIMEOUT_S = 20.0


def murmur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MURMUR, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


async def amurmur(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(murmur, *args)


SECTIONS = {
    "node": {"listen": ["/ip4/127.0.0.1/tcp/0"], "log_level": "info", "log_format": "text"},
    "api": {"port": 0},
    "learning": {"enabled": False},
}


async def test_stop_logs_status_and_peers_of_a_real_daemon(pool: DaemonPool) -> None:
    daemon = pool.add(SECTIONS)
    pool.spawn(daemon)
    await pool.wait_api(daemon)
    data_dir = str(daemon.data_dir)

    status = await amurmur("status", "--data-dir", data_dir, "--output", "human")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split() == ["peer", daemon.peer_id]
    assert any(line.startswith("health") and line.split()[1] == "ok" for line in lines)
    assert "reachability private (interfaces)" in [" ".join(line.split()) for line in lines]  # a loopback node
    assert any(line.startswith("learning") and "learning.enabled = false" in line for line in lines)
    assert any(line.startswith("traffic") and " B" in line for line in lines)
    as_json = await amurmur("status", "--data-dir", data_dir)  # not a terminal: JSON
    assert json.loads(as_json.stdout)["peer_id"] == daemon.peer_id
    peers = await amurmur("peers", "--data-dir", data_dir, "-o", "human")
    assert peers.returncode == 0 and peers.stdout.splitlines()[0].split()[:4] == ["peer", "connected", "neighbour", "score"]
    assert peers.stdout.rstrip().endswith("0 neighbours")

    logs = await amurmur("logs", "--data-dir", data_dir, "-n", "0")
    assert logs.returncode == 0, logs.stderr
    assert any("node started" in line and daemon.peer_id in line for line in logs.stdout.splitlines())

    stopped = await amurmur("node", "stop", "--data-dir", data_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"stopped the node in {data_dir} (pid {daemon.proc.pid}) in ")
    assert daemon.proc.wait(STOP_S) == 0  # a graceful exit, not a kill
    assert not daemon_running(daemon.state) and not daemon.state.api_path.exists()
    logs = await amurmur("logs", "--data-dir", data_dir, "-n", "3")
    assert len(logs.stdout.splitlines()) == 3
    assert "shut" in logs.stdout or "stopp" in logs.stdout  # the daemon's own last words are in the file

    again = await amurmur("node", "stop", "--data-dir", data_dir)
    assert again.returncode == 1 and again.stderr == f"murmur: no node is running in {data_dir}\n"


def test_stop_never_signals_a_stale_pid(tmp_path: Path) -> None:
    """A node.pid left behind names some other process now: no lock, no signal."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "node.lock").touch()
        (tmp_path / "node.pid").write_text(f"{bystander.pid}\n")
        done = murmur("node", "stop", "--data-dir", str(tmp_path))
        assert done.returncode == 1 and "no node is running" in done.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_logs_follow_across_rotation(tmp_path: Path) -> None:
    log_path = tmp_path / "murmur.log"
    handler = logging.handlers.RotatingFileHandler(log_path, maxBytes=10_000, backupCount=2)
    logger = logging.Logger("rotation-test")
    logger.addHandler(handler)
    logger.error("line 0")
    follower = subprocess.Popen([*MURMUR, "logs", "--data-dir", str(tmp_path), "-n", "1", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            follower.kill()
            pytest.fail(f"murmur logs -f printed nothing more; stderr: {follower.communicate()[1][-2000:]}")

    try:
        assert next_line() == "line 0"  # the tail: from here on the follower has the file open
        for i in range(1, 6):
            logger.error(f"line {i}")
        handler.doRollover()  # murmur.log -> murmur.log.1, a new murmur.log
        for i in range(6, 9):
            logger.error(f"line {i}")
        assert [next_line() for _ in range(1, 9)] == [f"line {i}" for i in range(1, 9)]
        assert (tmp_path / "murmur.log.1").exists()
    finally:
        follower.terminate()
        follower.wait(10)
        handler.close()


def test_version() -> None:
    done = murmur("--version")
    assert done.returncode == 0 and done.stdout == f"murmur {__version__}\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    script = tmp_path / "murmur.bash"
    done = murmur("completion", "bash")
    assert done.returncode == 0
    script.write_text(done.stdout)
    (tmp_path / "node.toml").touch()

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        code = (f"source {script}; COMP_WORDS=(murmur {line}); COMP_CWORD={len(words)}; _murmur; "
                'printf "%s\\n" "${COMPREPLY[@]}"')
        out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=30)
        assert out.returncode == 0, out.stderr
        return sorted(out.stdout.split())

    assert complete("no") == ["node"]
    assert complete("node", "st") == ["start", "stop"]
    assert complete("status", "--ou") == ["--output"]
    assert complete("status", "--output", "") == ["human", "json"]
    assert complete("node", "start", "--config", "no") == ["node.toml"]
    assert "stop" not in complete("testnet", "")  # testnet's own actions only
    assert complete("testnet", "") == ["compare", "run"]
    zsh = murmur("completion", "zsh").stdout
    assert "bashcompinit" in zsh and "complete -o filenames -F _murmur murmur" in zsh

