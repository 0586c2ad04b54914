"""Atomic, crash-safe file writes.

Every piece of persistent state (keys, checkpoints, peer table, histories) goes
through :func:`atomic_write_bytes`: write a temp file in the same directory,
fsync it, rename it over the target, fsync the directory. After kill -9 the
target is either the old complete file or the new complete file, never a torn
mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
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
    os.replace(tmp, target)
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
