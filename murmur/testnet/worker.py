"""One testnet worker process: K nodes (or one Sybil attacker) on one uvloop.

``python -m murmur.testnet.worker [--attacker] [--control SOCK] a.toml b.toml ...``

Why pack nodes: a Python interpreter with torch costs ~2 s of CPU to start and
a few hundred MB; on a 2-core box a 100-node testnet only fits when several
nodes share one interpreter and one event loop. Training runs in worker
threads (``asyncio.to_thread``), one torch thread per node.

With ``--attacker`` every config is one identity of a single
:class:`~murmur.testnet.sybil.SybilAttacker` (one poisoned learner), which
runs ``--tactic`` at the strengths given (``--boost``, ``--diversify``,
``--fresh``, ``--sleep-rounds``; :func:`attacker_arguments`).

The controller steers a running worker through a Unix control socket: one JSON
object per line in, one JSON reply per line out (see :class:`Command`).

``--standby``: import everything (torch, the trainer, privacy), serve the
control socket and wait for ``start`` before opening any node. The controller
pre-spawns a standby process for a node that a churn event will (re)start, so
that a restart at round r costs the node's own start-up (state dir,
checkpoint, data) instead of ~10-30 s of interpreter imports on a loaded
2-core box, during which a fast network would finish its remaining rounds.
A standby process has not touched the node's state: what comes up on
``start`` is a fresh process reading its data dir, as after any restart.
The first workers of a run are started with ``hold_rounds``: their nodes'
first round waits behind a :class:`~murmur.node.startgate.StartGate` until
the controller, once every worker answered ``up``, sends ``begin``.
Without ``--standby`` the same imports happen before the first node listens,
so a node never accepts connections while its loop is blocked importing.
Partitions are applied at the application level (``Node.set_partition``): all
testnet nodes share the loopback interface, where routes cannot cut them apart.

``--netns NAME``: the worker's nodes run on a host of the emulated internet
(:mod:`murmur.testnet.internet`): the process enters that network namespace
before anything else (the control socket is a path, reachable from outside).

SIGTERM/SIGINT stop every node gracefully (checkpoints, Goodbyes, peers.json)
and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import math
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError, MurmurError, OptionError
from murmur.learning.tactics import AttackPlan, Tactic, with_strength
from murmur.fastexit import exit_after_shutdown
from murmur.node import preflight as node_preflight
from murmur.node.config import NodeConfig, load_config_with_source
from murmur.node.daemon import Node
from murmur.node.logs import configure_logging
from murmur.node.startgate import StartGate
from murmur.protocol.identity import PeerId
from murmur.testnet.procs import FATAL_PREFIX

log = logging.getLogger(__name__)

MAX_CONTROL_LINE = 1 << 20  # a partition lists every peer id: ~60 bytes each
EXIT_CONFIG = 2
EXIT_FAILURE = 1


class Command(enum.StrEnum):
    """Control requests. ``partition`` carries ``groups``: lists of peer ids;
    each node may then reach only the peers of its own group (a node in no
    group reaches nobody). ``heal`` removes the partition. ``rounds`` is a
    long poll of the nodes' rounds (see :meth:`Worker.rounds`)."""

    PARTITION = "partition"
    HEAL = "heal"
    PING = "ping"
    START = "start"  # a --standby worker starts its nodes (replies at once); "hold_rounds": behind a start gate
    UP = "up"  # replies once the nodes are up and their learners at the gate, or after "wait_s"
    BEGIN = "begin"  # opens the start gate: the learners' rounds begin
    ROUNDS = "rounds"


MAX_ROUNDS_WAIT_S = 30.0  # the longest a rounds or up request may ask to be held
HOLD_ROUNDS_MAX_S = 60.0
"""Rounds held at the start (``start`` with ``hold_rounds``,
:mod:`murmur.node.startgate`) begin by themselves this long after the nodes
are up, if no ``begin`` came: a controller that died or lost a worker must
not leave the others idle."""


class ControlError(MurmurError):
    """A malformed control request (answered with an error, never fatal)."""


