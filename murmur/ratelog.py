"""Log lines that remote parties cause, bounded per key and in total, with the rest counted.

A node logs what its peers do wrong (faults, handler failures, failed
handshakes), and each such line is cheap for the peer to cause: a peer
spraying bad messages, or many identities taking turns, used to write one
WARNING (or a whole traceback) per message, at hundreds of KiB/s. Here each
line is charged to a *key* (a peer id, a subnet) within a fixed window of
``window_s`` seconds: a key gets ``per_key`` lines per window, all keys
together ``total``; what is over budget is only counted. When a window ends,
one summary line says how many lines were suppressed, from how many keys,
and names the keys that caused the most. So the log volume is bounded by
``total + 1`` lines per window whatever the input, and still says what
happened.

Sans-IO in time (the ``clock`` is injected). Summaries of an ended window go
out with the next line that arrives; call :meth:`RateLimitedLog.flush`
periodically (the node runs it as a supervised task) so that a flood that
stopped is summarised too, and :meth:`RateLimitedLog.close` on shutdown.
Shared by the node (peer faults, after authentication) and usable by the
transport (handshake-level warnings, keyed by subnet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]
ExcInfo = BaseException | bool | None


@dataclass(frozen=True)
class LogBudget:
    """How many lines a window may carry; every number named once."""

    per_key: int = 3  # lines per key per window
    total: int = 30  # lines per window, all keys together
    window_s: float = 60.0
    max_keys: int = 4096  # keys counted one by one per window; the rest are counted together
    top_keys: int = 5  # keys named in a summary

    def __post_init__(self) -> None:
        if self.per_key < 0 or self.total < 0 or self.max_keys < 1 or self.top_keys < 0:
            raise ValueError("per_key, total, top_keys must be >= 0 and max_keys >= 1")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")


OTHER_KEYS = "(other)"
"""Where suppressed lines are counted once ``max_keys`` keys are tracked."""


class RateLimitedLog:
    """Lines about ``what`` (e.g. ``"peer faults"``), at most ``budget`` per window.

    ``log(logger, level, key, msg, extra=..., exc_info=...)`` emits the line on
    ``logger`` if ``key`` and the window still have room, and returns whether
    it did. Summaries go to ``summary_logger`` at WARNING with
    ``event="log_suppressed"``.
    """

    def __init__(self, what: str, summary_logger: logging.Logger, budget: LogBudget | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.what = what
        self.budget = budget or LogBudget()
        self._summary_logger = summary_logger
        self._clock = clock
        self._window_start = clock()
        self._emitted = 0
        self._per_key: dict[Hashable, int] = {}  # lines emitted this window
        self._suppressed: dict[Hashable, int] = {}  # lines counted, not emitted, this window
        self.suppressed_total = 0  # since creation, for tests and metrics

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str, *,
            extra: Mapping[str, Any] | None = None, exc_info: ExcInfo = None) -> bool:
        if not logger.isEnabledFor(level):
            return False
        now = self._clock()
        if now - self._window_start >= self.budget.window_s:
            self._roll(now)
        used = self._per_key.get(key, 0)
        if used < self.budget.per_key and self._emitted < self.budget.total and (
                used or len(self._per_key) < self.budget.max_keys):
            self._per_key[key] = used + 1
            self._emitted += 1
            logger.log(level, msg, extra=dict(extra or {}), exc_info=exc_info)
            return True
        self._count(key)
        return False

    def warning(self, logger: logging.Logger, key: Hashable, msg: str, **kw: Any) -> bool:
        return self.log(logger, logging.WARNING, key, msg, **kw)

    def flush(self) -> None:
        """Summarise the window if it has ended (call it periodically)."""
        now = self._clock()
        if now - self._window_start >= self.budget.window_s:
            self._roll(now)

    def close(self) -> None:
        """Summarise what the current window suppressed so far (at shutdown)."""
        self._roll(self._clock())

    # -- internals -----------------------------------------------------------------

    def _count(self, key: Hashable) -> None:
        self.suppressed_total += 1
        if key not in self._suppressed and len(self._suppressed) >= self.budget.max_keys:
            key = OTHER_KEYS
        self._suppressed[key] = self._suppressed.get(key, 0) + 1

    def _roll(self, now: float) -> None:
        if self._suppressed:
            count = sum(self._suppressed.values())
            top = sorted(self._suppressed.items(), key=lambda kv: kv[1], reverse=True)[: self.budget.top_keys]
            self._summary_logger.warning(
                f"{self.what}: {count} more lines suppressed in the last {now - self._window_start:.0f} s",
                extra={"event": "log_suppressed", "what": self.what, "suppressed": count,
                       "keys": len(self._suppressed), "top": ", ".join(f"{k}={n}" for k, n in top)},
            )
        self._window_start = now
        self._emitted = 0
        self._per_key.clear()
        self._suppressed.clear()


__all__ = ["OTHER_KEYS", "LogBudget", "RateLimitedLog"]


@dataclass
class Streak:
    """Rounds in a row of one condition a node should tell its user about,
    and when to: at the ``first`` such round, then once per ``every`` more (a
    condition that lasts for good, a network sparser than the privacy plan
    or a group started apart, would otherwise fill the log, and the advice
    is the same each time)."""

    first: int
    every: int
    count: int = 0

    def hit(self) -> bool:
        """One more such round; True when this one is to be told."""
        self.count += 1
        return self.count % self.every == self.first % self.every

    def reset(self) -> None:
        self.count = 0
