"""Which inbound connection gives way for a newcomer: known answers."""

from __future__ import annotations

import itertools

from murmur.protocol.admission import Slot, SlotState, choose_victim

TTL = 60.0
NOW = 1000.0


def test_nothing_to_evict_when_empty_or_all_useful() -> None:
    assert choose_victim([], NOW, TTL) is None
    useful = [Slot(i, "a", 0.0, True, useful_at=NOW - 1) for i in range(3)]
    assert choose_victim(useful, NOW, TTL) is None


def test_most_crowded_subnet_first_then_half_open_then_oldest() -> None:
    slots = [
        Slot(1, "lonely", 0.0, authenticated=False),  # oldest of all, but alone in its subnet
        Slot(2, "crowded", 50.0, authenticated=True),
        Slot(3, "crowded", 40.0, authenticated=True),
        Slot(4, "crowded", 60.0, authenticated=False),  # half-open: before any authenticated one
        Slot(5, "middle", 10.0, authenticated=False),
        Slot(6, "middle", 20.0, authenticated=False),
    ]
    assert choose_victim(slots, NOW, TTL).key == 4  # type: ignore[union-attr]
    slots.remove(slots[3])
    # crowded (2) ties middle (2): half-open before authenticated across the tie, oldest first
    assert choose_victim(slots, NOW, TTL).key == 5  # type: ignore[union-attr]
    assert choose_victim([s for s in slots if s.key != 5 and s.key != 6], NOW, TTL).key == 3  # type: ignore[union-attr]


def test_useful_is_protected_until_it_goes_stale_then_it_goes_last() -> None:
    recent = Slot(1, "a", 0.0, True, useful_at=NOW - TTL)  # exactly at the TTL: still protected
    stale = Slot(2, "a", 0.0, True, useful_at=NOW - TTL - 1)
    unproven = Slot(3, "a", 500.0, True)
    assert recent.protected(NOW, TTL) and not stale.protected(NOW, TTL)
    assert stale.state() is SlotState.STALE and unproven.state() is SlotState.UNPROVEN
    assert choose_victim([recent, stale, unproven], NOW, TTL).key == 3  # type: ignore[union-attr]
    assert choose_victim([recent, stale], NOW, TTL).key == 2  # type: ignore[union-attr]
    # Protected connections do not make their subnet look crowded either.
    also_recent = Slot(4, "a", 0.0, True, useful_at=NOW)
    others = [Slot(10, "b", 900.0, True), Slot(11, "b", 950.0, True)]
    assert choose_victim([recent, also_recent, stale, *others], NOW, TTL).key == 10  # type: ignore[union-attr]


def test_a_flood_from_fewer_subnets_than_connections_never_evicts_the_lone_newcomer() -> None:
    """The issue's squat: max_inbound filled from 20 /24s and refilled as fast
    as slots free up; the honest newcomer, alone in its /24, keeps its slot."""
    max_inbound, subnets = 256, 20
    clock = itertools.count(1)
    keys = itertools.count(1)
    slots = [Slot(next(keys), f"evil{i % subnets}", float(next(clock)), authenticated=i % 2 == 0)
             for i in range(max_inbound)]
    victim = choose_victim(slots, NOW, TTL)
    assert victim is not None and victim.subnet != "honest"
    slots.remove(victim)
    honest = Slot(next(keys), "honest", float(next(clock)), authenticated=False)
    slots.append(honest)
    for i in range(10 * max_inbound):  # the attacker reconnects each evicted slot at once
        victim = choose_victim(slots, NOW, TTL)
        assert victim is not None and victim is not honest
        slots.remove(victim)
        slots.append(Slot(next(keys), f"evil{i % subnets}", float(next(clock)), authenticated=False))
