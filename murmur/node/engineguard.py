"""The round engine's heavy work in a worker thread, its other calls deferred meanwhile.

Closing a round (:meth:`RoundEngine.finish_round`: SybilWall's scoring, the
weighted sum, the new model) is O(model size) and ran on the daemon's event
loop: 1.2-1.6 s at 10 M parameters, during which the node answered nothing,
not its keepalives, not its status API, not its peers' streams (three daemons
at 10 M: the loop stalled 54-77 % of a run, API waits of several seconds).

:class:`EngineGuard` runs such a call in a worker thread (:meth:`off_loop`)
while the loop goes on serving. The engine (and its aggregator and trainer)
is not thread-safe, and the loop keeps receiving what changes it: the next
round's messages, re-synced replicas, links and departures, history records.
The rule is simple, and is why no lock is needed:

* while an off-loop call runs, the engine is *busy* and nothing on the loop
  touches it: every loop-side engine call goes through :meth:`call` (no
  result wanted) or :meth:`run` (awaits its result), which, while busy,
  queue it instead of running it;
* when the thread returns, on the loop: first ``then(result)`` (what the
  round loop did right after the call, synchronously, when it ran inline),
  then every queued call in the order it was made, with no await between
  them, and only then is the engine idle again.

So each loop-side call runs on the loop either before the off-loop call
started or after it (and its ``then``) ended, exactly as if the call had
been inline and the messages behind it had waited in the socket buffers:
the engine's math and the order of its inputs are unchanged, only where the
heavy call runs. (The alternative, computing on a snapshot in the thread
and applying on the loop, would have split the engine's one method in two
and copied model-sized state each round.)

A caller cancelled while its off-loop call runs (the node stopping) does not
stop the thread, which cannot be stopped: the call, its ``then`` and the
queued calls still complete, and :meth:`settled` waits for all of it, so a
checkpoint taken after it never holds a half-applied round.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["EngineGuard"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineGuard:
    """Serialises the event loop's engine calls with one off-loop call at a
    time (see the module docstring)."""

    def __init__(self) -> None:
        self._job: asyncio.Future[Any] | None = None  # the off-loop call in flight, with its then and drain
        self._deferred: deque[tuple[Callable[[], Any], asyncio.Future[Any] | None]] = deque()
        self.deferred_total = 0  # calls that waited for an off-loop call (for tests and benches)
        self.off_loop_total = 0

    @property
    def busy(self) -> bool:
        """Whether an off-loop call holds the engine (loop-side calls are queued)."""
        return self._job is not None

    def call(self, fn: Callable[[], object]) -> None:
        """``fn()`` now, or, while busy, on the loop once the off-loop call
        ended (in order with every other queued call). Its result is
        dropped; raised when deferred, it is logged (no caller is left)."""
        if self._job is None:
            fn()
            return
        self.deferred_total += 1
        self._deferred.append((fn, None))

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()``'s result: now, or, while busy, once the off-loop call
        ended (in order with every other queued call). A caller cancelled
        while waiting drops its call: it never runs."""
        if self._job is None:
            return fn()
        self.deferred_total += 1
        result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._deferred.append((fn, result))
        return await result

    async def off_loop(self, work: Callable[[], T], then: Callable[[T], object] | None = None) -> T:
        """``work()`` in a worker thread, the engine busy meanwhile; then, on
        the loop, ``then(result)`` and the calls queued meanwhile. Cancelling
        the caller does not cancel any of it (see :meth:`settled`)."""
        if self._job is not None:
            raise RuntimeError("an off-loop engine call is already running")
        self.off_loop_total += 1
        job = self._job = asyncio.ensure_future(self._complete(work, then))
        job.add_done_callback(_retrieve)
        return await asyncio.shield(job)

    async def settled(self) -> None:
        """Wait until no off-loop call (nor its ``then``, nor the calls queued
        behind it) is left; what it raised is the awaiting caller's, logged here."""
        job = self._job
        if job is None:
            return
        try:
            await asyncio.shield(job)
        except Exception:
            log.debug("the off-loop engine call failed", exc_info=True)

    async def _complete(self, work: Callable[[], T], then: Callable[[T], object] | None) -> T:
        try:
            result = await asyncio.to_thread(work)
            if then is not None:
                then(result)
            return result
        finally:
            self._drain()
            self._job = None

    def _drain(self) -> None:
        """The queued calls, in order, on the loop, without an await between
        them (one queued while draining runs in its turn)."""
        while self._deferred:
            fn, result = self._deferred.popleft()
            if result is not None and result.done():  # its caller was cancelled meanwhile
                continue
            try:
                value = fn()
            except Exception as exc:
                if result is None:
                    log.error("a deferred engine call failed", exc_info=True)
                else:
                    result.set_exception(exc)
                continue
            if result is not None:
                result.set_result(value)


def _retrieve(job: asyncio.Future[Any]) -> None:
    """Marks the job's exception retrieved: a caller cancelled meanwhile no longer will."""
    if not job.cancelled():
        job.exception()
