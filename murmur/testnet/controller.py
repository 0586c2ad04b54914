"""The testnet controller: start a scenario's nodes, drive its churn, report.

One :class:`Testnet` run:

1. writes one node config (TOML) per node from the scenario
   (:func:`~murmur.testnet.scenario.node_configs`) under ``<out>/configs``,
   data dirs under ``<out>/nodes``, process logs under ``<out>/logs``;
2. starts the worker processes (:mod:`murmur.testnet.worker`, K nodes or one
   Sybil attacker each) under a :class:`~murmur.testnet.procs.Supervisor`, so
   no process outlives the run, whatever ends it (Ctrl-C included); workers
   are forked from a :mod:`~murmur.testnet.forkserver` that imported torch and
   the node stack once, instead of each importing them anew; a node
   that a churn event will (re)start gets a ``--standby`` process ahead of
   time, so the event costs the node's start-up, not interpreter imports;
3. polls every node's ``/status`` (the only view of a node the controller has:
   it never reaches into a node's memory), feeds the live dashboard and prints
   a progress line; keeps a ``rounds`` long poll open on every worker's control
   socket, which answers as soon as a node reaches the round the next churn
   event names, and fires each event when its round (whose round: the event's
   ``round_of``, see :mod:`~murmur.testnet.churn`) or time comes, recording
   every node's round at that moment;
4. stops when every live honest node finished ``duration.rounds`` plus
   ``duration.mixing_rounds`` (or after
   ``duration.seconds``, or when training stalls), stops the nodes gracefully
   and writes the report from each node's own ``metrics.jsonl`` and last status.

With a ``[network]`` section the nodes run on an emulated internet
(:mod:`~murmur.testnet.internet`): the controller builds it before the first
worker starts and tears it down after the last one stopped; each worker
enters its host's namespace (``--netns``), and the controller reads each
node's loopback-only API through a socket made inside that host. The
layout (addresses, routers, NAT kinds, rates) is written to
``<out>/network.json``.

On a Ray cluster (``[cluster] backend = "ray"``) the same happens with the
worker processes on the cluster's hosts: :mod:`~murmur.testnet.raycluster`
places them, starts them for the supervisor, relays their control sockets
and reads the nodes' status on their hosts; their metrics and logs come back
into the run dir before the report is written.

Partitions are application-level (a control command to each worker, which
calls ``Node.set_partition``): the nodes share the loopback interface, which
routes cannot split. Loss and latency need per-node interfaces (network
namespaces): on the emulated internet a loss step drops that share of each
named node's packets, each way, with nftables on its host (a later step
with ``percent = 0`` ends it), and a latency step delays each named node's
packets by ``ms`` each way in the delay line of its host's cable
(:mod:`~murmur.testnet.delayline`, planned for the hosts latency steps name;
``ms = 0`` ends it), so its round trip to anyone grows by 2 ``ms``; no tc
netem is needed. On loopback both are skipped with a warning naming why,
and recorded as skipped in the report's event list; so is a step that
failed to apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp

from murmur.errors import ConfigError, StateError
from murmur.node.state import METRICS_FILE, StateDir
from murmur.protocol.identity import KEY_FILE_NAME
from murmur.testnet import internet
from murmur.testnet.churn import ChurnSchedule, partition_groups, reference_round
from murmur.testnet.dashboard import DashboardServer, DashboardState, fill_from_specs
from murmur.testnet.forkserver import ForkServer, ForkServerError
from murmur.testnet.ports import find_free_port_block
from murmur.testnet.procs import Supervisor, last_error
from murmur.testnet.worker import attacker_arguments
from murmur.testnet.report import write_report
from murmur.testnet.reporting.run import describe_event
from murmur.testnet.scenario import (
    Action,
    Backend,
    ChurnEvent,
    NodePlace,
    NodeSpec,
    Role,
    Scenario,
    dump_toml,
    host_name,
    network_topology,
    node_configs,
    process_groups,
    provision_identities,
)

if TYPE_CHECKING:
    from murmur.testnet.raycluster import RayLauncher

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
ROUNDS_WAIT_S = 5.0  # how long a worker holds a rounds request when no round moves that matters
SNAPSHOT_TIMEOUT_S = 1.0  # the rounds read from every worker as an event fires
PROGRESS_INTERVAL_S = 3.0
STATUS_TIMEOUT_S = 2.0
CONTROL_TIMEOUT_S = 5.0
MIN_STALL_S = 60.0  # no new round for this long (or 10 round deadlines) ends the run
STALL_DEADLINES = 10
MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux
WORKER_MODULE = "murmur.testnet.worker"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STARTING = frozenset({Action.RESTART, Action.JOIN})  # events that (re)start nodes
STANDBY_START_TIMEOUT_S = 120.0  # a standby still importing after this is replaced by a cold start
UP_TIMEOUT_S = 60.0  # the first workers' rounds begin without one whose nodes are not up after this
UP_WAIT_S = 5.0  # how long one up request is held


class RunEnd(enum.StrEnum):
    """Why a run ended."""

    COMPLETED = "completed"
    TIME_UP = "time_up"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"
    FAILED = "failed"  # every worker exited before any of its nodes answered: see RunResult.failure


@dataclass(frozen=True)
class RunOptions:
    out: Path
    nodes_per_process: int | None = None  # None: the scenario's
    dashboard: bool = True
    dashboard_port: int = 0
    progress: TextIO | None = field(default_factory=lambda: sys.stdout)
    poll_interval_s: float = POLL_INTERVAL_S
    progress_interval_s: float = PROGRESS_INTERVAL_S
    stall_s: float | None = None  # None: max(MIN_STALL_S, STALL_DEADLINES round deadlines)
    write_report: bool = True
    fork_server: bool = True  # fork workers from one process that imported once (False: a fresh interpreter each)


@dataclass
class WorkerProc:
    """One worker process of the plan and the nodes it hosts.

    ``child``/``control`` name the process that runs (or ran) the nodes;
    ``spare``/``spare_control`` a ``--standby`` process waiting to take over
    at the next (re)start event. Each has its own control socket: a standby
    must not take the socket of the worker it will replace."""

    name: str
    indices: list[int]
    args: list[str]  # worker arguments after --control
    ctl_dir: Path
    child: str = ""
    control: Path = Path()
    spare: str | None = None
    spare_control: Path = Path()
    generation: int = 0
    incarnation: int = 0  # counts the processes that ran (or run) the nodes: what a rounds reply is from
    wanted_up: bool = False  # what the schedule says; the process may disagree (crash)
    sync_partition: bool = False  # the current partition must still be sent to it

    def __post_init__(self) -> None:
        self.child = self.child or self.name
        self.control = self.control if self.control != Path() else self.socket(0)

    def socket(self, generation: int) -> Path:
        return self.ctl_dir / f"{self.name[:24]}.{generation}.sock"

    def argv(self, control: Path) -> list[str]:
        return [sys.executable, "-m", WORKER_MODULE, "--control", str(control), *self.args]


@dataclass
class NodeHandle:
    spec: NodeSpec
    data_dir: Path
    peer_id: str
    proc: str
    status: dict[str, Any] | None = None
    last_seen: dict[str, Any] | None = None  # last answer, kept after it goes down
    # The freshest round of the node's current process (status poll or the
    # worker's rounds reply, whichever is newer); None while it is down or
    # has not reported since it (re)started.
    round: int | None = None


@dataclass(frozen=True)
class WorkerFailure:
    """Why a worker process gave up: its exit code and last word (see ``procs.last_error``)."""

    proc: str
    code: int | None
    message: str
    log: Path


@dataclass
class RunResult:
    run_dir: Path
    report_dir: Path | None
    end: RunEnd
    wall_s: float
    network_round: int | None
    events: list[dict[str, Any]]
    summary: dict[str, Any] | None
    dashboard_url: str | None
    failure: WorkerFailure | None = None  # with RunEnd.FAILED: the first worker's error


# ------------------------------------------------------------------- helpers


def read_metrics(data_dir: Path) -> list[dict[str, Any]]:
    """A node's metrics.jsonl rows; a torn last line (kill -9 mid-append) is skipped."""
    path = data_dir / METRICS_FILE
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


