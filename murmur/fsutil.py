"""Atomic, crash-safe file writes.

Every piece of persistent state (keys, checkpoints, peer table, histories) goes
through :func:`atomic_write_bytes`: write a temp file in the same directory,
fsync it, rename it over the target, fsync the directory. After kill -9 the
target is either the old complete file or the new complete file, never a torn
mix. The one thing kill -9 can leave behind is the temp file of a write
it interrupted: :func:`remove_stale_temps` clears those (the daemon calls it
when it takes its state dir's lock).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"
"""Temp files are ``.<target name>.tmp-<pid of the writer>``."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically, with permission bits ``mode``."""
    atomic_write_parts(path, (data,), mode)


def atomic_write_parts(
    path: str | os.PathLike[str], parts: Sequence[bytes | bytearray | memoryview], mode: int = 0o644
) -> None:
    """Replace ``path`` with the concatenation of ``parts`` atomically (temp
    file, fsync, rename, fsync of the directory), never joining them in
    memory: a large checkpoint is written straight from its arrays."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what was asked
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        # A rename refused (the target a directory, permissions changed under
        # us) left the whole temp file behind, every write attempt a new one.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of :func:`atomic_write_parts` whose writer is
    dead (killed mid-write: its ``except`` never ran); returns them.

    The name carries the writer's pid, so every restart after such a kill
    used a new one and the old ones stayed for good: ten kill -9 of a process
    writing a 38 MB checkpoint left 44 MB of them. A live writer's file (another
    process may write in the directory, `murmur id` creating the key) is left
    alone; one whose pid was reused is only left until the next call."""
    removed: list[Path] = []
    for path in Path(directory).glob(f".*{TEMP_MARK}*"):
        pid_text = path.name.rpartition(TEMP_MARK)[2]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid no process can have: leave it)
    return True
