"""One testnet worker process: K nodes (or one Sybil attacker) on one uvloop.

``python -m murmur.testnet.worker [--attacker] [--control SOCK] a.toml b.toml ...``

Why pack nodes: a Python interpreter with torch costs ~2 s of CPU to start and
a few hundred MB; on a 2-core box a 100-node testnet only fits when several
nodes share one interpreter and one event loop. Training runs in worker
threads (``asyncio.to_thread``), one torch thread per node.

With ``--attacker`` every config is one identity of a single
:class:`~murmur.testnet.sybil.SybilAttacker` (one poisoned learner).

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
Without ``--standby`` the same imports happen before the first node listens,
so a node never accepts connections while its loop is blocked importing.
Partitions are applied at the application level (``Node.set_partition``): all
testnet nodes share the loopback interface, where routes cannot cut them apart.

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
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError, MurmurError, OptionError
from murmur.fastexit import exit_after_shutdown
from murmur.node import preflight as node_preflight
from murmur.node.config import NodeConfig, load_config_with_source
from murmur.node.daemon import Node
from murmur.node.logs import configure_logging
from murmur.protocol.identity import PeerId
from murmur.testnet.procs import FATAL_PREFIX

log = logging.getLogger(__name__)

MAX_CONTROL_LINE = 1 << 20  # a partition lists every peer id: ~60 bytes each
EXIT_CONFIG = 2
EXIT_FAILURE = 1


class Command(enum.StrEnum):
    """Control requests. ``partition`` carries ``groups``: lists of peer ids;
    each node may then reach only the peers of its own group (a node in no
    group reaches nobody). ``heal`` removes the partition."""

    PARTITION = "partition"
    HEAL = "heal"
    PING = "ping"
    START = "start"  # a --standby worker starts its nodes (replies at once)


class ControlError(MurmurError):
    """A malformed control request (answered with an error, never fatal)."""


@dataclass
class Worker:
    """The nodes of this process (for an attacker: its identities)."""

    nodes: list[Node] = field(default_factory=list)
    go: asyncio.Event = field(default_factory=asyncio.Event)  # start the nodes (standby ends)
    ready: bool = False  # the nodes are up: partition commands can be applied

    def _require_ready(self) -> None:
        if not self.ready:
            # not ok: the controller keeps the partition pending and resends it
            raise ControlError("nodes not started yet")

    async def start(self, _request: Mapping[str, Any]) -> dict[str, Any]:
        self.go.set()
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

    async def ping(self, _request: Mapping[str, Any]) -> dict[str, Any]:
        return {"ok": True, "peers": [str(n.peer_id) for n in self.nodes]}

    def handlers(self) -> dict[Command, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]]:
        return {Command.PARTITION: self.partition, Command.HEAL: self.heal, Command.PING: self.ping,
                Command.START: self.start}

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
            try:
                while line := await reader.readline():
                    writer.write(json.dumps(await self.handle(line)).encode() + b"\n")
                    await writer.drain()
            except (ConnectionError, ValueError):  # ValueError: line over the limit
                pass
            finally:
                writer.close()

        path.unlink(missing_ok=True)  # a stale socket of a crashed predecessor
        return await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_CONTROL_LINE)


@contextlib.asynccontextmanager
async def _running(configs: Sequence[NodeConfig], attacker: bool) -> AsyncIterator[list[Node]]:
    """Start the nodes (all or none) and stop them on exit, in reverse order."""
    if attacker:
        from murmur.testnet.sybil import SybilAttacker

        async with SybilAttacker(configs) as sybils:
            yield list(sybils.fronts)
        return
    nodes: list[Node] = []
    try:
        for cfg in configs:
            node = Node(cfg)
            await node.start()
            nodes.append(node)
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
        node_preflight.check_learning(cfg.learning)
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


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def serve(configs: Sequence[NodeConfig], *, attacker: bool, control: Path | None, standby: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker()
    if not standby:
        worker.go.set()
    server = await worker.serve_control(control) if control is not None else None
    try:
        if standby:
            log.info("worker standing by", extra={"event": "worker_standby"})
            await _first(worker.go, stop)
            if stop.is_set():
                return
        async with _running(configs, attacker) as nodes:
            worker.nodes, worker.ready = nodes, True
            log.info("worker ready", extra={"event": "worker_ready", "peers": [str(n.peer_id) for n in nodes]})
            await stop.wait()
            worker.ready = False
    finally:
        if server is not None:
            server.close()
            if control is not None:
                control.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m murmur.testnet.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="node config files (TOML), one per node")
    parser.add_argument("--attacker", action="store_true", help="run the configs as the identities of one Sybil attacker")
    parser.add_argument("--control", type=Path, help="Unix socket for control commands (partition/heal/start)")
    parser.add_argument("--standby", action="store_true", help="import everything, then wait for 'start' on the control socket")
    args = parser.parse_args(argv)
    if args.standby and args.control is None:
        parser.error("--standby needs --control (the start command arrives there)")
    try:
        configs = [load_checked(path) for path in args.configs]
        configure_logging(configs[0].node.log_level, configs[0].node.log_format)
        preload(configs)  # builds a trainer: a data set that is missing fails here, before any port is bound
        import uvloop

        from murmur.protocol.transport import tune_allocator

        tune_allocator()  # process-wide, as in `murmur node start`
        uvloop.run(serve(configs, attacker=args.attacker, control=args.control, standby=args.standby))
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
