"""RequestBudget: the limit on public models served to one peer."""

from __future__ import annotations

import pytest

from murmur.node.modelexchange import MODEL_SERVE_BURST, MODEL_SERVE_REFILL_S
from murmur.node.ratelimit import RequestBudget
from tests.clocks import ManualClock


def test_a_burst_then_one_per_refill() -> None:
    clock = ManualClock()
    budget = RequestBudget(3, 2.0, clock)
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    clock.now = 1.9
    assert not budget.take()
    clock.now = 2.0
    assert budget.take() and not budget.take()
    clock.now = 100.0  # idle: refills to the burst, no more
    assert [budget.take() for _ in range(4)] == [True, True, True, False]


def test_a_peer_asking_a_little_too_often_is_still_served_at_the_refill_rate() -> None:
    """The churn testnet's livelock: a node that joined behind asked the same
    neighbour for its model every 1.5 s (a catch-up each round, plus replica
    re-syncs); the served budget refills every 2 s. When refusals were
    charged too (a debt-keeping bucket), the node sank deeper with every
    request and was refused from the 10th on, for good: it never caught up.
    Only what is served may count."""
    clock = ManualClock()
    budget = RequestBudget(MODEL_SERVE_BURST, MODEL_SERVE_REFILL_S, clock)
    served, refused_in_a_row, worst = 0, 0, 0
    for i in range(400):  # 10 minutes, one request every 1.5 s
        clock.now = 1.5 * i
        if budget.take():
            served, refused_in_a_row = served + 1, 0
        else:
            refused_in_a_row += 1
            worst = max(worst, refused_in_a_row)
    assert served >= 1.5 * 400 / MODEL_SERVE_REFILL_S  # all the refill allows (the burst aside)
    assert worst <= 1  # never two refusals in a row at this pace


def test_a_budget_grants_something() -> None:
    with pytest.raises(ValueError):
        RequestBudget(0, 2.0)
    with pytest.raises(ValueError):
        RequestBudget(1, 0.0)