async def send_control(path: Path, request: Mapping[str, Any], timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
    """One request/reply on a worker's control socket; raises OSError/TimeoutError."""
    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise ConnectionResetError("worker closed the control connection")
        return dict(json.loads(line))

    return await asyncio.wait_for(exchange(), timeout_s)


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


# --------------------------------------------------------------- controller


class Testnet:
    """One run of ``scenario``; see the module docstring."""

    def __init__(self, scenario: Scenario, options: RunOptions) -> None:
        self.scenario = scenario
        self.options = options
        self.run_dir = Path(options.out).resolve()
        self.events: list[dict[str, Any]] = []
        self.nodes: dict[int, NodeHandle] = {}
        self.procs: dict[str, WorkerProc] = {}
        self.schedule = ChurnSchedule(scenario.churn, scenario.duration.last_round)
        self.dashboard = DashboardState(clock=lambda: time.monotonic() - self._t0)  # the events' time axis
        self.dashboard_url: str | None = None
        self._partition: list[list[str]] | None = None  # peer-id groups while partitioned
        self._supervisor: Supervisor | None = None
        self._t0 = time.monotonic()
        self._front: int | None = None
        self._rounds_done = 0  # sum of honest nodes' rounds: grows while any of them trains
        self._front_at = time.monotonic()
        self._last_progress = -math.inf
        self._background: set[asyncio.Task[None]] = set()  # standby start-ups and rounds watches
        self._watches: dict[str, tuple[int, asyncio.Task[None]]] = {}  # proc -> (incarnation, its rounds watch)
        self._by_peer: dict[str, int] = {}  # peer id -> node index
        self._moved = asyncio.Event()  # set (and replaced) when a round or status arrives: see _wake_loop
        self._exited: list[WorkerProc] = []  # processes that exited on their own, in the order seen
        self._rounds_began = False  # the loop runs: stop() can end the run with a report
        self._stop_asked = False  # stop() was called: the loop ends the run as INTERRUPTED
        self.failure: WorkerFailure | None = None
        self._worker_env: dict[str, str] | None = None
        self._ray: RayLauncher | None = None  # [cluster] backend = "ray": where the worker processes run
        self.hosts: dict[str, str] = {}  # node name -> its host's address (cluster runs)
        self.plan: internet.Plan | None = None  # the emulated internet's layout, with [network]
        self._internet: internet.Internet | None = None
        # the control sockets' folder in /tmp when the run dir's path is too long for
        # them: removed when the run ends (every run left one, 101 of them in /tmp here)
        self._ctl_tmp: Path | None = None
        self._host_http: dict[str, aiohttp.ClientSession] = {}  # namespace -> a client whose sockets start there
        self._actions: dict[Action, Callable[[ChurnEvent], Coroutine[Any, Any, str | None]]] = {
            Action.CRASH: self._crash, Action.STOP: self._stop, Action.RESTART: self._start_nodes,
            Action.JOIN: self._start_nodes, Action.PARTITION: self._partition_nodes, Action.HEAL: self._heal,
            Action.LATENCY: self._impair, Action.LOSS: self._impair,
        }

    # -- plan ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Write configs and identities; plan the worker processes (and, on a
        cluster, place them: their hosts' addresses go into the configs)."""
        sc = self.scenario
        specs = sc.node_specs()
        for sub in ("configs", "nodes", "logs"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        peer_ids = provision_identities(sc, self.run_dir / "nodes")
        if sc.network is not None:
            self.plan = internet.plan(network_topology(sc))
            self._write_network(peer_ids)
        paths = {spec.index: self.run_dir / "configs" / f"{spec.name}.toml" for spec in specs}
        ctl_dir = self.run_dir / "ctl"
        if len(str(ctl_dir)) + 40 > MAX_UNIX_PATH:  # + "/<name[:24]>.<gen>.sock"
            ctl_dir = self._ctl_tmp = Path(tempfile.mkdtemp(prefix="murmur-ctl-"))
        ctl_dir.mkdir(exist_ok=True)
        groups: dict[str, list[int]] = {}
        for group in process_groups(sc, self.options.nodes_per_process):
            first = specs[group[0]]
            attacker = first.attacker is not None
            name = (f"attacker{first.attacker}" if attacker else
                    first.name if len(group) == 1 else f"nodes-{'-'.join(map(str, group))}")
            groups[name] = group
            attack = attacker_arguments(sc.attackers[first.attacker].plan()) if first.attacker is not None else []
            args = attack + [str(paths[i]) for i in group]
            if self.plan is not None:  # a process runs on one host (process_groups saw to that)
                args = ["--netns", self.plan.hosts[host_name(first)].ns, *args]
            self.procs[name] = WorkerProc(name, group, args, ctl_dir)
            for i in group:
                self.nodes[i] = NodeHandle(specs[i], self.run_dir / "nodes" / specs[i].name,
                                           peer_ids[specs[i].name], name)
                self._by_peer[peer_ids[specs[i].name]] = i
        if sc.cluster.backend is Backend.RAY:
            configs = self._place_on_ray(groups, paths, ctl_dir)
        else:
            base_port = find_free_port_block(len(specs)) if self.plan is None else 0
            configs = node_configs(sc, self.run_dir / "nodes", base_port, self.plan)
        for spec, cfg in zip(specs, configs, strict=True):
            paths[spec.index].write_text(dump_toml(cfg), encoding="utf-8")
        if self._ray is not None:
            try:
                self._install_on_hosts(groups, paths)
            except BaseException:
                self._ray.shutdown()  # nothing of this run may stay on the cluster
                raise
        fill_from_specs(self.dashboard, specs, peer_ids)

    def _place_on_ray(self, groups: Mapping[str, list[int]], paths: Mapping[int, Path],
                      ctl_dir: Path) -> list[dict[str, Any]]:
        """Join (or start) the Ray cluster and place the worker processes
        (murmur.testnet.raycluster); the nodes' configs with their hosts'
        addresses and their state dirs there."""
        from murmur.testnet.raycluster import RayLauncher

        sc = self.scenario
        launcher = RayLauncher(sc.cluster, self.run_dir, ctl_dir, WORKER_MODULE, WORKER_ENV)
        self._ray = launcher
        try:
            launcher.connect(sc.cluster.cpus_per_node * len(self.nodes))
            hosts = launcher.place(groups, paths)
        except BaseException:
            launcher.shutdown()
            raise
        places: dict[int, NodePlace] = {}
        for name, group in groups.items():
            host = hosts[name]
            device = "cuda" if host.gpus and sc.cluster.gpus_per_node else None
            for k, i in enumerate(group):
                handle = self.nodes[i]
                places[i] = NodePlace(host.ip, host.base_port + k, launcher.remote_path(handle.data_dir), device)
                self.hosts[handle.spec.name] = host.ip
        return node_configs(sc, self.run_dir / "nodes", places=places)

    def _install_on_hosts(self, groups: Mapping[str, list[int]], paths: Mapping[int, Path]) -> None:
        """Each worker process's node configs and identity keys, onto its host."""
        assert self._ray is not None
        for name, group in groups.items():
            files: dict[str, bytes] = {}
            secret = []
            for i in group:
                handle = self.nodes[i]
                files[str(paths[i].relative_to(self.run_dir))] = paths[i].read_bytes()
                key = handle.data_dir / KEY_FILE_NAME
                secret.append(str(key.relative_to(self.run_dir)))
                files[secret[-1]] = key.read_bytes()
            self._ray.install(name, files, secret)

    def _write_network(self, peer_ids: Mapping[str, str]) -> None:
        """``network.json``: where each node runs on the emulated internet."""
        assert self.plan is not None
        plan = self.plan
        nodes = {}
        for spec in self.scenario.node_specs():
            host = plan.hosts[host_name(spec)]
            router = plan.routers[host.router] if host.router is not None else None
            nodes[spec.name] = {
                "peer_id": peer_ids[spec.name], "host": host.name, "address": host.address,
                "public_address": plan.public_address(host.name),
                "router": host.router, "nat": router.nat.value if router is not None else None,
                "up_mbit": host.rate.up_mbit, "down_mbit": host.rate.down_mbit,
            }
        routers = {r.name: {"nat": r.nat.value, "address": r.wan_address, "lan": str(r.lan)}
                   for r in plan.routers.values()}
        (self.run_dir / "network.json").write_text(json.dumps({"nodes": nodes, "routers": routers}, indent=2),
                                                   encoding="utf-8")

    def _http(self, handle: NodeHandle, default: aiohttp.ClientSession) -> aiohttp.ClientSession:
        """The client that reaches ``handle``'s API: on the emulated internet
        one per host, whose connections start in the host's namespace."""
        if self.plan is None:
            return default
        ns = self.plan.hosts[host_name(handle.spec)].ns
        http = self._host_http.get(ns)
        if http is None:
            connector = aiohttp.TCPConnector(socket_factory=internet.socket_factory(ns))
            http = self._host_http[ns] = aiohttp.ClientSession(connector=connector, timeout=default.timeout)
        return http

    async def _close_host_http(self) -> None:
        sessions, self._host_http = list(self._host_http.values()), {}
        await asyncio.gather(*(http.close() for http in sessions), return_exceptions=True)

    def worker_pids(self) -> dict[str, int]:
        """Live worker processes by name (for benchmarks sampling their CPU time);
        none on a cluster: their pids are their hosts', not this machine's."""
        sup = self._supervisor
        if sup is None or self._ray is not None:
            return {}
        return {name: sup[name].pid for name in sup.alive()}

    def _proc_of(self, index: int) -> WorkerProc:
        return self.procs[self.nodes[index].proc]

    def _env(self) -> dict[str, str]:
        """The workers' environment, taken once per run: the fork server
        forks only for the environment it was started in."""
        if self._worker_env is None:
            env = dict(os.environ) | WORKER_ENV
            root = str(Path(__file__).resolve().parents[2])  # so workers import this murmur, installed or not
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            self._worker_env = env
        return self._worker_env

    async def _start_fork_server(self) -> None:
        """Import torch & co once, in the fork server (off the event loop: it
        takes seconds); workers are then forked from it. Without it, each
        worker is a fresh interpreter: slower, never wrong."""
        assert self._supervisor is not None and self._supervisor.fork_server is not None
        self._say("importing torch and the node stack once (fork server)")
        started = time.monotonic()
        try:
            self._supervisor.fork_server.launch()
            await asyncio.to_thread(self._supervisor.fork_server.wait_ready)
        except (ForkServerError, OSError) as exc:
            log.warning("no fork server; workers start as fresh interpreters", extra={"error": str(exc)})
            self._say(f"fork server unavailable ({exc}); starting workers as fresh interpreters")
            return
        log.info("fork server ready", extra={"seconds": round(time.monotonic() - started, 2)})

    def _launch(self, proc: WorkerProc, standby: bool = False) -> None:
        assert self._supervisor is not None
        argv = [*proc.argv(proc.control), "--standby"] if standby else proc.argv(proc.control)
        self._supervisor.start(proc.child, argv, env=self._env(), log_name=proc.name)
        proc.wanted_up = True
        proc.incarnation += 1
        proc.sync_partition = self._partition is not None

    def _will_start(self, proc: WorkerProc) -> bool:
        """Whether a churn event still to come (re)starts a node of ``proc``."""
        return any(ev.action in STARTING and set(ev.nodes) & set(proc.indices) for ev in self.schedule.upcoming())

    def _prespawn(self, proc: WorkerProc) -> None:
        """Give ``proc`` a standby process for its next (re)start event, so
        the event costs the nodes' own start-up (see worker.py's docstring).
        Started ahead of time: importing torch takes tens of seconds on a
        loaded box, longer than a fast network needs for the rest of its run."""
        assert self._supervisor is not None
        if proc.spare is not None and self._supervisor[proc.spare].alive():
            return
        proc.generation += 1
        proc.spare, proc.spare_control = f"{proc.name}~{proc.generation}", proc.socket(proc.generation)
        self._supervisor.start(proc.spare, [*proc.argv(proc.spare_control), "--standby"], env=self._env(),
                               log_name=proc.name)

    async def _wake(self, proc: WorkerProc) -> None:
        """Start ``proc``'s nodes: through its standby process when it has one
        (which may still be importing: told in the background), else cold."""
        assert self._supervisor is not None
        if proc.spare is None:
            self._launch(proc)
            return
        proc.child, proc.control, proc.spare = proc.spare, proc.spare_control, None
        proc.wanted_up = True  # the process is alive and about to bring its nodes up
        proc.incarnation += 1
        proc.sync_partition = self._partition is not None
        task = asyncio.create_task(self._start_standby(proc, self._supervisor[proc.child]), name=f"standby-{proc.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_together(self, procs: list[WorkerProc]) -> bool:
        """Start the nodes of the first workers, launched as standbys, at once.

        Importing torch takes 10-30 s per process on a loaded 2-core box and
        varies by as much: workers started cold joined a network already many
        rounds in, so a churn event at round r could hit a node that had never
        checkpointed, and an attacker's learner, alone on the network, raced
        to the last round and handed its model to the first honest node to
        come up (the catch-up of a node whose neighbours are all ahead). A
        standby has done its imports once its control socket answers; the
        nodes then start within one control round trip of each other.

        False when every one of them exited first (a config it refused, a
        data set it could not load): they would all fail the same way again,
        so the run ends at once with the first one's error (``failure``)."""
        started = time.monotonic()
        self._say(f"starting {len(procs)} worker processes (imports first, then every node at once)")
        await asyncio.gather(*(self._await_control(proc) for proc in procs))
        assert self._supervisor is not None
        dead = [proc for proc in procs if not self._supervisor[proc.child].alive()]
        if procs and len(dead) == len(procs):
            self._fail(dead[0])
            return False
        self._say(f"workers ready in {time.monotonic() - started:.1f} s; starting the nodes")
        supervisor = self._supervisor
        await asyncio.gather(*(self._start_standby(proc, supervisor[proc.child], hold_rounds=True) for proc in procs))
        await self._begin_together(procs)
        return True

    async def _begin_together(self, procs: list[WorkerProc]) -> None:
        """Once every worker's nodes are up and linked to their neighbours
        (or done waiting for them), their rounds begin, all at once
        (:mod:`murmur.node.startgate`): no group of them runs rounds ahead of
        the rest. A worker whose nodes are not there within UP_TIMEOUT_S is
        not waited for; a worker begins its rounds by itself if no ``begin``
        comes (murmur.testnet.worker.HOLD_ROUNDS_MAX_S)."""
        started = time.monotonic()
        up = await asyncio.gather(*(self._await_up(proc) for proc in procs))
        await asyncio.gather(*(self._begin(proc) for proc in procs), return_exceptions=True)
        late = [proc.name for proc, ok in zip(procs, up, strict=True) if not ok]
        self._say(f"nodes up and linked in {time.monotonic() - started:.1f} s; their rounds begin together"
                  + (f" (not waiting for {', '.join(late)})" if late else ""))

    async def _await_up(self, proc: WorkerProc) -> bool:
        """Until ``proc``'s nodes are up and at the start gate (True), or it died or UP_TIMEOUT_S passed (False)."""
        assert self._supervisor is not None
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline and self._supervisor[proc.child].alive():
            try:
                reply = await send_control(proc.control, {"cmd": "up", "wait_s": UP_WAIT_S},
                                           UP_WAIT_S + CONTROL_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError):
                await asyncio.sleep(self.options.poll_interval_s)
                continue
            if reply.get("up"):
                return True
        return False

    async def _begin(self, proc: WorkerProc) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError, json.JSONDecodeError):
            await send_control(proc.control, {"cmd": "begin"})

    def _fail(self, proc: WorkerProc) -> None:
        assert self._supervisor is not None
        child = self._supervisor[proc.child]
        self.failure = WorkerFailure(proc.name, child.returncode, last_error(child.log_path), child.log_path)
        self._say(f"\nno worker could start; {proc.name} (exit {child.returncode}): {self.failure.message}")

    async def _await_control(self, proc: WorkerProc) -> None:
        """Until ``proc``'s control socket answers (its imports are done), it
        died, or STANDBY_START_TIMEOUT_S passed (``_start_standby`` then
        replaces it by a cold start)."""
        assert self._supervisor is not None
        child = self._supervisor[proc.child]
        deadline = time.monotonic() + STANDBY_START_TIMEOUT_S
        while child.alive() and time.monotonic() < deadline:
            try:
                if (await send_control(proc.control, {"cmd": "ping"})).get("ok"):
                    return
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError):
                pass
            await asyncio.sleep(self.options.poll_interval_s)  # polling for the socket to appear

    async def _start_standby(self, proc: WorkerProc, child: Any, *, hold_rounds: bool = False) -> None:
        """Send ``start`` once the standby serves its control socket (with
        ``hold_rounds``, its nodes' rounds wait for ``begin``); launch cold
        if it died or never answered (and the schedule still wants it)."""
        deadline = time.monotonic() + STANDBY_START_TIMEOUT_S
        while child.alive() and time.monotonic() < deadline:
            try:
                reply = await send_control(proc.control, {"cmd": "start", "hold_rounds": hold_rounds})
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError):
                await asyncio.sleep(self.options.poll_interval_s)  # polling for the socket to appear
                continue
            if reply.get("ok"):
                return
            break
        if not proc.wanted_up or self._supervisor is None or self._supervisor[proc.child] is not child:
            return  # crashed or stopped by the schedule meanwhile
        log.warning("standby did not start; launching cold", extra={"proc": proc.name})
        self._down(proc)  # not an unexpected exit: ours
        await asyncio.to_thread(child.crash)
        self._launch(proc)

    # -- run -------------------------------------------------------------------------

    async def run(self) -> RunResult:
        # the dashboard first: a port already taken stops the run before it writes
        # a thing (it wrote configs and identities, and the same command with
        # another port was then refused: 'run directory ... is not empty')
        server = await self._serve_dashboard() if self.options.dashboard else None
        try:
            if not self.procs:
                self.prepare()
        except BaseException:
            if server is not None:
                await server.stop()
            raise
        end = RunEnd.INTERRUPTED
        final: dict[str, dict[str, Any] | None] = {}
        fork_server = (ForkServer(WORKER_MODULE, env=self._env(), log_path=self.run_dir / "logs" / "forkserver.log",
                                  tag=str(self.run_dir)) if self.options.fork_server and self._ray is None else None)
        self._supervisor = Supervisor(self.run_dir / "logs", fork_server=self._ray or fork_server)
        launched = time.monotonic()
        try:
            self._say(f"run dir: {self.run_dir}  ({len(self.nodes)} nodes in {len(self.procs)} processes)")
            if self.plan is not None:
                self._internet = internet.Internet(self.plan, log_dir=self.run_dir / "logs")
                await _finish_in_thread(self._internet.start)
                nats = ", ".join(f"{r.name} {r.nat.value}" for r in self.plan.routers.values()) or "no routers"
                public = sum(1 for h in self.plan.hosts.values() if h.router is None)
                self._say(f"emulated internet: {len(self.plan.hosts)} hosts, {public} public; {nats} "
                          f"(see {self.run_dir / 'network.json'})")
            if fork_server is not None:
                await self._start_fork_server()
            initial = [proc for proc in self.procs.values() if not all(self.nodes[i].spec.late for i in proc.indices)]
            for proc in initial:
                self._launch(proc, standby=True)
            for proc in self.procs.values():  # standbys for later (re)starts import meanwhile
                if self._will_start(proc):
                    self._prespawn(proc)
            if not await self._start_together(initial):
                end = RunEnd.FAILED
            else:
                self._t0 = self._front_at = time.monotonic()  # at_s counts from here: the nodes' start
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)) as http:
                    poller = asyncio.create_task(self._poll_forever(http), name="status-poll")
                    try:
                        end = await self._loop()
                    finally:
                        poller.cancel()
                        await asyncio.gather(poller, return_exceptions=True)
                    final = await self._poll(http)
                    await self._close_host_http()
        finally:
            await self._close_host_http()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            self._end_progress()
            # graceful stop (checkpoints, peers.json) before reading metrics; on
            # cancellation (Ctrl-C) too: Supervisor.close holds back a second SIGINT
            await asyncio.shield(asyncio.to_thread(self._supervisor.close))
            if self._ray is not None:  # the nodes' metrics and the logs come home; the cluster is left clean
                await asyncio.shield(self._ray.finish(self._node_files()))
            if self._ctl_tmp is not None:  # no process serves a socket there any more
                shutil.rmtree(self._ctl_tmp, ignore_errors=True)
            if self._internet is not None:  # after the workers: nothing runs inside any more
                await asyncio.shield(asyncio.to_thread(self._internet.close))
            if server is not None:
                await server.stop()
        wall = time.monotonic() - launched  # imports included: what the user waited
        report_dir, summary = None, None
        if self.options.write_report and end is not RunEnd.FAILED:  # no node ran: nothing to report
            report_dir, summary = await asyncio.to_thread(self.write_report, final)
        return RunResult(self.run_dir, report_dir, end, wall, self._front, self.events, summary, self.dashboard_url,
                         self.failure)

    async def _serve_dashboard(self) -> DashboardServer:
        server = DashboardServer(self.dashboard, self.options.dashboard_port)
        try:
            self.dashboard_url = await server.start()
        except OSError as exc:
            await server.stop()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"dashboard port {self.options.dashboard_port} on 127.0.0.1: {why}; pick another "
                              "with --dashboard-port (0: any free one)") from None
        self._say(f"dashboard: {self.dashboard_url}")
        return server

    def stop(self) -> bool:
        """Ask the run to end at its next decision as :attr:`RunEnd.INTERRUPTED`,
        its nodes stopped and its report written (a Ctrl-C after many rounds
        left no report of them). False before its rounds began (start-up):
        there is nothing to report, so cancel the run instead."""
        if not self._rounds_began:
            return False
        self._stop_asked = True
        self._wake_loop()
        return True

    async def _loop(self) -> RunEnd:
        """Decide, each time a round or a status poll comes in (and at least
        every poll interval): fire due churn events, print progress, end the run."""
        sc = self.scenario
        stall_s = self.options.stall_s or max(MIN_STALL_S, STALL_DEADLINES * sc.duration.round_deadline_s)
        self._rounds_began = True
        while True:
            if self._stop_asked:
                return RunEnd.INTERRUPTED
            moved = self._moved  # taken before deciding: what arrives meanwhile wakes the wait below
            if self._nobody_started():
                self._fail(self._exited[0])
                return RunEnd.FAILED
            await self._sync_partitions()
            self._watch_rounds()
            elapsed = time.monotonic() - self._t0
            lag = self.schedule.lag
            for ev in self.schedule.due(self._schedule_rounds(), elapsed):
                await self._apply(ev)
            if self.schedule.lag > lag:
                self._say(f"\nthe schedule runs {self.schedule.lag} rounds late (nodes ran ahead of the controller's "
                          f"view, or of an event being applied): later events move as much, up to the last round")
            self._progress()
            if sc.duration.seconds is not None and elapsed >= sc.duration.seconds:
                return RunEnd.TIME_UP
            # bounded by seconds too: nodes whose privacy budget ran out stop (see the learner)
            if self._all_done(sc.duration.last_round):
                return RunEnd.COMPLETED
            if time.monotonic() - self._front_at > stall_s:
                self._say(f"\nno round completed for {stall_s:.0f} s: stopping (see {self.run_dir / 'logs'})")
                return RunEnd.STALLED
            # woken by the next round reply or status poll; the timeout runs at_s events on time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), self.options.poll_interval_s)

    async def _poll_forever(self, http: aiohttp.ClientSession) -> None:
        """Every node's /status each poll interval (dashboard, progress, exits, the end)."""
        while True:
            await self._poll(http)
            self._wake_loop()
            await asyncio.sleep(self.options.poll_interval_s)  # the polling period, not synchronisation

    def _wake_loop(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    def _schedule_rounds(self) -> dict[int, int]:
        """The live honest nodes' rounds the schedule counts, by node index.
        None counted until every started node answered: on a loaded box
        start-up skews by many rounds, and a crash must hit a node that has
        run, not one still importing torch."""
        return self._honest_rounds() if self._all_answered() else {}

    def _honest_rounds(self) -> dict[int, int]:
        return {i: h.round for i, h in self.nodes.items()
                if h.spec.role is Role.HONEST and h.round is not None and self.procs[h.proc].wanted_up}

    def _nobody_started(self) -> bool:
        """Every worker exited on its own and none of their nodes ever answered."""
        return (bool(self._exited) and not any(p.wanted_up for p in self.procs.values())
                and not any(h.last_seen is not None for h in self.nodes.values()))

    def _expected_up(self) -> list[NodeHandle]:
        return [h for h in self.nodes.values() if self.procs[h.proc].wanted_up]

    def _all_answered(self) -> bool:
        return all(h.last_seen is not None or h.round is not None for h in self._expected_up())

    def _all_done(self, rounds: int | None) -> bool:
        """Every live honest node says it is done, past ``rounds`` if given
        (None: a run bounded by seconds, where only a spent budget ends them)."""
        honest = [h for h in self._expected_up() if h.spec.role is Role.HONEST]
        if self.schedule.pending or not honest:
            return False
        # "done", not only round >= rounds: a node's round moves when it takes the last aggregate,
        # and stopping it then (while it evaluates) loses the last round's row from the report
        return all(h.status is not None and _round(h.status) is not None and (
            (h.status.get("learning") or {}).get("finished", False) if rounds is None
            else _round(h.status) >= rounds and (h.status.get("learning") or {}).get("done", True))  # type: ignore[operator]
            for h in honest)

    # -- polling ---------------------------------------------------------------------

    async def _poll(self, http: aiohttp.ClientSession) -> dict[str, dict[str, Any] | None]:
        handles = list(self.nodes.values())
        asked = [self.procs[h.proc].incarnation for h in handles]
        answers = await asyncio.gather(*(self._status(http, h) for h in handles))
        for handle, status, incarnation in zip(handles, answers, asked, strict=True):
            proc = self.procs[handle.proc]
            if not proc.wanted_up or proc.incarnation != incarnation:
                status = None  # the process that answered was taken down meanwhile
            handle.status = status
            if status is not None:
                handle.last_seen = status
                self._saw_round(handle, _round(status))
            self.dashboard.update_from_status(handle.spec.name, status)
        self._check_exits()
        self._note_progress()
        return {h.spec.name: h.status for h in handles}

    def _saw_round(self, handle: NodeHandle, round_: int | None) -> None:
        """A node's process reported ``round_``. Rounds only move forward in
        one process (a restart restores, a catch-up adopts a later round), so
        the later of two reports that crossed is the larger."""
        if round_ is not None and (handle.round is None or round_ > handle.round):
            handle.round = round_

    def _note_progress(self) -> None:
        honest = self._honest_rounds()
        front = max(honest.values(), default=None)
        if front is not None and (self._front is None or front > self._front):
            self._front = front
        # Stalled means no honest node completed a round, not that the front
        # did not move: one node that caught up far ahead must not hide the rest.
        progress = sum(r + 1 for r in honest.values())
        if progress > self._rounds_done:
            self._rounds_done, self._front_at = progress, time.monotonic()

    # -- rounds, pushed by the workers ----------------------------------------------

    def _watch_rounds(self) -> None:
        """One rounds watch per live worker process (see :meth:`_watch`)."""
        for proc in self.procs.values():
            if not proc.wanted_up:
                continue
            current = self._watches.get(proc.name)
            if current is not None and current[0] == proc.incarnation and not current[1].done():
                continue
            if current is not None:
                current[1].cancel()
            task = asyncio.create_task(self._watch(proc, proc.incarnation), name=f"rounds-{proc.name}")
            self._watches[proc.name] = (proc.incarnation, task)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _watch(self, proc: WorkerProc, incarnation: int) -> None:
        """Keep a ``rounds`` request open on ``proc``'s control socket while
        that process runs its nodes: the worker answers as soon as one of its
        nodes reaches the round the next churn event names (``from_round``),
        and the loop decides at once. Between events it answers only when
        its nodes come up or go, or every ROUNDS_WAIT_S."""
        def current() -> bool:
            return proc.wanted_up and proc.incarnation == incarnation

        while current():
            try:
                reader, writer = await asyncio.open_unix_connection(str(proc.control))
            except OSError:
                await asyncio.sleep(self.options.poll_interval_s)  # polling for the socket (a standby starting)
                continue
            try:
                known: dict[str, Any] = {}
                while current():
                    request = {"cmd": "rounds", "known": known, "wait_s": ROUNDS_WAIT_S,
                               "from_round": self._next_round_trigger()}
                    writer.write(json.dumps(request).encode() + b"\n")
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), ROUNDS_WAIT_S + CONTROL_TIMEOUT_S)
                    reply = json.loads(line) if line else {}
                    if not reply.get("ok") or not isinstance(reply.get("rounds"), dict):
                        break
                    known = reply["rounds"]
                    if current():
                        self._saw_rounds(known)
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError, ValueError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(self.options.poll_interval_s)  # the worker went away or refused: retry while wanted

    def _next_round_trigger(self) -> int | None:
        """The round the next churn event waits for (None: it waits for a time, or none is left)."""
        upcoming = self.schedule.upcoming()
        return self.schedule.trigger(upcoming[0]) if upcoming else None

    def _saw_rounds(self, rounds: Mapping[str, Any]) -> None:
        for peer, round_ in rounds.items():
            index = self._by_peer.get(peer)
            if index is not None and isinstance(round_, int):
                self._saw_round(self.nodes[index], round_)
        self._note_progress()
        self._wake_loop()

    async def _snapshot_rounds(self) -> dict[int, int]:
        """Every live node's round, read from the workers now (for an event's
        record: between events the workers only report rounds that matter)."""
        procs = [p for p in self.procs.values() if p.wanted_up]

        async def one(proc: WorkerProc) -> None:
            incarnation = proc.incarnation
            try:
                reply = await send_control(proc.control, {"cmd": "rounds"}, SNAPSHOT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError, ValueError):
                return
            if proc.wanted_up and proc.incarnation == incarnation and isinstance(reply.get("rounds"), dict):
                self._saw_rounds(reply["rounds"])

        await asyncio.gather(*(one(p) for p in procs))
        return {i: h.round for i, h in self.nodes.items() if h.round is not None and self.procs[h.proc].wanted_up}

    def _down(self, proc: WorkerProc) -> None:
        """``proc`` no longer runs its nodes (taken down, or exited): their rounds are unknown."""
        proc.wanted_up = False
        for i in proc.indices:
            self.nodes[i].round = None

    def _node_files(self) -> dict[str, list[Path]]:
        """What a cluster run brings back from each worker process's host:
        its nodes' metrics and its log (the report's inputs)."""
        return {name: [self.nodes[i].data_dir / METRICS_FILE for i in proc.indices]
                + [self.run_dir / "logs" / f"{name}.log"] for name, proc in self.procs.items()}

    async def _status(self, http: aiohttp.ClientSession, handle: NodeHandle) -> dict[str, Any] | None:
        if not self.procs[handle.proc].wanted_up:
            return None
        if self._ray is not None:  # read on the node's host
            status = await self._ray.status(handle.proc, handle.data_dir)
            return status if status is not None and status.get("peer_id") == handle.peer_id else None
        try:
            info = StateDir(handle.data_dir).read_api_info()  # re-read: a restarted node has a new port
            async with self._http(handle, http).get(f"{info.url}/status") as resp:
                if resp.status != 200:
                    return None
                status = await resp.json()
        except (StateError, OSError, aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError):
            return None
        if not isinstance(status, dict) or status.get("peer_id") != handle.peer_id:
            return None  # a stale api.json pointing at somebody else's port
        return status

    def _check_exits(self) -> None:
        """A process the schedule wants up has exited on its own: say so once."""
        assert self._supervisor is not None
        for proc in self.procs.values():
            child = self._supervisor[proc.child] if proc.wanted_up else None
            if child is not None and not child.alive():
                code = child.returncode
                self._down(proc)
                self._exited.append(proc)
                record = {"action": "exited", "process": proc.name, "code": code}
                why = f"exited unexpectedly (code {code})"
                if self._ray is not None:  # where it ran; a lost host takes its nodes with it
                    record["host"] = self._ray.hosts[proc.name].ip
                    if self._ray.host_lost(proc.name):
                        record["host_lost"] = True
                        why = f"is gone with its Ray host {record['host']}"
                self._say(f"\nprocess {proc.name} {why}; see {child.log_path}")
                self._record(record)

    # -- churn -----------------------------------------------------------------------

    async def _apply(self, ev: ChurnEvent) -> None:
        fired = await self._fired(ev)
        skipped = await self._actions[ev.action](ev)
        names = [self.nodes[i].spec.name for i in ev.nodes]
        record: dict[str, Any] = fired | {"action": ev.action.value, "nodes": names}
        if ev.at_round is not None:  # the rounds it took to apply move the schedule on (churn.py)
            rounds = await self._snapshot_rounds()
            record["applied_rounds"] = {self.nodes[i].spec.name: r for i, r in sorted(rounds.items())}
            record["applied_round"] = reference_round(ev.reference, self._schedule_rounds())
            self.schedule.took_effect(fired["round"], record["applied_round"])
        if ev.ms is not None:
            record["ms"] = ev.ms
        if ev.percent is not None:
            record["percent"] = ev.percent
        if skipped:
            record["skipped"] = skipped
        self._record(record)
        what = describe_event({k: v for k, v in record.items() if k != "skipped"})
        self._say(f"\nevent at round {fired['round']} of {fired['round_of']} (front {fired['front']}, slowest "
                  f"{fired['slowest']}): {what}" + (f" (skipped: {skipped})" if skipped else ""))

    async def _fired(self, ev: ChurnEvent) -> dict[str, Any]:
        """What an event's record says of the moment it fired: its trigger;
        ``round``, the round of ``round_of`` that fired it (as the controller
        saw it then: at_round, or later by what it saw late); then, read from
        the workers right after, every live node's round (``rounds``) and
        the front and slowest live honest node; ``fired_t``, when it fired
        (seconds since the start; ``t``/``ts`` are once it was applied, and
        for a round trigger ``applied_rounds``, every live node's round then,
        and ``applied_round``, the round of ``round_of`` then)."""
        decided = reference_round(ev.reference, self._honest_rounds())
        fired_t = round(time.monotonic() - self._t0, 3)
        rounds = await self._snapshot_rounds()
        honest = {i: r for i, r in rounds.items() if self.nodes[i].spec.role is Role.HONEST}
        trigger = {"at_round": ev.at_round, "lag": self.schedule.lag} if ev.at_round is not None else {"at_s": ev.at_s}
        return trigger | {
            "round": decided,
            "round_of": str(ev.reference),
            "front": max(honest.values(), default=None),
            "slowest": min(honest.values(), default=None),
            "rounds": {self.nodes[i].spec.name: r for i, r in sorted(rounds.items())},
            "fired_t": fired_t,
        }

    def _record(self, record: dict[str, Any]) -> None:
        record = {"round": self._front, "t": round(time.monotonic() - self._t0, 3), "ts": time.time()} | record
        self.events.append(record)
        self.dashboard.add_event(record)

    def _procs_for(self, ev: ChurnEvent) -> list[WorkerProc]:
        out: dict[str, WorkerProc] = {}
        for i in ev.nodes:
            out.setdefault(self.nodes[i].proc, self._proc_of(i))
        return list(out.values())

    async def _crash(self, ev: ChurnEvent) -> str | None:
        assert self._supervisor is not None
        procs = self._procs_for(ev)
        for proc in procs:
            self._down(proc)
        # all at once: killing and reaping one process after the other let the
        # network run rounds between the first kill and the last
        await asyncio.gather(*(asyncio.to_thread(self._supervisor[p.child].crash) for p in procs))
        self._prespawn_restarts(ev)
        return None

    def _prespawn_restarts(self, ev: ChurnEvent) -> None:
        for proc in self._procs_for(ev):
            if self._will_start(proc):
                self._prespawn(proc)

    async def _stop(self, ev: ChurnEvent) -> str | None:
        assert self._supervisor is not None
        procs = self._procs_for(ev)
        for proc in procs:
            self._down(proc)
        await asyncio.gather(*(asyncio.to_thread(self._supervisor[p.child].stop) for p in procs))
        self._prespawn_restarts(ev)
        return None

    async def _start_nodes(self, ev: ChurnEvent) -> str | None:
        await asyncio.gather(*(self._wake(p) for p in self._procs_for(ev) if not p.wanted_up))
        return None

    async def _partition_nodes(self, ev: ChurnEvent) -> str | None:
        groups = partition_groups(ev.nodes, len(self.nodes))
        self._partition = [[self.nodes[i].peer_id for i in g] for g in groups]
        for proc in self.procs.values():
            proc.sync_partition = proc.wanted_up
        await self._sync_partitions()
        return None

    async def _heal(self, _ev: ChurnEvent) -> str | None:
        self._partition = None
        for proc in self.procs.values():
            proc.sync_partition = proc.wanted_up
        await self._sync_partitions()
        if self.scenario.topology.rotation_shuffles == 0:
            self._say("  (each side keeps the learning neighbours it found during the partition: the sides may "
                      "learn apart to the end; [topology] rotation_shuffles swaps neighbours, see the README)")
        return None

    async def _sync_partitions(self) -> None:
        """Tell every live worker the current partition (or heal). A worker that
        is still starting (no control socket yet) is retried on the next poll."""
        request = {"cmd": "heal"} if self._partition is None else {"cmd": "partition", "groups": self._partition}
        pending = [p for p in self.procs.values() if p.sync_partition and p.wanted_up]

        async def one(proc: WorkerProc) -> None:
            try:
                reply = await send_control(proc.control, request)
            except (OSError, asyncio.TimeoutError, json.JSONDecodeError):
                return
            if reply.get("ok"):
                proc.sync_partition = False
            else:
                log.warning("worker refused control request", extra={"proc": proc.name, "reply": reply})

        await asyncio.gather(*(one(p) for p in pending))

    async def _impair(self, ev: ChurnEvent) -> str | None:
        """Loss or latency on the emulated internet, on each named node's host
        (every host when none is named): loss with nftables, latency with the
        host's delay line (planned for it, see ``latency_hosts``). On
        loopback both are skipped, saying why."""
        what = f"{ev.action.value} on {list(ev.nodes) or 'all nodes'}"
        net = self._internet
        if net is None:
            reason = "nodes share the loopback interface (no per-node netns)"
            internet.skipped(what, reason)
            return reason
        hosts = sorted({host_name(self.nodes[i].spec) for i in (ev.nodes or self.nodes)})
        if ev.action is Action.LOSS:
            assert ev.percent is not None
            setting, value = net.set_loss, ev.percent
        else:
            assert ev.ms is not None
            setting, value = net.set_latency, ev.ms

        def apply() -> None:
            for host in hosts:
                setting(host, value)

        try:
            await asyncio.to_thread(apply)
        except internet.InternetError as exc:
            internet.skipped(what, str(exc))
            return str(exc)
        return None

    # -- output ----------------------------------------------------------------------

    def progress_line(self) -> str:
        sc = self.scenario
        honest = [h for h in self.nodes.values() if h.spec.role is Role.HONEST and h.status is not None]
        acc = _finite([(h.status.get("learning") or {}).get("accuracy") for h in honest if h.status])
        ppl = _finite([(h.status.get("learning") or {}).get("perplexity") for h in honest if h.status])
        attack = _finite([(h.status.get("learning") or {}).get("attack_rate") for h in honest if h.status])
        alive = sum(1 for h in self.nodes.values() if h.status is not None)
        target = f"/{sc.duration.last_round}" if sc.duration.last_round else ""
        parts = [
            f"[{time.monotonic() - self._t0:6.1f}s]",
            f"round {self._front if self._front is not None else '-'}{target}",
            f"acc mean {statistics.fmean(acc):.3f} min {min(acc):.3f}" if acc else "acc -",
            *([f"ppl mean {statistics.fmean(ppl):.2f} max {max(ppl):.2f}"] if ppl else []),
            f"alive {alive}/{len(self.nodes)}",
            f"attack {statistics.fmean(attack):.3f}" if attack else "attack -",
        ]
        return " | ".join(parts)

    def _progress(self) -> None:
        out = self.options.progress
        now = time.monotonic()
        if out is None:
            return
        if out.isatty():
            out.write("\r\x1b[K" + self.progress_line())
        elif now - self._last_progress >= self.options.progress_interval_s:
            out.write(self.progress_line() + "\n")
        else:
            return
        self._last_progress = now
        out.flush()

    def _end_progress(self) -> None:
        out = self.options.progress
        if out is not None and out.isatty():
            out.write("\n")
            out.flush()

    def _say(self, text: str) -> None:
        out = self.options.progress
        if out is not None:
            if not out.isatty():
                text = text.lstrip("\n")
            out.write(text + "\n")
            out.flush()

    # -- report ----------------------------------------------------------------------

    def write_report(self, final: Mapping[str, dict[str, Any] | None]) -> tuple[Path, dict[str, Any]]:
        """Report from each node's own metrics.jsonl and its last /status
        (None for nodes that were down at the end)."""
        metrics = {h.spec.name: read_metrics(h.data_dir) for h in self.nodes.values()}
        peer_ids = {h.spec.name: h.peer_id for h in self.nodes.values()}
        report_dir = write_report(self.run_dir, metrics, dict(final), self.scenario, self.events, peer_ids,
                                  hosts=self.hosts or None)
        summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
        return report_dir, summary


async def _finish_in_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread and return when it is done, even when
    cancelled meanwhile (then re-raise the cancellation). A cancelled
    ``asyncio.to_thread`` returns at once while its thread runs on: a Ctrl-C
    while the emulated internet was being built had the run's cleanup remove
    the namespaces made so far, and the thread then made the rest, which
    stayed (all 6 of a 4-node NAT run)."""
    done = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.gather(done, return_exceptions=True)  # its error, if any, is not the story now
        raise


def _round(status: Mapping[str, Any] | None) -> int | None:
    learning = (status or {}).get("learning") or {}
    value = learning.get("round")
    return value if isinstance(value, int) else None
