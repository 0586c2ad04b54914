"""What a user can get wrong is one line on stderr and exit code 2, before a port is bound.

Real ``murmur`` processes, as a user runs them: ``node start``, ``config
check`` and ``id`` against unknown or ill-typed names and options, a device the
machine lacks, a plug-in that cannot be imported, a port in use, a data dir
that cannot be written. ``node start`` must refuse before it listens: every
case here would otherwise leave a daemon running (or a traceback), which the
timeout turns into a failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MURMUR = Path(sys.executable).with_name("murmur")
TIMEOUT_S = 60  # far beyond a refusal (a torch import), far below a daemon that started anyway
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141
LOOPBACK_ANY_PORT = 'node.listen=["/ip4/127.0.0.1/tcp/0"]'  # never the default 4731: it may be taken here
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24


def murmur(*args: str, cwd: Path | None = None, preexec_fn: Callable[[], None] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MURMUR), *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                          preexec_fn=preexec_fn)


def refused(proc: subprocess.CompletedProcess[str], prefix: str, *fragments: str) -> str:
    """The one stderr line of a config refusal (exit 2, nothing on stdout)."""
    assert proc.returncode == EXIT_CONFIG, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"murmur: config error: {prefix}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port somebody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["learning.trainer=nope"], "learning.trainer", "unknown trainer 'nope'"),
        (["learning.aggregator=meen"], "learning.aggregator", "unknown aggregator 'meen'; known: "),
        (["learning.trainer_options.lrr=1"], "learning.trainer_options",
         "unknown trainer 'digits-mlp' option(s) lrr; valid: "),
        (["learning.trainer_options.batch_size=2.5"], "learning.trainer_options", "option batch_size must be int"),
        (["learning.aggregator=krum", "learning.aggregator_options.f=x"], "learning.aggregator_options",
         "aggregator 'krum' option f must be int, got str 'x'"),
        (["learning.aggregator=krum", "learning.aggregator_options.g=1"], "learning.aggregator_options",
         "unknown aggregator 'krum' option(s) g"),
        (["learning.trainer=nomod:Trainer"], "learning.trainer", "cannot import module 'nomod'"),
        (["learning.device=cuda:99"], "learning.device", "device 'cuda:99' requested but"),
        (["learning.trainer=digits-mlp:Nope"], "learning.trainer", "cannot import module 'digits-mlp'"),
        # names are checked when learning is off too: switching it on must not reveal a typo
        (["learning.enabled=false", "learning.trainer=nope"], "learning.trainer", "unknown trainer 'nope'"),
        (["learning.enabled=false", "learning.aggregator=meen"], "learning.aggregator", "unknown aggregator"),
        (["learning.mode=gossip", "privacy.enabled=true"], "privacy.enabled", 'needs learning.mode = "dsgd"'),
        # passed config check, then node start refused them
        (["privacy.enabled=true", "privacy.level=example"], "privacy.level",
         '"example" needs one DP-SGD step per round: learning.local_steps = 1'),
        (["node.listen=/ip4/10.99.99.99/tcp/0"], "node.listen", "no such address on this machine"),
    ],
)
def test_config_check_refuses_what_the_node_could_not_run(tmp_path: Path, overrides: list[str], key: str,
                                                           fragment: str) -> None:
    proc = murmur("config", "check", "--data-dir", str(tmp_path), *_sets(LOOPBACK_ANY_PORT, *overrides))
    refused(proc, f"<command line>: {key}: ", fragment)


@pytest.mark.parametrize(
    ("section", "line", "key", "fragment"),
    [
        ('[learning]\ntrainer = "digits-mpl"\n', 2, "learning.trainer", "unknown trainer 'digits-mpl'"),
        ('[learning]\naggregator = "sybilwal"\n', 2, "learning.aggregator", "unknown aggregator 'sybilwal'"),
        ("[learning]\ndevice = 'cuda:99'\n", 2, "learning.device", "device 'cuda:99'"),
        ("[learning]\nrounds = 3\n\n[learning.trainer_options]\nlr = 'fast'\n", 4, "learning.trainer_options",
         "option lr must be float"),
        ("[learning]\naggregator = 'trimmed_mean'\naggregator_options = { beta = 0.7 }\n", 3,
         "learning.aggregator_options", "beta"),
    ],
)
def test_node_start_refuses_with_file_line_and_key(tmp_path: Path, section: str, line: int, key: str,
                                                    fragment: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(section)
    proc = murmur("node", "start", "--config", str(config), "--data-dir", str(tmp_path / "state"),
                  "--listen", "/ip4/127.0.0.1/tcp/0")
    refused(proc, f"{config}:{line}: {key}: ", fragment)
    assert not (tmp_path / "state" / "node.pid").exists()  # refused before the node took its state dir


def test_port_in_use_is_one_line(tmp_path: Path, listener: int) -> None:
    proc = murmur("node", "start", "--data-dir", str(tmp_path), "--listen", f"/ip4/127.0.0.1/tcp/{listener}")
    refused(proc, "<command line>: node.listen: ", f"cannot listen on /ip4/127.0.0.1/tcp/{listener}",
            f"port {listener} is already in use")
    config = tmp_path / "node.toml"
    config.write_text(f"[api]\nport = {listener}\n")
    proc = murmur("node", "start", "--config", str(config), "--data-dir", str(tmp_path), "--listen",
                  "/ip4/127.0.0.1/tcp/0")
    refused(proc, f"{config}:2: api.port: ", "already in use")
    proc = murmur("config", "check", "--data-dir", str(tmp_path), "--listen", f"/ip4/127.0.0.1/tcp/{listener}")
    refused(proc, "<command line>: node.listen: ", "already in use")  # the flags of `node start`, checked
    proc = murmur("config", "check", "--data-dir", str(tmp_path), *_sets(f'node.listen=["/ip4/127.0.0.1/tcp/{listener}"]'))
    refused(proc, "<command line>: node.listen: ", "already in use")


def test_trainer_that_cannot_load_its_data_is_one_line(tmp_path: Path) -> None:
    """Past the checks, the node builds its trainer before it listens: a data
    set that is not there is still one line, and no log of a node that never ran."""
    missing = tmp_path / "no-mnist"
    proc = murmur("node", "start", "--data-dir", str(tmp_path / "state"), "--listen", "/ip4/127.0.0.1/tcp/0",
                  *_sets("learning.trainer=mnist-cnn", f'learning.trainer_options.data_dir="{missing}"'))
    refused(proc, f"{missing}: missing train-images-idx3-ubyte")


def _without_root_override() -> None:
    """``preexec_fn``: a root test process would write anywhere; drop the
    capabilities that let it ignore permission bits (the child then obeys
    them as any user does). A no-op for other users."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    path.mkdir(mode=0o500)
    probe = subprocess.run([sys.executable, "-c", f"open({str(path / 'probe')!r}, 'w')"], preexec_fn=_without_root_override,
                           capture_output=True)
    if probe.returncode == 0:
        path.chmod(0o700)
        pytest.skip("this process can write to a read-only directory (no way to drop the privilege)")
    yield path
    path.chmod(0o700)


