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

A slot goes to an urgent job before a deferred one, whichever waited
longer. Deferred: a neighbour's round message further ahead than our round
engine buffers. It must still be decoded (its increment keeps our replica of
the sender exact; refusing it undecoded left replicas to be re-synced from
the models their senders serve, which is how Sybils got their models in:
tried and reverted), but no round of ours needs it soon, and each costs a
slot (~0.7 s of CPU at 10M parameters, random-k 0.5). FIFO, our own round's
mask and every neighbour's message for our round waited behind as many of
them as neighbours sent, one per sender (each sender's stream waits for its
own decode).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from murmur.protocol.delta import CompletedDelta, VerifiedDelta

__all__ = ["DECODE_WORKERS", "OffLoopDecoder"]

DECODE_WORKERS = 1
"""Decodes in flight at once, per node. One: a decode is numpy work that
mostly releases the GIL, the training thread wants the other core, and each
one in flight is another model-sized array alive."""

T = TypeVar("T")


class _Slots:
    """``n`` slots, handed to urgent waiters before deferred ones, each
    class first come, first served (an asyncio.Semaphore with two queues)."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    def _queued(self, urgent: bool) -> bool:
        return any(not f.done() for f in self._waiting[True]) or (
            not urgent and any(not f.done() for f in self._waiting[False]))

    async def acquire(self, urgent: bool) -> None:
        if self._free > 0 and not self._queued(urgent):
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting[urgent]
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed the slot as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    queue.remove(fut)
            raise

    def release(self) -> None:
        for urgent in (True, False):
            queue = self._waiting[urgent]
            while queue:
                fut = queue.popleft()
                if not fut.done():  # a cancelled waiter is skipped
                    fut.set_result(None)
                    return
        self._free += 1


class OffLoopDecoder:
    """Runs :meth:`VerifiedDelta.decode` in a worker thread when it costs
    anything, ``workers`` at a time (see the module docstring)."""

    def __init__(self, workers: int = DECODE_WORKERS) -> None:
        if workers < 1:
            raise ValueError("at least one decode worker")
        self.workers = workers
        self._slots = _Slots(workers)
        self.in_flight = 0
        self.most_in_flight = 0  # the high-water mark, for tests and benches

    async def decode(self, verified: VerifiedDelta, *, urgent: bool = True) -> CompletedDelta:
        """The decoded delta; raises what :meth:`VerifiedDelta.decode` raises."""
        if not verified.costly:
            return verified.decode()
        return await self.run(verified.decode, urgent=urgent)

    async def run(self, work: Callable[[], T], *, urgent: bool = True) -> T:
        """``work()`` in a worker thread once a slot is free (``urgent`` ones
        first, see the module docstring). The slot is
        held until the thread ends, even if the caller is cancelled meanwhile
        (its connection closed): a thread cannot be stopped, and what it
        allocates must still count against the bound."""
        await self._slots.acquire(urgent)
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
