"""``murmur node stop`` and ``murmur logs``: acting on a node through its state dir.

Stopping goes through the pid in ``node.pid`` and SIGTERM, the same graceful
shutdown as Ctrl-C or ``systemctl stop``, not through the HTTP API: the API
is unauthenticated, and a ``/shutdown`` any local web page could POST to
would let a browser tab stop the node. The state-dir lock says whether a
daemon really runs there (the kernel drops it when the process dies), so a
stale pid file never gets an unrelated process signalled, and its release
says that the daemon has persisted everything and exited.

``murmur logs`` prints the end of ``murmur.log`` and, with ``-f``, follows it
across rotations (``murmur.log`` renamed to ``murmur.log.1`` and a new one
opened) as ``tail -F`` does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from murmur.errors import MurmurError
from murmur.node.state import StateDir

STOP_TIMEOUT_S = 30.0  # the daemon persists its checkpoint on the way out: give it time
POLL_S = 0.05
FOLLOW_POLL_S = 0.25
TAIL_BLOCK = 64 * 1024


class OperateError(MurmurError):
    """The operation cannot be done (no node there, it did not stop); one line."""


def daemon_running(state: StateDir) -> bool:
    """Whether a daemon holds ``state``'s lock now (probed with a shared,
    non-blocking flock taken and dropped at once)."""
    try:
        fd = os.open(state.lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Stopped:
    pid: int
    seconds: float


def stop_node(state: StateDir, timeout_s: float = STOP_TIMEOUT_S) -> Stopped:
    """SIGTERM the daemon of ``state`` and wait until it released the state
    dir (it said goodbye to its peers and wrote its checkpoint)."""
    if not daemon_running(state):
        raise OperateError(f"no node is running in {state.path}")
    pid = state.read_pid()
    if pid is None:
        raise OperateError(f"a daemon holds {state.lock_path} but {state.pid_path} is missing; stop it by hand")
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it exited between the check and the signal: waiting below confirms
    except PermissionError:
        raise OperateError(f"not allowed to signal the node (pid {pid}); run as the user it runs as") from None
    deadline = started + timeout_s
    while daemon_running(state):
        if time.monotonic() >= deadline:
            raise OperateError(f"the node (pid {pid}) did not stop within {timeout_s:g} s; "
                               f"`kill -9 {pid}` stops it without a checkpoint")
        time.sleep(POLL_S)
    return Stopped(pid, time.monotonic() - started)


def tail_lines(fh: BinaryIO, count: int) -> list[str]:
    """The last ``count`` lines of the open file ``fh`` (all of them for
    ``count`` 0), leaving it at its end: :func:`follow` goes on from there,
    so no line written in between is lost."""
    size = fh.seek(0, os.SEEK_END)
    block, data = 0, b""
    while count and data.count(b"\n") <= count and block < size:
        block = min(size, block + TAIL_BLOCK)
        fh.seek(size - block)
        data = fh.read(block)
    if not count:
        fh.seek(0)
        data = fh.read(size)
    fh.seek(size)
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:] if count else lines


def follow(fh: BinaryIO, path: Path, write: Callable[[str], None], stop: Callable[[], bool] = lambda: False,
           poll_s: float = FOLLOW_POLL_S) -> None:
    """Write what is appended to ``path`` from ``fh``'s position on (``fh``
    is ``path`` opened earlier), reopening it when it is rotated (a new
    inode) or truncated, until ``stop()``. Closes ``fh``."""
    partial = b""

    def drain(fh: BinaryIO) -> bool:
        nonlocal partial
        chunk = fh.read()
        partial += chunk
        *complete, partial = partial.split(b"\n")
        for line in complete:
            write(line.decode("utf-8", errors="replace") + "\n")
        return bool(chunk)

    try:
        while not stop():
            if drain(fh):
                continue
            try:
                current = os.stat(path)
            except FileNotFoundError:  # between the rename and the new file
                time.sleep(poll_s)
                continue
            if current.st_ino != os.fstat(fh.fileno()).st_ino:
                drain(fh)  # what reached the old file before it was renamed
                fh.close()
                fh = open(path, "rb")
            elif current.st_size < fh.tell():  # truncated in place
                fh.seek(0)
            else:
                time.sleep(poll_s)
    finally:
        fh.close()