def test_read_only_data_dir_is_one_line(read_only_dir: Path) -> None:
    fragment = f"{read_only_dir} is not writable (permission denied)"
    start = murmur("node", "start", "--data-dir", str(read_only_dir), "--listen", "/ip4/127.0.0.1/tcp/0",
                   preexec_fn=_without_root_override)
    refused(start, "<command line>: node.data_dir: ", fragment)
    ident = murmur("id", "--data-dir", str(read_only_dir), preexec_fn=_without_root_override)
    refused(ident, "<command line>: node.data_dir: ", fragment)
    below = murmur("id", "--data-dir", str(read_only_dir / "sub"), preexec_fn=_without_root_override)
    refused(below, "<command line>: node.data_dir: ", f"cannot be created: {read_only_dir} is not writable")
    check = murmur("config", "check", "--data-dir", str(read_only_dir), *_sets(LOOPBACK_ANY_PORT),
                   preexec_fn=_without_root_override)
    refused(check, "<command line>: node.data_dir: ", fragment)


def test_data_dir_below_a_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = murmur("id", "--data-dir", str(blocker / "state"))
    refused(proc, "<command line>: node.data_dir: ", f"cannot be created: {blocker} is not a directory")


USER_TRAINER = '''
from functools import cache

import numpy as np
from torch import nn

from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchTrainer


@cache
def my_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=120)
    x = (rng.normal(size=(120, 2)) + 3.0 * np.eye(3, 2)[y]).astype(np.float32)
    return ArrayDataset(x[:100], y[:100], x[100:], y[100:], num_classes=3)


class MyTrainer(TorchTrainer):
    outputs = 3

    def load_dataset(self):
        return my_data()

    def build_model(self, dataset):
        return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, self.outputs))


class TwoOutputs(MyTrainer):
    outputs = 2  # three classes


class NoData(MyTrainer):
    def load_dataset(self):
        return np.load("no-such-data.npz")


class Chatty(MyTrainer):
    def load_dataset(self):
        print("loading my data")
        return my_data()
'''


