"""Per-peer byte budgets drawing from one node-wide pool, and the rules on a
peer's stream opens that both muxers share: known answers."""

from __future__ import annotations

import pytest

from murmur.errors import MuxerError
from murmur.protocol.budget import FRAME_SLACK, BytePool, StreamOpens, least_peer_limit
from tests.clocks import ManualClock


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


def _opens(client: bool = True, burst: int = 4, max_refused: int = 3,
           max_live: int = 2) -> tuple[StreamOpens, ManualClock]:
    clock = ManualClock()
    return StreamOpens(client, burst, 1.0, max_refused, max_live, clock), clock


def test_the_peers_stream_ids_are_of_its_parity_and_increasing() -> None:
    opens, _ = _opens(client=True)  # we dialled: the peer opens even ids
    with pytest.raises(MuxerError, match="wrong parity"):
        opens.open(1, live=0, going_away=False)
    assert opens.open(2, live=0, going_away=False) is None
    with pytest.raises(MuxerError, match="not increasing"):
        opens.open(2, live=0, going_away=False)
    server, _ = _opens(client=False)
    assert server.open(1, live=0, going_away=False) is None


def test_an_open_is_refused_going_away_past_the_live_bound_and_for_rate() -> None:
    opens, clock = _opens(burst=2, max_live=1)
    assert opens.open(2, live=0, going_away=True) == "session is going away"
    assert opens.open(4, live=1, going_away=False) == "stream limit 1 reached"
    assert opens.open(6, live=0, going_away=False) is None
    assert opens.open(8, live=0, going_away=False) == "streams opened too fast"  # the burst of 2 is spent
    clock.now += 1.0  # one more a second
    assert opens.open(10, live=0, going_away=False) is None


def test_refusals_for_rate_beyond_what_is_forgiven_are_a_flood() -> None:
    opens, _ = _opens(burst=1, max_refused=2)
    assert opens.open(2, live=0, going_away=False) is None
    assert opens.open(4, live=0, going_away=False) == "streams opened too fast"
    assert opens.open(6, live=0, going_away=False) == "streams opened too fast"
    with pytest.raises(MuxerError, match="open flood"):
        opens.open(8, live=0, going_away=False)


def test_refusals_in_a_row_are_a_flood_and_an_accepted_stream_ends_the_streak() -> None:
    opens, _ = _opens(max_refused=2)
    opens.refused()
    opens.refused()
    opens.accepted()
    opens.refused()
    opens.refused()
    with pytest.raises(MuxerError, match="3 streams refused in a row"):
        opens.refused()


def test_a_frame_names_a_stream_never_opened_by_either_side() -> None:
    opens, _ = _opens(client=True)  # our ids odd, next 5: 1 and 3 were ours
    opens.open(4, live=0, going_away=False)
    assert not opens.never_opened(3, next_local_id=5)
    assert opens.never_opened(5, next_local_id=5)
    assert not opens.never_opened(4, next_local_id=5)
    assert not opens.never_opened(2, next_local_id=5)
    assert opens.never_opened(6, next_local_id=5)
