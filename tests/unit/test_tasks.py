"""TaskManager failure records: what counts as a crash, and as a failing periodic task."""

from __future__ import annotations

import asyncio
import logging

import pytest

from murmur.tasks import FAILING_AFTER, MAX_ERROR_CHARS, TaskFailure, TaskManager, describe
from tests.integration.cluster import wait_until

BOUND_S = 5.0


async def test_a_task_that_raises_is_recorded_as_crashed_and_reported_once():
    seen: list[TaskFailure] = []
    tasks = TaskManager("test", on_crash=seen.append)

    async def boom() -> None:
        raise ValueError("train() returned dict")

    task = tasks.spawn("rounds", boom)
    await asyncio.wait_for(task, BOUND_S)
    assert [(f.task, f.error, f.errors) for f in tasks.crashes()] == [("rounds", "ValueError: train() returned dict", 1)]
    assert seen == tasks.crashes() and seen[0].since > 0
    assert tasks.error_count == 1 and "rounds" not in tasks
    await tasks.shutdown()
    assert tasks.crashes() == seen  # the record outlives the shutdown: the daemon reports it after stopping


async def test_clean_return_cancel_and_shutdown_are_not_crashes():
    seen: list[TaskFailure] = []
    tasks = TaskManager("test", on_crash=seen.append)
    started = asyncio.Event()

    async def done() -> int:
        return 1

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    assert await asyncio.wait_for(tasks.spawn("done", done), BOUND_S) == 1
    tasks.spawn("cancelled", forever)
    await asyncio.wait_for(started.wait(), BOUND_S)
    tasks.cancel("cancelled")
    tasks.spawn("running", forever)
    await tasks.shutdown()
    assert tasks.crashes() == [] and seen == [] and tasks.error_count == 0


async def test_a_restarted_task_is_not_a_crash_but_its_errors_count():
    seen: list[TaskFailure] = []
    tasks = TaskManager("test", on_crash=seen.append)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("transient")
        return "ok"

    assert await asyncio.wait_for(tasks.spawn("flaky", flaky, restart=True), BOUND_S) == "ok"
    assert calls == 2 and tasks.crashes() == [] and seen == [] and tasks.error_count == 1


async def test_periodic_failures_are_failing_after_a_run_of_them_and_recover():
    seen: list[TaskFailure] = []
    tasks = TaskManager("test", on_crash=seen.append)
    n = FAILING_AFTER
    outcomes = ["fail"] * (n - 1) + ["ok"] + ["fail"] * n + ["ok"]
    # Each call first notes what failing() says then: the outcome of every call before it.
    after: list[list[tuple[str, str, int]]] = []

    async def step() -> None:
        after.append([(f.task, f.error, f.errors) for f in tasks.failing()])
        call = len(after)
        if call <= len(outcomes) and outcomes[call - 1] == "fail":
            raise OSError(f"disk full ({call})")

    tasks.periodic("save-peers", 0.0, step)
    await wait_until(lambda: len(after) > len(outcomes), BOUND_S, "every periodic call")
    await tasks.shutdown()

    assert after[: n + 1] == [[]] * (n + 1)  # one or two in a row are transient; a success resets the run
    assert after[n + 1 : 2 * n] == [[]] * (n - 1)
    assert after[2 * n] == [("save-peers", f"OSError: disk full ({2 * n})", n)]  # n in a row: failing
    assert after[2 * n + 1] == []  # recovered by one good call
    assert tasks.crashes() == [] and seen == []  # a periodic task is never a crash: it keeps running
    assert tasks.error_count == 2 * n - 1


def test_describe_is_one_bounded_line():
    assert describe(ValueError("a\n  b\tc")) == "ValueError: a b c"
    assert describe(KeyError()) == "KeyError"
    long = describe(RuntimeError("x" * 10_000))
    assert len(long) == MAX_ERROR_CHARS and long.startswith("RuntimeError: xxx") and long.endswith("...")


@pytest.mark.parametrize("n", [1, 40])
async def test_crash_records_are_bounded_and_newest_kept(n):
    tasks = TaskManager("test")

    async def boom() -> None:
        raise RuntimeError("bug")

    for i in range(n):
        await asyncio.wait_for(tasks.spawn(f"link-{i}", boom), BOUND_S)
    names = [f.task for f in tasks.crashes()]
    assert names == [f"link-{i}" for i in range(max(0, n - 32), n)]
    assert tasks.error_count == n


async def test_finished_tasks_leave_the_registry():
    """One task per accepted connection must not mean one record per connection ever made."""
    tasks = TaskManager("test")

    async def done() -> None:
        return None

    for i in range(100):
        await asyncio.wait_for(tasks.spawn(f"accept-{i}", done), BOUND_S)
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert len(tasks._tasks) == 0 and tasks.names() == []
    replaced = tasks.spawn("same", done)
    current = tasks.spawn("same", done, replace=True)
    await asyncio.wait({replaced, current}, timeout=BOUND_S)  # the replaced one was cancelled
    await asyncio.sleep(0)
    assert "same" not in tasks._tasks
    await tasks.shutdown()


async def test_a_periodic_task_failing_every_call_logs_a_bounded_number_of_lines(caplog):
    tasks = TaskManager("test")
    calls = 0
    total = 64

    async def broken() -> None:
        nonlocal calls
        calls += 1
        if calls <= total:
            raise RuntimeError("maintain bug")
        if calls == total + 1:
            raise ValueError("another bug")

    with caplog.at_level(logging.INFO, logger="murmur.tasks"):
        tasks.periodic("maintain", 0.0, broken)
        await wait_until(lambda: calls > total + 2, BOUND_S, "every periodic call")
        await tasks.shutdown()
    lines = [(r.levelname, r.getMessage().split(":")[0], r.exc_info is not None) for r in caplog.records]
    assert lines[0] == ("ERROR", "periodic task failed", True)  # the first: with its traceback
    # the same error again only at 2, 4, ..., 64 in a row, without one: 6 lines, not 63 tracebacks
    assert lines[1:7] == [("ERROR", "periodic task still failing", False)] * 6
    assert lines[7] == ("ERROR", "periodic task failed", True)  # a new error is shown whole
    assert lines[8:] == [("INFO", "periodic task works again", False)]
    assert tasks.error_count == total + 1
