"""Known peers: addresses, reputation score, standing, liveness; persisted atomically.

The table is the node's long-term memory of the network (what survives a
restart), as opposed to the sampler's view, which is a small, constantly
shuffled cache. It is sans-IO: time comes from an injected ``clock`` so tests
and simulations can drive it; use wall-clock time (``time.time``, the default)
in the daemon, because ``last_seen`` and ``banned_until`` are written to disk
and must stay meaningful across restarts.

Scoring. Every peer starts at 0. Good behaviour (``mark_alive``) adds a little,
faults (``penalise`` with a :class:`~murmur.errors.PeerFault`'s ``penalty``)
and failures (``mark_failure``, down to ``failure_floor`` only) subtract.
Scores decay exponentially toward 0 with a half-life, so old sins and old
merits both fade: a peer that misbehaved once a day ago is not punished
forever. A peer whose score falls below
``ban_threshold`` is banned for ``ban_duration_s``; banned peers are never
handed out for dialling or peer exchange.

Standing. A score fades within hours, so it cannot tell a peer known for a
month from one minted a second ago: both sit near 0 after a quiet afternoon.
What an attacker cannot mint is *time*: a peer is **reputed** once it has
``repute_successes`` successful interactions (``mark_alive``, counted at most
once per ``success_interval_s``, so reconnecting in a loop earns nothing)
spread over at least ``repute_age_s`` since we first saw it. A ban costs the
standing (the count starts again).

Bounded size, in two tiers (as Bitcoin's addrman keeps "tried" apart from
"new"). An attacker can mint identities for free, so the table holds at most
``max_peers`` records, of which at most ``max_reputed`` reputed; everyone
else is *new*. A record that must make room evicts the least valuable *new*
record (lowest decayed score, then fewest successes, then seen longest ago;
banned and penalised ones go first), never a reputed one: a flood of fresh
ids, each sending a ``Hello``, churns the new tier among itself while every
reputed peer stays, in memory and on disk. Within the new tier, at most
``max_new_per_subnet`` records may share a /24 (IPv4) or /48 (IPv6) of their
first address (records without an address count as one subnet), and a
newcomer from a full subnet displaces the least valuable record of *that*
subnet, so one subnet cannot flush the others either (``exempt_loopback``
lifts this for local testnets, like the sampler's ``allow_loopback_flood``).
When the reputed tier is full, a peer that earns its standing takes the place
of the reputed peer with the fewest successes (seen longest ago at equal
counts) only if it has more, and that one moves back to the new tier.
(Banned records are the first to go under a flood, so a ban is a cost, not a
permanent exclusion; ids are free to mint anyway, which is why the sampler's
subnet limits, not bans, are the Sybil defence.)

Identify. What a peer's libp2p identify said (:meth:`PeerTable.identified`:
its agent, protocols and listen addresses as it claims them, and the address
it observed for us) is kept in memory with the record, cut to
:data:`MAX_KEPT_PROTOCOLS` protocols and the address bound, and shown by
``murmur peers``; it is refreshed on every connection, so it is not
persisted. The claimed listen addresses are never dialled: ``addrs`` stay
the ones we observed the peer at (see ``Membership.observed_addrs``).
"""

from __future__ import annotations

import ipaddress
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
from murmur.protocol.multiaddr import MAX_CIRCUIT_ADDRS, CircuitAddr, PeerAddr, parse_peer_addr
from murmur.protocol.subnets import SubnetKey, subnet_of

log = logging.getLogger(__name__)

FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before standing (first_seen, successes, last_success) was kept
CORRUPT_SUFFIX = ".corrupt"

Clock = Callable[[], float]

NO_ADDRESS = "no address"
"""The new-tier subnet bucket of records without any address."""

SubnetBucket = SubnetKey | str | None  # None: exempt from the per-subnet limit

MAX_KEPT_PROTOCOLS = 32  # of a peer's identify: protocol ids kept per record
MAX_KEPT_TEXT = 128  # characters of an agent, protocol id or address kept


