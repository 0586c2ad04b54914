"""When churn events fire: whose round an ``at_round`` counts (known answers)."""

from __future__ import annotations

import pytest

from murmur.testnet.churn import LATE_SLACK_ROUNDS, ChurnSchedule, reference_round
from murmur.testnet.scenario import Action, ChurnEvent, Reference, RoundOf

FRONT, MEDIAN, SLOWEST = RoundOf(Reference.FRONT), RoundOf(Reference.MEDIAN), RoundOf(Reference.SLOWEST)


@pytest.mark.parametrize(
    ("rounds", "front", "median", "slowest"),
    [
        ({0: 8, 1: 8, 2: 9, 3: 9}, 9, 8, 8),  # 9: only half the nodes; 8: all of them
        ({0: 7, 1: 9, 2: 8}, 9, 8, 7),
        ({0: 3, 1: 10, 2: 10, 3: 10, 4: 30}, 30, 10, 3),  # one racing ahead, one lagging: neither moves the median
        ({0: 0, 1: 12, 2: 12, 3: 12}, 12, 12, 0),  # a restarted node at round 0 holds back only the slowest
        ({5: 4}, 4, 4, 4),
        ({}, None, None, None),
    ],
)
def test_reference_rounds(rounds: dict[int, int], front: int | None, median: int | None, slowest: int | None) -> None:
    assert reference_round(FRONT, rounds) == front
    assert reference_round(MEDIAN, rounds) == median
    assert reference_round(SLOWEST, rounds) == slowest


def test_a_named_node_counts_its_own_round_only() -> None:
    assert reference_round(RoundOf(Reference.NODE, 2), {0: 9, 1: 9, 2: 4}) == 4
    assert reference_round(RoundOf(Reference.NODE, 3), {0: 9, 1: 9, 2: 4}) is None  # down, or not reported yet


def heal(at_round: int | None = None, round_of: RoundOf | None = None, at_s: float | None = None) -> ChurnEvent:
    return ChurnEvent(Action.HEAL, at_round=at_round, at_s=at_s, round_of=round_of)


def test_events_fire_once_their_own_reference_reaches_the_round_in_file_order() -> None:
    a, b, c, d = heal(8), heal(8, SLOWEST), heal(9, RoundOf(Reference.NODE, 1)), heal(at_s=5.0)
    schedule = ChurnSchedule([a, b, c, d])
    assert schedule.due({}, 0.0) == []  # no rounds counted yet (nodes still starting)
    assert schedule.due({0: 9, 1: 8, 2: 7}, 0.0) == [a]  # median 8; the slowest is at 7
    assert schedule.due({0: 9, 1: 8, 2: 7}, 0.0) == []  # a fired once
    assert schedule.due({0: 10, 1: 8, 2: 8}, 0.0) == [b]  # node1 is at 8, not 9
    assert schedule.due({0: 10, 2: 9}, 0.0) == []  # node1 went down: its round is unknown
    assert schedule.due({0: 10, 1: 9, 2: 9}, 1.0) == [c]  # then d waits for its time
    assert schedule.pending == 1 and list(schedule.upcoming()) == [d]
    assert schedule.due({0: 10, 1: 9, 2: 9}, 5.0) == [d]
    assert schedule.pending == 0


def test_a_later_event_never_fires_before_an_earlier_one() -> None:
    first, second = heal(20), heal(5)
    schedule = ChurnSchedule([first, second])
    assert schedule.due({0: 10, 1: 10}, 0.0) == []
    assert schedule.due({0: 20, 1: 20}, 0.0) == [first, second]


def test_a_schedule_seen_late_keeps_its_spacing() -> None:
    """Rounds first seen at 30 (a loaded box): the crash due at 4 fires, and
    the heal due 6 rounds after the partition still waits 6 rounds."""
    crash, partition, end = heal(4), heal(14), heal(20)
    schedule = ChurnSchedule([crash, partition, end])
    assert schedule.due({0: 30, 1: 30}, 0.0) == [crash]  # not all three at once
    assert schedule.lag == 26 and schedule.trigger(partition) == 40
    assert schedule.due({0: 39, 1: 39}, 0.0) == []
    assert schedule.due({0: 40, 1: 41}, 0.0) == [partition]
    assert schedule.due({0: 45, 1: 45}, 0.0) == []
    assert schedule.due({0: 46, 1: 46}, 0.0) == [end] and schedule.lag == 26


def test_rounds_spent_applying_an_event_move_the_next_one() -> None:
    """A partition fired at 14 took effect at 19 (relayed to every worker):
    the heal due at 20 waits until 25, six rounds of partition as the file
    says, not one; an event applied within the slack moves nothing."""
    partition, end, later = heal(14), heal(20), heal(30)
    schedule = ChurnSchedule([partition, end, later], last_round=40)
    assert schedule.due({0: 14, 1: 14}, 0.0) == [partition]
    schedule.took_effect(14, 19)
    assert schedule.lag == 5 and schedule.trigger(end) == 25
    assert schedule.due({0: 24, 1: 24}, 0.0) == []
    assert schedule.due({0: 25, 1: 25}, 0.0) == [end]
    schedule.took_effect(25, 25 + LATE_SLACK_ROUNDS)
    schedule.took_effect(None, 40)
    assert schedule.lag == 5 and schedule.trigger(later) == 35


def test_a_late_schedule_never_moves_an_event_past_the_last_round() -> None:
    """The nodes stop at the last round: an event due after it would never fire."""
    crash, stop = heal(4), heal(30)
    schedule = ChurnSchedule([crash, stop], last_round=40)
    assert schedule.due({0: 30, 1: 30}, 0.0) == [crash] and schedule.lag == 26
    assert schedule.trigger(stop) == 39
    assert schedule.due({0: 39, 1: 39}, 0.0) == [stop]


def test_an_event_a_round_or_two_late_is_on_time() -> None:
    first, second = heal(4), heal(6)
    schedule = ChurnSchedule([first, second])
    assert schedule.due({0: 6, 1: 6}, 0.0) == [first, second]  # 2 rounds late: within the slack
    assert schedule.lag == 0