@dataclass
class Worker:
    """The nodes of this process (for an attacker: its identities)."""

    nodes: list[Node] = field(default_factory=list)
    learners: int = 0  # the learners of its nodes (an attacker's identities share one)
    go: asyncio.Event = field(default_factory=asyncio.Event)  # start the nodes (standby ends)
    gate: StartGate | None = None  # set by a start that holds the rounds; begin opens it
    ready: bool = False  # the nodes are up: partition commands can be applied
    up_event: asyncio.Event = field(default_factory=asyncio.Event)  # set with ready (an up request waits on it)
    # Set (and replaced) whenever a node's round moves or the nodes come up:
    # a rounds request waits on the one it saw, so no move is missed.
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False  # the worker is stopping: held requests answer now
    _clients: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)  # control connections
    _idle: set[asyncio.StreamWriter] = field(default_factory=set)  # those waiting for their next request

    def bring_up(self, nodes: list[Node]) -> None:
        """The nodes are up: control commands apply to them, their rounds are reported."""
        self.nodes, self.ready = nodes, True
        self.up_event.set()
        for node in nodes:
            if node.learner is not None:  # an attacker's identities share one learner (added once)
                node.learner.add_round_listener(self._round_moved)
        self._round_moved()

    def _round_moved(self, _round: int | None = None) -> None:
        self.moved.set()
        self.moved = asyncio.Event()

    def current_rounds(self) -> dict[str, int]:
        """Each up node's learning round, by peer id."""
        if not self.ready:
            return {}
        return {str(n.peer_id): n.learner.round for n in self.nodes if n.learner is not None}

    def _require_ready(self) -> None:
        if not self.ready:
            # not ok: the controller keeps the partition pending and resends it
            raise ControlError("nodes not started yet")

    async def start(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if not self.go.is_set() and request.get("hold_rounds"):
            self.gate = StartGate(self.learners)
        self.go.set()
        return {"ok": True}

    def _at_gate(self) -> bool:
        return self.ready and (self.gate is None or self.gate.all_arrived.is_set())

    async def up(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"ok": true, "up": bool}``: whether the nodes are up and their
        learners at the start gate (linked to their neighbours, or done
        waiting for them), once they are or after ``wait_s`` (at most
        MAX_ROUNDS_WAIT_S)."""
        wait_s = request.get("wait_s", 0.0)
        if not isinstance(wait_s, (int, float)):
            raise ControlError("up takes 'wait_s' (seconds)")

        async def at_gate() -> None:
            await self.up_event.wait()
            if self.gate is not None:
                await self.gate.all_arrived.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(at_gate(), min(max(0.0, float(wait_s)), MAX_ROUNDS_WAIT_S))
        return {"ok": True, "up": self._at_gate()}

    async def begin(self, _request: Mapping[str, Any]) -> dict[str, Any]:
        """Open the start gate: the learners' rounds begin."""
        if self.gate is not None:
            self.gate.open()
        return {"ok": True}

    async def partition(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self._require_ready()
        groups = request.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise ControlError("partition needs 'groups': a list of lists of peer ids")
        try:
            sides = [frozenset(PeerId.from_string(str(p)) for p in g) for g in groups]
        except ValueError as exc:
            raise ControlError(f"bad peer id in partition: {exc}") from None
        for node in self.nodes:
            side = next((s for s in sides if node.peer_id in s), frozenset())
            await node.set_partition(side)
        return {"ok": True, "nodes": len(self.nodes)}

    async def heal(self, _request: Mapping[str, Any]) -> dict[str, Any]:
        self._require_ready()
        for node in self.nodes:
            await node.set_partition(None)
        return {"ok": True, "nodes": len(self.nodes)}

    async def rounds(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The nodes' rounds, ``{"ok": true, "rounds": {peer id: round}}``,
        as soon as they differ from ``known`` (the rounds of the last reply)
        in a way that matters: a node reached ``from_round`` or moved past it,
        or one appeared or vanished; else after ``wait_s`` (0, the default:
        at once). Without ``from_round`` no move is worth a reply. The controller
        keeps one such request open per worker, so it learns that a node
        reached the round a churn event names within a control round trip,
        instead of at its next status poll (rounds take ~0.05 s on a small
        testnet; the poll is every 0.5 s). Rounds below ``from_round`` (the
        next event's) are not worth a reply: they wait for the poll."""
        known = request.get("known") or {}
        wait_s = request.get("wait_s", 0.0)
        from_round = request.get("from_round")
        if not isinstance(known, dict) or not isinstance(wait_s, (int, float)) or not (
                from_round is None or isinstance(from_round, int)):
            raise ControlError("rounds takes 'known' (peer id -> round), 'wait_s' (seconds) and 'from_round' (int)")
        floor = from_round if from_round is not None else math.inf  # None: no move is worth a reply
        loop = asyncio.get_running_loop()
        end = loop.time() + min(max(0.0, float(wait_s)), MAX_ROUNDS_WAIT_S)
        while True:
            moved = self.moved  # before reading the rounds: a move after this sets it
            now = self.current_rounds()
            if now.keys() != known.keys() or any(r >= floor and r != known[p] for p, r in now.items()):
                return {"ok": True, "rounds": now}
            left = 0.0 if self.closing else end - loop.time()
            if left <= 0:
                return {"ok": True, "rounds": now}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), left)

    async def ping(self, _request: Mapping[str, Any]) -> dict[str, Any]:
        return {"ok": True, "peers": [str(n.peer_id) for n in self.nodes]}

    @property
    def requests_in_progress(self) -> int:
        """Control requests read and not answered yet (a held rounds request)."""
        return len(self._clients) - len(self._idle)

    async def close_clients(self, timeout_s: float = 1.0) -> None:
        """End every control connection (the controller keeps a rounds request
        open on one): a held request is answered, then its connection ends;
        an idle one sees its end at once. Ended, not cancelled: a cancelled
        connection task is logged as an error by asyncio's stream callback
        (Python 3.11)."""
        self.closing = True
        self._round_moved()  # held requests answer, and their connections end after the reply
        for writer in self._idle:
            writer.close()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=timeout_s)

    def handlers(self) -> dict[Command, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]]:
        return {Command.PARTITION: self.partition, Command.HEAL: self.heal, Command.PING: self.ping,
                Command.START: self.start, Command.UP: self.up, Command.BEGIN: self.begin,
                Command.ROUNDS: self.rounds}

    async def handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ControlError("a control request is a JSON object")
            try:
                command = Command(request.get("cmd"))
            except ValueError:
                raise ControlError(f"unknown command {request.get('cmd')!r}") from None
            return await self.handlers()[command](request)
        except (ControlError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": str(exc)}

    async def serve_control(self, path: Path) -> asyncio.AbstractServer:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._clients[task] = writer
            try:
                while not self.closing:
                    self._idle.add(writer)
                    line = await reader.readline()
                    self._idle.discard(writer)
                    if not line:
                        break
                    reply = await self.handle(line)
                    if writer.is_closing():  # the controller hung up meanwhile
                        break
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
            except (ConnectionError, ValueError):  # ValueError: line over the limit
                pass
            finally:
                self._idle.discard(writer)
                writer.close()
                self._clients.pop(task, None)

        path.unlink(missing_ok=True)  # a stale socket of a crashed predecessor
        return await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_CONTROL_LINE)


