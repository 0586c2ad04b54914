"""The ``murmur`` command line.

``murmur id``              peer id and addresses (like ``ipfs id``), JSON
``murmur node start``      run the daemon (``murmur.node.daemon.run_node``)
``murmur node stop``       stop it gracefully (SIGTERM to the pid in the state dir)
``murmur node health``     exit 0 while its /healthz says healthy (container health checks)
``murmur status|peers``    query a running node's local HTTP API (human or JSON)
``murmur logs [-f]``       the daemon's log in its state dir
``murmur config default``  print the documented default config
``murmur config check``    validate a config file, print it resolved
``murmur testnet run``     run a local testnet scenario (``murmur.testnet.cli``)
``murmur testnet compare`` overlay several runs' reports (``murmur.testnet.compare``)
``murmur completion SHELL`` a bash or zsh completion script
``murmur --version``

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage or a
state file a restart cannot mend (:class:`~murmur.errors.StateDamaged`: the
identity key, both checkpoints, the privacy ledger) or a state dir another
daemon holds (:class:`~murmur.errors.StateInUse`), 3 the node's trainer
failed while it ran (:class:`~murmur.errors.TrainerCrashed`), 141 (as
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
import contextlib
import enum
import importlib
import inspect
import json
import math
import os
import signal
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import uvloop

from murmur import __version__
from murmur.errors import ConfigError, MurmurError, OptionError, StateDamaged, StateError, StateInUse, TrainerCrashed
from murmur.fastexit import exit_after_shutdown
from murmur.node import preflight
from murmur.node.config import (
    ConfigSource,
    NodeConfig,
    LogFormat,
    LogLevel,
    config_to_dict,
    default_config_text,
    load_config_with_source,
    collect_overrides,
)
from murmur.node.completion import Shell
from murmur.node.completion import script as completion_script
from murmur.node.logs import configure_logging
from murmur.node.operate import STOP_TIMEOUT_S, follow, stop_node, tail_lines
from murmur.node.render import render_peers, render_status
from murmur.node.state import StateDir
from murmur.protocol.addresses import advertised
from murmur.protocol.multiaddr import Multiaddr
from murmur.testnet.options import add_run_arguments as add_testnet_run_arguments

PROG = "murmur"
DIST_NAME = "murmur"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_TRAINER = 3
"""The node's trainer failed (:class:`~murmur.errors.TrainerCrashed`): its code
raised twice running or broke its contract. Apart from 1 so that a
supervisor can leave it stopped (the unit's ``RestartPreventExitStatus``):
restarted, the same code fails the same way."""
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
HTTP_TIMEOUT_S = 5.0
DAEMON_ENTRY = ("murmur.node.daemon", "run_node")
TESTNET_ENTRY = ("murmur.testnet.cli", "run_testnet")
COMPARE_ENTRY = ("murmur.testnet.compare", "run_compare")
LOG_LINES = 50
HEALTH_TIMEOUT_S = 3.0


class Output(enum.StrEnum):
    HUMAN = "human"
    JSON = "json"

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
    with _located(source):
        for check in checks:
            check(cfg)
    return cfg


@contextlib.contextmanager
def _located(source: ConfigSource) -> Iterator[None]:
    """An :class:`OptionError` raised inside, located in the file (line and
    key) or on the command line. The daemon raises some of its own at start
    (``learning.num_nodes`` too large for the data set it loaded): located
    here, ``node start`` prints the line ``config check`` prints."""
    try:
        yield
    except OptionError as exc:
        raise source.located(exc) from None


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
    # What the node will advertise: a wildcard listener (the default config's
    # 0.0.0.0) as this machine's interface addresses, as the daemon does; the
    # wildcard itself is no address another machine can dial.
    addrs = [str(a) for listen in cfg.node.listen for a in advertised(Multiaddr(listen.host, listen.port, peer))]
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
    cfg, source = load_config_with_source(getattr(args, "config", None), _overrides(args))
    with _located(source):
        preflight.check_node(cfg)
        state = StateDir(cfg.node.data_dir).create()  # preflight found it writable
        configure_logging(cfg.node.log_level, cfg.node.log_format, log_file=state.log_path)
        run_node = load_entry(*DAEMON_ENTRY, what="start the node")
        return _call_entry(run_node, cfg)


def _state_dir(args: argparse.Namespace) -> StateDir:
    """The state dir ``--data-dir`` names, else the config's."""
    return StateDir(Path(args.data_dir).expanduser() if args.data_dir else _config(args).node.data_dir)


def cmd_node_stop(args: argparse.Namespace) -> int:
    state = _state_dir(args)
    stopped = stop_node(state, args.timeout)
    _write(f"stopped the node in {state.path} (pid {stopped.pid}) in {stopped.seconds:.2f} s\n")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    state = _state_dir(args)
    path = state.log_path
    if not path.exists():
        raise CliError(f"no log in {state.path}: `murmur node start` writes {path.name} there")
    with open(path, "rb") as fh:
        _write("".join(line + "\n" for line in tail_lines(fh, args.lines)))
        if args.follow:
            try:
                follow(fh, path, _write)
            except KeyboardInterrupt:
                return EXIT_OK  # Ctrl-C is how one stops following
    return EXIT_OK


def _api_url(args: argparse.Namespace) -> str:
    if args.api:
        return _checked_api_url(str(args.api))
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else _config(args).node.data_dir
    state = StateDir(data_dir)
    info = state.read_api_info()
    if not _pid_alive(info.pid):
        raise CliError(f"the node (pid {info.pid}) in {data_dir} is not running; {state.api_path} is stale")
    return info.url


def _seconds(text: str) -> float:
    """A ``--timeout``: a finite number of seconds > 0 (aiohttp reads 0 as
    no limit at all: ``node health --timeout 0`` waited forever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _checked_api_url(text: str) -> str:
    """``--api`` as given, if it is an http(s) URL with a host and a valid
    port: aiohttp's own errors for 127.0.0.1:5001 (no scheme) or port 99999
    came out as tracebacks."""
    parsed = urllib.parse.urlsplit(text)
    try:
        port_ok = parsed.port is None or parsed.port > 0
    except ValueError:
        port_ok = False
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not port_ok:
        raise CliError(f"--api must be a URL such as http://127.0.0.1:5001, got {text!r}")
    return text.rstrip("/")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


async def _get_json(base: str, path: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    return (await _request(base, path, timeout_s))[1]


async def _request(base: str, path: str, timeout_s: float = HTTP_TIMEOUT_S,
                   accept: tuple[int, ...] = (200,)) -> tuple[int, Any]:
    """(HTTP status, JSON body) of ``GET base+path``; a status not in ``accept`` is a CliError."""
    import aiohttp  # late: half of the CLI's start-up time, and only the API clients need it

    url = f"{base}{path}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                if resp.status not in accept:
                    raise CliError(f"{url}: HTTP {resp.status}")
                return resp.status, await resp.json()
    except aiohttp.ClientConnectionError as exc:
        raise CliError(f"cannot reach the node API at {base} ({exc}); is the node running?") from exc
    except aiohttp.InvalidURL as exc:
        raise CliError(f"{url}: not a URL the API can be reached at ({exc})") from exc
    except (aiohttp.ContentTypeError, json.JSONDecodeError) as exc:
        raise CliError(f"{url}: not a murmur API (bad JSON)") from exc
    except asyncio.TimeoutError as exc:
        raise CliError(f"{url}: no answer within {timeout_s:g}s") from exc


def _output(args: argparse.Namespace) -> Output:
    """``--output``, else human on a terminal and JSON into a pipe or file."""
    if args.output is not None:
        return Output(args.output)
    return Output.HUMAN if sys.stdout.isatty() else Output.JSON


def _show(args: argparse.Namespace, path: str, shape: type, render: Callable[[Any], str]) -> int:
    """GET an API document and print it rendered for a person, or as JSON
    (piped, --output json, or a document of an unexpected shape)."""
    document = run_async(_get_json(_api_url(args), path))
    if _output(args) is Output.HUMAN and isinstance(document, shape):
        _write(render(document))
    else:
        _print_json(document)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    return _show(args, "/status", dict, render_status)


def cmd_peers(args: argparse.Namespace) -> int:
    return _show(args, "/peers", list, render_peers)


def cmd_node_health(args: argparse.Namespace) -> int:
    """Exit 0 while the node answers /healthz 200, else 1, with one line
    either way: what a container HEALTHCHECK or a monitor runs (no curl needed)."""
    code, health = run_async(_request(_api_url(args), "/healthz", args.timeout, accept=(200, 503)))
    if code == 200:
        _write("healthy\n")
        return EXIT_OK
    failed = health.get("failed_tasks") if isinstance(health, dict) else None
    detail = "; ".join(f"{f.get('task')} {f.get('state')}: {f.get('error')}" for f in failed or [] if isinstance(f, dict))
    raise CliError(f"unhealthy: {detail or health}")


def cmd_completion(args: argparse.Namespace) -> int:
    _write(completion_script(Shell(args.shell), build_parser(), PROG))
    return EXIT_OK


def cmd_config_default(_args: argparse.Namespace) -> int:
    _write(default_config_text())
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """What ``node start`` would refuse, refused here (the ports included:
    a port in use now is one the node could not listen on now), the trainer
    built as the daemon builds it (its data loaded, its model's fit checked)."""
    _print_json(config_to_dict(_config(args, preflight.check_node, preflight.check_trainer_builds)))
    return EXIT_OK


def cmd_testnet_run(args: argparse.Namespace) -> int:
    run_testnet = load_entry(*TESTNET_ENTRY, what="run the testnet")
    return _call_entry(run_testnet, args)


def cmd_testnet_compare(args: argparse.Namespace) -> int:
    run_compare = load_entry(*COMPARE_ENTRY, what="compare testnet runs")
    return _call_entry(run_compare, args)


# -------------------------------------------------------------------- parser


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped, examples (text with line breaks) as written;
    every option with a default names it (flags that default to off, and
    options without one, do not)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default is not argparse.SUPPRESS
                and "default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
             examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose help has a description and examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=HelpFormatter)


def _group(sub: argparse._SubParsersAction, name: str, summary: str, dest: str) -> argparse._SubParsersAction:
    p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
    return p.add_subparsers(dest=dest, required=True, metavar="ACTION")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="node config file (TOML); defaults apply without one")
    p.add_argument("--data-dir", metavar="DIR", help="state directory (overrides node.data_dir, default ~/.murmur)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any option, e.g. learning.rounds=5; a list option takes one item per --set "
                        "(--set node.listen=/ip4/0.0.0.0/tcp/4731) or a TOML list")