@dataclass(frozen=True)
class PeerTableConfig:
    """Every tunable of the peer table, named once."""

    max_peers: int = 1024
    max_reputed: int | None = None  # None: half of max_peers
    max_new_per_subnet: int = 64
    exempt_loopback: bool = False  # loopback is not one subnet for the new tier (local testnets)
    max_addrs_per_peer: int = 8
    score_half_life_s: float = 3600.0
    max_score: float = 100.0
    alive_reward: float = 1.0
    failure_penalty: float = 5.0
    # How low failures alone take a score (faults go on below it, to a ban):
    # a dial that fails says the peer is unreachable, not that it misbehaved,
    # and anyone can make our dials to an honest peer fail by telling us a
    # dead address for it in a shuffle (measured: one such record every 5
    # minutes held an honest peer's score at about -89, one real failure from
    # a ban). Low enough that such a peer is dialled last and evicted first.
    failure_floor: float | None = None  # None: half of ban_threshold
    ban_threshold: float = -100.0
    ban_duration_s: float = 3600.0
    repute_successes: int = 3
    repute_age_s: float = 3600.0
    success_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_peers < 1 or self.max_addrs_per_peer < 1 or self.max_new_per_subnet < 1:
            raise ValueError("max_peers, max_addrs_per_peer and max_new_per_subnet must be >= 1")
        if not 0 <= self.reputed_capacity < self.max_peers:
            raise ValueError("max_reputed must be in [0, max_peers): the new tier needs room")
        if self.score_half_life_s <= 0 or self.ban_duration_s < 0:
            raise ValueError("score_half_life_s must be > 0 and ban_duration_s >= 0")
        if self.ban_threshold >= 0:
            raise ValueError("ban_threshold must be negative (new peers start at 0)")
        if not self.ban_threshold < self.floor <= 0:
            raise ValueError("failure_floor must be in (ban_threshold, 0]: failures alone never ban")

    @property
    def floor(self) -> float:
        """``failure_floor``, or half of ``ban_threshold``."""
        return self.ban_threshold / 2 if self.failure_floor is None else self.failure_floor
        if self.repute_successes < 1 or self.repute_age_s < 0 or self.success_interval_s < 0:
            raise ValueError("repute_successes must be >= 1, repute_age_s and success_interval_s >= 0")

    @property
    def reputed_capacity(self) -> int:
        return self.max_peers // 2 if self.max_reputed is None else self.max_reputed


@dataclass
class PeerRecord:
    """What we know about one peer.

    ``score`` is the value at time ``score_time``; read the current value with
    :meth:`PeerTable.score`, which applies the decay. ``first_seen`` is our
    first direct contact (0: only heard of), ``successes`` the interactions
    that count toward standing, the last of them at ``last_success``.
    """

    peer_id: PeerId
    addrs: list[PeerAddr]  # direct ones and relay circuits (a private peer has only those)
    score: float = 0.0
    last_seen: float = 0.0
    failures: int = 0
    banned_until: float = 0.0
    score_time: float = 0.0
    first_seen: float = 0.0
    successes: int = 0
    last_success: float = 0.0
    # what its identify said (in memory only; see the module docstring)
    agent: str = ""
    protocols: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()  # its listen addresses as it claims them (never dialled)
    observed: str = ""  # the address it observed for us

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
            "first_seen": self.first_seen,
            "successes": self.successes,
            "last_success": self.last_success,
        }

    @classmethod
    def from_json(cls, obj: Any, version: int = FILE_VERSION) -> PeerRecord:
        """Parse one record; ValueError/KeyError/TypeError on anything malformed.
        A version-1 record has no standing yet (it was not kept)."""
        if not isinstance(obj, dict):
            raise TypeError("peer record must be an object")
        peer = PeerId.from_string(_typed(obj["peer_id"], str))
        addrs = [parse_peer_addr(_typed(a, str)) for a in _typed(obj["addrs"], list)]
        names = ("score", "score_time", "last_seen", "banned_until")
        if version >= 2:
            names += ("first_seen", "last_success")
        numbers = {k: float(_typed(obj[k], (int, float))) for k in names}
        if not all(math.isfinite(v) for v in numbers.values()):
            raise ValueError("non-finite number in peer record")
        counts = {"failures": _typed(obj["failures"], int)}
        if version >= 2:
            counts["successes"] = _typed(obj["successes"], int)
        if any(v < 0 for v in counts.values()):
            raise ValueError("negative count in peer record")
        return cls(peer_id=peer, addrs=addrs, **counts, **numbers)


def _typed(value: Any, types: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"expected {types}, got {type(value).__name__}")
    return value


def merge_addrs(first: Sequence[PeerAddr], second: Iterable[PeerAddr], limit: int) -> list[PeerAddr]:
    """``first`` then the new ones from ``second``, deduplicated, at most ``limit``.

    The first address is the one dialled first, so callers put the most
    trustworthy (e.g. the address we observed a connection from) in front.
    """
    out: list[PeerAddr] = []
    for addr in (*first, *second):
        addr = addr.without_peer()
        if addr not in out:
            out.append(addr)
        if len(out) == limit:
            break
    return out