@contextlib.asynccontextmanager
async def _running(configs: Sequence[NodeConfig], attacker: AttackPlan | None,
                   gate: StartGate | None = None) -> AsyncIterator[list[Node]]:
    """Start the nodes (all or none), their first round behind ``gate``,
    and stop them on exit, in reverse order."""
    if attacker is not None:
        from murmur.testnet.sybil import SybilAttacker

        async with SybilAttacker(configs, attacker, start_gate=gate) as sybils:
            yield list(sybils.fronts)
        return
    # All at once: each start builds its learner in a thread (seconds of CPU,
    # see Node._start), so the nodes of a worker come up together instead of
    # one after another; the first of them started its rounds while the last
    # was still being built, and found only whoever was up first to link to.
    nodes: list[Node] = []
    try:
        for cfg in configs:
            nodes.append(Node(cfg, start_gate=gate))
        started = await asyncio.gather(*(node.start() for node in nodes), return_exceptions=True)
        failed = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if failed:
            raise failed[0]
        yield nodes
    finally:
        # all at once: K nodes stopping one after the other would overrun the
        # controller's SIGTERM grace period (each stop may wait for a training step)
        await asyncio.gather(*(node.stop() for node in reversed(nodes)), return_exceptions=True)


#: What the fork server imports before forking workers (murmur.testnet.forkserver):
#: the heavy part of ``preload`` that does not depend on the configs.
FORK_PRELOAD = (
    "torch._dynamo",  # every torch.optim call imports it (~1.5 s)
    "murmur.node.learner",
    "murmur.node.privacy",
    "murmur.learning.trainers.registry",
    "uvloop",
)


def load_checked(path: Path) -> NodeConfig:
    """A node config, with what :mod:`murmur.node.preflight` finds in it
    located in the file. Not its ports: a standby worker checks long before its
    node restarts, while the process it replaces may still hold them."""
    cfg, source = load_config_with_source(path)
    try:
        node_preflight.check_data_dir(cfg.node.data_dir)
        node_preflight.check_learner(cfg)
    except OptionError as exc:
        raise source.located(exc) from None
    return cfg


