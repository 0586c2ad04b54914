"""StartGate: who has arrived, and when the held learners may pass."""

from __future__ import annotations

import asyncio

import pytest

from murmur.node.startgate import StartGate


async def test_the_gate_is_all_arrived_after_the_expected_learners_and_passes_them_when_opened() -> None:
    gate = StartGate(2)
    first = asyncio.ensure_future(gate.passed())
    await asyncio.sleep(0)  # let it arrive
    assert gate.arrived == 1 and not gate.all_arrived.is_set() and not first.done()
    second = asyncio.ensure_future(gate.passed())
    await asyncio.sleep(0)
    assert gate.all_arrived.is_set() and not first.done() and not second.done()  # held until opened
    gate.open()
    await asyncio.wait_for(asyncio.gather(first, second), 1.0)


def test_a_gate_for_no_learners_is_all_arrived_at_once() -> None:
    """A worker whose nodes learn nothing (relays): its controller must not wait for arrivals."""
    assert StartGate(0).all_arrived.is_set()
    with pytest.raises(ValueError):
        StartGate(-1)
