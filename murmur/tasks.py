"""Named, supervised, cancellable background tasks (after py-ipv8's TaskManager).

Every long-lived coroutine of a component is registered here under a unique
name. A task that dies with an exception is logged with its name and, if it
was registered with ``restart=True``, started again after a back-off; a clean
return is simply forgotten. ``shutdown()`` cancels everything and waits for it,
so a component owning a TaskManager leaves no orphan tasks behind.

Failures are also *recorded*, because a log line alone let a node whose round
loop had died keep answering "healthy" (issue 13). What counts:

* a **crash** is a task that ended with an exception and will not run again
  (not registered with ``restart=True``, or the manager is closing). It is
  kept in :meth:`TaskManager.crashes` and reported to ``on_crash``, which is
  how the daemon turns it into a failed health check and a non-zero exit;
* a **periodic** task's call that raises is not a crash: the next call runs
  on schedule (a dial or a disk write may fail once and work again). Its
  errors are counted, and a task whose last :data:`FAILING_AFTER` calls in a
  row all raised is reported as *failing* (:meth:`TaskManager.failing`) until
  a call succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)
RECANCEL_INTERVAL_S = 0.2
FAILING_AFTER = 3
"""Consecutive failed calls after which a periodic task counts as failing:
one or two in a row are the transient errors the retry is there for."""
MAX_RECORDED = 32
"""Crash and periodic-error records kept per manager (the newest): a node
kept serving after crashes must not grow without bound."""
MAX_ERROR_CHARS = 500


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line, bounded: what status and logs show."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class TaskFailure:
    """A task that ended with an exception, or a periodic task that is failing."""

    task: str
    error: str  # see describe(): the latest exception
    since: float  # unix time of the crash, or of the first failed call in the current run of failures
    errors: int = 1  # exceptions counted for this task (a periodic task's failed calls in a row)


@dataclass
class _PeriodicErrors:
    errors: int = 0  # failed calls in total
    consecutive: int = 0  # failed calls since the last success
    since: float = 0.0  # when the current run of failures began
    last: str = ""


class TaskManager:
    def __init__(self, owner: str, on_crash: Callable[[TaskFailure], None] | None = None) -> None:
        self.owner = owner
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._closing = False
        self._on_crash = on_crash
        self._crashes: dict[str, TaskFailure] = {}  # oldest first
        self._periodic: dict[str, _PeriodicErrors] = {}
        self.error_count = 0  # every exception a task raised: crashes, restarts and failed periodic calls

    def __contains__(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def names(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[Any]],
        *,
        restart: bool = False,
        replace: bool = False,
    ) -> asyncio.Task[Any]:
        """Run ``factory()`` as task ``name``.

        ``factory`` is a zero-argument callable returning a fresh awaitable, so
        a crashed task can be restarted. ``replace`` cancels a running task of
        the same name first; otherwise a duplicate name is a programming error.
        """
        if self._closing:
            raise RuntimeError(f"{self.owner}: task manager is shutting down; refusing {name!r}")
        existing = self._tasks.get(name)
        if existing is not None and not existing.done():
            if not replace:
                raise RuntimeError(f"{self.owner}: task {name!r} is already running")
            existing.cancel()
        task = asyncio.get_running_loop().create_task(
            self._supervise(name, factory, restart), name=f"{self.owner}:{name}"
        )
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._forget(name, done))
        return task

    def _forget(self, name: str, task: asyncio.Task[Any]) -> None:
        """A finished task leaves the registry (its crash, if any, is recorded
        apart): a transport spawns one per accepted connection, and keeping
        each done one grew memory with every connection ever made."""
        if self._tasks.get(name) is task:
            del self._tasks[name]

    def periodic(self, name: str, interval_s: float, fn: Callable[[], Awaitable[Any]], *, delay_s: float = 0.0) -> asyncio.Task[Any]:
        """Call ``fn`` every ``interval_s`` seconds; an exception in one call
        does not stop the next. A run of failures is logged with bounded
        volume (see :meth:`_log_periodic_failure`)."""

        async def loop() -> None:
            if delay_s:
                await asyncio.sleep(delay_s)
            while not self._closing:
                try:
                    await fn()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._log_periodic_failure(name, exc, self._periodic_failed(name, exc))
                else:
                    record = self._periodic.get(name)
                    if record is not None:
                        if record.consecutive >= FAILING_AFTER:
                            log.info("periodic task works again",
                                     extra={"task": name, "owner": self.owner, "failed_calls": record.consecutive})
                        record.consecutive = 0
                await asyncio.sleep(interval_s)

        return self.spawn(name, loop)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[Any]], restart: bool) -> Any:
        attempt = 0
        while True:
            try:
                return await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("task crashed", extra={"task": name, "owner": self.owner})
                self.error_count += 1
                if not restart or self._closing:
                    self._crashed(name, exc)
                    return None
                await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                attempt += 1

    # -- failure records ---------------------------------------------------------------

    def _crashed(self, name: str, exc: BaseException) -> None:
        failure = TaskFailure(name, describe(exc), time.time())
        self._crashes.pop(name, None)  # re-inserted last: newest at the end
        self._crashes[name] = failure
        while len(self._crashes) > MAX_RECORDED:
            del self._crashes[next(iter(self._crashes))]
        if self._on_crash is not None:
            try:
                self._on_crash(failure)
            except Exception:
                log.exception("crash listener failed", extra={"task": name, "owner": self.owner})

    def _log_periodic_failure(self, name: str, exc: BaseException, repeated: bool) -> None:
        """The traceback of a run's first failure, and of each new error in
        it; the same error again only at 2, 4, 8, ... calls in a row, one
        line. Each call's traceback made a task failing every second
        (maintain-neighbours) write 86,400 of them a day, and the log's
        rotation then kept only the last hours of them."""
        record = self._periodic[name]
        extra = {"task": name, "owner": self.owner, "failed_calls": record.consecutive}
        if not repeated:
            log.error("periodic task failed", extra=extra, exc_info=exc)
        elif record.consecutive & (record.consecutive - 1) == 0:
            log.error(f"periodic task still failing: {record.last} (the same error: "
                      "logged again after twice as many calls)", extra=extra)

    def _periodic_failed(self, name: str, exc: BaseException) -> bool:
        """Count a failed call; whether it repeats the run's previous error."""
        self.error_count += 1
        record = self._periodic.get(name)
        if record is None:
            record = self._periodic[name] = _PeriodicErrors()
            while len(self._periodic) > MAX_RECORDED:
                del self._periodic[next(iter(self._periodic))]
        if record.consecutive == 0:
            record.since = time.time()
        error = describe(exc)
        repeated = record.consecutive > 0 and error == record.last
        record.errors += 1
        record.consecutive += 1
        record.last = error
        return repeated

    def crashes(self) -> list[TaskFailure]:
        """Tasks that ended with an exception and were not restarted, oldest first."""
        return list(self._crashes.values())

    def failing(self) -> list[TaskFailure]:
        """Periodic tasks whose last :data:`FAILING_AFTER` or more calls all raised."""
        return [
            TaskFailure(name, record.last, record.since, record.consecutive)
            for name, record in self._periodic.items()
            if record.consecutive >= FAILING_AFTER
        ]

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Cancel every task and wait (bounded) for them to finish. Called
        from one of its own tasks (a stream handler closing its connection),
        that task is left to finish by itself: it cannot wait for its own end."""
        self._closing = True
        current = asyncio.current_task()
        pending = {t for t in self._tasks.values() if not t.done() and t is not current}
        deadline = asyncio.get_running_loop().time() + timeout_s
        # Cancel again until they are gone: on Python 3.11 asyncio.wait_for can
        # swallow a cancellation that races with its inner future completing,
        # and a task that lost its cancel would otherwise run on to the timeout.
        while pending:
            for task in pending:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(left, RECANCEL_INTERVAL_S))
        for task in pending:
            log.error("task did not stop in time", extra={"task": task.get_name(), "owner": self.owner})
        self._tasks.clear()
