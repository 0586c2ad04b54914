"""Peer table: scores, bans, bounded eviction, crash-safe persistence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.errors import DecodeError, LimitExceeded, StateError
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, CircuitAddr, Multiaddr
from murmur.protocol.peertable import FILE_VERSION, PeerTable, PeerTableConfig, parse_peer_entry
from tests.clocks import ManualClock


def pid(i: int) -> PeerId:
    return Identity.from_seed(i.to_bytes(32, "big")).peer_id


def addr(i: int, host: str = "10.0.0.1") -> Multiaddr:
    return Multiaddr(host, 4000 + i)


def test_add_observe_merge_addresses_and_ignore_self():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(max_addrs_per_peer=2), clock, self_id=pid(0))
    assert table.add(pid(0), [addr(0)]) is None and len(table) == 0
    rec = table.add(pid(1), [addr(1)])
    assert rec is not None and rec.last_seen == 0.0  # hearing of a peer is not seeing it
    clock.now = 1500.0
    table.observe(pid(1), [addr(9, "192.0.2.7")])
    rec = table.get(pid(1))
    assert rec is not None and rec.last_seen == 1500.0
    assert rec.addrs == [addr(9, "192.0.2.7"), addr(1)]  # observed address first
    table.add(pid(1), [addr(2), addr(3)])
    assert len(rec.addrs) == 2  # capped


def test_scores_decay_toward_zero_with_half_life():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(score_half_life_s=100.0), clock)
    table.penalise(pid(1), 40)
    for _ in range(8):
        table.mark_alive(pid(2))
    assert table.score(pid(1)) == pytest.approx(-40)
    clock.now += 100
    assert table.score(pid(1)) == pytest.approx(-20)
    assert table.score(pid(2)) == pytest.approx(4)
    clock.now += 1000
    assert abs(table.score(pid(1))) < 0.1 and 0 < table.score(pid(2)) < 0.01


def test_penalty_below_threshold_bans_for_a_while_then_expires():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(ban_threshold=-50, ban_duration_s=600, score_half_life_s=60), clock)
    table.add(pid(1), [addr(1)])
    assert not table.penalise(pid(1), 30)
    assert table.penalise(pid(1), 30)
    assert table.is_banned(pid(1)) and pid(1) not in {r.peer_id for r in table.usable()}
    clock.now += 599
    assert table.is_banned(pid(1))
    clock.now += 2
    assert not table.is_banned(pid(1)) and pid(1) in {r.peer_id for r in table.usable()}


def test_failures_count_penalise_and_alive_resets():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(failure_penalty=30, failure_floor=-70, ban_threshold=-80), clock)
    assert not table.mark_failure(pid(1))
    assert not table.mark_failure(pid(1))
    assert table.get(pid(1)).failures == 2  # type: ignore[union-attr]
    table.mark_alive(pid(1))
    assert table.get(pid(1)).failures == 0  # type: ignore[union-attr]
    assert table.score(pid(1)) == pytest.approx(-59)
    assert not table.mark_failure(pid(1))  # -70 at most: failures alone never ban
    assert table.score(pid(1)) == pytest.approx(-70)
    assert table.get(pid(1)).failures == 1  # type: ignore[union-attr]
    assert table.penalise(pid(1), 15)  # a fault on top of them does (-85 < -80)


def test_failures_by_made_up_addresses_never_ban_an_honest_peer():
    """Anyone can make our dials to an honest peer fail by telling us a dead
    address for it; one such failure every five minutes (the failure memory)
    held its score near -89 with the default settings, one step from a ban."""
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(), clock)
    for _ in range(24 * 12):  # a day of it
        assert not table.mark_failure(pid(1))
        clock.now += 300
    assert table.score(pid(1)) >= PeerTableConfig().floor == -50
    assert not table.mark_failure(pid(1)) and not table.is_banned(pid(1))
    with pytest.raises(ValueError, match="failure_floor"):
        PeerTableConfig(failure_floor=-200.0)


def test_bounded_size_evicts_worst_and_keeps_reputable_peers_under_flood():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(max_peers=20), clock)
    good = [pid(i) for i in range(1, 6)]
    for p in good:
        table.observe(p, [addr(1)])
        table.mark_alive(p)
    bad = pid(6)
    table.penalise(bad, 10)
    for i in range(100, 400):  # a flood of fresh Sybil ids
        clock.now += 1
        table.add(pid(i), [addr(i % 50)])
        assert len(table) <= 20
    assert all(p in table for p in good)
    assert bad not in table  # the penalised one went first
    assert pid(100) not in table and pid(399) in table  # then the oldest of equal score


def test_save_load_roundtrip(tmp_path: Path):
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(), clock)
    for i in range(1, 30):
        table.observe(pid(i), [addr(i), Multiaddr("::1", 5000 + i)])
    table.penalise(pid(3), 500)
    path = tmp_path / "peers.json"
    table.save(path)
    fresh = PeerTable(PeerTableConfig(), clock)
    assert fresh.load(path) is None
    assert len(fresh) == 29
    assert fresh.is_banned(pid(3))
    assert fresh.get(pid(5)).addrs == table.get(pid(5)).addrs  # type: ignore[union-attr]
    assert fresh.score(pid(3)) == pytest.approx(table.score(pid(3)))


def test_load_missing_file_is_empty_not_error(tmp_path: Path):
    table = PeerTable()
    assert table.load(tmp_path / "nope.json") is None and len(table) == 0


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 99, "peers": []}', b'{"version": 1, "peers": [{"peer_id": "x"}]}',
     b'{"version": 1, "peers": [{"peer_id": "12D3KooWbad", "addrs": [], "score": 0, "score_time": 0,'
     b' "last_seen": 0, "failures": 0, "banned_until": 0}]}'],
)
def test_corrupt_file_is_reported_moved_aside_and_table_starts_empty(tmp_path: Path, content: bytes):
    path = tmp_path / "peers.json"
    good = PeerTable()
    good.observe(pid(1), [addr(1)])
    good.save(path)
    table = PeerTable()
    assert table.load(path) is None and len(table) == 1
    path.write_bytes(content)
    err = table.load(path)
    assert isinstance(err, StateError) and "corrupt" in str(err)
    assert len(table) == 0
    assert not path.exists()
    assert (tmp_path / "peers.json.corrupt").read_bytes() == content


_WRITER = """
import sys
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, CircuitAddr, Multiaddr
from murmur.protocol.peertable import PeerTable, PeerTableConfig
table = PeerTable(PeerTableConfig(max_new_per_subnet=1024))  # one /24 for all
n = 0
while True:
    n += 1
    for i in range(50):
        table.observe(Identity.from_seed((n * 1000 + i).to_bytes(32, "big")).peer_id, [Multiaddr("10.1.0.1", 1000 + i)])
    table.save(sys.argv[1])
    print(n, flush=True)
