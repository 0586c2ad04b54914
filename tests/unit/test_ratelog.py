"""RateLimitedLog: per-key and total budgets per window, one summary of the rest."""

from __future__ import annotations

import logging

import pytest

from murmur.ratelog import OTHER_KEYS, LogBudget, RateLimitedLog
from tests.clocks import ManualClock

LOG = logging.getLogger("murmur.test.ratelog")


def _lines(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == msg]


def _summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "log_suppressed"]


def test_budgets_per_key_and_in_total_then_one_summary_per_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murmur.test")
    clock = ManualClock(100.0)
    limited = RateLimitedLog("probe", LOG, LogBudget(per_key=2, total=5, window_s=10.0), clock)
    for _ in range(100):
        limited.warning(LOG, "a", "line", extra={"k": 1})
    for key in "bcdefgh":
        limited.warning(LOG, key, "line")
    lines = _lines(caplog, "line")
    assert [getattr(r, "k", None) for r in lines[:2]] == [1, 1]  # extras pass through
    assert len(lines) == 5 and not _summaries(caplog)  # a: 2, then b, c, d: the total is spent
    clock.now += 9.9
    limited.flush()
    assert not _summaries(caplog)  # the window has not ended
    clock.now += 0.1
    limited.flush()
    (summary,) = _summaries(caplog)
    assert (summary.suppressed, summary.keys, summary.what) == (98 + 4, 5, "probe")
    assert summary.top.startswith("a=98") and summary.levelno == logging.WARNING
    assert limited.suppressed_total == 102
    limited.warning(LOG, "a", "line")  # a new window: room again
    assert len(_lines(caplog, "line")) == 6
    limited.flush()
    limited.close()
    assert len(_summaries(caplog)) == 1  # nothing suppressed since: no summary


def test_an_ended_window_is_summarised_by_the_next_line_and_close_summarises_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murmur.test")
    clock = ManualClock(100.0)
    limited = RateLimitedLog("probe", LOG, LogBudget(per_key=1, total=10, window_s=5.0), clock)
    for _ in range(3):
        limited.warning(LOG, "a", "line")
    clock.now += 6
    assert limited.warning(LOG, "a", "line")
    assert [s.suppressed for s in _summaries(caplog)] == [2]
    assert not limited.warning(LOG, "a", "line")
    limited.close()
    assert [s.suppressed for s in _summaries(caplog)] == [2, 1]


def test_keys_beyond_max_keys_are_counted_together(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murmur.test")
    clock = ManualClock(100.0)
    limited = RateLimitedLog("probe", LOG, LogBudget(per_key=1, total=1000, max_keys=3, top_keys=10), clock)
    for key in range(10):
        limited.warning(LOG, key, "line")
        limited.warning(LOG, key, "line")
    assert len(_lines(caplog, "line")) == 3  # only 3 keys tracked: new ones are over budget
    limited.close()
    (summary,) = _summaries(caplog)
    assert summary.suppressed == 17 and summary.keys == 4  # 0, 1, 2 and everyone else together
    assert f"{OTHER_KEYS}=14" in summary.top


def test_a_level_the_logger_drops_is_not_charged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="murmur.test")
    limited = RateLimitedLog("probe", LOG, LogBudget(per_key=1, total=1), ManualClock(100.0))
    assert not limited.log(LOG, logging.DEBUG, "a", "quiet")
    assert limited.warning(LOG, "a", "loud")
    limited.close()
    assert limited.suppressed_total == 0 and not _summaries(caplog)


def test_budget_checks_its_numbers() -> None:
    with pytest.raises(ValueError):
        LogBudget(window_s=0)
    with pytest.raises(ValueError):
        LogBudget(max_keys=0)
