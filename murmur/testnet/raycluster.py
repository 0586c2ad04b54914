"""The testnet on a Ray cluster: worker processes on the hosts Ray gives them.

``[cluster] backend = "ray"`` (or ``murmur testnet run --cluster ray[=ADDRESS]``)
runs the same controller (:mod:`murmur.testnet.controller`) and the same worker
processes (:mod:`murmur.testnet.worker`) as a local run; only where a worker
process starts and how the controller reaches it change:

* :class:`RayLauncher` joins the cluster at ``address`` (or starts a local Ray
  instance, sized to the run, and stops it afterwards), reserves one
  placement-group bundle per worker process (``cpus_per_node`` and
  ``gpus_per_node`` times its node count; strategy from ``placement``) and
  puts one :class:`HostAgent` actor in each bundle. The agent's host address
  and a free port block there become the nodes' listen and bootstrap
  addresses; a node whose agent got a GPU trains on ``cuda`` (Ray sets
  ``CUDA_VISIBLE_DEVICES`` for the agent, and its worker processes inherit it).
* The agent writes the nodes' configs and identity keys under its host's
  run root (``<tmp>/murmur-ray/<run>``; the nodes' state dirs live there) and
  starts worker processes there exactly as the local supervisor does
  (:func:`~murmur.testnet.spawn.popen_supervised`: own session,
  ``PR_SET_PDEATHSIG`` against the agent). The launcher is the
  :class:`~murmur.testnet.procs.Supervisor`'s spawner, so crash (kill -9 of the
  process group, on its host), graceful stop and restart (a new process on the
  same host, same state dir) are the supervisor's own code; the
  :class:`RemoteProcess` it holds signals and waits through the agent.
* Control: for each worker process the launcher serves the Unix control
  socket the controller expects and relays each line, unchanged, to the
  worker's own socket on its host (:class:`ControlRelay`): the worker/controller
  protocol (ping, start, rounds long polls, partition, heal) is not duplicated.
* ``/status`` is read by the agent on the node's host (the API listens on
  loopback, as locally); metrics (``metrics.jsonl``) and worker logs come
  back into the controller's run dir when the run ends (:meth:`RayLauncher.finish`),
  so the report is written from the nodes' own files as in a local run.

Lifetimes: the agents are owned by the controller's Ray driver; when the
controller dies (even by SIGKILL) Ray kills them, and their worker processes
die with them (``PR_SET_PDEATHSIG``). A Ray node that dies takes its agents
and worker processes with it: the supervisor sees them exit (code -9) and the
run's events record it. Keys and configs cross the cluster in Ray's own
(pickled) channel: the cluster is trusted, as it runs the code too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from murmur.errors import ConfigError, StateError
from murmur.fsutil import atomic_write_bytes
from murmur.testnet.ports import find_free_port_block
from murmur.testnet.procs import ChildProcess
from murmur.testnet.scenario import ClusterSpec, Placement
from murmur.testnet.spawn import popen_supervised

PLACE_TIMEOUT_S = 60.0  # a placement group the cluster cannot hold never becomes ready
CALL_TIMEOUT_S = 30.0  # one agent call (spawn, signal, files); a wedged host fails it, not the run
STATUS_TIMEOUT_S = 2.0  # as the controller's own status timeout
RELAY_LINE_LIMIT = 1 << 20  # the worker's MAX_CONTROL_LINE: a partition names every peer
KEY_MODE = 0o600
ROOT_PREFIX = "murmur-ray"
CONTROL_DIR = "ctl"  # the workers' control sockets, under a host's run root
STRATEGIES = {Placement.SPREAD: "SPREAD", Placement.STRICT_SPREAD: "STRICT_SPREAD", Placement.PACK: "PACK"}


# ------------------------------------------------------------------ host side


class HostAgent:
    """One worker process's agent on its Ray host (a Ray actor, async: every
    call runs on its one event loop thread, which therefore is the parent
    thread ``PR_SET_PDEATHSIG`` watches, alive as long as the agent)."""

    def __init__(self, root: str, module: str, env: Mapping[str, str]) -> None:
        self.root = Path(root)
        self.module = module
        self.env = dict(env)
        self.children: dict[str, ChildProcess] = {}
        self.conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._http: Any = None

    async def where(self) -> dict[str, Any]:
        """This host: its address (what the nodes listen on), name and the GPUs Ray gave this agent."""
        return {"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    async def free_port_block(self, host: str, count: int) -> int:
        """A base port such that ``base .. base+count-1`` can all be bound on ``host`` now."""
        return find_free_port_block(count, host=host)

    async def install(self, files: Mapping[str, bytes], secret: Sequence[str] = ()) -> None:
        """Write ``files`` (path under the run root -> content); those in ``secret`` owner-only."""
        for rel, data in files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, mode=KEY_MODE if rel in secret else 0o644)

    async def spawn(self, child: str, args: Sequence[str], log_rel: str) -> int:
        """Start a worker process (``python -m <module> *args``) as the local
        supervisor does; its output is appended to ``log_rel``."""
        log_path = self.root / log_rel
        log_path.parent.mkdir(parents=True, exist_ok=True)
        (self.root / CONTROL_DIR).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ) | self.env  # Ray's CUDA_VISIBLE_DEVICES for this agent included
        popen = popen_supervised([sys.executable, "-m", self.module, *args], log_path=log_path, env=env)
        self.children[child] = ChildProcess(child, popen, log_path)
        return popen.pid

    async def wait_exit(self, child: str) -> int:
        """The worker's exit code once it exits (negative: killed by that signal)."""
        return await self.children[child].wait_async()

    async def signal(self, child: str, sig: int) -> None:
        """Signal the worker's process group, if it still runs (a reaped pid may be reused)."""
        proc = self.children[child]
        if proc.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    async def control(self, conn: str, sock_rel: str, line: bytes) -> bytes | None:
        """One control line to the worker's socket on connection ``conn``
        (opened on first use, kept for the next lines, as the controller's
        own connection); its reply line, or None when the worker is not
        there or hung up (the relay then closes the controller's connection)."""
        pair = self.conns.get(conn)
        if pair is None:
            try:
                pair = await asyncio.open_unix_connection(str(self.root / sock_rel), limit=RELAY_LINE_LIMIT)
            except OSError:
                return None
            self.conns[conn] = pair
        reader, writer = pair
        try:
            writer.write(line)
            await writer.drain()
            reply = await reader.readline()
        except (OSError, ValueError):
            reply = b""
        if not reply:
            await self.close_control(conn)
            return None
        return reply

    async def close_control(self, conn: str) -> None:
        pair = self.conns.pop(conn, None)
        if pair is not None:
            pair[1].close()

    async def status(self, data_rel: str) -> dict[str, Any] | None:
        """The node's ``GET /status`` on this host (None: not up, or no answer)."""
        import aiohttp

        from murmur.node.state import StateDir

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S))
        try:
            info = StateDir(self.root / data_rel).read_api_info()  # re-read: a restarted node has a new port
            async with self._http.get(f"{info.url}/status") as resp:
                if resp.status != 200:
                    return None
                status = await resp.json()
        except (StateError, OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    async def read_files(self, rels: Sequence[str]) -> dict[str, bytes]:
        """The files of ``rels`` that exist (metrics, logs), by path under the run root."""
        out = {}
        for rel in rels:
            try:
                out[rel] = (self.root / rel).read_bytes()
            except OSError:
                continue
        return out

    async def remove_root(self) -> None:
        """Delete this host's run root (after its files came back)."""
        for proc in self.children.values():
            if proc.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------- controller side


@dataclass(frozen=True)
class Host:
    """Where one worker process's agent runs."""

    ip: str
    hostname: str
    gpus: tuple[str, ...]
    base_port: int


class RemoteProcess:
    """A worker process on an agent's host, as the supervisor's ``ChildProcess``
    sees a process: ``poll``/``wait`` on the agent's ``wait_exit``,
    ``signal_group`` through the agent. An agent that died (its Ray node
    lost, or killed) counts as the process killed by SIGKILL."""

    def __init__(self, agent: Any, child: str, pid: int, log_path: Path, log_rel: str,
                 on_lost: Callable[[], None]) -> None:
        self.agent = agent
        self._on_lost = on_lost
        self.child = child
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False  # the agent (host) went away rather than the process exiting
        self._log_path = log_path
        self._log_rel = log_rel
        self._exit = agent.wait_exit.remote(child)

    def _settle(self) -> int:
        if self.returncode is None:
            try:
                code = int(ray.get(self._exit))
            except RayError:
                code, self.lost = -signal.SIGKILL, True
                self._on_lost()
            self.returncode = code
            if not self.lost:
                self._fetch_log()  # the exit's last word, for the controller's message
        return self.returncode

    def _fetch_log(self) -> None:
        try:
            files = ray.get(self.agent.read_files.remote([self._log_rel]), timeout=CALL_TIMEOUT_S)
        except RayError:
            return
        if self._log_rel in files:
            self._log_path.write_bytes(files[self._log_rel])

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = ray.wait([self._exit], timeout=0)
            if not ready:
                return None
        return self._settle()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                ray.wait([self._exit], timeout=timeout)
                ray.get(self._exit, timeout=0 if timeout is not None else None)
            except GetTimeoutError:
                raise subprocess.TimeoutExpired(self.child, timeout or 0.0) from None
            except RayError:
                pass  # settled below as lost
        return self._settle()

    def signal_group(self, sig: int) -> None:
        if self.poll() is None:
            try:
                ray.get(self.agent.signal.remote(self.child, sig), timeout=CALL_TIMEOUT_S)
            except RayError:
                pass  # the agent is gone: so is the process


class ControlRelay:
    """The Unix control socket the controller expects for one worker process,
    relaying each request line to the worker's own socket on its host and
    each reply back, one agent connection per controller connection (a
    rounds long poll keeps its connection, as locally)."""

    def __init__(self, path: Path, agent: Any, sock_rel: str) -> None:
        self.path = path
        self.agent = agent
        self.sock_rel = sock_rel
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        sock.listen(128)  # bound now: a controller that connects before the server runs waits in the backlog
        sock.setblocking(False)
        self._server = asyncio.get_running_loop().create_task(
            asyncio.start_unix_server(self._client, sock=sock, limit=RELAY_LINE_LIMIT), name=f"relay-{path.name}")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = uuid.uuid4().hex
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = await self.agent.control.remote(conn, self.sock_rel, line)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, ValueError, RayError):
            pass
        finally:
            writer.close()
            # fire and forget; the agent, or Ray itself (after finish), may be gone
            with contextlib.suppress(Exception):
                self.agent.close_control.remote(conn)

    async def close(self) -> None:
        server = await self._server
        server.close()
        self.path.unlink(missing_ok=True)


