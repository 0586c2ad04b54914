"""Process supervision for the testnet controller.

The controller runs many node processes and must never leave one behind:

* every child starts in its own session/process group (``start_new_session``),
  so a terminal Ctrl-C reaches only the controller, which then stops the
  children in order, and signals reach a child's own helpers too (``killpg``);
* on Linux every child asks the kernel for ``PR_SET_PDEATHSIG = SIGKILL``: if the
  controller dies without cleaning up (SIGKILL, OOM), its children die with it;
* :class:`Supervisor` is a context manager that stops every child on exit,
  including exit by exception or KeyboardInterrupt.

A :class:`~murmur.testnet.forkserver.ForkServer` given to the supervisor
runs the commands it serves by forking from one process that has done the
imports, with the same three guarantees (see that module).

Exits are observed without polling through a pidfd (``os.pidfd_open``, Linux
5.3+) registered with the event loop; elsewhere a thread waits on the child.
Stdout and stderr go, interleaved, to one append-mode log file per node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from murmur.testnet.forkserver import ForkServerError
from murmur.testnet.spawn import popen_supervised

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # SIGTERM -> SIGKILL; nodes promise a graceful exit "within a few seconds"
KILL_WAIT_S = 5.0  # a SIGKILLed process is gone once the kernel reaps it; bound the wait anyway
FATAL_PREFIX = "murmur worker: "
"""Starts the one line a worker that gives up writes last on stderr (its log),
so that the controller can tell the user why (:func:`last_error`)."""
LOG_TAIL_BYTES = 64 * 1024


class _Process(Protocol):
    """What :class:`ChildProcess` needs of its process: ``subprocess.Popen``,
    or a fork server's :class:`~murmur.testnet.forkserver.ForkedProcess`."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@runtime_checkable
class _RemoteProcess(Protocol):
    """A process on another host (murmur.testnet.raycluster): its pid means
    nothing here, so its process group is signalled where it runs."""

    def signal_group(self, sig: int) -> None: ...


class Spawner(Protocol):
    """Runs some commands for the :class:`Supervisor` instead of ``Popen``: a
    :class:`~murmur.testnet.forkserver.ForkServer`, or a cluster launcher."""

    def serves(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None) -> bool: ...

    def spawn(self, args: Sequence[str], log_path: Path) -> _Process: ...

    def close(self) -> None: ...


class ChildProcess:
    """One supervised child: a process group led by ``pid``."""

    def __init__(self, name: str, popen: _Process, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative signal number if killed by a signal."""
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        if isinstance(self._popen, _RemoteProcess):
            self._popen.signal_group(sig)
            return
        # pgid == pid (own session). While the leader is unreaped its pid cannot be reused.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def crash(self) -> int:
        """kill -9 the whole process group (no graceful shutdown) and reap it."""
        if self._popen.poll() is not None:
            return self._popen.returncode  # already gone: never signal a reaped (reusable) pid
        self._signal_group(signal.SIGKILL)
        return self._popen.wait(KILL_WAIT_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM the group, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
        return self._await_stop(grace_s)

    def _await_stop(self, grace_s: float) -> int:
        """After the one SIGTERM: wait up to ``grace_s``, then SIGKILL. A second
        SIGTERM would land in the middle of the child's graceful exit (a
        handler that raises SystemExit raises again there)."""
        if self._popen.poll() is None:
            try:
                self._popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("child did not stop in time; killing", extra={"child": self.name, "grace_s": grace_s})
        self._signal_group(signal.SIGKILL)  # leftovers of the group (helpers) go too
        return self._popen.wait(KILL_WAIT_S)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits; raises ``subprocess.TimeoutExpired``."""
        return self._popen.wait(timeout)

    async def wait_async(self) -> int:
        """Await the child's exit without polling (pidfd) or blocking the loop."""
        if self._popen.poll() is not None:
            return self._popen.returncode
        if isinstance(self._popen, _RemoteProcess):  # no local pid to watch
            return await asyncio.to_thread(self._popen.wait)
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            fd = pidfd_open(self.pid) if pidfd_open else -1
        except OSError:
            fd = -1  # kernel without pidfd support, or already reaped
        if fd < 0:
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self._popen.wait()

    def __repr__(self) -> str:
        return f"ChildProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def last_error(log_path: Path) -> str:
    """Why a child gave up: its last :data:`FATAL_PREFIX` line (prefix
    removed), else its last line (a traceback's last line names the exception)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"no log ({exc.strerror})"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(FATAL_PREFIX):
            return line[len(FATAL_PREFIX):]
    return lines[-1] if lines else "exited without a word"


class Supervisor:
    """Starts children and guarantees none outlives the ``with`` block.

    Names are unique among live children; starting a name again after its
    process exited (a restart) appends to the same log file.
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, grace_s: float = STOP_GRACE_S, fork_server: Spawner | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        #: Runs the commands it serves (see ForkServer.serves) once started; stopped after the children.
        self.fork_server = fork_server
        self._children: dict[str, ChildProcess] = {}
        self._closed = False

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_name: str | None = None,
    ) -> ChildProcess:
        """Start ``argv`` as child ``name``, output appended to ``<log_name or name>.log``
        (two children may share a log: a standby process and the one it replaces)."""
        if self._closed:
            raise RuntimeError("supervisor is closed")
        current = self._children.get(name)
        if current is not None and current.alive():
            raise RuntimeError(f"child {name!r} is already running (pid {current.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{log_name or name}.log"
        popen: _Process | None = None
        if self.fork_server is not None and self.fork_server.serves(argv, env, cwd):
            try:
                popen = self.fork_server.spawn(argv[3:], log_path)
            except ForkServerError as exc:  # it died (its children with it): carry on without it
                log.warning("fork server failed; starting a fresh interpreter", extra={"child": name, "error": str(exc)})
                self.fork_server.close()
        if popen is None:
            popen = popen_supervised(argv, log_path=log_path, env=env, cwd=cwd)
        child = ChildProcess(name, popen, log_path)
        self._children[name] = child
        log.info("child started", extra={"child": name, "pid": child.pid})
        return child

    def __getitem__(self, name: str) -> ChildProcess:
        return self._children[name]

    def __iter__(self) -> Iterator[ChildProcess]:
        return iter(list(self._children.values()))

    def alive(self) -> list[str]:
        return [name for name, child in self._children.items() if child.alive()]

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live child at once, give them one shared grace period,
        then SIGKILL what is left. Returns name -> exit code."""
        live = [c for c in self._children.values() if c.alive()]
        for child in live:
            child._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        codes = {}
        for child in live:
            codes[child.name] = child._await_stop(max(0.0, deadline - time.monotonic()))
        for child in self._children.values():  # already-dead ones: sweep their groups' leftovers
            child._signal_group(signal.SIGKILL)
            codes.setdefault(child.name, child.wait(KILL_WAIT_S))
        return codes

    def close(self) -> None:
        """Stop everything. A second Ctrl-C during cleanup is held back (SIGINT
        blocked) and delivered after the children are gone, so impatience cannot
        create orphans."""
        if self._closed:
            return
        self._closed = True
        blocked = {signal.SIGINT}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self.stop_all()
            if self.fork_server is not None:  # last: its children die with it, ungracefully
                self.fork_server.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
