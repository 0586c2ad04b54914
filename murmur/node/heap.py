"""Give the heap's freed pages back to the OS once a round is over (glibc).

Why. glibc's malloc serves a request below its mmap threshold from the heap,
and raises that threshold to the size of any mapped block freed, up to 32
MB. A model below 8M fp32 parameters is under it: after the first model
buffer is freed every later one comes from the heap, and a round frees many
(offsets, half steps, encoded and decoded messages) at different places.
The heap only shrinks from its top, so the holes stay resident. Measured:
three daemons, a 3.6M-parameter model (14 MB), two neighbours each: heap
773-892 MB of which 404-515 MB free, live tensors 151-213 MB, RSS 0.95-1.07
GB; a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_) did not help, since the
freed holes serve later requests before the threshold is looked at.
``malloc_trim(0)`` returns every free page of every arena (madvise), in
milliseconds. Elsewhere (musl, macOS) there is nothing to call and nothing
is done.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

KEEP_PAD = 0
"""Bytes malloc_trim leaves at the top of the heap: none (the next round
maps what it needs again; a page fault costs far less than a model's worth of
resident memory)."""


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        process = ctypes.CDLL(None)
    except OSError:  # no dynamic symbol table to read (unusual builds)
        return None
    trim = getattr(process, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_heap() -> bool:
    """Return freed heap pages to the OS; whether the C library could (glibc)."""
    if _TRIM is None:
        return False
    _TRIM(KEEP_PAD)
    return True
