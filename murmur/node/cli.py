"""The ``murmur`` command line.

``murmur id``              peer id and addresses (like ``ipfs id``), JSON
``murmur node start``      run the daemon (``murmur.node.daemon.run_node``)
``murmur status|peers``    query a running node's local HTTP API
``murmur config default``  print the documented default config
``murmur config check``    validate a config file, print it resolved
``murmur testnet run``     run a local testnet scenario (``murmur.testnet.cli``)

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage or a
damaged identity key (:class:`~murmur.errors.StateDamaged`), 141 (as
if killed by SIGPIPE) when stdout's reader went away (``murmur config check |
head``). Every failure is one ``murmur: ...`` line on stderr. ``node start``
and ``config check`` run :mod:`murmur.node.preflight` after loading the
config, so what the schema cannot see (trainer, aggregator, their options,
device, data dir, ports) fails the same way, before a port is bound. The
daemon and testnet are imported lazily so that ``murmur id`` and ``murmur
status`` start fast and work without torch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import uvloop

from murmur.errors import ConfigError, MurmurError, OptionError, StateDamaged, StateError
from murmur.fastexit import exit_after_shutdown
from murmur.node import preflight
from murmur.node.config import (
    NodeConfig,
    LogFormat,
    LogLevel,
    config_to_dict,
    default_config_text,
    load_config_with_source,
    collect_overrides,
)
from murmur.node.logs import configure_logging
from murmur.node.state import StateDir
from murmur.protocol.multiaddr import Multiaddr
from murmur.testnet.options import add_run_arguments as add_testnet_run_arguments

PROG = "murmur"
DIST_NAME = "murmur"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
HTTP_TIMEOUT_S = 5.0
DAEMON_ENTRY = ("murmur.node.daemon", "run_node")
TESTNET_ENTRY = ("murmur.testnet.cli", "run_testnet")

T = TypeVar("T")


class CliError(MurmurError):
    """A command failed in a way the user can act on; printed as one line."""


class OutputClosed(Exception):
    """Whoever read our stdout went away (``murmur config check | head``)."""


def _agent_version() -> str:
    try:
        from importlib.metadata import version

        return f"{DIST_NAME}/{version(DIST_NAME)}"
    except Exception:  # not installed (running from a source tree)
        return f"{DIST_NAME}/dev"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh uvloop event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def load_entry(module: str, attr: str, what: str) -> Callable[..., Any]:
    """Import ``module.attr`` late, turning any import failure into one clear line."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        reason = f"{module} is not available" if missing == module else f"{module} failed to import: {exc}"
        raise CliError(f"cannot {what}: {reason}") from exc
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise CliError(f"cannot {what}: {module} has no {attr}()")
    return fn


def _call_entry(fn: Callable[..., Any], *args: Any) -> int:
    """Entry points may be plain functions or coroutine functions; the latter run on uvloop."""
    result = fn(*args)
    if inspect.iscoroutine(result):
        result = run_async(result)
    return int(result or 0)


# ------------------------------------------------------------------- config


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dedicated flags and ``--set KEY=VALUE`` as dotted-key overrides;
    later ``--set`` wins over flags, so scripts can always be explicit."""
    flags = {
        "node.data_dir": getattr(args, "data_dir", None),
        "node.listen": getattr(args, "listen", None),
        "node.log_level": getattr(args, "log_level", None),
        "node.log_format": getattr(args, "log_format", None),
        "network.bootstrap": getattr(args, "bootstrap", None),
        "api.port": getattr(args, "api_port", None),
        "learning.trainer": getattr(args, "trainer", None),
    }
    out: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    return out | collect_overrides(getattr(args, "set", None) or ())


def _config(args: argparse.Namespace, *checks: Callable[[NodeConfig], None]) -> NodeConfig:
    """The config the arguments describe, after ``checks`` (see
    :mod:`murmur.node.preflight`); what they find is located in the file (line
    and key) or on the command line, like the schema's own errors."""
    cfg, source = load_config_with_source(getattr(args, "config", None), _overrides(args))
    try:
        for check in checks:
            check(cfg)
    except OptionError as exc:
        raise source.located(exc) from None
    return cfg


def _write(text: str) -> None:
    """Write to stdout now, so that a closed pipe shows here and not in the
    interpreter's last flush, as a traceback."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # what is still buffered must not fail again on the way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputClosed from None


def _print_json(data: Any) -> None:
    _write(json.dumps(data, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------ commands


def cmd_id(args: argparse.Namespace) -> int:
    cfg = _config(args, preflight.check_identity_dir)
    state = StateDir(cfg.node.data_dir)
    identity = state.identity()
    peer = identity.peer_id
    addrs = [str(Multiaddr(a.host, a.port, peer)) for a in cfg.node.listen]
    running = _running_node_addrs(state)
    _print_json(
        {
            "ID": str(peer),
            # like ipfs: base64 of the libp2p protobuf PublicKey (the peer id minus the multihash header)
            "PublicKey": base64.b64encode(peer.raw[2:]).decode(),
            "Addresses": running if running is not None else addrs,
            "AgentVersion": _agent_version(),
        }
    )
    return EXIT_OK


def _running_node_addrs(state: StateDir) -> list[str] | None:
    """A running node's actual addresses (ports chosen at start), if one answers."""
    try:
        info = state.read_api_info()
    except StateError:
        return None
    try:
        status = run_async(_get_json(info.url, "/status", timeout_s=1.0))
    except CliError:
        return None
    addrs = status.get("addrs") if isinstance(status, dict) else None
    return [str(a) for a in addrs] if isinstance(addrs, list) else None


