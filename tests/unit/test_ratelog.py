"""ThrottledLog: a burst per event and interval passes, the rest become one summary line."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from murmur.protocol.ratelog import ThrottledLog


class FakeTimers:
    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, Callable[[], None]]] = []

    def schedule(self, delay: float, callback: Callable[[], None]) -> FakeTimers.Handle:
        handle = FakeTimers.Handle(self, (self.now + delay, callback))
        self.due.append(handle.entry)
        return handle

    def advance(self, to: float) -> None:
        self.now = to
        for entry in [e for e in self.due if e[0] <= to]:
            self.due.remove(entry)
            entry[1]()

    class Handle:
        def __init__(self, timers: FakeTimers, entry: tuple[float, Callable[[], None]]) -> None:
            self.timers, self.entry = timers, entry

        def cancel(self) -> None:
            if self.entry in self.timers.due:
                self.timers.due.remove(self.entry)


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int | None]]:
    return [(r.getMessage(), getattr(r, "event"), getattr(r, "count", None)) for r in caplog.records]


def test_burst_passes_rest_is_summarised_when_the_interval_ends(caplog: pytest.LogCaptureFixture) -> None:
    timers = FakeTimers()
    logger = logging.getLogger("test.ratelog")
    throttled = ThrottledLog(logger, interval_s=10.0, burst=2, schedule=timers.schedule, clock=lambda: timers.now)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for _ in range(500):
            throttled.warning("handshake failed", event="handshake_failed", remote="x")
        throttled.warning("refused", event="inbound_refused")
        assert _records(caplog) == [("handshake failed", "handshake_failed", None)] * 2 + [
            ("refused", "inbound_refused", None)]
        timers.advance(9.9)
        assert len(caplog.records) == 3
        timers.advance(10.0)  # the flood stopped: the timer still writes the summary
        summary = caplog.records[-1]
        assert (summary.getMessage(), getattr(summary, "event")) == ("warnings suppressed", "warnings_suppressed")
        assert (getattr(summary, "suppressed_event"), getattr(summary, "count")) == ("handshake_failed", 498)
        assert len(caplog.records) == 4
        caplog.clear()
        timers.advance(25.0)
        throttled.warning("handshake failed", event="handshake_failed")  # a new interval: passes again
        throttled.flush()  # nothing suppressed: no summary
        assert _records(caplog) == [("handshake failed", "handshake_failed", None)]
        assert timers.due == []


def test_a_continuing_flood_is_summarised_by_the_next_record() -> None:
    timers = FakeTimers()
    lines: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{getattr(record, 'event')}:{getattr(record, 'count', '')}")

    logger = logging.getLogger("test.ratelog.sink")
    logger.addHandler(Sink())
    logger.propagate = False
    throttled = ThrottledLog(logger, interval_s=1.0, burst=1, schedule=timers.schedule, clock=lambda: timers.now)
    for step in range(30):  # 10 per second for 3 s
        timers.now = step / 10
        throttled.warning("x", event="e")
    summary = "warnings_suppressed:9"
    assert lines == ["e:", summary, "e:", summary, "e:"]
