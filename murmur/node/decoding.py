"""Decoding received deltas off the event loop, a bounded number at a time.

A compressed round payload is costly to decode (a random-k mask of a
10 M-parameter model at ratio 0.5 took ~1 s, integer dequantisation of a
dense model tens of ms), and decoded inside the message handler it ran on
the daemon's event loop: meanwhile the node served nothing, not its
keepalives, not its other peers' streams, not its status API, and with a
few neighbours each round's messages stalled it for seconds.

:class:`OffLoopDecoder` runs each costly decode in a worker thread, at most
``workers`` at once: every decode in flight holds a decoded model (4 bytes a
parameter), so N neighbours' messages arriving together must not make N
threads each holding one (see :mod:`murmur.learning.footprint`). A message
waiting for a slot holds only its received payload, and its sender's stream
waits with it (the session awaits each handler), so a peer's messages are
still decoded, and offered to the round engine, in the order it sent them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from murmur.protocol.delta import CompletedDelta, VerifiedDelta

__all__ = ["DECODE_WORKERS", "OffLoopDecoder"]

DECODE_WORKERS = 1
"""Decodes in flight at once, per node. One: a decode is numpy work that
mostly releases the GIL, the training thread wants the other core, and each
one in flight is another model-sized array alive."""

T = TypeVar("T")


class OffLoopDecoder:
    """Runs :meth:`VerifiedDelta.decode` in a worker thread when it costs
    anything, ``workers`` at a time (see the module docstring)."""

    def __init__(self, workers: int = DECODE_WORKERS) -> None:
        if workers < 1:
            raise ValueError("at least one decode worker")
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)
        self.in_flight = 0
        self.most_in_flight = 0  # the high-water mark, for tests and benches

    async def decode(self, verified: VerifiedDelta) -> CompletedDelta:
        """The decoded delta; raises what :meth:`VerifiedDelta.decode` raises."""
        if not verified.costly:
            return verified.decode()
        return await self.run(verified.decode)

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` in a worker thread once a slot is free. The slot is
        held until the thread ends, even if the caller is cancelled meanwhile
        (its connection closed): a thread cannot be stopped, and what it
        allocates must still count against the bound."""
        await self._slots.acquire()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            job = asyncio.ensure_future(asyncio.to_thread(work))
        except BaseException:
            self._release()
            raise
        job.add_done_callback(self._finished)
        return await asyncio.shield(job)

    def _finished(self, job: asyncio.Future[object]) -> None:
        self._release()
        if not job.cancelled():
            job.exception()  # retrieved: a caller cancelled meanwhile no longer will

    def _release(self) -> None:
        self.in_flight -= 1
        self._slots.release()