def run_root(run_dir: Path) -> Path:
    """Where a run's files live on every host: the same path on each (hosts
    sharing a file system keep one tree; node names are unique in it)."""
    return Path(tempfile.gettempdir()) / ROOT_PREFIX / f"{run_dir.name[:40]}-{uuid.uuid4().hex[:8]}"


class RayLauncher:
    """Places a run's worker processes on a Ray cluster and starts them there
    (the supervisor's spawner); see the module docstring."""

    def __init__(self, cluster: ClusterSpec, run_dir: Path, ctl_dir: Path, module: str, env: Mapping[str, str]) -> None:
        self.cluster = cluster
        self.run_dir = run_dir
        self.ctl_dir = ctl_dir
        self.module = module
        self.env = dict(env)
        self.root = run_root(run_dir)
        self.agents: dict[str, Any] = {}  # worker process name -> its agent
        self.hosts: dict[str, Host] = {}  # worker process name -> where
        self._config_owner: dict[str, str] = {}  # local config path -> worker process name
        self._relays: dict[Path, ControlRelay] = {}
        self._closing: set[asyncio.Task[None]] = set()  # relays replaced by a restart's, closing
        self._lost: set[str] = set()  # worker processes whose agent died (their host, or the agent, is gone)
        self._group: Any = None
        self._started_ray = False

    # -- placement -----------------------------------------------------------------

    def connect(self, total_cpus: float) -> None:
        """Join the cluster at ``address``, or start a local Ray instance with
        at least ``total_cpus`` CPUs (a local run is this machine's cores, shared
        as a local testnet shares them; Ray must not refuse it for counting)."""
        root = str(Path(__file__).resolve().parents[2])  # so agents import this murmur, installed or not
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
        try:
            if self.cluster.address:
                ray.init(address=self.cluster.address, runtime_env=runtime_env, log_to_driver=False,
                         logging_level="warning")
            else:
                # "local": a new instance, never one that a stale /tmp/ray/ray_current_cluster names
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(total_cpus)),
                         include_dashboard=False,
                         runtime_env=runtime_env, log_to_driver=False, logging_level="warning")
                self._started_ray = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {self.cluster.address or 'a new local instance'}: "
                              f"{exc}") from None

    def place(self, groups: Mapping[str, Sequence[int]], config_paths: Mapping[int, Path]) -> dict[str, Host]:
        """One agent per worker process (name -> its node indices), placed as
        the scenario says; where each landed and a free port block there."""
        cl = self.cluster
        names = list(groups)
        demand = [{"CPU": cl.cpus_per_node * len(groups[n])} | ({"GPU": cl.gpus_per_node * len(groups[n])}
                                                              if cl.gpus_per_node else {}) for n in names]
        cpus = sum(d["CPU"] for d in demand)
        gpus = sum(d.get("GPU", 0.0) for d in demand)
        labels = "".join(f", {k}={v}" for k, v in cl.labels.items())
        asked = (f"{len(names)} worker processes ({cpus:g} CPUs{f', {gpus:g} GPUs' if gpus else ''}, "
                 f"{cl.placement.value}{labels})")
        total = ray.cluster_resources()
        if cpus > total.get("CPU", 0.0) or gpus > total.get("GPU", 0.0):  # never, not just not now
            raise ConfigError(f"the Ray cluster cannot place {asked}: it has {total.get('CPU', 0.0):g} CPUs, "
                              f"{total.get('GPU', 0.0):g} GPUs (lower [cluster] cpus_per_node / gpus_per_node)")
        # label selectors only when asked: older Rays (murmur[ray] allows 2.9+) have no such argument
        selector = {"bundle_label_selector": [dict(cl.labels)] * len(demand)} if cl.labels else {}
        try:
            self._group = placement_group(demand, strategy=STRATEGIES[cl.placement],
                                          name=f"murmur-{self.root.name}", **selector)
        except TypeError:
            raise ConfigError(f"[cluster] labels need a Ray whose placement groups take label selectors "
                              f"(this is Ray {ray.__version__}; murmur was tested with 2.60)") from None
        try:
            ray.get(self._group.ready(), timeout=PLACE_TIMEOUT_S)
        except GetTimeoutError:
            raise ConfigError(f"the Ray cluster cannot place {asked} within {PLACE_TIMEOUT_S:.0f} s; "
                              f"available: {ray.available_resources()}") from None
        agent_cls = ray.remote(HostAgent)
        for b, name in enumerate(names):
            self.agents[name] = agent_cls.options(
                num_cpus=demand[b]["CPU"], num_gpus=demand[b].get("GPU", 0), name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=b),
            ).remote(str(self.root), self.module, self.env)
            for i in groups[name]:
                self._config_owner[str(config_paths[i])] = name
        wheres = ray.get([self.agents[n].where.remote() for n in names], timeout=CALL_TIMEOUT_S)
        ports = ray.get([self.agents[n].free_port_block.remote(w["ip"], len(groups[n]))
                         for n, w in zip(names, wheres, strict=True)], timeout=CALL_TIMEOUT_S)
        for n, w, port in zip(names, wheres, ports, strict=True):
            self.hosts[n] = Host(w["ip"], w["hostname"], tuple(w["gpus"]), int(port))
        return dict(self.hosts)

    def host_lost(self, name: str) -> bool:
        """Whether worker process ``name`` ended because its agent (its Ray node) died."""
        return name in self._lost

    def remote_path(self, local: Path) -> Path:
        """Where a path under the controller's run dir lives on the hosts."""
        return self.root / local.relative_to(self.run_dir)

    def install(self, name: str, files: Mapping[str, bytes], secret: Sequence[str] = ()) -> None:
        ray.get(self.agents[name].install.remote(dict(files), list(secret)), timeout=CALL_TIMEOUT_S)

    # -- the supervisor's spawner ---------------------------------------------------

    def serves(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: Any) -> bool:
        return len(argv) > 3 and argv[1:3] == ["-m", self.module]

    def spawn(self, args: Sequence[str], log_path: Path) -> RemoteProcess:
        """Start ``python -m <module> *args`` on the host of the worker process
        whose configs ``args`` name; its ``--control`` socket is relayed here."""
        owner = next(self._config_owner[a] for a in args if a in self._config_owner)
        agent = self.agents[owner]
        remote_args: list[str] = []
        control: Path | None = None
        for a in args:
            if a in self._config_owner:
                a = str(self.remote_path(Path(a)))
            elif control is None and remote_args and remote_args[-1] == "--control":
                control = Path(a)
                a = str(self.root / CONTROL_DIR / control.name)
            remote_args.append(a)
        log_rel = f"logs/{log_path.name}"
        child = f"{owner}:{uuid.uuid4().hex[:8]}"
        if control is not None:
            old = self._relays.pop(control, None)
            if old is not None:
                task = asyncio.get_running_loop().create_task(old.close(), name=f"relay-close-{control.name}")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            self._relays[control] = ControlRelay(control, agent, f"{CONTROL_DIR}/{control.name}")
        try:
            pid = ray.get(agent.spawn.remote(child, remote_args, log_rel), timeout=CALL_TIMEOUT_S)
        except RayError:
            pid = -1  # the agent is gone: the process counts as killed (RemoteProcess.lost)
        return RemoteProcess(agent, child, pid, log_path, log_rel, on_lost=lambda: self._lost.add(owner))

    def close(self) -> None:
        """The supervisor is done with us; :meth:`finish` collects and tears down."""

    # -- per poll --------------------------------------------------------------------

    async def status(self, proc: str, data_dir: Path) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(
                self.agents[proc].status.remote(str(data_dir.relative_to(self.run_dir))), STATUS_TIMEOUT_S * 2)
        except (RayError, asyncio.TimeoutError):
            return None

    # -- the end -----------------------------------------------------------------------

    async def finish(self, files: Mapping[str, Sequence[Path]]) -> None:
        """Bring each worker process's ``files`` (local paths under the run dir)
        back from its host, remove the hosts' run roots, the agents and the
        placement group; stop Ray if this run started it. Called once every
        worker process stopped."""
        for relay in list(self._relays.values()):
            await relay.close()
        self._relays.clear()
        try:
            await asyncio.to_thread(self._collect, files)
        finally:
            await asyncio.to_thread(self.shutdown)

    def _collect(self, files: Mapping[str, Sequence[Path]]) -> None:
        asks = {name: self.agents[name].read_files.remote([str(p.relative_to(self.run_dir)) for p in paths])
                for name, paths in files.items() if name in self.agents}
        for name, ref in asks.items():
            try:
                got = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except RayError:
                continue  # its host is gone, and its files with it
            for rel, data in got.items():
                path = self.run_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def shutdown(self) -> None:
        """Remove what this run put on the cluster (idempotent)."""
        if not ray.is_initialized():
            return
        cleaned: set[str] = set()  # hosts whose run root is gone (one live agent per host does it)
        for name, agent in self.agents.items():
            host = self.hosts[name].ip if name in self.hosts else None
            if host in cleaned:
                continue
            try:
                ray.get(agent.remove_root.remote(), timeout=CALL_TIMEOUT_S)
            except RayError:
                continue  # a lost host: its files went with it
            if host is not None:
                cleaned.add(host)
        for agent in self.agents.values():
            ray.kill(agent)
        if self._group is not None:
            remove_placement_group(self._group)
        self.agents.clear()
        ray.shutdown()
