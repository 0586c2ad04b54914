"""Named, supervised, cancellable background tasks (after py-ipv8's TaskManager).

Every long-lived coroutine of a component is registered here under a unique
name. A task that dies with an exception is logged with its name and, if it
was registered with ``restart=True``, started again after a back-off; a clean
return is simply forgotten. ``shutdown()`` cancels everything and waits for it,
so a component owning a TaskManager leaves no orphan tasks behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)
RECANCEL_INTERVAL_S = 0.2


class TaskManager:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._closing = False

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
        return task

    def periodic(self, name: str, interval_s: float, fn: Callable[[], Awaitable[Any]], *, delay_s: float = 0.0) -> asyncio.Task[Any]:
        """Call ``fn`` every ``interval_s`` seconds; an exception in one call is
        logged and does not stop the next."""

        async def loop() -> None:
            if delay_s:
                await asyncio.sleep(delay_s)
            while not self._closing:
                try:
                    await fn()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("periodic task failed", extra={"task": name, "owner": self.owner})
                await asyncio.sleep(interval_s)

        return self.spawn(name, loop)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[Any]], restart: bool) -> Any:
        attempt = 0
        while True:
            try:
                return await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task crashed", extra={"task": name, "owner": self.owner})
                if not restart or self._closing:
                    return None
                await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                attempt += 1

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Cancel every task and wait (bounded) for them to finish."""
        self._closing = True
        pending = {t for t in self._tasks.values() if not t.done()}
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
