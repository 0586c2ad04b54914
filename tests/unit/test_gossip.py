"""Flood gossip: ids, seen-cache bounds, exactly-once delivery over a 30-node graph."""

from __future__ import annotations

import random
from collections import Counter, deque

import msgpack
import pytest

from murmur.errors import DecodeError, LimitExceeded
from murmur.protocol.gossip import (
    MSG_ID_LEN,
    FloodGossip,
    GossipConfig,
    GossipMessage,
    SeenCache,
    message_id,
)
from murmur.protocol.identity import Identity, PeerId
from tests.clocks import ManualClock

_IDS: dict[int, PeerId] = {}


def pid(i: int) -> PeerId:
    if i not in _IDS:
        _IDS[i] = Identity.from_seed((i + 500).to_bytes(32, "big")).peer_id
    return _IDS[i]


def test_message_id_is_blake2b_128_and_binds_every_field():
    base = message_id(pid(1), 1, "t", b"x")
    assert len(base) == MSG_ID_LEN == 16
    assert base == message_id(pid(1), 1, "t", b"x")
    variants = {message_id(pid(2), 1, "t", b"x"), message_id(pid(1), 2, "t", b"x"),
                message_id(pid(1), 1, "u", b"x"), message_id(pid(1), 1, "t", b"y"),
                message_id(pid(1), 1, "tx", b""), message_id(pid(1), 1, "", b"tx")}
    assert base not in variants and len(variants) == 6


def test_seen_cache_is_bounded_lru():
    cache = SeenCache(capacity=100, ttl_s=1e9, clock=ManualClock())
    for i in range(10_000):
        assert cache.add(i)
        assert len(cache) <= 100
    assert 9_999 in cache and 9_899 not in cache and 9_900 in cache
    cache.add(9_900)  # refresh: now the most recent
    cache.add(-1)
    assert 9_900 in cache and 9_901 not in cache


def test_seen_cache_expires_after_ttl_and_refresh_extends():
    clock = ManualClock()
    cache = SeenCache(capacity=10, ttl_s=5.0, clock=clock)
    cache.add("a")
    cache.add("b")
    clock.now = 4.0
    assert not cache.add("b")  # duplicate, refreshed until t=9
    clock.now = 5.0
    assert "a" not in cache and "b" in cache and len(cache) == 1
    clock.now = 9.0
    assert len(cache) == 0
    assert cache.add("b")


def random_connected_graph(n: int, extra_edges: int, rng: random.Random) -> dict[int, set[int]]:
    """A random spanning tree (connected by construction) plus random chords."""
    graph: dict[int, set[int]] = {i: set() for i in range(n)}
    order = list(range(n))
    rng.shuffle(order)
    for idx in range(1, n):
        a, b = order[idx], order[rng.randrange(idx)]
        graph[a].add(b)
        graph[b].add(a)
    while extra_edges:
        a, b = rng.sample(range(n), 2)
        if b not in graph[a]:
            graph[a].add(b)
            graph[b].add(a)
            extra_edges -= 1
    return graph


def to_wire(msg: GossipMessage) -> bytes:
    return msgpack.packb([msg.msg_id, msg.origin.raw, msg.ttl, msg.topic, msg.payload])


def from_wire(buf: bytes) -> GossipMessage:
    msg_id, origin, ttl, topic, payload = msgpack.unpackb(buf)
    return GossipMessage(msg_id, PeerId.from_bytes(origin), ttl, topic, payload)


