"""Eight real ``murmur node start`` processes on loopback, driven only from outside.

What an operator sees: TOML configs, ``api.json`` in each data dir, the HTTP
status API, ``murmur status`` / ``murmur peers``, ``kill -9`` and SIGTERM.
Nothing here reaches into a daemon's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from murmur.node.state import StateDir
from murmur.protocol.multiaddr import Multiaddr
from tests.integration.cluster import wait_until

N = 8
K = 3
START_S = 20.0  # eight interpreters starting on a shared 2-core box
CONVERGE_S = 20.0
RECOVER_S = 10.0
GRACEFUL_EXIT_S = 6.0  # from the signal, for all of them; a task stuck in shutdown costs the TaskManager's 5 s
HTTP_TIMEOUT_S = 2.0
MURMUR = [sys.executable, "-m", "murmur.node.cli"]


def free_port() -> int:
    """A port nobody listens on now (node 0's, which the others bootstrap from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data_dir: Path, port: int, bootstrap: str | None) -> None:
    lines = [
        "[node]",
        f'data_dir = "{data_dir}"',
        f'listen = ["/ip4/127.0.0.1/tcp/{port}"]',
        'log_level = "info"',
        'log_format = "json"',
        "[network]",
        f"bootstrap = [{json.dumps(bootstrap)}]" if bootstrap else "bootstrap = []",
        f"neighbours = {K}",
        "shuffle_interval_s = 0.5",
        "allow_loopback = true",
        "[api]",
        "port = 0",
        "[learning]",
        "enabled = false",  # membership, transport and the CLI; eight trainers would crowd 2 cores
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Daemon:
    index: int
    data_dir: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    peer_id: str = ""
    api: str = ""
    log: list[Path] = field(default_factory=list)


class DaemonPool:
    """Starts daemons; owns every child process it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, port: int, bootstrap: str | None) -> Daemon:
        i = len(self.daemons)
        data_dir = self.root / f"node{i}"
        config = self.root / f"node{i}.toml"
        write_config(config, data_dir, port, bootstrap)
        daemon = Daemon(i, data_dir, config)
        self.daemons.append(daemon)
        return daemon

    def spawn(self, daemon: Daemon) -> None:
        StateDir(daemon.data_dir).api_path.unlink(missing_ok=True)  # never read a previous run's api.json
        log = self.root / f"node{daemon.index}.{len(daemon.log)}.log"
        daemon.log.append(log)
        with open(log, "wb") as out:
            daemon.proc = subprocess.Popen(
                [*MURMUR, "node", "start", "--config", str(daemon.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        self.procs.append(daemon.proc)

    def kill9(self, daemon: Daemon) -> None:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        assert daemon.proc.wait(5) == -signal.SIGKILL

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    pool = DaemonPool(tmp_path)
    try:
        yield pool
    finally:
        pool.teardown()
        assert _children_of(os.getpid()) == [], "a daemon outlived the test"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
        yield session


def _children_of(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            out.append(int(entry.name))
    return out


async def _get(http: aiohttp.ClientSession, daemon: Daemon, path: str) -> Any:
    async with http.get(f"{daemon.api}{path}") as resp:
        assert resp.status == 200, f"{path}: HTTP {resp.status}"
        if path == "/metrics":
            return await resp.text()
        return await resp.json()


async def _wait_api(daemon: Daemon) -> None:
    """Until the daemon wrote api.json; records its API URL and peer id."""
    state = StateDir(daemon.data_dir)

    def ready() -> bool:
        assert daemon.proc is not None and daemon.proc.poll() is None, (
            f"node {daemon.index} exited: {daemon.log[-1].read_text()[-2000:]}"
        )
        return state.api_path.exists()

    await wait_until(ready, START_S, f"node {daemon.index} api.json")
    info = state.read_api_info()
    assert info.pid == daemon.proc.pid  # type: ignore[union-attr]
    daemon.api, daemon.peer_id = info.url, info.peer_id


async def _statuses(http: aiohttp.ClientSession, daemons: list[Daemon]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(_get(http, d, "/status") for d in daemons)))


async def _healthy(http: aiohttp.ClientSession, daemons: list[Daemon], dead: set[str]) -> bool:
    for status in await _statuses(http, daemons):
        neighbours = set(status["neighbours"])
        if len(neighbours) < K or neighbours & dead:
            return False
    return True


def _cli(*args: str) -> Any:
    done = subprocess.run([*MURMUR, *args], capture_output=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout)


async def test_daemons_converge_survive_kill9_restart_and_stop(pool: DaemonPool, http: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    # Node 0 has a fixed port (everyone's bootstrap) and a known identity.
    boot_port = free_port()
    boot = pool.add(boot_port, None)
    boot_id = StateDir(boot.data_dir).identity().peer_id
    boot_addr = str(Multiaddr("127.0.0.1", boot_port, boot_id))
    for _ in range(N - 1):
        pool.add(0, boot_addr)
    for daemon in pool.daemons:
        pool.spawn(daemon)
    await asyncio.gather(*(_wait_api(d) for d in pool.daemons))
    assert boot.peer_id == str(boot_id)
    assert len({d.peer_id for d in pool.daemons}) == N

    took = await wait_until(lambda: _healthy(http, pool.daemons, set()), CONVERGE_S, f"every daemon with >= {K} neighbours")
    print(f"{N} daemons up and converged {time.monotonic() - t0:.1f}s after spawn (converge wait {took:.1f}s)")
    metrics = await _get(http, pool.daemons[2], "/metrics")
    assert "murmur_bytes_total" in metrics
    assert any(line.startswith('murmur_bytes_total{direction="in"}') and float(line.split()[-1]) > 0
               for line in metrics.splitlines())
    async with http.get(f"{pool.daemons[2].api}/healthz") as resp:
        assert resp.status == 200

    # kill -9 three daemons; the survivors must drop them and refill to K.
    victims = [pool.daemons[i] for i in (2, 5, 7)]
    for daemon in victims:
        pool.kill9(daemon)
    dead = {d.peer_id for d in victims}
    survivors = [d for d in pool.daemons if d not in victims]
    took = await wait_until(lambda: _healthy(http, survivors, dead), RECOVER_S, "survivors replaced the killed")
    print(f"kill -9 of 3: survivors back to >= {K} live neighbours in {took:.2f}s")

    # A killed daemon restarted on its data dir keeps its identity and rejoins.
    back = victims[1]
    pool.spawn(back)
    await _wait_api(back)
    assert back.peer_id in dead
    status = await _get(http, back, "/status")
    assert status["peer_id"] == back.peer_id
    alive = [*survivors, back]
    took = await wait_until(lambda: _healthy(http, alive, dead - {back.peer_id}), CONVERGE_S, "restarted daemon rejoined")
    print(f"restarted daemon has >= {K} neighbours after {took:.2f}s")

    # The CLI clients print the same JSON the API serves.
    cli_status = _cli("status", "--data-dir", str(back.data_dir))
    assert cli_status["peer_id"] == back.peer_id
    assert cli_status["addrs"] == status["addrs"]
    cli_peers = _cli("peers", "--data-dir", str(back.data_dir))
    api_peers = await _get(http, back, "/peers")
    assert {p["peer_id"] for p in cli_peers} == {p["peer_id"] for p in api_peers}
    assert all(set(p) >= {"peer_id", "addrs", "score", "connected", "neighbour"} for p in cli_peers)

    # SIGTERM: graceful exit 0 within a few seconds, peer table on disk.
    for daemon in alive:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    exit_s = {}
    for daemon in alive:
        assert daemon.proc is not None
        rc = daemon.proc.wait(max(0.0, start + GRACEFUL_EXIT_S - time.monotonic()))
        exit_s[daemon.index] = round(time.monotonic() - start, 2)
        assert rc == 0, f"node {daemon.index} exited {rc}: {daemon.log[-1].read_text()[-2000:]}"
    print(f"{len(alive)} daemons exited 0 on SIGTERM; seconds after the signal: {exit_s}")
    for daemon in alive:
        saved = json.loads((daemon.data_dir / "peers.json").read_text())
        assert saved["peers"], f"node {daemon.index} saved an empty peer table"
