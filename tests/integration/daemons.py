"""Real ``murmur node start`` processes for tests, driven only from outside.

What an operator has: a TOML config per node, ``api.json`` in each data dir,
the HTTP API, signals. :class:`DaemonPool` writes the configs, starts the
processes, and owns every one it started (the ``pool`` fixture in
conftest.py kills what is left and checks that nothing outlived the test).
"""

from __future__ import annotations

import json
import os
import signal
import random
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from murmur.node.state import StateDir
from murmur.protocol.multiaddr import Multiaddr
from tests.integration.cluster import wait_until

MURMUR = [sys.executable, "-m", "murmur.node.cli"]
START_S = 30.0  # interpreters importing torch on a shared 2-core box
HTTP_TIMEOUT_S = 2.0
PORT_FLOOR = 10_000  # free_port's lowest pick (the emulated internet's hosts use their own namespaces)

Sections = Mapping[str, Mapping[str, Any]]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody holds now (a bootstrap node's, fixed before it starts),
    below the kernel's ephemeral range: between this pick and the node's bind
    the kernel cannot hand it to an outgoing connection (a CI run's node
    found its port taken so, among a whole suite's connections)."""
    rng = random.Random()
    low, high = PORT_FLOOR, _ephemeral_low() - 1
    for _ in range(256):
        port = rng.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml_config(sections: Sections) -> str:
    """A node config file: one ``[section]`` per key, dotted sub-tables as inline tables."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def merge(base: Sections, extra: Sections) -> dict[str, dict[str, Any]]:
    out = {name: dict(table) for name, table in base.items()}
    for name, table in extra.items():
        out.setdefault(name, {}).update(table)
    return out


@dataclass
class Daemon:
    index: int
    data_dir: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    peer_id: str = ""
    api: str = ""
    log: list[Path] = field(default_factory=list)

    @property
    def state(self) -> StateDir:
        return StateDir(self.data_dir)

    def describe(self, tail: int = 4000) -> str:
        """Whether its process is up, and the end of its log: what a CI
        failure needs to say when a daemon's API stopped answering."""
        if self.proc is None:
            return "never started"
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        text = self.log[-1].read_text(encoding="utf-8", errors="replace")[-tail:] if self.log else ""
        return f"process {self.proc.pid} {state}; log tail:\n{text}"

    def addr(self, port: int) -> str:
        """Its multiaddr on loopback with ``/p2p/`` (its identity exists before it starts)."""
        return str(Multiaddr("127.0.0.1", port, self.state.identity().peer_id))


class DaemonPool:
    """Starts daemons; owns every child process it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, sections: Sections) -> Daemon:
        """A daemon with its own data dir and this config (``node.data_dir`` is filled in)."""
        i = len(self.daemons)
        data_dir = self.root / f"node{i}"
        config = self.root / f"node{i}.toml"
        config.write_text(toml_config(merge(sections, {"node": {"data_dir": str(data_dir)}})), encoding="utf-8")
        daemon = Daemon(i, data_dir, config)
        self.daemons.append(daemon)
        return daemon

    def spawn(self, daemon: Daemon, *args: str, env: Mapping[str, str] | None = None,
              prefix: Sequence[str] = ()) -> None:
        """Start ``daemon``; ``prefix`` goes before its argv (``ip netns exec NS``)."""
        daemon.state.api_path.unlink(missing_ok=True)  # never read a previous run's api.json
        log = self.root / f"node{daemon.index}.{len(daemon.log)}.log"
        daemon.log.append(log)
        with open(log, "wb") as out:
            daemon.proc = subprocess.Popen(
                [*prefix, *MURMUR, "node", "start", "--config", str(daemon.config), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        self.procs.append(daemon.proc)

    async def wait_api(self, daemon: Daemon, timeout: float = START_S) -> None:
        """Until the daemon wrote api.json; records its API URL and peer id."""
        state = daemon.state

        def ready() -> bool:
            assert daemon.proc is not None and daemon.proc.poll() is None, (
                f"node {daemon.index} exited: {daemon.log[-1].read_text()[-2000:]}"
            )
            return state.api_path.exists()

        await wait_until(ready, timeout, f"node {daemon.index} api.json")
        info = state.read_api_info()
        assert info.pid == daemon.proc.pid  # type: ignore[union-attr]
        daemon.api, daemon.peer_id = info.url, info.peer_id

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


def children_of(pid: int) -> list[int]:
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


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


async def api_get(http: Any, daemon: Daemon, path: str) -> Any:
    """GET ``path`` from a daemon's status API (``http``: an aiohttp session);
    JSON, or text for /metrics. Anything but 200 fails."""
    try:
        async with http.get(f"{daemon.api}{path}") as resp:
            assert resp.status == 200, f"{path}: HTTP {resp.status}"
            return await resp.text() if path == "/metrics" else await resp.json()
    except aiohttp.ClientConnectorError as exc:
        raise AssertionError(f"node {daemon.index}: {path} unreachable ({exc}); {daemon.describe()}") from exc