def flood(graph: dict[int, set[int]], config: GossipConfig, seed: int, publisher: int = 0):
    """Deliver every transmission through msgpack in a random (asynchronous) order."""
    rng = random.Random(seed)
    nodes = {i: FloodGossip(pid(i), config, ManualClock(), random.Random(seed + i)) for i in graph}
    neighbours = {i: [pid(j) for j in sorted(graph[i])] for i in graph}
    index = {pid(i): i for i in graph}
    delivered: Counter[int] = Counter()
    transmissions = 0
    action = nodes[publisher].publish("records", b"history-record", neighbours[publisher], ttl=config.max_ttl)
    in_flight = deque((publisher, index[t], to_wire(action.forward)) for t in action.targets)  # type: ignore[arg-type]
    while in_flight:
        k = rng.randrange(len(in_flight))
        in_flight.rotate(-k)
        sender, receiver, buf = in_flight.popleft()
        transmissions += 1
        act = nodes[receiver].on_message(from_wire(buf), pid(sender), neighbours[receiver])
        if act.deliver:
            delivered[receiver] += 1
        if act.forward is not None:
            assert act.forward.ttl < from_wire(buf).ttl
            assert pid(sender) not in act.targets
            in_flight.extend((receiver, index[t], to_wire(act.forward)) for t in act.targets)
    return nodes, delivered, transmissions


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_message_reaches_all_30_nodes_exactly_once(seed: int):
    rng = random.Random(seed)
    graph = random_connected_graph(30, extra_edges=30, rng=rng)
    edges = sum(len(v) for v in graph.values()) // 2
    nodes, delivered, transmissions = flood(graph, GossipConfig(max_ttl=30), seed)
    assert set(delivered) == set(range(1, 30))  # everyone but the publisher
    assert all(count == 1 for count in delivered.values())
    duplicates = sum(n.duplicates for n in nodes.values())
    assert duplicates > 0  # the graph has cycles: duplicates arrived and were dropped
    assert transmissions == 29 + duplicates
    assert transmissions <= 2 * edges  # each node forwards once, never back to the sender


def test_ttl_limits_the_flood_radius():
    path = {i: {j for j in (i - 1, i + 1) if 0 <= j < 10} for i in range(10)}
    nodes = {i: FloodGossip(pid(i), GossipConfig(), ManualClock()) for i in path}
    action = nodes[0].publish("t", b"p", [pid(1)], ttl=3)
    reached = []
    msg, hop = action.forward, 1
    while msg is not None:
        act = nodes[hop].on_message(msg, pid(hop - 1), [pid(j) for j in path[hop]])
        assert act.deliver
        reached.append(hop)
        msg, hop = act.forward, hop + 1
        if msg is not None:
            assert act.targets == (pid(hop),)
    assert reached == [1, 2, 3]


def test_should_forward_marks_seen_and_respects_ttl():
    g = FloodGossip(pid(0), GossipConfig(), ManualClock())
    mid = message_id(pid(1), 1, "t", b"")
    assert g.should_forward(mid, 3)
    assert not g.should_forward(mid, 3)
    assert not g.should_forward(message_id(pid(1), 2, "t", b""), 1)


def test_fanout_excludes_sender_origin_and_self_and_is_bounded():
    g = FloodGossip(pid(0), GossipConfig(fanout=3), ManualClock(), random.Random(4))
    peers = [pid(i) for i in range(10)]
    msg = GossipMessage(message_id(pid(1), 1, "t", b""), pid(1), 5, "t", b"")
    chosen = set()
    for seq in range(50):
        m = GossipMessage(message_id(pid(1), seq, "t", b""), pid(1), 5, "t", b"")
        act = g.on_message(m, pid(2), peers)
        assert len(act.targets) == 3 and not {pid(0), pid(1), pid(2)} & set(act.targets)
        chosen |= set(act.targets)
    assert chosen == set(peers[3:])  # random choice covers all eligible peers
    assert not g.on_message(msg, pid(3), peers).deliver  # seq 1 was seen in the loop


def test_bad_messages_are_typed_peer_faults_and_ttl_is_clamped():
    g = FloodGossip(pid(0), GossipConfig(default_ttl=2, max_ttl=4, max_payload_bytes=10), ManualClock())
    good_id = message_id(pid(1), 1, "t", b"")
    with pytest.raises(DecodeError):
        g.on_message(GossipMessage(b"short", pid(1), 3, "t", b""), pid(1), [])
    with pytest.raises(DecodeError):
        g.on_message(GossipMessage(good_id, pid(1), 0, "t", b""), pid(1), [])
    with pytest.raises(LimitExceeded):
        g.on_message(GossipMessage(good_id, pid(1), 3, "t", b"x" * 11), pid(1), [])
    act = g.on_message(GossipMessage(good_id, pid(1), 1000, "t", b""), pid(1), [pid(2)])
    assert act.deliver and act.forward is not None and act.forward.ttl == 3
    # our own message coming back is never delivered to ourselves
    own = g.publish("t", b"", [pid(1)])
    assert own.forward is not None and not g.on_message(own.forward, pid(1), [pid(1)]).deliver