def _add_node_config_args(p: argparse.ArgumentParser) -> None:
    """Every option that changes the config ``node start`` runs with, declared
    once for it and for ``config check``: a user checks exactly the command
    line they will start (``--trainer X`` was a usage error in ``config check``)."""
    _add_config_args(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/4731 (default: node.listen)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="bootstrap peer (repeatable)")
    p.add_argument("--api-port", type=int, metavar="PORT", help="status API port on 127.0.0.1 (default: api.port, 0 = any)")
    p.add_argument("--trainer", metavar="SPEC", help="trainer name or package.module:Class (default: learning.trainer)")
    p.add_argument("--log-level", choices=[v.value for v in LogLevel], help="log level (default: node.log_level)")
    p.add_argument("--log-format", choices=[v.value for v in LogFormat],
                   help="log lines as text or JSON, on stderr and in murmur.log (default: node.log_format)")


def _add_state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="node config file, to find its data dir")
    p.add_argument("--data-dir", metavar="DIR", help="state dir of the node (default: the config's node.data_dir)")


def _add_api_args(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="node config file, to find its data dir")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", metavar="DIR", help="state dir of the running node (its api.json says where the API is)")
    where.add_argument("--api", metavar="URL", help="API base URL, e.g. http://127.0.0.1:5001")
    if not output:
        return
    p.add_argument("--output", "-o", choices=[o.value for o in Output],
                   help="human: labelled lines with units; json: the API's answer as is "
                        "(default: human on a terminal, json otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="murmur: peer-to-peer decentralized learning node",
        epilog=f"`{PROG} COMMAND --help` describes each command, with examples.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "id", "print this node's peer id and addresses (creates the identity if missing)",
                 "Print the node's peer id, public key and addresses as JSON (like `ipfs id`). Creates the "
                 "identity in the data dir if there is none; asks a running node for its actual addresses.",
                 [f"{PROG} id --data-dir ~/.murmur"])
    _add_config_args(p)
    p.set_defaults(handler=cmd_id)

    node = _group(sub, "node", "run or stop the node daemon", "node_command")
    p = _command(node, "start", "start the daemon in the foreground",
                 "Run the node daemon in the foreground until SIGINT/SIGTERM (`murmur node stop`). It logs to "
                 "stderr and to murmur.log in its data dir (`murmur logs`). Any problem with the config is one "
                 "line and exit code 2 before a port is bound.",
                 [f"{PROG} node start --config node.toml",
                  f"{PROG} node start --listen /ip4/0.0.0.0/tcp/4731 --bootstrap /ip4/192.0.2.7/tcp/4731/p2p/12D3KooW...",
                  f"{PROG} node start --set learning.rounds=0 --set privacy.enabled=true"])
    _add_node_config_args(p)
    p.set_defaults(handler=cmd_node_start)

    p = _command(node, "stop", "stop a running daemon gracefully",
                 "Send SIGTERM to the daemon whose state dir this is (the pid in node.pid, checked against the "
                 "state dir's lock) and wait until it has said goodbye to its peers, written its checkpoint and "
                 "exited. Exit code 1 when no node runs there or it does not stop in time.",
                 [f"{PROG} node stop --data-dir ~/.murmur", f"{PROG} node stop --config node.toml --timeout 60"])
    _add_state_args(p)
    p.add_argument("--timeout", type=_seconds, default=STOP_TIMEOUT_S, metavar="SECONDS",
                   help="how long to wait for the daemon to exit")
    p.set_defaults(handler=cmd_node_stop)

    p = _command(node, "health", "exit 0 if the running node is healthy, else 1",
                 "Ask the node's /healthz: exit 0 and print `healthy` while every supervised task runs, else exit "
                 "1 with what failed (also when the node does not answer). For container health checks and "
                 "monitors; needs no curl.",
                 [f"{PROG} node health --data-dir /var/lib/murmur"])
    _add_api_args(p, output=False)
    p.add_argument("--timeout", type=_seconds, default=HEALTH_TIMEOUT_S, metavar="SECONDS",
                   help="how long to wait for an answer")
    p.set_defaults(handler=cmd_node_health)

    p = _command(sub, "status", "status of a running node",
                 "Ask a running node's local API for its status: peers, rounds against the target, accuracy, "
                 "ε spent against the budget, traffic, health.",
                 [f"{PROG} status --data-dir ~/.murmur", f"{PROG} status --api http://127.0.0.1:5001 --output json"])
    _add_api_args(p)
    p.set_defaults(handler=cmd_status)

    p = _command(sub, "peers", "peers of a running node",
                 "Every peer the node knows: whether it is connected, a learning neighbour, and its score.",
                 [f"{PROG} peers --data-dir ~/.murmur", f"{PROG} peers --data-dir ~/.murmur -o json"])
    _add_api_args(p)
    p.set_defaults(handler=cmd_peers)

    p = _command(sub, "logs", "print (and follow) the daemon's log",
                 "Print the end of murmur.log in the node's state dir; with --follow, keep printing what it "
                 "writes, across log rotations, until Ctrl-C.",
                 [f"{PROG} logs --data-dir ~/.murmur", f"{PROG} logs -f -n 0 --config node.toml"])
    _add_state_args(p)
    p.add_argument("--lines", "-n", type=int, default=LOG_LINES, metavar="N", help="last N lines (0: all)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.set_defaults(handler=cmd_logs)

    config = _group(sub, "config", "inspect configuration", "config_command")
    p = _command(config, "default", "print the documented default config",
                 "Print every option with its default and what it does, as a TOML file to start from.",
                 [f"{PROG} config default > node.toml"])
    p.set_defaults(handler=cmd_config_default)
    p = _command(config, "check", "validate a config as node start would and print it resolved (JSON)",
                 "Check a config as `node start` would, with the same options (schema, trainer, options, device, data dir, ports; the trainer is "
                 "built, its data loaded and its model run on two examples) "
                 "and print it resolved as JSON; a problem is one line naming the file, line and key.",
                 [f"{PROG} config check --config node.toml", f"{PROG} config check --set learning.codec=int8",
                  f"{PROG} config check --trainer mnist-cnn --listen /ip4/0.0.0.0/tcp/4731"])
    _add_node_config_args(p)
    p.set_defaults(handler=cmd_config_check)

    testnet = _group(sub, "testnet", "local testnets", "testnet_command")
    p = _command(testnet, "run", "run a testnet scenario",
                 "Start a scenario's nodes on this machine, drive its churn, serve a live dashboard, and write "
                 "a report (index.html, PNG plots and the CSV behind each) to the run directory.",
                 [f"{PROG} testnet run", f"{PROG} testnet run my.toml --nodes-per-process 8 --out runs/mine"])
    add_testnet_run_arguments(p)  # declared once, for `python -m murmur.testnet.cli` too
    p.set_defaults(handler=cmd_testnet_run)
    p = _command(testnet, "compare", "overlay the reports of several runs on one page",
                 "Overlay the metric over rounds, over bytes on the wire and over time of several testnet runs "
                 "(their network means), and tabulate their summaries: a codec, an aggregator or a privacy "
                 "setting judged side by side.",
                 [f"{PROG} testnet compare runs/fp32 runs/fp16 --out runs/fp32-vs-fp16"])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories of `murmur testnet run` (each has report/summary.json)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where to write the comparison (default: reports/compare-<time>)")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="a name per run, in order (default: each run directory's name)")
    p.set_defaults(handler=cmd_testnet_compare)

    p = _command(sub, "completion", "print a shell completion script",
                 "Print a completion script for bash or zsh, generated from this command's own options.",
                 [f'eval "$({PROG} completion bash)"   # in ~/.bashrc',
                  f'eval "$({PROG} completion zsh)"    # in ~/.zshrc'])
    p.add_argument("shell", choices=[sh.value for sh in Shell])
    p.set_defaults(handler=cmd_completion)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (StateDamaged, StateInUse) as exc:  # the operator must act (restore a file, stop a daemon), as with a bad config
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainerCrashed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_TRAINER
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