def cmd_node_start(args: argparse.Namespace) -> int:
    cfg = _config(args, preflight.check_node)
    configure_logging(cfg.node.log_level, cfg.node.log_format)
    run_node = load_entry(*DAEMON_ENTRY, what="start the node")
    return _call_entry(run_node, cfg)


def _api_url(args: argparse.Namespace) -> str:
    if args.api:
        return str(args.api).rstrip("/")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else _config(args).node.data_dir
    state = StateDir(data_dir)
    info = state.read_api_info()
    if not _pid_alive(info.pid):
        raise CliError(f"the node (pid {info.pid}) in {data_dir} is not running; {state.api_path} is stale")
    return info.url


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


async def _get_json(base: str, path: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    import aiohttp  # late: half of the CLI's start-up time, and only the API clients need it

    url = f"{base}{path}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise CliError(f"{url}: HTTP {resp.status}")
                return await resp.json()
    except aiohttp.ClientConnectionError as exc:
        raise CliError(f"cannot reach the node API at {base} ({exc}); is the node running?") from exc
    except (aiohttp.ContentTypeError, json.JSONDecodeError) as exc:
        raise CliError(f"{url}: not a murmur API (bad JSON)") from exc
    except asyncio.TimeoutError as exc:
        raise CliError(f"{url}: no answer within {timeout_s:g}s") from exc


def cmd_status(args: argparse.Namespace) -> int:
    _print_json(run_async(_get_json(_api_url(args), "/status")))
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    _print_json(run_async(_get_json(_api_url(args), "/peers")))
    return EXIT_OK


def cmd_config_default(_args: argparse.Namespace) -> int:
    _write(default_config_text())
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """What ``node start`` would refuse, refused here (the ports included:
    a port in use now is one the node could not listen on now)."""
    _print_json(config_to_dict(_config(args, preflight.check_node)))
    return EXIT_OK


def cmd_testnet_run(args: argparse.Namespace) -> int:
    run_testnet = load_entry(*TESTNET_ENTRY, what="run the testnet")
    return _call_entry(run_testnet, args)


# -------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="node config file (TOML); defaults apply without one")
    p.add_argument("--data-dir", help="state directory (overrides node.data_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any option, e.g. learning.rounds=5")


def _add_api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="node config file, to find its data dir")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", help="state dir of the running node (its api.json says where the API is)")
    where.add_argument("--api", metavar="URL", help="API base URL, e.g. http://127.0.0.1:5001")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="murmur: peer-to-peer decentralized learning node")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("id", help="print this node's peer id and addresses (creates the identity if missing)")
    _add_config_args(p)
    p.set_defaults(handler=cmd_id)

    node = sub.add_parser("node", help="run the node daemon").add_subparsers(dest="node_command", required=True, metavar="ACTION")
    p = node.add_parser("start", help="start the daemon in the foreground")
    _add_config_args(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/4731")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="bootstrap peer (repeatable)")
    p.add_argument("--api-port", type=int, metavar="PORT", help="status API port (0 = any)")
    p.add_argument("--trainer", metavar="SPEC", help="trainer name or package.module:Class")
    p.add_argument("--log-level", choices=[v.value for v in LogLevel])
    p.add_argument("--log-format", choices=[v.value for v in LogFormat])
    p.set_defaults(handler=cmd_node_start)

    p = sub.add_parser("status", help="status of a running node (JSON)")
    _add_api_args(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("peers", help="peers of a running node (JSON)")
    _add_api_args(p)
    p.set_defaults(handler=cmd_peers)

    config = sub.add_parser("config", help="inspect configuration").add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = config.add_parser("default", help="print the documented default config")
    p.set_defaults(handler=cmd_config_default)
    p = config.add_parser("check", help="validate a config as node start would (trainer, options, device, data dir, ports) and print it resolved (JSON)")
    _add_config_args(p)
    p.set_defaults(handler=cmd_config_check)

    testnet = sub.add_parser("testnet", help="local testnets").add_subparsers(dest="testnet_command", required=True, metavar="ACTION")
    p = testnet.add_parser("run", help="run a testnet scenario")
    add_testnet_run_arguments(p)  # declared once, for `python -m murmur.testnet.cli` too
    p.set_defaults(handler=cmd_testnet_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateDamaged as exc:  # the operator must restore or remove a file, as with a bad config
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MurmurError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OutputClosed:
        return EXIT_BROKEN_PIPE


def run() -> NoReturn:
    """The ``murmur`` console entry: :func:`main`, then leave without the
    interpreter's teardown (see :mod:`murmur.fastexit`): a stopped daemon has
    persisted everything, and a slow exit only eats a supervisor's grace period."""
    exit_after_shutdown(main())


if __name__ == "__main__":
    run()
