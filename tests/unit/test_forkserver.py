"""The fork server with real processes: children forked from it keep every
guarantee the supervisor gives the processes it starts itself (own session,
logs, exit codes, kill -9, graceful stop, nothing outliving the controller)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from murmur.testnet.forkserver import ForkServer, ForkServerError
from murmur.testnet.procs import Supervisor
from tests.signals import default_sigint
from tests.unit.test_procs import EXIT_WAIT_S, SLEEPER, _await_exit, _exists, _starttime, _wait_for_line

ROOT = Path(__file__).resolve().parents[2]
FORKEE = "tests.forkee"


def _env() -> dict[str, str]:
    """The children's environment, taken once: the server forks only for the
    environment it was started in (pytest changes PYTEST_CURRENT_TEST per phase)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


ENV = _env()


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", FORKEE, *args]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture(scope="module")
def started_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """One server for the module's tests (it costs an interpreter start)."""
    server = ForkServer(FORKEE, env=ENV, log_path=tmp_path_factory.mktemp("fs") / "forkserver.log")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sup(tmp_path: Path, started_server: ForkServer) -> Iterator[Supervisor]:
    with Supervisor(tmp_path, grace_s=2.0) as supervisor:
        supervisor.fork_server = started_server
        yield supervisor
        supervisor.fork_server = None  # the module's server outlives this supervisor


def test_forked_children_get_own_session_logs_and_exit_codes(sup: Supervisor, started_server: ForkServer) -> None:
    child = sup.start("n", _argv("exit", "3", "first"), env=ENV)
    assert _ppid(child.pid) == started_server.pid  # forked, not exec'd by us
    assert child.wait(EXIT_WAIT_S) == 3
    sup.start("n", _argv("exit", "0", "second"), env=ENV).wait(EXIT_WAIT_S)
    text = (sup.log_dir / "n.log").read_text()
    assert text.count("to-stderr") == 2
    assert [line for line in text.splitlines() if line.startswith("to-stdout")] == ["to-stdout first", "to-stdout second"]


def test_only_its_own_module_in_its_own_environment_is_forked(sup: Supervisor, started_server: ForkServer) -> None:
    assert _ppid(sup.start("plain", SLEEPER, env=ENV).pid) == os.getpid()
    assert _ppid(sup.start("other-env", _argv("sleep"), env={**ENV, "X": "1"}).pid) == os.getpid()
    forked = sup.start("forked", _argv("sleep"), env=ENV)
    assert _ppid(forked.pid) == started_server.pid
    assert os.getpgid(forked.pid) == forked.pid != os.getpgid(started_server.pid)


def test_crash_is_sigkill_and_the_pid_is_held_until_reaped(sup: Supervisor) -> None:
    child = sup.start("n", _argv("sleep"), env=ENV)
    _wait_for_line(child.log_path, "ready")
    os.kill(child.pid, signal.SIGKILL)
    assert _await_exit(child.pid)
    assert _state(child.pid) == "Z"  # the server keeps it for us: killpg(pid) cannot hit a stranger
    assert child.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{child.pid}").exists()
    other = sup.start("m", _argv("sleep"), env=ENV)
    assert other.crash() == -signal.SIGKILL and not other.alive()


def test_stop_is_graceful_or_escalates(sup: Supervisor) -> None:
    graceful = sup.start("g", _argv("graceful"), env=ENV)
    stubborn = sup.start("s", _argv("stubborn"), env=ENV)
    _wait_for_line(graceful.log_path, "ready")
    _wait_for_line(stubborn.log_path, "ready")
    assert graceful.stop(grace_s=5.0) == 0
    assert stubborn.stop(grace_s=0.3) == -signal.SIGKILL


def test_a_failing_main_leaves_its_traceback_and_exit_1(sup: Supervisor) -> None:
    raising = sup.start("r", _argv("raise"), env=ENV)
    assert raising.wait(EXIT_WAIT_S) == 1
    assert "forkee failed on purpose" in raising.log_path.read_text()
    message = sup.start("m", _argv("exit-message"), env=ENV)
    assert message.wait(EXIT_WAIT_S) == 1
    assert "leaving with a message" in message.log_path.read_text()


async def test_external_kill_9_is_observed_without_blocking(sup: Supervisor) -> None:
    child = sup.start("n", _argv("sleep"), env=ENV)
    waiter = asyncio.ensure_future(child.wait_async())
    await asyncio.sleep(0)  # let the waiter register its pidfd before the kill
    assert not waiter.done()
    os.kill(child.pid, signal.SIGKILL)
    assert await asyncio.wait_for(waiter, EXIT_WAIT_S) == -signal.SIGKILL