@pytest.mark.parametrize(
    ("trainer", "config", "fragment"),
    [
        ("TwoOutputs", "", "has shape (2, 2); expected (2, 3): one logit per class"),
        ("NoData", "", "could not be built: FileNotFoundError"),
        ("MyTrainer", "num_nodes = 500\n", "node.toml:4: learning.num_nodes: 100 training samples cannot fill 500"),
    ],
)
def test_config_check_builds_the_trainer_as_node_start_does(tmp_path: Path, trainer: str, config: str,
                                                          fragment: str) -> None:
    """A user's trainer that fails to build (its data file missing), whose
    model does not fit its data, or whose data cannot fill learning.num_nodes
    passed `config check` (exit 0) and was refused only by `node start`:
    both now refuse it with the same line and exit code 2."""
    (tmp_path / "mymod.py").write_text(USER_TRAINER)
    path = tmp_path / "node.toml"
    path.write_text(f'[learning]\ntrainer = "mymod:{trainer}"\nnode_index = 1\n{config}')
    args = ("--config", str(path), "--data-dir", str(tmp_path / "state"))
    check = refused(murmur("config", "check", *args, *_sets(LOOPBACK_ANY_PORT), cwd=tmp_path), "", fragment)
    start = refused(murmur("node", "start", *args, "--listen", "/ip4/127.0.0.1/tcp/0", cwd=tmp_path), "", fragment)
    assert check == start
    ok = murmur("config", "check", *args, *_sets(LOOPBACK_ANY_PORT, "learning.trainer=mymod:Chatty",
                                                 "learning.num_nodes=2"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["learning"]["trainer"] == "mymod:Chatty"  # what the user's code printed
    assert ok.stderr == "loading my data\n"  # is on stderr, out of the JSON


PLUGIN = '''
from dataclasses import dataclass

from murmur.learning.trainers.digits import DigitsMLPTrainer, DigitsOptions


@dataclass(frozen=True)
class MyOptions(DigitsOptions):
    width: int = 3


class MyTrainer(DigitsMLPTrainer):
    Options = MyOptions
'''


def test_plugin_trainer_is_found_in_the_working_directory(tmp_path: Path) -> None:
    """``mymod:MyTrainer`` next to the user, without PYTHONPATH=.; its options
    are checked against its own Options class."""
    (tmp_path / "mymod.py").write_text(textwrap.dedent(PLUGIN))
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "").split(os.pathsep)
    args = ("config", "check", "--data-dir", str(tmp_path / "state"),
            *_sets(LOOPBACK_ANY_PORT, "learning.trainer=mymod:MyTrainer"))
    ok = murmur(*args, *_sets("learning.trainer_options.width=4"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert '"width": 4' in ok.stdout and ok.stderr == ""
    refused(murmur(*args, *_sets("learning.trainer_options.width=4.5"), cwd=tmp_path),
            "<command line>: learning.trainer_options: ", "trainer 'mymod:MyTrainer' option width must be int")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused(murmur(*args, cwd=elsewhere), "<command line>: learning.trainer: ",
            "cannot import module 'mymod'", f"working directory {elsewhere}")
    (tmp_path / "broken.py").write_text("def oops(:\n")
    refused(murmur(*args[:-1], "learning.trainer=broken:MyTrainer", cwd=tmp_path),
            "<command line>: learning.trainer: ", "importing module 'broken'", "SyntaxError")


@pytest.mark.parametrize("command", [["config", "default"], ["config", "check", *_sets(LOOPBACK_ANY_PORT)]])
def test_closed_stdout_is_a_quiet_exit(tmp_path: Path, command: list[str]) -> None:
    """``murmur config check | head``: the reader leaves early; no traceback,
    the exit status of a process killed by SIGPIPE."""
    proc = subprocess.Popen([str(MURMUR), *command, "--data-dir", str(tmp_path)] if command[1] == "check"
                            else [str(MURMUR), *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child (still importing) writes a byte
    err = proc.stderr.read()
    assert proc.wait(TIMEOUT_S) == EXIT_BROKEN_PIPE, err.decode()[-2000:]
    assert err == b""


def test_state_dir_another_daemon_holds_is_exit_2(tmp_path: Path) -> None:
    """A second ``node start`` on a state dir whose lock another daemon holds
    (one started by hand, one by systemd) exited 1, which the unit
    (``Restart=on-failure``, ``RestartPreventExitStatus=2 3``) restarted every
    5 s for ever, each try importing torch again (2.5 s of CPU) to fail the
    same way. systemd stops a unit's old process before it starts the new one,
    so the holder is never the unit's own: exit 2, which it leaves stopped."""
    from murmur.node.state import StateDir

    with StateDir(tmp_path / "state"):  # the real flock a running daemon holds
        proc = murmur("node", "start", "--data-dir", str(tmp_path / "state"), *_sets(LOOPBACK_ANY_PORT, "api.port=0"))
    assert proc.returncode == EXIT_CONFIG, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.splitlines() == [f"murmur: state dir {tmp_path / 'state'} is in use by another murmur daemon "
                                        f"(pid {os.getpid()}); stop it or choose another --data-dir"]
    unit = (Path(__file__).parents[2] / "deploy" / "murmur.service").read_text()
    assert f"RestartPreventExitStatus={EXIT_CONFIG} " in unit
