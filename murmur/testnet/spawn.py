"""Starting one supervised child process: the part of supervision that both
:mod:`murmur.testnet.procs` and :mod:`murmur.testnet.forkserver` need.

A supervised child runs in its own session (a terminal Ctrl-C reaches only
the controller; ``killpg`` reaches the child's helpers) and, on Linux, asks
for ``PR_SET_PDEATHSIG = SIGKILL``, so it dies with the process that started
it even when that one is killed without cleaning up (SIGKILL, OOM).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl


_PRCTL = _load_prctl()


def set_parent_death_signal(parent_pid: int) -> None:
    """Ask for SIGKILL when the parent dies (Linux); exit at once if it already has."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # the parent may have died between fork and prctl: then nobody would signal us
        if os.getppid() != parent_pid:
            os._exit(1)


def _make_preexec(parent_pid: int):  # noqa: ANN202 - returns the preexec callable
    """Runs in the child between fork and exec: only async-signal-safe work."""

    def preexec() -> None:
        set_parent_death_signal(parent_pid)

    return preexec


def popen_supervised(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, dying with us, output appended to ``log_path``."""
    with open(log_path, "ab") as out:  # the child holds its own copy of the fd
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=_make_preexec(os.getpid()),  # noqa: PLW1509 - no threads fork concurrently here
        )
