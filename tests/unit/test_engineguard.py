"""EngineGuard: one call in a worker thread, the loop's engine calls deferred meanwhile, in order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from murmur.node.engineguard import EngineGuard

WAIT_S = 30.0  # a bound on a loaded machine, never a synchronisation


async def _until(predicate: object, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.001)


async def test_calls_made_while_busy_run_after_the_off_loop_call_and_its_then_in_order() -> None:
    guard = EngineGuard()
    release = threading.Event()
    started = threading.Event()
    events: list[str] = []
    loop_thread = threading.get_ident()

    def work() -> str:
        started.set()
        assert threading.get_ident() != loop_thread
        assert release.wait(WAIT_S)
        events.append("work")
        return "closed"

    job = asyncio.create_task(guard.off_loop(work, lambda result: events.append(f"then {result}")))
    await _until(started.is_set, "the worker thread")
    assert guard.busy
    guard.call(lambda: events.append("call 1"))
    asked = asyncio.create_task(guard.run(lambda: events.append("run 2") or 2))
    await asyncio.sleep(0)  # the task queues its call
    guard.call(lambda: events.append("call 3"))
    await asyncio.sleep(0)  # the loop keeps running: nothing deferred ran
    assert events == [] and not asked.done()
    release.set()
    assert await job == "closed"
    assert await asked == 2
    assert events == ["work", "then closed", "call 1", "run 2", "call 3"]
    assert not guard.busy and guard.deferred_total == 3
    events.clear()
    guard.call(lambda: events.append("idle"))  # idle: at once
    assert await guard.run(lambda: 5) == 5
    assert events == ["idle"]


async def test_a_cancelled_caller_leaves_the_call_to_finish_and_settled_waits_for_it() -> None:
    """A stop during an off-loop close: the thread, its then and the
    deferred calls all complete, and settled() returns only after them."""
    guard = EngineGuard()
    release = threading.Event()
    started = threading.Event()
    events: list[str] = []

    def work() -> int:
        started.set()
        assert release.wait(WAIT_S)
        events.append("work")
        return 1

    job = asyncio.create_task(guard.off_loop(work, lambda _: events.append("then")))
    await _until(started.is_set, "the worker thread")
    guard.call(lambda: events.append("deferred"))
    dropped = asyncio.create_task(guard.run(lambda: events.append("dropped")))
    await asyncio.sleep(0)
    job.cancel()
    dropped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    settled = asyncio.create_task(guard.settled())
    await asyncio.sleep(0.01)
    assert not settled.done() and events == []  # still in its thread: settled waits
    release.set()
    await settled
    assert events == ["work", "then", "deferred"]  # the cancelled run() never ran
    assert not guard.busy


async def test_what_the_calls_raise_goes_to_their_callers() -> None:
    guard = EngineGuard()
    release = threading.Event()
    started = threading.Event()

    def work() -> None:
        started.set()
        assert release.wait(WAIT_S)
        raise ValueError("the close failed")

    def bad() -> None:
        raise KeyError("deferred")

    job = asyncio.create_task(guard.off_loop(work))
    await _until(started.is_set, "the worker thread")
    asked = asyncio.create_task(guard.run(bad))
    guard.call(bad)  # logged: no caller is left to tell
    ran: list[int] = []
    guard.call(lambda: ran.append(1))  # the queue goes on past a failed call
    release.set()
    with pytest.raises(ValueError, match="the close failed"):
        await job
    with pytest.raises(KeyError):
        await asked
    assert ran == [1] and not guard.busy
    await guard.settled()  # nothing in flight


async def test_one_off_loop_call_at_a_time() -> None:
    guard = EngineGuard()
    release = threading.Event()
    first = asyncio.create_task(guard.off_loop(lambda: release.wait(WAIT_S)))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await guard.off_loop(lambda: None)
    release.set()
    assert await first
