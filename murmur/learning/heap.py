"""Giving the C heap's free pages back to the system once a round has closed.

A round's temporaries below glibc's mmap threshold live in the heap: the
coordinate bound's chunks (k rows of 1 MB), the sketches' float64 chunks
(8 MB each at 1M coordinates a chunk), and below 8M parameters (32 MB)
whole models. glibc raises that threshold to the largest such block it
frees (up to 32 MB), so after the first round they all land in the heap,
between small objects the round keeps (SybilWall's sketches of each model,
the engine's bookkeeping); freed, they leave holes the heap cannot shrink
past, and glibc returns a hole's pages only when asked. Measured between
rounds: at 2M parameters and 4 neighbours 29 models' worth of free heap
stayed resident (test_round_memory); at 10M (bench/memory.py) the steady
RSS was 1 model higher at k = 2, 4 and 8 (11.5 / 13.5 / 17.6 models against
10.4 / 12.5 / 16.5 trimmed), and up to 5 models higher after an unlucky
round. ``malloc_trim(0)`` hands every free page of every arena back
(0.3-26 ms at 10M); the next round's temporaries fault theirs in again.

Within a round the holes still fill: the in-round peak RSS at 10M moves by
up to 3 models from run to run with where the temporaries land, against
the live tensors' peak (what MALLOC_MMAP_THRESHOLD_=1048576 shows, every
temporary of 1 MB or more mapped and unmapped on its own).

Not glibc (musl, macOS): nothing to call, nothing done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["release_free_heap"]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Return the heap's free pages (all arenas) to the system, where the C
    library can (glibc's ``malloc_trim``); a no-op elsewhere."""
    if _TRIM is not None:
        _TRIM(0)