def preload(configs: Sequence[NodeConfig]) -> None:
    """Import what the nodes will need (see the module docstring)."""
    learning = {cfg.learning.trainer: cfg.learning for cfg in configs if cfg.learning.enabled}
    if learning:
        from murmur.learning.trainers.registry import load_trainer
        from murmur.node import learner  # noqa: F401 - torch and the round engine

        for spec, section in learning.items():
            # A throwaway trainer (any data share will do): datasets import their loaders lazily.
            if not isinstance(section.node_index, int):
                section = dataclasses.replace(section, node_index=0)
            load_trainer(spec)(section.trainer_context())
    if any(cfg.privacy.enabled for cfg in configs):
        from murmur.node import privacy  # noqa: F401 - accountant, noise, cvxpy


def _release_held_rounds(gate: StartGate | None) -> None:
    if gate is not None and not gate.opened.is_set():
        log.warning(f"no begin came {HOLD_ROUNDS_MAX_S:.0f} s after the nodes were up: their rounds begin now",
                    extra={"event": "rounds_released"})
        gate.open()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def serve(configs: Sequence[NodeConfig], *, attacker: AttackPlan | None, control: Path | None, standby: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(learners=1 if attacker is not None else sum(1 for cfg in configs if cfg.learning.enabled))
    if not standby:
        worker.go.set()
    server = await worker.serve_control(control) if control is not None else None
    try:
        if standby:
            log.info("worker standing by", extra={"event": "worker_standby"})
            await _first(worker.go, stop)
            if stop.is_set():
                return
        async with _running(configs, attacker, worker.gate) as nodes:
            worker.bring_up(nodes)
            log.info("worker ready", extra={"event": "worker_ready", "peers": [str(n.peer_id) for n in nodes],
                                            "rounds_held": worker.gate is not None})
            release = loop.call_later(HOLD_ROUNDS_MAX_S, _release_held_rounds, worker.gate)
            try:
                await stop.wait()
            finally:
                release.cancel()
            worker.ready = False
    finally:
        if server is not None:
            server.close()
            await worker.close_clients()
            if control is not None:
                control.unlink(missing_ok=True)


def attacker_arguments(plan: AttackPlan) -> list[str]:
    """The worker's arguments that run its configs as one attacker with ``plan``."""
    return ["--attacker", "--tactic", plan.tactic.value, "--boost", repr(plan.boost), "--diversify",
            repr(plan.diversify), "--fresh", repr(plan.fresh), "--sleep-rounds", str(plan.sleep_rounds)]


def attack_plan(args: argparse.Namespace) -> AttackPlan | None:
    """The plan :func:`attacker_arguments` gave (None: not an attacker)."""
    if not args.attacker:
        return None
    try:
        plan = AttackPlan.tuned(args.tactic)
        changes = {k: v for k, v in (("boost", args.boost), ("diversify", args.diversify), ("fresh", args.fresh),
                                     ("sleep_rounds", args.sleep_rounds)) if v is not None}
        return with_strength(plan, **changes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m murmur.testnet.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=Path, help="node config files (TOML), one per node")
    p.add_argument("--attacker", action="store_true", help="run the configs as the identities of one Sybil attacker")
    p.add_argument("--tactic", default=Tactic.IDENTICAL.value, help="the attacker's tactic (murmur.learning.adversary)")
    p.add_argument("--boost", type=float, help="the attacker's strengths (default: the tactic's tuned ones)")
    p.add_argument("--diversify", type=float)
    p.add_argument("--fresh", type=float)
    p.add_argument("--sleep-rounds", type=int)
    p.add_argument("--control", type=Path, help="Unix socket for control commands (partition/heal/start)")
    p.add_argument("--standby", action="store_true", help="import everything, then wait for 'start' on the control socket")
    p.add_argument("--netns", metavar="NAME", help="run in this network namespace (a host of the emulated internet)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.standby and args.control is None:
        cli.error("--standby needs --control (the start command arrives there)")
    try:
        plan = attack_plan(args)
        if args.netns:
            from murmur.testnet.internet import enter_namespace

            # first, while this process has one thread (a fork of the fork server, or a fresh interpreter)
            enter_namespace(args.netns)
        configs = [load_checked(path) for path in args.configs]
        configure_logging(configs[0].node.log_level, configs[0].node.log_format)
        preload(configs)  # builds a trainer: a data set that is missing fails here, before any port is bound
        import uvloop

        from murmur.protocol.transport import tune_allocator

        tune_allocator()  # process-wide, as in `murmur node start`
        uvloop.run(serve(configs, attacker=plan, control=args.control, standby=args.standby))
    except ConfigError as exc:
        print(f"{FATAL_PREFIX}config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except MurmurError as exc:
        print(f"{FATAL_PREFIX}{exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    # The nodes have stopped and persisted when main returns: skip the slow
    # interpreter teardown that ate the controller's SIGTERM grace (murmur.fastexit).
    exit_after_shutdown(main())