"""


def test_save_survives_kill_9_mid_write(tmp_path: Path):
    path = tmp_path / "peers.json"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        for _ in range(3):  # a few complete saves, then kill while it keeps writing
            assert proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    table = PeerTable(PeerTableConfig(max_new_per_subnet=1024))
    assert table.load(path) is None  # never a torn file
    assert len(table) >= 50 and len(table) % 50 == 0
    assert json.loads(path.read_text())["version"] == FILE_VERSION


def test_parse_peer_entry_validates_network_input():
    peer = pid(1)
    got_peer, addrs = parse_peer_entry(peer.raw, ["/ip4/10.0.0.1/tcp/4001", f"/ip4/10.0.0.2/tcp/4002/p2p/{peer}"], 4)
    assert got_peer == peer and addrs == (Multiaddr("10.0.0.1", 4001), Multiaddr("10.0.0.2", 4002))
    with pytest.raises(DecodeError):
        parse_peer_entry(b"\x00\x01junk", ["/ip4/10.0.0.1/tcp/1"], 4)
    with pytest.raises(DecodeError):
        parse_peer_entry(peer.raw, ["/dns/evil/tcp/1"], 4)
    with pytest.raises(DecodeError):
        parse_peer_entry(peer.raw, [f"/ip4/10.0.0.1/tcp/1/p2p/{pid(2)}"], 4)
    with pytest.raises(DecodeError):
        parse_peer_entry(peer.raw, [], 4)
    with pytest.raises(DecodeError):
        parse_peer_entry("text", ["/ip4/10.0.0.1/tcp/1"], 4)
    with pytest.raises(LimitExceeded):
        parse_peer_entry(peer.raw, [f"/ip4/10.0.0.1/tcp/{i}" for i in range(1, 6)], 4)


# -- standing and tiers ------------------------------------------------------------

DAY = 86400.0


def _earn_standing(table: PeerTable, clock: ManualClock, peer: PeerId, host: str = "10.9.9.9",
                   visits: int = 10, every_s: float = 3 * 3600) -> None:
    """``visits`` Hellos ``every_s`` apart: known for a while, seen again and again."""
    for _ in range(visits):
        table.observe(peer, [Multiaddr(host, 4001)])
        table.mark_alive(peer)
        clock.now += every_s


def _hello(table: PeerTable, peer: PeerId, host: str) -> None:
    """What the node does with a Hello (membership: observe, then mark_alive)."""
    table.observe(peer, [Multiaddr(host, 4001)])
    table.mark_alive(peer)


def test_a_reputed_peer_survives_a_hello_flood_of_fresh_ids_in_memory_and_on_disk(tmp_path: Path):
    clock = ManualClock(1000.0)
    config = PeerTableConfig(max_peers=64, max_new_per_subnet=64)
    table = PeerTable(config, clock)
    honest = pid(1)
    _earn_standing(table, clock, honest)
    assert table.is_reputed(honest)
    clock.now += DAY  # away for a day: its score has decayed to nothing
    assert table.score(honest) < 0.01
    for i in range(1000, 1000 + 5 * config.max_peers):  # each fresh id says Hello (score 1, seen now)
        clock.now += 0.01
        _hello(table, pid(i), f"10.{i % 200}.{i // 200}.1")
        assert len(table) <= config.max_peers
    assert honest in table and table.is_reputed(honest)
    table.save(tmp_path / "peers.json")
    again = PeerTable(config, clock)
    assert again.load(tmp_path / "peers.json") is None
    assert again.is_reputed(honest) and len(again) == config.max_peers


def test_standing_takes_time_reconnecting_in_a_loop_earns_nothing():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(repute_successes=3, repute_age_s=3600, success_interval_s=60), clock)
    for _ in range(100):  # a hundred Hellos in ten seconds
        _hello(table, pid(1), "10.0.0.1")
        clock.now += 0.1
    assert table.get(pid(1)).successes == 1 and not table.is_reputed(pid(1))  # type: ignore[union-attr]
    for _ in range(5):  # five more minutes apart: enough successes, not enough time
        clock.now += 61
        _hello(table, pid(1), "10.0.0.1")
    assert not table.is_reputed(pid(1))
    clock.now += 3600
    _hello(table, pid(1), "10.0.0.1")
    assert table.is_reputed(pid(1))


def test_one_subnet_cannot_flush_the_new_peers_of_others():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(max_peers=100, max_new_per_subnet=10), clock)
    others = [pid(i) for i in range(1, 21)]
    for i, peer in enumerate(others):
        _hello(table, peer, f"192.0.{i}.1")  # twenty subnets, one peer each
    for i in range(1000, 1500):  # 500 ids from one /24
        clock.now += 1
        _hello(table, pid(i), f"198.51.100.{i % 250}")
    assert all(p in table for p in others)
    assert len(table) == 20 + 10
    assert pid(1499) in table and pid(1000) not in table  # the subnet's oldest went first


def test_loopback_can_be_exempt_for_local_testnets():
    table = PeerTable(PeerTableConfig(max_peers=100, max_new_per_subnet=10, exempt_loopback=True), ManualClock(1000.0))
    for i in range(1, 51):
        _hello(table, pid(i), "127.0.0.1")
    assert len(table) == 50


def test_a_full_reputed_tier_admits_only_more_standing_and_demotes_the_weakest():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(max_peers=10, max_reputed=2, max_new_per_subnet=10), clock)
    _earn_standing(table, clock, pid(1), visits=5)
    _earn_standing(table, clock, pid(2), visits=8)
    _earn_standing(table, clock, pid(3), visits=4)  # qualifies, but has less than both
    assert {p for p in (pid(1), pid(2), pid(3)) if table.is_reputed(p)} == {pid(1), pid(2)}
    assert pid(3) in table  # kept, in the new tier
    _earn_standing(table, clock, pid(3), visits=4)  # now 8 > pid(1)'s 5
    assert table.is_reputed(pid(3)) and not table.is_reputed(pid(1)) and pid(1) in table
    assert table.reputed_count == 2


def test_a_ban_costs_the_standing():
    clock = ManualClock(1000.0)
    table = PeerTable(PeerTableConfig(max_peers=10, max_new_per_subnet=10), clock)
    _earn_standing(table, clock, pid(1))
    assert table.is_reputed(pid(1))
    assert table.penalise(pid(1), 500)
    assert not table.is_reputed(pid(1)) and table.get(pid(1)).successes == 0  # type: ignore[union-attr]
    for i in range(100, 120):
        _hello(table, pid(i), f"10.{i}.0.1")
    assert pid(1) not in table  # banned and new: the first to go


def test_a_version_1_file_loads_and_is_saved_as_version_2(tmp_path: Path):
    path = tmp_path / "peers.json"
    record = {"peer_id": pid(1).text, "addrs": ["/ip4/10.0.0.1/tcp/4001"], "score": 3.0, "score_time": 900.0,
              "last_seen": 950.0, "failures": 0, "banned_until": 0.0}
    path.write_text(json.dumps({"version": 1, "peers": [record]}))
    table = PeerTable(PeerTableConfig(), ManualClock(1000.0))
    assert table.load(path) is None and pid(1) in table and not table.is_reputed(pid(1))
    table.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == FILE_VERSION and doc["peers"][0]["successes"] == 0


def test_eviction_rank_orders_as_the_decayed_score_at_any_time():
    import random

    rng = random.Random(7)
    clock = ManualClock(1.7e9)  # wall-clock magnitudes, as in the daemon
    table = PeerTable(PeerTableConfig(max_peers=400, max_new_per_subnet=400, score_half_life_s=3600), clock)
    for i in range(1, 300):
        clock.now += rng.uniform(0, 600)
        table.add(pid(i), [addr(i)])
        points = rng.choice([0.0, 0.5, 3.0, 40.0, -2.0, -60.0])
        if points > 0:
            table.mark_alive(pid(i))
        elif points < 0:
            table.penalise(pid(i), -points)
    for later in (0.0, 3600.0, 30 * DAY):
        now = clock.now + later
        records = list(table)
        by_decay = sorted(records, key=lambda r: (table._decayed(r, now), r.successes, r.last_seen))
        by_rank = sorted(records, key=lambda r: table._rank[r.peer_id])
        assert [round(table._decayed(r, now), 9) for r in by_rank] == [round(table._decayed(r, now), 9) for r in by_decay]


def test_identify_is_kept_bounded_in_memory_and_not_on_disk(tmp_path: Path):
    """What a peer's identify said is kept with its record, cut to bounds a
    stranger cannot grow, and never written to peers.json (refreshed per connection)."""
    table = PeerTable(PeerTableConfig(max_addrs_per_peer=2), clock=lambda: 1000.0)
    protocols = [f"/p/{i}/" + "x" * 300 for i in range(100)]
    record = table.identified(pid(1), "agent/" + "a" * 500, protocols, ["/ip4/1.2.3.4/tcp/1"] * 5, "/ip4/5.6.7.8/tcp/9")
    assert record is not None and record is table.get(pid(1))
    assert len(record.agent) <= 128 and len(record.protocols) == 32 and all(len(p) <= 128 for p in record.protocols)
    assert record.listen == ("/ip4/1.2.3.4/tcp/1",) * 2 and record.observed == "/ip4/5.6.7.8/tcp/9"
    assert record.addrs == [] and record.last_seen == 0.0  # a claim, not a sign of life; never dialled
    path = tmp_path / "peers.json"
    table.save(path)
    assert "agent" not in path.read_text()
    again = PeerTable(PeerTableConfig())
    assert again.load(path) is None and again.get(pid(1)).agent == ""  # type: ignore[union-attr]


def test_peer_entries_carry_relay_circuits_bounded_and_validated():
    """A private peer is reached only through its relays: its entry may name
    /p2p-circuit addresses (kept without its own id, as every address), at most
    MAX_CIRCUIT_ADDRS of them, each through a named relay on an IP address."""
    peer, relay = pid(1), pid(2)
    circuit = f"/ip4/198.18.0.1/tcp/4001/p2p/{relay}/p2p-circuit"
    got_peer, addrs = parse_peer_entry(peer.raw, ["/ip4/10.0.0.1/tcp/4001", f"{circuit}/p2p/{peer}"], 4)
    assert got_peer == peer
    assert addrs == (Multiaddr("10.0.0.1", 4001), CircuitAddr(Multiaddr("198.18.0.1", 4001, relay)))
    assert str(addrs[1]) == circuit and addrs[1].is_circuit and not addrs[0].is_circuit
    too_many = [f"/ip4/198.18.0.{i}/tcp/4001/p2p/{pid(10 + i)}/p2p-circuit" for i in range(MAX_CIRCUIT_ADDRS + 1)]
    with pytest.raises(LimitExceeded):
        parse_peer_entry(peer.raw, too_many, 8)
    for garbage in (
        "/ip4/198.18.0.1/tcp/4001/p2p-circuit",  # no relay id
        f"/dns4/relay.example/tcp/4001/p2p/{relay}/p2p-circuit",  # a name we would resolve for a stranger
        f"{circuit}/p2p/{pid(3)}",  # a circuit to someone else
        f"/ip4/198.18.0.1/tcp/4001/p2p/{peer}/p2p-circuit",  # through the peer itself
        f"{circuit}/p2p-circuit",
        f"/ip4/198.18.0.1/tcp/0/p2p/{relay}/p2p-circuit",  # port 0
    ):
        with pytest.raises(DecodeError):
            parse_peer_entry(peer.raw, [garbage], 4)


def test_a_saved_table_keeps_relay_circuits(tmp_path: Path):
    table, relay = PeerTable(), pid(2)
    circuit = CircuitAddr(Multiaddr("198.18.0.1", 4001, relay))
    table.add(pid(1), [circuit])
    table.save(tmp_path / "peers.json")
    again = PeerTable()
    assert again.load(tmp_path / "peers.json") is None
    assert again.get(pid(1)).addrs == [circuit]  # type: ignore[union-attr]
