"""Cooloff: addresses whose connections keep being dropped for faults wait before connecting again."""

from __future__ import annotations

from murmur.protocol.cooloff import Cooloff
from tests.clocks import ManualClock


def test_offences_within_the_window_cool_the_address_for_a_while() -> None:
    clock = ManualClock(100.0)
    c = Cooloff(offences=3, window_s=30.0, cool_s=10.0, clock=clock)
    assert not c.offence("198.18.0.5") and not c.offence("198.18.0.5")
    assert not c.cooling("198.18.0.5")  # two drops: still welcome
    assert c.offence("198.18.0.5")
    assert c.cooling("198.18.0.5") and c.cooling("198.18.0.5") and c.refused == 2
    assert not c.cooling("198.18.0.6")  # only that address
    clock.now += 10.0
    assert not c.cooling("198.18.0.5")  # served its time
    assert not c.offence("198.18.0.5")  # and starts again from zero


def test_offences_spread_beyond_the_window_never_cool() -> None:
    clock = ManualClock(100.0)
    c = Cooloff(offences=3, window_s=30.0, clock=clock)
    for _ in range(10):
        assert not c.offence("198.18.0.5")
        clock.now += 16.0  # three drops always span more than the window


def test_the_machine_s_own_loopback_is_never_cooled() -> None:
    c = Cooloff(offences=1)
    assert not c.offence("127.0.0.1") and not c.offence("::1")
    assert not c.cooling("127.0.0.1")
    assert c.offence("127.70.0.1")  # another 127.x address is a party like any other (testnets use them)


def test_memory_is_bounded() -> None:
    c = Cooloff(offences=1, max_addrs=8)
    for i in range(100):
        c.offence(f"198.18.1.{i}")
    assert len(c._seen) <= 8 and len(c._until) <= 8
    assert c.cooling("198.18.1.99") and not c.cooling("198.18.1.0")  # the oldest were forgotten
