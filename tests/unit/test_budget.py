"""Per-peer byte budgets drawing from one node-wide pool: known answers."""

from __future__ import annotations

import pytest

from murmur.protocol.budget import FRAME_SLACK, BytePool, least_peer_limit


def test_reserve_is_the_peers_own_and_the_rest_draws_from_the_pool() -> None:
    pool = BytePool(100)
    peer = pool.budget(limit=50, reserve=10)
    assert peer.charge(10) and pool.used == 0 and peer.pooled == 0
    assert peer.charge(20) and (peer.used, peer.pooled, pool.used) == (30, 20, 20)
    assert peer.headroom() == 20  # its limit binds before the pool (80 left)
    assert not peer.try_acquire(21) and peer.used == 30
    assert peer.try_acquire(20) and peer.used == 50 and peer.over  # at the limit: take nothing more
    peer.release(45)
    assert (peer.used, pool.used, peer.peak) == (5, 0, 50) and not peer.over


def test_charge_counts_what_arrived_past_the_limit_and_says_stop() -> None:
    pool = BytePool(1000)
    peer = pool.budget(limit=100)
    assert not peer.charge(130)  # already here: counted, never refused
    assert peer.used == 130 and peer.over and peer.headroom() == 0
    assert not peer.try_acquire(1)
    with pytest.raises(ValueError):
        peer.release(131)
    with pytest.raises(ValueError):
        peer.charge(-1)


def test_an_empty_pool_stops_peers_beyond_their_reserve_only() -> None:
    pool = BytePool(50)
    hog = pool.budget(limit=100, reserve=10)
    small = pool.budget(limit=100, reserve=10)
    assert not hog.charge(60)  # 50 from the pool: it is dry
    assert pool.over and hog.over
    assert small.charge(5) and not small.over and small.headroom() == 5  # its reserve still flows
    assert not small.charge(5)  # reserve spent, pool dry
    woken: list[str] = []
    small.wait(lambda: woken.append("small"))
    hog.release(5)  # the pool is under capacity again: its waiters are told, once
    assert woken == ["small"] and pool.used == 45 and not pool.over and pool.waiting == 0
    hog.release(1)
    assert woken == ["small"]
    hog.charge(6)  # dry again; two wait, oldest first
    hog.wait(lambda: woken.append("hog"))
    small.wait(lambda: woken.append("small, first callback"))
    small.wait(lambda: woken.append("small, replaced"))  # one callback per budget; keeps its place
    assert pool.waiting == 2
    hog.release(1)
    assert woken == ["small", "hog", "small, replaced"] and pool.waiting == 0


def test_close_gives_everything_back_and_stops_waiting() -> None:
    pool = BytePool(10)
    peer = pool.budget(limit=100)
    other = pool.budget(limit=100)
    peer.charge(40)
    called: list[int] = []
    peer.wait(lambda: called.append(1))
    other.wait(lambda: called.append(2))
    peer.close()
    assert pool.used == 0 and called == [2] and pool.waiting == 0
    peer.release(10)  # late releases (a message taken after the close) are no-ops
    assert not peer.charge(1) and not peer.try_acquire(1) and pool.used == 0


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        BytePool(0)
    with pytest.raises(ValueError):
        BytePool(10).budget(limit=10, reserve=11)
    assert least_peer_limit(1000) == 2 * (1000 + FRAME_SLACK)
