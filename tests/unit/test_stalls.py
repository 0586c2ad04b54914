"""StallMonitor: a node that learns alone while it has neighbours says so."""

from __future__ import annotations

import logging

import pytest

from murmur.errors import LimitExceeded
from murmur.node.stalls import STALL_DEADLINES, STALL_ROUNDS, StallMonitor
from murmur.ratelog import Streak
from murmur.protocol.layout import ShapeMismatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refused_messages_for_three_rounds_stall_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    monitor = StallMonitor()
    with caplog.at_level(logging.WARNING, logger="murmur.node.stalls"):
        for round_ in range(STALL_ROUNDS):
            monitor.on_refused("…peerA", ShapeMismatch("round transfer of shape (2, 31), expected (2, 21)"))
            monitor.on_refused("…peerB", LimitExceeded("round transfer of 800 bytes, limit 400"))
            monitor.on_round(round_, neighbours=2, received=0)
            assert monitor.stalled is (round_ == STALL_ROUNDS - 1)
    status = monitor.status()
    assert status["rounds_stalled"] == STALL_ROUNDS and status["stalled"]
    assert status["stall_reason"].startswith("neighbours' messages refused (3 ShapeMismatch, 3 LimitExceeded)")
    assert "LimitExceeded from …peerB: round transfer of 800 bytes, limit 400" in status["stall_reason"]
    assert [r.message for r in caplog.records] == ["rounds stalled: training alone although neighbours are connected"]


def test_a_round_with_a_message_or_without_neighbours_resets_it(caplog: pytest.LogCaptureFixture) -> None:
    monitor = StallMonitor()
    for round_ in range(STALL_ROUNDS + 2):
        monitor.on_round(round_, neighbours=3, received=0)
    assert monitor.stalled and "no message from any of 3 neighbours" in monitor.reason
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="murmur.node.stalls"):
        monitor.on_round(9, neighbours=3, received=1)
    assert monitor.status() == {"rounds_stalled": 0, "stalled": False, "stall_reason": None}
    assert [r.message for r in caplog.records] == ["rounds resumed"]
    for round_ in range(10, 10 + STALL_ROUNDS + 1):
        monitor.on_round(round_, neighbours=0, received=0)  # alone: nobody to learn from, not a stall
    assert not monitor.stalled


def test_a_round_loop_that_completes_no_round_is_stalled_only_with_neighbours() -> None:
    clock = Clock()
    monitor = StallMonitor(clock=clock)
    clock.now += STALL_DEADLINES * 2.0 + 1
    monitor.watch(deadline_s=2.0, connected=0, phase="train_s")
    assert not monitor.stalled  # nobody connected: rounds alone last their deadline, nothing is stuck
    monitor.watch(deadline_s=2.0, connected=2, phase="send_s")
    assert monitor.stalled and "the round loop is in phase send_s" in monitor.reason
    monitor.on_round(0, neighbours=2, received=2)
    assert not monitor.stalled
    clock.now += STALL_DEADLINES * 2.0 - 1
    monitor.watch(deadline_s=2.0, connected=2, phase="wait_s")
    assert not monitor.stalled


def test_the_wait_for_the_first_neighbours_is_no_stall() -> None:
    """A node that waited ``learning.start_wait_s`` for its neighbours begins
    its rounds then: the stall clock starts there, not at construction."""
    clock = Clock()
    monitor = StallMonitor(clock=clock)
    clock.now += STALL_DEADLINES * 2.0 * 10  # a long start wait
    monitor.rounds_begin()
    monitor.watch(deadline_s=2.0, connected=2, phase="train_s")
    assert not monitor.stalled
    clock.now += STALL_DEADLINES * 2.0 + 1
    monitor.watch(deadline_s=2.0, connected=2, phase="train_s")
    assert monitor.stalled


def test_a_streak_is_told_at_its_first_round_then_once_per_every_more() -> None:
    """Rounds 3, 103, 203 of one streak are told; a reset starts it over."""
    streak = Streak(first=3, every=100)
    told = [r for r in range(1, 251) if streak.hit()]
    assert told == [3, 103, 203] and streak.count == 250
    streak.reset()
    assert [streak.hit() for _ in range(3)] == [False, False, True]
    every_hundredth = Streak(first=100, every=100)
    assert [r for r in range(1, 251) if every_hundredth.hit()] == [100, 200]
