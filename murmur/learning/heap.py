"""Giving the C heap's free pages back to the system once a round has closed (glibc).

Why. glibc's malloc serves a request below its mmap threshold from the heap,
and raises that threshold to the size of any mapped block freed, up to 32
MB. A model below 8M fp32 parameters is under it: after the first model
buffer is freed every later one comes from the heap, and a round frees many
(offsets, half steps, encoded and decoded messages, the coordinate bound's
and the sketches' chunks) at different places, between small objects the
round keeps (SybilWall's sketches, the engine's bookkeeping). The heap only
shrinks from its top, so the holes stay resident, and glibc returns a hole's
pages only when asked. Measured: three daemons, a 3.6M-parameter model (14
MB), two neighbours each: heap 773-892 MB of which 404-515 MB free, live
tensors 151-213 MB, RSS 0.95-1.07 GB; one engine at 2M parameters and 4
neighbours kept 18-29 models' worth of free heap resident after 3 rounds,
under one trimmed (test_round_memory); at 10M (bench/memory.py) the steady
RSS was a model higher untrimmed. A fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_) did not help the daemons, since the freed holes
serve later requests before the threshold is looked at.

``malloc_trim(0)`` hands every free page of every arena back (madvise):
0.3-26 ms at 10M; the next round's temporaries fault theirs in again.
Within a round the holes still fill: the in-round peak RSS at 10M moves by
up to 3 models from run to run with where the temporaries land.

Not glibc (musl, macOS): nothing to call, nothing done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["release_free_heap"]

KEEP_PAD = 0
"""Bytes malloc_trim leaves at the top of the heap: none (the next round
maps what it needs again; a page fault costs far less than a model's worth of
resident memory)."""


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:  # no dynamic symbol table to read (unusual builds)
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


def release_free_heap() -> bool:
    """Return the heap's free pages (all arenas) to the system; whether the
    C library could (glibc's ``malloc_trim``)."""
    if _TRIM is None:
        return False
    _TRIM(KEEP_PAD)
    return True