def parse_peer_entry(peer_raw: Any, addr_texts: Any, max_addrs: int) -> tuple[PeerId, tuple[PeerAddr, ...]]:
    """Validate one ``(peer_raw, [addr str])`` pair received from the network.

    An address is direct TCP or a relay circuit (a private peer is reached
    only so), at most :data:`MAX_CIRCUIT_ADDRS` of those per entry.

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
    addrs: list[PeerAddr] = []
    for text in addr_texts:
        if not isinstance(text, str):
            raise DecodeError("multiaddr must be a string")
        try:
            addr = parse_peer_addr(text)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        if isinstance(addr, CircuitAddr) and addr.relay.peer_id == peer:
            raise DecodeError(f"address {text!r} is a circuit through the peer itself")
        if addr.peer_id is not None and addr.peer_id != peer:
            raise DecodeError(f"address {text!r} names another peer than its entry")
        addr = addr.without_peer()
        if addr.port == 0:
            raise DecodeError(f"address {text!r} has port 0 (not dialable)")
        if addr not in addrs:
            addrs.append(addr)
    if sum(1 for a in addrs if a.is_circuit) > MAX_CIRCUIT_ADDRS:
        raise LimitExceeded(f"peer entry names more than {MAX_CIRCUIT_ADDRS} relay circuits")
    if not addrs:
        raise DecodeError("peer entry without any address")
    return peer, tuple(addrs)


Rank = tuple[int, float, int, float]


class PeerTable:
    """Bounded map ``PeerId -> PeerRecord`` with decaying scores, bans and two tiers."""

    def __init__(self, config: PeerTableConfig | None = None, clock: Clock = time.time,
                 self_id: PeerId | None = None) -> None:
        self.config = config or PeerTableConfig()
        self._clock = clock
        self._self_id = self_id
        self._records: dict[PeerId, PeerRecord] = {}
        self._decay_per_s = math.log(2) / self.config.score_half_life_s
        self._reputed: set[PeerId] = set()
        self._new: dict[PeerId, SubnetBucket] = {}  # new-tier records and the bucket each counts in
        self._new_by_subnet: dict[SubnetBucket, set[PeerId]] = {}
        self._rank: dict[PeerId, Rank] = {}  # eviction order of new records (see _rank_of)

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

    def is_reputed(self, peer: PeerId) -> bool:
        """``peer`` has earned its standing (see the module docstring)."""
        return peer in self._reputed

    @property
    def reputed_count(self) -> int:
        return len(self._reputed)

    def usable(self) -> list[PeerRecord]:
        """Records that may be dialled or shared: not banned, with an address."""
        now = self._clock()
        return [r for r in self._records.values() if r.addrs and not r.banned(now)]

    # -- updates -------------------------------------------------------------
    def add(self, peer: PeerId, addrs: Iterable[PeerAddr] = ()) -> PeerRecord | None:
        """Remember ``peer`` (heard of it, e.g. via peer exchange); merge addresses.

        Does not touch ``last_seen``: hearing about a peer is not seeing it.
        Returns the record, or None for our own id.
        """
        if peer == self._self_id:
            return None
        record = self._records.get(peer)
        if record is None:
            return self._admit(peer, merge_addrs((), addrs, self.config.max_addrs_per_peer))
        record.addrs = merge_addrs(record.addrs, addrs, self.config.max_addrs_per_peer)
        self._rebucket(record)
        return record

    def observe(self, peer: PeerId, addrs: Iterable[PeerAddr] = ()) -> PeerRecord | None:
        """We heard *from* ``peer`` directly: refresh ``last_seen``; ``addrs``
        (e.g. its observed address) go in front of the known ones."""
        if peer == self._self_id:
            return None
        record = self._records.get(peer)
        merged = merge_addrs(list(addrs), record.addrs if record else [], self.config.max_addrs_per_peer)
        if record is None:
            record = self._admit(peer, merged)
        else:
            record.addrs = merged
            self._rebucket(record)
        now = self._clock()
        record.last_seen = now
        if not record.first_seen:
            record.first_seen = now
        self._rerank(record)
        return record

    def penalise(self, peer: PeerId, points: float) -> bool:
        """Subtract ``points``; ban if the score falls below the threshold.

        A ban costs a reputed peer its standing. Returns True iff the peer is
        banned afterwards.
        """
        record = self.add(peer)
        if record is None:
            return False
        now = self._clock()
        self._set_score(record, self._decayed(record, now) - points, now)
        if record.score < self.config.ban_threshold:
            record.banned_until = max(record.banned_until, now + self.config.ban_duration_s)
            record.successes = 0
            self._demote(record)
            # debug: the node's (rate-limited) fault line says banned=True
            log.debug("banned peer %s until %.0f (score %.1f)", peer.short(), record.banned_until, record.score)
        return record.banned(now)

    def mark_failure(self, peer: PeerId) -> bool:
        """A dial or request to ``peer`` failed: its score falls by
        ``failure_penalty``, but not below ``failure_floor`` (nor lower than
        it already was), so failures alone never ban. Returns True iff the
        peer is banned (by its faults)."""
        record = self.add(peer)
        if record is None:
            return False
        record.failures += 1
        now = self._clock()
        current = self._decayed(record, now)
        points = min(self.config.failure_penalty, current - self.config.floor)
        return self.penalise(peer, points) if points > 0 else record.banned(now)

    def mark_alive(self, peer: PeerId) -> None:
        """A dial or request succeeded: reset failures, small reward, seen now,
        one more success toward standing (at most one per ``success_interval_s``)."""
        record = self.observe(peer)
        if record is None:
            return
        record.failures = 0
        now = self._clock()
        self._set_score(record, self._decayed(record, now) + self.config.alive_reward, now)
        if not record.successes or now - record.last_success >= self.config.success_interval_s:
            record.successes += 1
            record.last_success = now
            self._rerank(record)
        if peer not in self._reputed and self._qualifies(record, now):
            self._promote(record)

    def identified(self, peer: PeerId, agent: str, protocols: Sequence[str], listen: Sequence[str],
                   observed: str) -> PeerRecord | None:
        """Keep what ``peer``'s identify said (bounded); the record is made if
        new, like :meth:`add` (identify is not a sign of life by itself)."""
        record = self.add(peer)
        if record is None:
            return None
        record.agent = agent[:MAX_KEPT_TEXT]
        record.protocols = tuple(p[:MAX_KEPT_TEXT] for p in protocols[:MAX_KEPT_PROTOCOLS])
        record.listen = tuple(a[:MAX_KEPT_TEXT] for a in listen[: self.config.max_addrs_per_peer])
        record.observed = observed[:MAX_KEPT_TEXT]
        return record

    def remove(self, peer: PeerId) -> None:
        record = self._records.pop(peer, None)
        if record is not None:
            self._reputed.discard(peer)
            self._unbucket(peer)

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
        self._clear()
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._corrupt(target, f"cannot read peer table {target}: {exc}")
        try:
            doc = json.loads(data)
            version = doc.get("version") if isinstance(doc, dict) else doc
            if version not in READABLE_VERSIONS:
                raise ValueError(f"unsupported peer table version {version!r}")
            records = [PeerRecord.from_json(item, version) for item in _typed(doc["peers"], list)]
        except (ValueError, KeyError, TypeError) as exc:
            return self._corrupt(target, f"corrupt peer table {target}: {exc}")
        # Best first, reputed before new: if the file holds more than this
        # config allows (or a subnet more than its share), the rest is dropped.
        now = self._clock()
        records.sort(key=lambda r: (self._qualifies(r, now), *self._reputed_rank(r), self._decayed(r, now), r.last_seen),
                     reverse=True)
        for record in records:
            if record.peer_id == self._self_id or record.peer_id in self._records:
                continue
            record.addrs = merge_addrs(record.addrs, (), self.config.max_addrs_per_peer)
            if self._qualifies(record, now) and len(self._reputed) < self.config.reputed_capacity:
                self._records[record.peer_id] = record
                self._reputed.add(record.peer_id)
                continue
            bucket = self._bucket_of(record.addrs)
            full = len(self._records) >= self.config.max_peers
            if full or (bucket is not None and len(self._new_by_subnet.get(bucket, ())) >= self.config.max_new_per_subnet):
                continue
            self._records[record.peer_id] = record
            self._bucket(record.peer_id, bucket)
            self._rerank(record)
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

    # -- internals: scores -----------------------------------------------------
    def _decayed(self, record: PeerRecord, now: float) -> float:
        elapsed = max(0.0, now - record.score_time)
        return record.score * math.exp(-self._decay_per_s * elapsed)

    def _set_score(self, record: PeerRecord, value: float, now: float) -> None:
        record.score = min(self.config.max_score, value)
        record.score_time = now
        self._rerank(record)

    def _rank_of(self, record: PeerRecord) -> Rank:
        """Eviction order of new records, lowest first: decayed score, then
        successes, then last seen. All records decay by the same factor, so
        the order of ``score * exp(-k (now - t))`` is that of
        ``log|score| + k t`` (sign first), which does not depend on ``now``:
        a rank computed when a record changes stays right, and finding the
        record to evict is one ``min`` over stored tuples, with no ``exp``
        per record per eviction under a flood."""
        if record.score == 0.0:
            sign, level = 0, 0.0
        else:
            sign = 1 if record.score > 0 else -1
            level = sign * (math.log(abs(record.score)) + self._decay_per_s * record.score_time)
        return sign, level, record.successes, record.last_seen

    def _rerank(self, record: PeerRecord) -> None:
        if record.peer_id in self._new:
            self._rank[record.peer_id] = self._rank_of(record)

    # -- internals: tiers ------------------------------------------------------
    def _qualifies(self, record: PeerRecord, now: float) -> bool:
        return (not record.banned(now) and record.successes >= self.config.repute_successes
                and record.first_seen > 0 and record.last_success - record.first_seen >= self.config.repute_age_s)

    @staticmethod
    def _reputed_rank(record: PeerRecord) -> tuple[int, float]:
        return record.successes, record.last_success

    def _bucket_of(self, addrs: Sequence[PeerAddr]) -> SubnetBucket:
        if not addrs:
            return NO_ADDRESS
        host = addrs[0].host
        try:
            if self.config.exempt_loopback and ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
                return None
            return subnet_of(host)
        except ValueError:
            return NO_ADDRESS

    def _bucket(self, peer: PeerId, bucket: SubnetBucket) -> None:
        self._new[peer] = bucket
        self._new_by_subnet.setdefault(bucket, set()).add(peer)

    def _unbucket(self, peer: PeerId) -> None:
        if peer not in self._new:
            return
        bucket = self._new.pop(peer)
        self._rank.pop(peer, None)
        members = self._new_by_subnet.get(bucket)
        if members is not None:
            members.discard(peer)
            if not members:
                del self._new_by_subnet[bucket]

    def _rebucket(self, record: PeerRecord) -> None:
        """A new record's first address changed: count it in its new subnet
        (a soft move: the limit is enforced when records are admitted)."""
        peer = record.peer_id
        if peer in self._new:
            bucket = self._bucket_of(record.addrs)
            if bucket != self._new[peer]:
                self._unbucket(peer)
                self._bucket(peer, bucket)
                self._rerank(record)

    def _admit(self, peer: PeerId, addrs: list[PeerAddr]) -> PeerRecord:
        """A new-tier record for ``peer``, after making room for it: in its
        subnet if that is at its share, else in the table if it is full;
        always at the expense of a new record, never a reputed one."""
        bucket = self._bucket_of(addrs)
        same_subnet = self._new_by_subnet.get(bucket, set()) if bucket is not None else set()
        if len(same_subnet) >= self.config.max_new_per_subnet:
            self._evict(same_subnet)
        elif len(self._records) >= self.config.max_peers:
            self._evict(self._new)  # never empty here: reputed_capacity < max_peers
        record = PeerRecord(peer, addrs, score_time=self._clock())
        self._records[peer] = record
        self._bucket(peer, bucket)
        self._rerank(record)
        return record

    def _evict(self, candidates: Iterable[PeerId]) -> None:
        worst = min(candidates, key=self._rank.__getitem__)
        log.debug("peer table: evicting new peer %s", worst.short())
        del self._records[worst]
        self._unbucket(worst)

    def _promote(self, record: PeerRecord) -> None:
        """``record`` qualified: into the reputed tier, if there is room or
        it has more standing than the weakest reputed peer (who moves back)."""
        if len(self._reputed) >= self.config.reputed_capacity:
            if not self._reputed:
                return
            weakest = self._records[min(self._reputed, key=lambda p: self._reputed_rank(self._records[p]))]
            if self._reputed_rank(weakest) >= self._reputed_rank(record):
                return
            self._demote(weakest)
        self._unbucket(record.peer_id)
        self._reputed.add(record.peer_id)

    def _demote(self, record: PeerRecord) -> None:
        if record.peer_id in self._reputed:
            self._reputed.discard(record.peer_id)
            self._bucket(record.peer_id, self._bucket_of(record.addrs))
            self._rerank(record)

    def _clear(self) -> None:
        self._records.clear()
        self._reputed.clear()
        self._new.clear()
        self._new_by_subnet.clear()
        self._rank.clear()


__all__ = [
    "PeerRecord",
    "PeerTable",
    "PeerTableConfig",
    "merge_addrs",
    "parse_peer_entry",
]
