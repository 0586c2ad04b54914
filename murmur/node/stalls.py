"""Noticing a node that learns alone while it has neighbours.

A round closes at its deadline with whatever arrived, so a node whose
neighbours' messages are all refused (a size limit, another model, bad
signatures) or never come keeps training on its own data, round after round,
and looks busy. That is how a network of real daemons refused every fp32
round of any model above 16,384 parameters without anyone noticing: the only
trace was a "peer fault" line per delta. :class:`StallMonitor` turns it into
one loud line, a status field and a metric: ``rounds_stalled`` counts the
consecutive rounds that had neighbours and used none of their messages, and
``reason`` says why, from the refusals it saw or from the round loop itself
not completing rounds (:meth:`StallMonitor.watch`, for a loop blocked in a
phase). It is sans-IO: the learner feeds it and reads it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

HELD_BACK_STREAK = 10
HELD_BACK_WARN_EVERY = 100
"""A node with neighbours more than CATCH_UP_GAP rounds ahead that it may not
adopt from (catch_up_target: they are at most two thirds of its neighbours and
it never weighed them) WARNs after HELD_BACK_STREAK such rounds in a row, then
once per this many more. Two groups of nodes that started apart (a pair, then
two more a few seconds later, each with rounds of tens of milliseconds) keep
their distance for good: each side's neighbours are half ahead or half behind,
and a claim of being ahead is what a Sybil would make."""


STALL_ROUNDS = 3
"""Consecutive rounds with neighbours and no usable message before a node
says it is stalled: one such round is normal (a neighbour restarting), three
in a row are not."""
STALL_DEADLINES = 3.0
"""Round deadlines without a completed round (neighbours connected) before
the round loop itself counts as stalled."""


@dataclass
class StallMonitor:
    threshold: int = STALL_ROUNDS
    clock: Callable[[], float] = time.monotonic
    rounds_stalled: int = 0
    reason: str | None = None
    _refused: Counter[str] = field(default_factory=Counter)
    _last_refusal: str | None = None
    _last_round_at: float = field(default=0.0)
    _loop_stalled: bool = False

    def __post_init__(self) -> None:
        self._last_round_at = self.clock()

    @property
    def stalled(self) -> bool:
        return self.rounds_stalled >= self.threshold or self._loop_stalled

    def on_refused(self, peer: str, fault: Exception) -> None:
        """A neighbour's transfer was refused (the fault is also penalised
        and logged by the session; this remembers it for the reason)."""
        self._refused[type(fault).__name__] += 1
        self._last_refusal = f"{type(fault).__name__} from {peer}: {fault}"

    def on_round(self, round_: int, neighbours: int, received: int) -> None:
        """A round closed with ``received`` usable messages of ``neighbours``."""
        was_stalled = self.stalled
        self._last_round_at = self.clock()
        self._loop_stalled = False
        if neighbours == 0 or received > 0:
            if was_stalled:
                log.warning("rounds resumed", extra={"event": "rounds_resumed", "round": round_,
                                                     "stalled_rounds": self.rounds_stalled})
            self.rounds_stalled, self.reason = 0, None
            self._refused.clear()
            self._last_refusal = None
            return
        self.rounds_stalled += 1
        if self._refused:
            counts = ", ".join(f"{n} {name}" for name, n in self._refused.most_common())
            self.reason = f"neighbours' messages refused ({counts}); last: {self._last_refusal}"
        else:
            self.reason = f"no message from any of {neighbours} neighbours before the round deadline"
        if self.rounds_stalled == self.threshold:
            log.warning(
                "rounds stalled: training alone although neighbours are connected",
                extra={"event": "rounds_stalled", "round": round_, "rounds_stalled": self.rounds_stalled,
                       "reason": self.reason},
            )

    def rounds_begin(self) -> None:
        """The round loop starts now: the time a node spent waiting for its
        first neighbours (``learning.start_wait_s``) was no stall."""
        self._last_round_at = self.clock()

    def watch(self, deadline_s: float, connected: int, phase: str | None) -> None:
        """Periodic check that the round loop completes rounds at all while
        neighbours are connected (a loop blocked in a send, say)."""
        waited = self.clock() - self._last_round_at
        if connected == 0 or waited < STALL_DEADLINES * deadline_s:
            return
        if not self._loop_stalled:
            self._loop_stalled = True
            self.reason = (f"no round completed in {waited:.0f} s ({STALL_DEADLINES:g} deadlines) with "
                           f"{connected} neighbours connected; the round loop is in phase {phase or 'start-up'}")
            log.warning("rounds stalled: no round completed", extra={"event": "rounds_stalled", "reason": self.reason})

    def status(self) -> dict[str, Any]:
        return {"rounds_stalled": self.rounds_stalled, "stalled": self.stalled, "stall_reason": self.reason}
