"""The murmur CLI: real processes for id/status/bad config; flag wiring; logging."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from murmur.node import cli
from murmur.node.api import StatusApi
from murmur.node.config import LogLevel, NodeConfig, load_config
from murmur.node.logs import ABSL_LOGGER, configure_logging
from murmur.node.metrics import NodeMetrics
from murmur.node.render import render_status
from murmur.node.state import ApiInfo, StateDir
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import Multiaddr

MURMUR = Path(sys.executable).with_name("murmur")
CLI_TIMEOUT_S = 60
#: `node start` checks its ports before it starts: in-process tests must not
#: depend on whether something on this machine holds the default 4731
_NO_DEFAULT_PORTS = ("--listen", "/ip4/127.0.0.1/tcp/0")


def murmur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MURMUR), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


async def amurmur(*args: str) -> tuple[int, str, str]:
    """The CLI as a real process, without blocking the loop serving the API."""
    proc = await asyncio.create_subprocess_exec(
        str(MURMUR), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_murmur_id_creates_identity_and_is_stable(tmp_path):
    data_dir = tmp_path / "state"
    listen = 'node.listen=["/ip4/127.0.0.1/tcp/4999"]'
    first = murmur("id", "--data-dir", str(data_dir), "--set", listen)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    peer = PeerId.from_string(doc["ID"])
    assert doc["ID"].startswith("12D3KooW")
    assert doc["Addresses"] == [f"/ip4/127.0.0.1/tcp/4999/p2p/{doc['ID']}"]
    assert doc["PublicKey"].startswith("CAESI")  # base64 of protobuf {Ed25519, 32 bytes}, as ipfs prints
    assert (data_dir / "identity.key").stat().st_mode & 0o777 == 0o600
    second = murmur("id", "--data-dir", str(data_dir))
    assert second.returncode == 0
    assert PeerId.from_string(json.loads(second.stdout)["ID"]) == peer
    other = murmur("id", "--data-dir", str(tmp_path / "other"))
    assert json.loads(other.stdout)["ID"] != doc["ID"]


def test_murmur_id_prints_dialable_addresses_for_a_wildcard_listener(tmp_path, capsys):
    """The default config listens on /ip4/0.0.0.0/tcp/4731, and `murmur id`
    (README: "peer id and addresses") printed that wildcard, which no other
    machine can dial, for users to hand out as a bootstrap address. It now
    prints what the node will advertise: this machine's interface addresses."""
    from murmur.protocol.addresses import advertised
    from murmur.protocol.multiaddr import Multiaddr

    assert cli.main(["id", "--data-dir", str(tmp_path), "--set", "node.listen=/ip4/0.0.0.0/tcp/4731"]) == 0
    doc = json.loads(capsys.readouterr().out)
    peer = PeerId.from_string(doc["ID"])
    assert doc["Addresses"] == [str(a) for a in advertised(Multiaddr("0.0.0.0", 4731, peer))]
    assert doc["Addresses"] and not [a for a in doc["Addresses"] if "/0.0.0.0/" in a]


def test_bad_config_exits_2_with_one_line(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node]\nlog_level = 'info'\n\n[transport]\nmax_frame = 12\n")
    proc = murmur("node", "start", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"murmur: config error: {config}:5: transport.max_frame: must be in [1024")


