"""One send at a time per peer, none of them holding up the round loop.

A round message is tens of megabytes at real model sizes, and a neighbour
may read slowly or not at all. The round loop used to ``gather`` its sends,
so one peer that stopped reading held every round of the node (and so its
other neighbours) until the connection died. Each transfer now runs as its
own task, at most one per (identity, peer, kind): the loop waits for them
only until the round's deadline, a transfer still running when the next one
for that peer is due means that peer skips it (its replica of us re-syncs
later), and every task is cancelled when the node stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[None]] = {}
        self.skipped = 0  # transfers not started: the previous one to that peer was still running

    def busy(self, key: Hashable) -> bool:
        task = self._running.get(key)
        return task is not None and not task.done()

    def start(self, key: Hashable, send: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``send`` for ``key`` unless one is still running (then it is
        dropped, counted in ``skipped``, and None is returned)."""
        if self.busy(key):
            send.close()
            self.skipped += 1
            return None
        task = asyncio.get_running_loop().create_task(send, name=f"send-{key}")
        task.add_done_callback(self._done)
        self._running[key] = task
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("send failed", exc_info=task.exception())
        for key, running in list(self._running.items()):
            if running is task:
                del self._running[key]

    @staticmethod
    async def wait(tasks: Iterable[asyncio.Task[None] | None], timeout_s: float) -> int:
        """Wait for ``tasks`` up to ``timeout_s``; returns how many are still running."""
        pending = [t for t in tasks if t is not None]
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=max(0.0, timeout_s))
        return len(still)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()