def test_stop_all_sends_each_child_one_sigterm(sup: Supervisor) -> None:
    """A second SIGTERM during a graceful exit lands in the child's shutdown
    (a handler raising SystemExit raised again there, and the exit code of a
    graceful stop read 1): stop_all signals once, then only waits."""
    counter = sup.start("c", _argv("count-terms"), env=ENV)
    _wait_for_line(counter.log_path, "ready")
    assert sup.stop_all()["c"] == 1


def test_closing_the_supervisor_stops_children_then_the_server(tmp_path: Path) -> None:
    server = ForkServer(FORKEE, env=ENV, log_path=tmp_path / "forkserver.log")
    with Supervisor(tmp_path, grace_s=2.0, fork_server=server) as sup:
        server.start()
        assert server.pid is not None
        server_pid, server_start = server.pid, _starttime(server.pid)
        child = sup.start("g", _argv("graceful"), env=ENV)
        _wait_for_line(child.log_path, "ready")
        pid, start = child.pid, _starttime(child.pid)
    assert child.returncode == 0  # stopped gracefully, before the server went
    assert not _exists(pid, start) and not _exists(server_pid, server_start)
    with pytest.raises(ForkServerError, match="closed"):
        server.spawn(["sleep"], tmp_path / "late.log")


def test_a_server_that_cannot_import_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    server = ForkServer("tests.no_such_module_xyz", env=ENV, log_path=tmp_path / "forkserver.log")
    with pytest.raises(ForkServerError, match="did not start"):
        server.start(timeout=EXIT_WAIT_S)
    assert not server.ready
    assert "No module named" in (tmp_path / "forkserver.log").read_text()
    with Supervisor(tmp_path, fork_server=server) as sup:  # not ready: plain processes, as before
        assert _ppid(sup.start("plain", _argv("exit", "0"), env=ENV).pid) == os.getpid()


CONTROLLER = textwrap.dedent("""
    import sys, time
    from murmur.testnet.forkserver import ForkServer
    from murmur.testnet.procs import Supervisor
    from pathlib import Path
    env = {**__import__("os").environ}
    server = ForkServer("tests.forkee", env=env, log_path=Path(sys.argv[1]) / "forkserver.log")
    with Supervisor(sys.argv[1], grace_s=2.0, fork_server=server) as sup:
        server.start()
        child = sup.start("n", [sys.executable, "-m", "tests.forkee", "sleep"], env=env)
        print(server.pid, child.pid, flush=True)
        time.sleep(60)
""")


def test_a_killed_controller_takes_the_server_and_its_children(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=ENV, preexec_fn=default_sigint)
    assert proc.stdout is not None
    server_pid, child_pid = map(int, proc.stdout.readline().split())
    starts = [(pid, _starttime(pid)) for pid in (server_pid, child_pid)]
    proc.kill()  # no cleanup runs: PDEATHSIG, controller -> server -> child, must do it
    proc.wait(EXIT_WAIT_S)
    for pid, start in starts:
        assert _await_exit(pid), pid
        assert not _exists(pid, start), pid


def test_a_dead_server_takes_its_children_and_the_supervisor_carries_on(tmp_path: Path) -> None:
    server = ForkServer(FORKEE, env=ENV, log_path=tmp_path / "forkserver.log")
    with Supervisor(tmp_path, grace_s=2.0, fork_server=server) as sup:
        server.start()
        assert server.pid is not None
        child = sup.start("n", _argv("sleep"), env=ENV)
        _wait_for_line(child.log_path, "ready")
        os.kill(server.pid, signal.SIGKILL)  # e.g. the OOM killer
        assert child.wait(EXIT_WAIT_S) == -signal.SIGKILL  # PDEATHSIG; its zombie went to init
        again = sup.start("n", _argv("exit", "0"), env=ENV)  # the restart still happens
        assert _ppid(again.pid) == os.getpid() and again.wait(EXIT_WAIT_S) == 0
        assert not server.ready


def test_reaping_a_running_child_is_refused_not_waited_for(sup: Supervisor, started_server: ForkServer) -> None:
    child = sup.start("n", _argv("sleep"), env=ENV)
    with pytest.raises(ForkServerError, match="has not exited"):
        started_server.reap(child.pid)
    assert child.alive() and child.crash() == -signal.SIGKILL
