"""Sans-IO flood gossip: message ids, a bounded expiring seen-cache, TTL, fan-out.

Used for network-wide announcements (e.g. SybilWall history records, round
commits). The node feeds every received ``Gossip`` message to
:meth:`FloodGossip.on_message` and gets back a :class:`GossipAction`: whether to
deliver it to the application, and the (TTL-decremented) message plus the
peers to forward it to. No sockets, no timers: time comes from ``clock``.

Duplicate suppression is what keeps flooding affordable: each node forwards a
message at most once, so a flood over a graph with E edges costs at most 2E
transmissions. The seen-cache is both size-bounded (LRU) and time-bounded
(entries expire after ``seen_ttl_s``), so a burst of ids cannot grow memory,
and an id only needs to be remembered for as long as copies of it can still be
in flight — the TTL (hop limit) bounds that.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from murmur.errors import DecodeError, LimitExceeded
from murmur.protocol.identity import PeerId

MSG_ID_LEN = 16  # BLAKE2b-128
_ID_PERSON = b"murmur-gossip-v1"  # domain separation (BLAKE2b personalisation, 16 bytes)


def message_id(origin: PeerId, seq: int, topic: str, payload: bytes) -> bytes:
    """BLAKE2b-128 over (origin, seq, topic, payload), each length-delimited so
    that no two different tuples hash the same input."""
    topic_bytes = topic.encode()
    h = hashlib.blake2b(digest_size=MSG_ID_LEN, person=_ID_PERSON)
    h.update(len(origin.raw).to_bytes(2, "big") + origin.raw)
    h.update(seq.to_bytes(8, "big"))
    h.update(len(topic_bytes).to_bytes(2, "big") + topic_bytes)
    h.update(payload)
    return h.digest()


@dataclass(frozen=True)
class GossipConfig:
    seen_capacity: int = 65_536
    seen_ttl_s: float = 600.0
    default_ttl: int = 8            # hops a published message may travel
    max_ttl: int = 16               # larger incoming TTLs are clamped (no amplification)
    fanout: int | None = None       # None: flood to every neighbour; k: k random ones
    max_payload_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.seen_capacity < 1 or self.seen_ttl_s <= 0:
            raise ValueError("seen_capacity >= 1 and seen_ttl_s > 0 required")
        if not 1 <= self.default_ttl <= self.max_ttl:
            raise ValueError("need 1 <= default_ttl <= max_ttl")
        if self.fanout is not None and self.fanout < 1:
            raise ValueError("fanout must be None or >= 1")


class SeenCache:
    """Set of recently seen keys, bounded in size (LRU) and age (TTL).

    ``add`` on a key already present refreshes it: copies still arriving mean
    the flood is still going, so the key must be remembered longer.
    """

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Hashable, float] = OrderedDict()  # key -> expiry, oldest first

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        self._expire(self._clock())
        return key in self._entries

    def add(self, key: Hashable) -> bool:
        """Record ``key``; True iff it was not already present."""
        now = self._clock()
        self._expire(now)
        is_new = key not in self._entries
        self._entries[key] = now + self.ttl_s
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return is_new

    def _expire(self, now: float) -> None:
        # Expiry times are monotone in insertion/refresh order, so expired keys
        # are exactly a prefix.
        while self._entries:
            key, expiry = next(iter(self._entries.items()))
            if expiry > now:
                break
            del self._entries[key]


@dataclass(frozen=True)
class GossipMessage:
    """Mirror of the ``Gossip`` wire message."""

    msg_id: bytes
    origin: PeerId
    ttl: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class GossipAction:
    """What to do with a message: deliver locally? send ``forward`` to ``targets``."""

    deliver: bool
    forward: GossipMessage | None = None
    targets: tuple[PeerId, ...] = ()


class FloodGossip:
    """Gossip state of one node."""

    def __init__(self, self_id: PeerId, config: GossipConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.self_id = self_id
        self.config = config or GossipConfig()
        self._rng = rng or random.Random()
        self._seen = SeenCache(self.config.seen_capacity, self.config.seen_ttl_s, clock)
        self._seq = 0
        self.duplicates = 0  # counters for metrics
        self.delivered = 0

    @property
    def seen(self) -> SeenCache:
        return self._seen

    def publish(self, topic: str, payload: bytes, peers: Sequence[PeerId], ttl: int | None = None) -> GossipAction:
        """Originate a message; returns it with the peers to send it to."""
        if len(payload) > self.config.max_payload_bytes:
            raise ValueError(f"gossip payload of {len(payload)} bytes exceeds {self.config.max_payload_bytes}")
        self._seq += 1
        msg = GossipMessage(message_id(self.self_id, self._seq, topic, payload), self.self_id,
                            min(ttl or self.config.default_ttl, self.config.max_ttl), topic, payload)
        self._seen.add(msg.msg_id)
        return GossipAction(deliver=False, forward=msg, targets=tuple(self.fanout(peers, exclude=())))

    def should_forward(self, msg_id: bytes, ttl: int) -> bool:
        """Mark ``msg_id`` seen; True iff it is new and has hops left (ttl > 1).

        A False answer does not say whether the message was new (and should be
        delivered); :meth:`on_message` answers both.
        """
        return self._seen.add(msg_id) and ttl > 1

    def on_message(self, msg: GossipMessage, sender: PeerId, peers: Sequence[PeerId]) -> GossipAction:
        """Handle a message received from ``sender``; ``peers`` are the current
        neighbours. Raises :class:`DecodeError` / :class:`LimitExceeded` for
        malformed input (the caller penalises ``sender``)."""
        if len(msg.msg_id) != MSG_ID_LEN:
            raise DecodeError(f"gossip id must be {MSG_ID_LEN} bytes, got {len(msg.msg_id)}")
        if msg.ttl < 1:
            raise DecodeError(f"gossip ttl {msg.ttl} < 1 (nobody may send an exhausted message)")
        if len(msg.payload) > self.config.max_payload_bytes:
            raise LimitExceeded(f"gossip payload of {len(msg.payload)} bytes")
        ttl = min(msg.ttl, self.config.max_ttl)
        is_new = self._seen.add(msg.msg_id)
        if not is_new or msg.origin == self.self_id:
            self.duplicates += 1
            return GossipAction(deliver=False)
        self.delivered += 1
        if ttl <= 1:
            return GossipAction(deliver=True)
        targets = self.fanout(peers, exclude=(sender, msg.origin))
        return GossipAction(deliver=True, forward=replace(msg, ttl=ttl - 1), targets=tuple(targets))

    def fanout(self, peers: Sequence[PeerId], exclude: Sequence[PeerId]) -> list[PeerId]:
        """The peers to send to: all of ``peers`` minus ``exclude`` and self, or
        ``fanout`` of them drawn at random."""
        candidates = list(dict.fromkeys(p for p in peers if p not in exclude and p != self.self_id))
        k = self.config.fanout
        if k is None or k >= len(candidates):
            return candidates
        return self._rng.sample(candidates, k)


__all__ = [
    "FloodGossip",
    "GossipAction",
    "GossipConfig",
    "GossipMessage",
    "MSG_ID_LEN",
    "SeenCache",
    "message_id",
]
