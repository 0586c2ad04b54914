"""Process supervision with real child processes (the emulated internet's
command lines are in test_internet.py)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from murmur.testnet.procs import Supervisor
from tests.signals import default_sigint

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
EXIT_WAIT_S = 10.0


def _exists(pid: int, starttime: str) -> bool:
    """pid is alive and is still the same process (not a reused pid), not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == starttime and fields[0] != "Z"


def _starttime(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _await_exit(pid: int, timeout: float = EXIT_WAIT_S) -> bool:
    """Block on a pidfd until ``pid`` (not necessarily our child) exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def test_children_get_own_session_and_logs(tmp_path: Path) -> None:
    code = "import sys; print('to-stdout', flush=True); print('to-stderr', file=sys.stderr, flush=True)"
    with Supervisor(tmp_path) as sup:
        child = sup.start("node0", [sys.executable, "-c", code])
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert child.wait(EXIT_WAIT_S) == 0
    text = (tmp_path / "node0.log").read_text()
    assert "to-stdout" in text and "to-stderr" in text


def test_restart_appends_to_the_same_log(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start("n", [sys.executable, "-c", "print('first')"]).wait(EXIT_WAIT_S)
        sup.start("n", [sys.executable, "-c", "print('second')"]).wait(EXIT_WAIT_S)
        with pytest.raises(RuntimeError, match="already running"):
            sup.start("s", SLEEPER)
            sup.start("s", SLEEPER)
    assert (tmp_path / "n.log").read_text().split() == ["first", "second"]


def test_crash_is_sigkill(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start("n", SLEEPER)
        assert child.alive()
        assert child.crash() == -signal.SIGKILL
        assert not child.alive()


def test_stop_is_graceful_when_the_child_cooperates(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print('ready', flush=True)
        time.sleep(60)
    """)
    with Supervisor(tmp_path) as sup:
        child = sup.start("n", [sys.executable, "-c", code])
        _wait_for_line(child.log_path, "ready")
        assert child.stop(grace_s=5.0) == 0


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    with Supervisor(tmp_path) as sup:
        child = sup.start("n", [sys.executable, "-c", code])
        _wait_for_line(child.log_path, "ready")
        assert child.stop(grace_s=0.3) == -signal.SIGKILL


def test_stop_reaches_the_whole_process_group(tmp_path: Path) -> None:
    # a shell that runs a grandchild in the background: killpg must reach it
    code = f"{sys.executable} -c 'import time; time.sleep(60)' & echo grandchild=$! ; wait"
    with Supervisor(tmp_path) as sup:
        child = sup.start("n", ["/bin/sh", "-c", code])
        grandchild = int(_wait_for_line(child.log_path, "grandchild=").split("=")[1])
        start = _starttime(grandchild)
        child.stop(grace_s=2.0)
    assert _await_exit(grandchild)
    assert not _exists(grandchild, start)


def test_no_child_survives_the_manager(tmp_path: Path) -> None:
    with Supervisor(tmp_path, grace_s=2.0) as sup:
        pids = [(c.pid, _starttime(c.pid)) for c in (sup.start(f"n{i}", SLEEPER) for i in range(3))]
        assert sorted(sup.alive()) == ["n0", "n1", "n2"]
    assert not any(_exists(pid, st) for pid, st in pids)


def test_no_child_survives_an_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(tmp_path) as sup:
            child = sup.start("n", SLEEPER)
            pid, start = child.pid, _starttime(child.pid)
            raise KeyboardInterrupt
    assert not _exists(pid, start)


async def test_external_kill_9_is_observed(tmp_path: Path) -> None:
    import asyncio

    with Supervisor(tmp_path) as sup:
        child = sup.start("n", SLEEPER)
        waiter = asyncio.ensure_future(child.wait_async())
        await asyncio.sleep(0)  # let the waiter register its pidfd before the kill
        assert not waiter.done()
        os.kill(child.pid, signal.SIGKILL)
        assert await asyncio.wait_for(waiter, EXIT_WAIT_S) == -signal.SIGKILL
        assert not child.alive() and sup.alive() == []


CONTROLLER = textwrap.dedent("""
    import sys, time
    from murmur.testnet.procs import Supervisor
    with Supervisor(sys.argv[1], grace_s=2.0) as sup:
        child = sup.start("n", [sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
""")


def _controller(tmp_path: Path) -> tuple[subprocess.Popen[str], int, str]:
    proc = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], preexec_fn=default_sigint)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    return proc, pid, _starttime(pid)


def _signal_masks(pid: int) -> str:
    """The signal lines of /proc/<pid>/status (blocked, ignored, caught): what
    a child inherited from us is the first suspect when a signal has no effect."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"no status: {exc}"
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_ctrl_c_of_the_controller_stops_children(tmp_path: Path) -> None:
    proc, pid, start = _controller(tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        masks = _signal_masks(proc.pid)
        proc.kill()
        proc.wait()
        pytest.fail(f"the controller ignored Ctrl-C for {EXIT_WAIT_S} s ({masks}; ours: {_signal_masks(os.getpid())})")
    assert code != 0  # KeyboardInterrupt propagated after cleanup
    assert not _exists(pid, start)


def test_children_die_with_a_killed_controller(tmp_path: Path) -> None:
    proc, pid, start = _controller(tmp_path)
    proc.kill()  # no cleanup code runs: only PR_SET_PDEATHSIG can save us
    proc.wait(EXIT_WAIT_S)
    assert _await_exit(pid)
    assert not _exists(pid, start)


def _wait_for_line(path: Path, prefix: str, timeout: float = EXIT_WAIT_S) -> str:
    """Wait for the condition "the child has logged ``prefix``" (bounded re-reads
    of its log: the log file is the child's only output channel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        time.sleep(0.02)
    raise AssertionError(f"{prefix!r} never appeared in {path}")
