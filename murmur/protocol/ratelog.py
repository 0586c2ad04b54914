"""Warnings a stranger can trigger, rate-limited and summarised.

Anybody can open TCP connections and fail handshakes for free, so one log
line per failed try lets them write the node's log at line rate (a
handshake-message-1 flood made 359 KiB/s of WARNINGs). :class:`ThrottledLog`
passes the first ``burst`` records of each event per ``interval_s`` and
counts the rest; once per interval with suppressions it writes one summary
line per event (``event="warnings_suppressed"``, the ``suppressed_event`` and
its ``count``), so the log still says how much happened.

Sans-IO in time: the clock and the timer that emits the summary of a flood
that stopped are injected (the transport passes the event loop's
``call_later``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Cancellable]


class ThrottledLog:
    """WARNING records per ``event``: ``burst`` per ``interval_s`` pass, the rest are summarised."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        burst: int,
        schedule: Schedule,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or burst < 0:
            raise ValueError("a throttled log needs interval_s > 0 and burst >= 0")
        self._log = logger
        self.interval_s = interval_s
        self.burst = burst
        self._schedule = schedule
        self._clock = clock
        self._window_start = clock()
        self._passed: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._timer: Cancellable | None = None

    def warning(self, msg: str, *, event: str, **fields: Any) -> None:
        now = self._clock()
        if now - self._window_start >= self.interval_s:
            self.flush()
            self._window_start = now
        if self._passed[event] < self.burst:
            self._passed[event] += 1
            self._log.warning(msg, extra={"event": event, **fields})
            return
        self._suppressed[event] += 1
        if self._timer is None:
            due = max(0.0, self._window_start + self.interval_s - now)
            self._timer = self._schedule(due, self._on_timer)

    def flush(self) -> None:
        """Write the summaries of the current window and start a new one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        elapsed = self._clock() - self._window_start
        for event, count in self._suppressed.items():
            self._log.warning(
                "warnings suppressed",
                extra={"event": "warnings_suppressed", "suppressed_event": event, "count": count,
                       "interval_s": round(max(elapsed, self.interval_s), 3)},
            )
        self._suppressed.clear()
        self._passed.clear()
        self._window_start = self._clock()

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
