"""Staggered dial lanes (murmur/node/dialrace.py): the first result wins, a
later lane waits its delay unless the one before failed, the losers are
cancelled, and a dial that fails everywhere raises its last failure."""

from __future__ import annotations

import asyncio
import time

import pytest

from murmur.node.dialrace import Lane, first_of

LONG_S = 60.0  # a delay or a hang no test may wait out


class Dial:
    """One attempt: succeeds with ``value``, fails with ``error``, or hangs until cancelled."""

    def __init__(self, value: str | None = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.started = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> str:
        self.started.set()
        if self.error is not None:
            raise self.error
        if self.value is not None:
            return self.value
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


async def test_a_hanging_direct_dial_loses_to_the_delayed_lane_and_is_cancelled() -> None:
    hanging, circuit = Dial(), Dial("circuit")
    started = time.monotonic()
    got = await first_of([Lane([hanging]), Lane([circuit], 0.05)], (OSError,))
    assert got == "circuit" and hanging.cancelled
    assert time.monotonic() - started < 5.0  # the delay, not the hang


async def test_the_delayed_lane_does_not_start_when_the_first_wins_within_its_delay() -> None:
    direct, circuit = Dial("direct"), Dial("circuit")
    assert await first_of([Lane([direct]), Lane([circuit], LONG_S)], (OSError,)) == "direct"
    assert not circuit.started.is_set()


async def test_the_next_lane_starts_at_once_when_every_address_before_it_failed() -> None:
    refused = [Dial(error=ConnectionRefusedError()), Dial(error=OSError("no route"))]
    circuit = Dial("circuit")
    started = time.monotonic()
    assert await first_of([Lane(refused), Lane([circuit], LONG_S)], (OSError,)) == "circuit"
    assert time.monotonic() - started < 5.0
    assert all(d.started.is_set() for d in refused)  # one after another within the lane


async def test_every_failure_raises_the_last_and_nothing_is_left_running() -> None:
    with pytest.raises(TimeoutError):
        await first_of([Lane([Dial(error=OSError("a"))]), Lane([Dial(error=TimeoutError("b"))], LONG_S)],
                       (OSError, TimeoutError))
    assert {t.get_name() for t in asyncio.all_tasks()} == {asyncio.current_task().get_name()}  # type: ignore[union-attr]


async def test_an_error_that_is_no_dial_failure_propagates() -> None:
    with pytest.raises(ValueError, match="a bug"):
        await first_of([Lane([Dial(error=ValueError("a bug"))]), Lane([Dial()], 0.01)], (OSError,))


async def test_cancelling_the_race_cancels_every_lane() -> None:
    hanging, later = Dial(), Dial()
    race = asyncio.ensure_future(first_of([Lane([hanging]), Lane([later], 0.0)], (OSError,)))
    await asyncio.wait_for(later.started.wait(), 5)
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await race
    assert hanging.cancelled and later.cancelled


async def test_no_address_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        await first_of([Lane([]), Lane([], 0.1)], (OSError,))
