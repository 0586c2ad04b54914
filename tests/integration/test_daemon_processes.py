"""Eight real ``murmur node start`` processes on loopback, driven only from outside.

What an operator sees: TOML configs, ``api.json`` in each data dir, the HTTP
status API, ``murmur status`` / ``murmur peers``, ``kill -9`` and SIGTERM.
Nothing here reaches into a daemon's memory.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import aiohttp

from murmur.node.state import StateDir
from murmur.protocol.multiaddr import Multiaddr
from tests.integration.cluster import wait_until
from tests.integration.daemons import MURMUR, Daemon, DaemonPool, api_get, free_port

N = 8
K = 3
START_S = 20.0  # eight interpreters starting on a shared 2-core box
CONVERGE_S = 20.0
RECOVER_S = 10.0
GRACEFUL_EXIT_S = 6.0  # from the signal, for all of them; a task stuck in shutdown costs the TaskManager's 5 s


def node_sections(port: int, bootstrap: str | None) -> dict[str, dict[str, Any]]:
    return {
        "node": {"listen": [f"/ip4/127.0.0.1/tcp/{port}"], "log_level": "info", "log_format": "json"},
        "network": {"bootstrap": [bootstrap] if bootstrap else [], "neighbours": K, "shuffle_interval_s": 0.5,
                    "allow_loopback": True},
        "api": {"port": 0},
        "learning": {"enabled": False},  # membership, transport and the CLI; eight trainers would crowd 2 cores
    }


async def _statuses(http: aiohttp.ClientSession, daemons: list[Daemon]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(api_get(http, d, "/status") for d in daemons)))


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
    boot = pool.add(node_sections(boot_port, None))
    boot_id = StateDir(boot.data_dir).identity().peer_id
    boot_addr = str(Multiaddr("127.0.0.1", boot_port, boot_id))
    for _ in range(N - 1):
        pool.add(node_sections(0, boot_addr))
    for daemon in pool.daemons:
        pool.spawn(daemon)
    await asyncio.gather(*(pool.wait_api(d, START_S) for d in pool.daemons))
    assert boot.peer_id == str(boot_id)
    assert len({d.peer_id for d in pool.daemons}) == N

    took = await wait_until(lambda: _healthy(http, pool.daemons, set()), CONVERGE_S, f"every daemon with >= {K} neighbours")
    print(f"{N} daemons up and converged {time.monotonic() - t0:.1f}s after spawn (converge wait {took:.1f}s)")
    metrics = await api_get(http, pool.daemons[2], "/metrics")
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
    await pool.wait_api(back, START_S)
    assert back.peer_id in dead
    status = await api_get(http, back, "/status")
    assert status["peer_id"] == back.peer_id
    alive = [*survivors, back]
    took = await wait_until(lambda: _healthy(http, alive, dead - {back.peer_id}), CONVERGE_S, "restarted daemon rejoined")
    print(f"restarted daemon has >= {K} neighbours after {took:.2f}s")

    # The CLI clients print the same JSON the API serves.
    cli_status = _cli("status", "--data-dir", str(back.data_dir))
    assert cli_status["peer_id"] == back.peer_id
    assert cli_status["addrs"] == status["addrs"]
    cli_peers = _cli("peers", "--data-dir", str(back.data_dir))
    api_peers = await api_get(http, back, "/peers")
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