def test_set_takes_list_options_one_item_at_a_time(tmp_path, capsys):
    """`--set node.listen=/ip4/...` used to fail with "must be a list, got str"."""
    one, two = "/ip4/127.0.0.1/tcp/4999", "/ip4/127.0.0.1/tcp/5001"
    assert cli.main(["id", "--data-dir", str(tmp_path), "--set", f"node.listen={one}"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["Addresses"] == [f"{one}/p2p/{doc['ID']}"]
    assert cli.main(["id", "--data-dir", str(tmp_path), "--set", f"node.listen={one}",
                     "--set", f"node.listen={two}"]) == 0
    assert json.loads(capsys.readouterr().out)["Addresses"] == [f"{a}/p2p/{doc['ID']}" for a in (one, two)]
    # a TOML list still replaces whatever came before it
    assert cli.main(["id", "--data-dir", str(tmp_path), "--set", f"node.listen={one}",
                     "--set", f'node.listen=["{two}"]']) == 0
    assert json.loads(capsys.readouterr().out)["Addresses"] == [f"{two}/p2p/{doc['ID']}"]
    # a bad item is still one line naming it
    assert cli.main(["id", "--data-dir", str(tmp_path), "--set", "node.listen=nowhere"]) == 2
    assert capsys.readouterr().err.startswith("murmur: config error: <command line>: node.listen[0]: ")


def test_bad_flag_value_exits_2(capsys):
    assert cli.main(["id", "--set", "api.port=-1"]) == 2
    assert capsys.readouterr().err == "murmur: config error: <command line>: api.port: must be in [0, 65535], got -1\n"


async def test_status_and_peers_against_real_api_server(tmp_path):
    from tests.unit.test_api import TinyNode

    node = TinyNode()
    state = StateDir(tmp_path).create()
    async with StatusApi(node, NodeMetrics()) as api:
        state.write_api_info(ApiInfo(api.host, api.port, os.getpid(), str(node.identity.peer_id)))
        node.round = 42
        rc, out, err = await amurmur("status", "--data-dir", str(tmp_path))
        assert rc == 0, err
        status = json.loads(out)
        assert status["id"] == str(node.identity.peer_id)
        assert status["round"] == 42
        rc, out, err = await amurmur("peers", "--api", api.url)
        assert rc == 0, err
        assert [p["id"] for p in json.loads(out)] == [str(p.peer_id) for p in node.known]
        # `murmur id` asks the running node for its real addresses
        state.identity_path.write_bytes(node.identity.private_bytes())
        state.identity_path.chmod(0o600)
        rc, out, err = await amurmur("id", "--data-dir", str(tmp_path))
        assert rc == 0, err
        assert json.loads(out)["Addresses"] == [str(a) for a in node.addrs]
    rc, _, err = await amurmur("status", "--data-dir", str(tmp_path))
    assert rc == 1
    assert err.startswith("murmur: cannot reach the node API at http://127.0.0.1:") and err.count("\n") == 1


def test_status_without_node_or_with_stale_api_file(tmp_path, capsys):
    assert cli.main(["status", "--data-dir", str(tmp_path)]) == 1
    assert "no running node found" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    StateDir(tmp_path).write_api_info(ApiInfo("127.0.0.1", 9, dead.pid, "12D3KooWx"))
    assert cli.main(["status", "--data-dir", str(tmp_path)]) == 1
    assert f"(pid {dead.pid})" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["127.0.0.1:5001", "garbage", "http://127.0.0.1:99999", "ftp://127.0.0.1:5"])
def test_a_malformed_api_url_is_one_line(url, capsys):
    """aiohttp's errors for these came out as tracebacks."""
    for command in (["status"], ["peers"], ["node", "health"]):
        assert cli.main([*command, "--api", url]) == 1
        assert capsys.readouterr().err == f"murmur: --api must be a URL such as http://127.0.0.1:5001, got {url!r}\n"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_must_be_seconds_above_zero(value, capsys):
    """aiohttp reads a total of 0 as no limit: `node health --timeout 0` waited forever."""
    for command in (["node", "health"], ["node", "stop"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--timeout", value])
        assert exit_.value.code == 2 and "argument --timeout" in capsys.readouterr().err


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> None:
    """Install a stand-in for a module written elsewhere (daemon, testnet) to
    test only the CLI's side of the contract."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_node_start_passes_flags_as_typed_config(tmp_path, monkeypatch, restore_logging):
    seen: list[NodeConfig] = []

    def run_node(config: NodeConfig) -> int:
        seen.append(config)
        return 0

    _fake_module(monkeypatch, "murmur.node.daemon", run_node=run_node)
    config = tmp_path / "node.toml"
    config.write_text("[learning]\nrounds = 3\n[api]\nport = 8000\n")
    peer = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    rc = cli.main([
        "node", "start", "--config", str(config), "--data-dir", str(tmp_path / "d"),
        "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip6/::1/tcp/0",
        "--bootstrap", f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}", "--api-port", "0",
        "--bootstrap", f"/dns6/boot.example.org/tcp/4001/p2p/{peer}",
        "--bootstrap", f"/dns4/relay.example.org/tcp/4001/p2p/{peer}/p2p-circuit/p2p/{peer}",
        "--trainer", "mnist-cnn", "--log-level", "debug", "--set", "learning.seed=9",
    ])
    assert rc == 0
    (cfg,) = seen
    assert cfg.node.data_dir == tmp_path / "d"
    assert cfg.node.listen == (Multiaddr("127.0.0.1", 0), Multiaddr("::1", 0))
    assert [str(a.peer_id) for a in cfg.network.bootstrap] == [peer] * 3
    assert [(a.host, a.dns, a.is_circuit) for a in cfg.network.bootstrap] == [
        ("127.0.0.1", False, False), ("boot.example.org", True, False), ("relay.example.org", True, True)]
    assert (cfg.api.port, cfg.learning.trainer, cfg.learning.seed, cfg.learning.rounds) == (0, "mnist-cnn", 9, 3)
    assert cfg.node.log_level is LogLevel.DEBUG
    assert logging.getLogger().level == logging.DEBUG


def test_async_run_node_runs_on_uvloop(monkeypatch, restore_logging):
    loops: list[asyncio.AbstractEventLoop] = []

    async def run_node(config: NodeConfig) -> int:
        loops.append(asyncio.get_running_loop())
        return 3

    _fake_module(monkeypatch, "murmur.node.daemon", run_node=run_node)
    assert cli.main(["node", "start", *_NO_DEFAULT_PORTS]) == 3
    assert isinstance(loops[0], uvloop.Loop)


def test_missing_daemon_or_testnet_is_a_clear_error(monkeypatch, capsys, restore_logging):
    monkeypatch.setitem(sys.modules, "murmur.node.daemon", None)  # import fails as if absent
    assert cli.main(["node", "start", *_NO_DEFAULT_PORTS]) == 1
    assert capsys.readouterr().err == "murmur: cannot start the node: murmur.node.daemon is not available\n"
    monkeypatch.setitem(sys.modules, "murmur.testnet.cli", None)
    assert cli.main(["testnet", "run", "ring"]) == 1
    assert "cannot run the testnet: murmur.testnet.cli is not available" in capsys.readouterr().err
    _fake_module(monkeypatch, "murmur.node.daemon")  # present but without run_node
    assert cli.main(["node", "start", *_NO_DEFAULT_PORTS]) == 1
    assert "murmur.node.daemon has no run_node()" in capsys.readouterr().err


def test_testnet_run_passes_scenario(monkeypatch):
    got: list[Any] = []
    _fake_module(monkeypatch, "murmur.testnet.cli", run_testnet=lambda args: got.append(args) or 0)
    assert cli.main(["testnet", "run", "s.toml", "--nodes-per-process", "8", "--no-dashboard"]) == 0
    assert Path(got[0].scenario) == Path("s.toml")
    assert got[0].nodes_per_process == 8 and got[0].no_dashboard is True


def test_config_default_prints_loadable_defaults(tmp_path, capsys):
    assert cli.main(["config", "default"]) == 0
    path = tmp_path / "node.toml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path) == NodeConfig()
    assert cli.main(["config", "check", "--config", str(path), "--set", "learning.codec=int8"]) == 0
    assert json.loads(capsys.readouterr().out)["learning"]["codec"] == "int8"


def _options(parser: Any) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}


def test_config_check_takes_every_option_of_node_start(tmp_path, capsys):
    """A user checks the command line they will start: ``config check
    --trainer X`` was a usage error (exit 2) while ``node start --trainer X``
    ran. ``node start``'s options all change the config, so all of them are
    ``config check``'s, with what they set visible in the resolved config."""
    leaves = dict(_leaf_commands(cli.build_parser()))
    assert _options(leaves[("node", "start")]) <= _options(leaves[("config", "check")])
    assert cli.main(["config", "check", "--data-dir", str(tmp_path), *_NO_DEFAULT_PORTS, "--trainer", "digits-mlp",
                     "--bootstrap", "/ip4/192.0.2.7/tcp/4731/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp",
                     "--api-port", "0", "--log-level", "debug", "--log-format", "json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["learning"]["trainer"] == "digits-mlp"
    assert resolved["node"]["log_level"] == "debug" and resolved["node"]["log_format"] == "json"
    assert len(resolved["network"]["bootstrap"]) == 1


def test_json_logs_carry_extra_fields(restore_logging):
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    configure_logging("debug", "json", stream)  # a second call replaces, never duplicates
    log = logging.getLogger("murmur.test")
    log.info("delta accepted from %s", "peer", extra={"peer": "12D3KooWx", "round": 4, "path": Path("/x")})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("round failed", extra={"round": 5})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "delta accepted from peer" and first["level"] == "info"
    assert (first["logger"], first["peer"], first["round"], first["path"]) == ("murmur.test", "12D3KooWx", 4, "/x")
    assert first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_text_logs_are_readable_and_respect_level(restore_logging):
    stream = io.StringIO()
    configure_logging(LogLevel.WARNING, "text", stream)
    log = logging.getLogger("murmur.test")
    log.info("hidden")
    log.warning("peer dropped", extra={"peer": "12D3KooWx", "reason": "bad frame"})
    (line,) = stream.getvalue().splitlines()
    assert line.split(" ", 1)[1] == 'WARNING murmur.test: peer dropped peer=12D3KooWx reason="bad frame"'


def test_dp_accountings_convergence_notes_stay_out_of_the_log(restore_logging):
    """dp_accounting WARNs through absl whenever one Renyi order does not
    converge (every example-level start); its errors still get through."""
    stream = io.StringIO()
    configure_logging(LogLevel.INFO, "text", stream)
    absl = logging.getLogger(ABSL_LOGGER)
    try:
        absl.warning("_compute_log_a_frac failed to converge after 1000 iterations")
        absl.error("real trouble")
    finally:
        absl.setLevel(logging.NOTSET)
    (line,) = stream.getvalue().splitlines()
    assert "real trouble" in line


def _leaf_commands(parser: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _leaf_commands(sub, (*path, name))]


def test_every_command_has_a_description_an_example_and_its_defaults():
    leaves = _leaf_commands(cli.build_parser())
    assert {" ".join(p) for p, _ in leaves} >= {"id", "node start", "node stop", "status", "peers", "logs",
                                                "config default", "config check", "testnet run",
                                                "testnet compare", "completion"}
    for path, parser in leaves:
        text = parser.format_help()
        assert parser.description and len(parser.description) > 40, path
        assert "examples:\n  murmur " in text or "examples:\n  eval " in text, path
        for action in parser._actions:
            if action.option_strings and action.default is not None and action.default is not False \
                    and action.dest != "help":
                assert f"(default: {action.default})" in " ".join(text.split()), (path, action.dest)


async def test_node_health_exit_code_follows_healthz():
    from tests.unit.test_api import TinyNode

    node = TinyNode()
    async with StatusApi(node, NodeMetrics()) as api:
        rc, out, err = await amurmur("node", "health", "--api", api.url)
        assert (rc, out, err) == (0, "healthy\n", "")
        node.failed_tasks = [{"task": "rounds", "state": "crashed", "error": "TrainerError: boom"}]
        rc, out, err = await amurmur("node", "health", "--api", api.url)
        assert (rc, out) == (1, "") and err == "murmur: unhealthy: rounds crashed: TrainerError: boom\n"
    rc, _, err = await amurmur("node", "health", "--api", api.url, "--timeout", "1")
    assert rc == 1 and err.startswith("murmur: cannot reach the node API")


def test_status_for_a_person_says_how_reachable_the_node_is():
    observed = "/ip4/198.18.1.1/tcp/4731"
    behind = {"reachability": {"state": "private", "basis": "autonat", "observed": [observed], "observers": 5}}
    lines = [" ".join(line.split()) for line in render_status(behind).splitlines()]
    assert f"reachability private (autonat); peers see it at {observed}" in lines
    # an older node that does not say: a dash, never a crash
    assert "reachability – (–)" in [" ".join(line.split()) for line in render_status({}).splitlines()]
