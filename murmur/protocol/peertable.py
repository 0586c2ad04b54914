"""Known peers: addresses, reputation score, liveness; persisted atomically.

The table is the node's long-term memory of the network (what survives a
restart), as opposed to the sampler's view, which is a small, constantly
shuffled cache. It is sans-IO: time comes from an injected ``clock`` so tests
and simulations can drive it; use wall-clock time (``time.time``, the default)
in the daemon, because ``last_seen`` and ``banned_until`` are written to disk
and must stay meaningful across restarts.

Scoring. Every peer starts at 0. Good behaviour (``mark_alive``) adds a little,
faults (``penalise`` with a :class:`~murmur.errors.PeerFault`'s ``penalty``,
``mark_failure``) subtract. Scores decay exponentially toward 0 with a
half-life, so old sins and old merits both fade: a peer that misbehaved once a
day ago is not punished forever, and a peer that was good long ago does not
keep a privileged slot. A peer whose score falls below ``ban_threshold`` is
banned for ``ban_duration_s``; banned peers are never handed out for dialling
or peer exchange.

Bounded size. An attacker can mint identities for free, so the table holds at
most ``max_peers`` records. When full, the worst record is evicted: lowest
(decayed) score first, then the one seen longest ago. A fresh peer enters at
score 0, so it displaces only peers that are banned/penalised or stale with no
positive reputation — peers with earned reputation are never pushed out by a
flood of new ids. (Banned records are the first to go under such a flood, so a
ban is a cost, not a permanent exclusion; ids are free to mint anyway, which is
why the sampler's subnet limits, not bans, are the Sybil defence.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.errors import DecodeError, LimitExceeded, StateError
from murmur.fsutil import atomic_write_json
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import Multiaddr

log = logging.getLogger(__name__)

FILE_VERSION = 1
CORRUPT_SUFFIX = ".corrupt"

Clock = Callable[[], float]


@dataclass(frozen=True)
class PeerTableConfig:
    """Every tunable of the peer table, named once."""

    max_peers: int = 1024
    max_addrs_per_peer: int = 8
    score_half_life_s: float = 3600.0
    max_score: float = 100.0
    alive_reward: float = 1.0
    failure_penalty: float = 5.0
    ban_threshold: float = -100.0
    ban_duration_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_peers < 1 or self.max_addrs_per_peer < 1:
            raise ValueError("max_peers and max_addrs_per_peer must be >= 1")
        if self.score_half_life_s <= 0 or self.ban_duration_s < 0:
            raise ValueError("score_half_life_s must be > 0 and ban_duration_s >= 0")
        if self.ban_threshold >= 0:
            raise ValueError("ban_threshold must be negative (new peers start at 0)")


@dataclass
class PeerRecord:
    """What we know about one peer.

    ``score`` is the value at time ``score_time``; read the current value with
    :meth:`PeerTable.score`, which applies the decay.
    """

    peer_id: PeerId
    addrs: list[Multiaddr]
    score: float = 0.0
    last_seen: float = 0.0
    failures: int = 0
    banned_until: float = 0.0
    score_time: float = 0.0

    def banned(self, now: float) -> bool:
        return self.banned_until > now

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id.text,
            "addrs": [str(a) for a in self.addrs],
            "score": self.score,
            "score_time": self.score_time,
            "last_seen": self.last_seen,
            "failures": self.failures,
            "banned_until": self.banned_until,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PeerRecord:
        """Parse one record; ValueError/KeyError/TypeError on anything malformed."""
        if not isinstance(obj, dict):
            raise TypeError("peer record must be an object")
        peer = PeerId.from_string(_typed(obj["peer_id"], str))
        addrs = [Multiaddr.parse(_typed(a, str)) for a in _typed(obj["addrs"], list)]
        numbers = {k: float(_typed(obj[k], (int, float))) for k in ("score", "score_time", "last_seen", "banned_until")}
        if not all(math.isfinite(v) for v in numbers.values()):
            raise ValueError("non-finite number in peer record")
        failures = _typed(obj["failures"], int)
        if failures < 0:
            raise ValueError("negative failure count")
        return cls(peer_id=peer, addrs=addrs, failures=failures, **numbers)


def _typed(value: Any, types: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"expected {types}, got {type(value).__name__}")
    return value


def merge_addrs(first: Sequence[Multiaddr], second: Iterable[Multiaddr], limit: int) -> list[Multiaddr]:
    """``first`` then the new ones from ``second``, deduplicated, at most ``limit``.

    The first address is the one dialled first, so callers put the most
    trustworthy (e.g. the address we observed a connection from) in front.
    """
    out: list[Multiaddr] = []
    for addr in (*first, *second):
        addr = addr.without_peer()
        if addr not in out:
            out.append(addr)
        if len(out) == limit:
            break
    return out


def parse_peer_entry(peer_raw: Any, addr_texts: Any, max_addrs: int) -> tuple[PeerId, tuple[Multiaddr, ...]]:
    """Validate one ``(peer_raw, [addr str])`` pair received from the network.

    Shared by peer exchange and Cyclon shuffles. Raises :class:`DecodeError`
    for malformed entries (honest peers only relay entries they validated
    themselves, so there is nothing to be lenient about) and
    :class:`LimitExceeded` for too many addresses.
    """
    if not isinstance(peer_raw, (bytes, bytearray)) or not isinstance(addr_texts, (list, tuple)):
        raise DecodeError("peer entry must be (bytes, [str])")
    if len(addr_texts) > max_addrs:
        raise LimitExceeded(f"peer entry has {len(addr_texts)} addresses (max {max_addrs})")
    try:
        peer = PeerId.from_bytes(bytes(peer_raw))
    except ValueError as exc:
        raise DecodeError(f"bad peer id in entry: {exc}") from None
    addrs: list[Multiaddr] = []
    for text in addr_texts:
        if not isinstance(text, str):
            raise DecodeError("multiaddr must be a string")
        try:
            addr = Multiaddr.parse(text)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        if addr.peer_id is not None and addr.peer_id != peer:
            raise DecodeError(f"address {text!r} names another peer than its entry")
        addr = addr.without_peer()
        if addr.port == 0:
            raise DecodeError(f"address {text!r} has port 0 (not dialable)")
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise DecodeError("peer entry without any address")
    return peer, tuple(addrs)


class PeerTable:
    """Bounded map ``PeerId -> PeerRecord`` with decaying scores and bans."""

    def __init__(self, config: PeerTableConfig | None = None, clock: Clock = time.time,
                 self_id: PeerId | None = None) -> None:
        self.config = config or PeerTableConfig()
        self._clock = clock
        self._self_id = self_id
        self._records: dict[PeerId, PeerRecord] = {}
        self._decay_per_s = math.log(2) / self.config.score_half_life_s

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer: object) -> bool:
        return peer in self._records

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._records.values()))

    def get(self, peer: PeerId) -> PeerRecord | None:
        return self._records.get(peer)

    def score(self, peer: PeerId) -> float:
        """Current (decayed) score; 0 for unknown peers."""
        record = self._records.get(peer)
        return 0.0 if record is None else self._decayed(record, self._clock())

    def is_banned(self, peer: PeerId) -> bool:
        record = self._records.get(peer)
        return record is not None and record.banned(self._clock())

    def usable(self) -> list[PeerRecord]:
        """Records that may be dialled or shared: not banned, with an address."""
        now = self._clock()
        return [r for r in self._records.values() if r.addrs and not r.banned(now)]

    # -- updates -------------------------------------------------------------
    def add(self, peer: PeerId, addrs: Iterable[Multiaddr] = ()) -> PeerRecord | None:
        """Remember ``peer`` (heard of it, e.g. via peer exchange); merge addresses.

        Does not touch ``last_seen``: hearing about a peer is not seeing it.
        Returns the record, or None for our own id.
        """
        if peer == self._self_id:
            return None
        record = self._records.get(peer)
        if record is None:
            now = self._clock()
            if len(self._records) >= self.config.max_peers:
                self._evict_one(now)
            record = PeerRecord(peer, [], score_time=now)
            self._records[peer] = record
        record.addrs = merge_addrs(record.addrs, addrs, self.config.max_addrs_per_peer)
        return record

    def observe(self, peer: PeerId, addrs: Iterable[Multiaddr] = ()) -> PeerRecord | None:
        """We heard *from* ``peer`` directly: refresh ``last_seen``; ``addrs``
        (e.g. its observed address) go in front of the known ones."""
        if peer == self._self_id:
            return None
        existing = self._records.get(peer)
        record = self.add(peer)
        assert record is not None
        record.addrs = merge_addrs(list(addrs), existing.addrs if existing else [], self.config.max_addrs_per_peer)
        record.last_seen = self._clock()
        return record

    def penalise(self, peer: PeerId, points: float) -> bool:
        """Subtract ``points``; ban if the score falls below the threshold.

        Returns True iff the peer is banned afterwards.
        """
        record = self.add(peer)
        if record is None:
            return False
        now = self._clock()
        self._set_score(record, self._decayed(record, now) - points, now)
        if record.score < self.config.ban_threshold:
            record.banned_until = max(record.banned_until, now + self.config.ban_duration_s)
            # debug: the node's (rate-limited) fault line says banned=True
            log.debug("banned peer %s until %.0f (score %.1f)", peer.short(), record.banned_until, record.score)
        return record.banned(now)

    def mark_failure(self, peer: PeerId) -> bool:
        """A dial or request to ``peer`` failed; returns True iff now banned."""
        record = self.add(peer)
        if record is None:
            return False
        record.failures += 1
        return self.penalise(peer, self.config.failure_penalty)

    def mark_alive(self, peer: PeerId) -> None:
        """A dial or request succeeded: reset failures, small reward, seen now."""
        record = self.observe(peer)
        if record is None:
            return
        record.failures = 0
        now = self._clock()
        self._set_score(record, self._decayed(record, now) + self.config.alive_reward, now)

    def remove(self, peer: PeerId) -> None:
        self._records.pop(peer, None)

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table atomically (old or new file survives kill -9)."""
        doc = {"version": FILE_VERSION, "peers": [r.to_json() for r in self._records.values()]}
        atomic_write_json(path, doc)

    def load(self, path: str | os.PathLike[str]) -> StateError | None:
        """Replace the contents with the table stored at ``path``.

        A missing file means a first start (empty table). A corrupt or
        inconsistent file must not keep the daemon from starting: it is moved
        aside to ``<path>.corrupt`` for inspection, the table starts empty, and
        the :class:`StateError` describing the problem is *returned* (and
        logged) rather than raised. Returns None on success.
        """
        target = Path(path)
        self._records.clear()
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._corrupt(target, f"cannot read peer table {target}: {exc}")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
                raise ValueError(f"unsupported peer table version {doc.get('version') if isinstance(doc, dict) else doc!r}")
            records = [PeerRecord.from_json(item) for item in _typed(doc["peers"], list)]
        except (ValueError, KeyError, TypeError) as exc:
            return self._corrupt(target, f"corrupt peer table {target}: {exc}")
        # Keep the best records if the file holds more than this config allows.
        now = self._clock()
        records.sort(key=lambda r: (self._decayed(r, now), r.last_seen), reverse=True)
        for record in records[: self.config.max_peers]:
            if record.peer_id == self._self_id or record.peer_id in self._records:
                continue
            record.addrs = merge_addrs(record.addrs, (), self.config.max_addrs_per_peer)
            self._records[record.peer_id] = record
        return None

    def _corrupt(self, target: Path, message: str) -> StateError:
        error = StateError(message)
        aside = target.with_name(target.name + CORRUPT_SUFFIX)
        try:
            os.replace(target, aside)
            log.warning("%s; moved aside to %s, starting with an empty peer table", message, aside)
        except OSError as exc:
            log.warning("%s; could not move it aside (%s), starting with an empty peer table", message, exc)
        return error

    # -- internals -----------------------------------------------------------
    def _decayed(self, record: PeerRecord, now: float) -> float:
        elapsed = max(0.0, now - record.score_time)
        return record.score * math.exp(-self._decay_per_s * elapsed)

    def _set_score(self, record: PeerRecord, value: float, now: float) -> None:
        record.score = min(self.config.max_score, value)
        record.score_time = now

    def _evict_one(self, now: float) -> None:
        worst = min(self._records.values(), key=lambda r: (self._decayed(r, now), r.last_seen))
        log.debug("peer table full; evicting %s", worst.peer_id.short())
        del self._records[worst.peer_id]


__all__ = [
    "PeerRecord",
    "PeerTable",
    "PeerTableConfig",
    "merge_addrs",
    "parse_peer_entry",
]
