"""Sans-IO peer sampling: Cyclon shuffles, a stable neighbour set, subnet limits.

Two sets of peers live here, with different jobs:

* the **view** (Cyclon's cache, at most ``view_size`` = c descriptors with
  ages) is a constantly shuffled, near-uniform random sample of the live
  network. ``sample(n)`` draws from it (gossip-learning partners, MoDeST
  candidates), and it is the reservoir neighbours are taken from.
* the **neighbours** (``neighbours(k)``) are the peers this node learns with in
  D-SGD. They must be *stable*: averaging weights are computed from degrees and
  pairwise privacy noise needs both ends of an edge to persist. Policy: a
  neighbour is kept for as long as it is alive; when one is reported failed it
  is replaced *immediately* by a view entry that is not already a neighbour
  and keeps the subnet limit: a peer we have spoken with first (``on_contact``:
  it proved its identity on a connection; the latest contact first, kept
  apart from the view, which a stranger's shuffles may have emptied of them),
  and only when there is none, the freshest (lowest-age, i.e. most recently
  heard from) view entry, which is hearsay. A shuffle's entries are the sender's word: an
  attacker sends records of age 0 for ids it made up, which the age order
  alone put first, so the slots that opened went to them, each lost again
  only after a failed dial (see tests/integration/test_hearsay_neighbours.py). Optionally (``neighbour_rotation_rounds > 0``) the longest-held
  neighbour is swapped every that many shuffle rounds for a view entry drawn
  uniformly; this is off by default. It dissolves the hub a network started
  from one bootstrap peer makes of it (nodes that fill their neighbour set at
  once all pick it; see the tests for measured in-degrees), and it is what
  links the sides of a healed partition again: each side refilled its
  neighbours on its own side, and kept while alive they never cross again.

Cyclon (Voulgaris et al., 2005), as implemented:

* ``start_shuffle()``: age every entry by one, pick the *oldest* entry Q as the
  target and remove it from the view, send Q up to l-1 other random entries
  plus our own descriptor with age 0. Picking the oldest makes every link be
  refreshed or found dead in bounded time, which is what evicts dead peers.
* ``on_shuffle_request(sender, entries)``: reply with up to l random entries
  (never the sender), then merge what was received.
* ``on_shuffle_response(sent, received, target)``: merge; then Q itself goes
  back, fresh, into a slot the merge left free (a view with free slots is a
  network smaller than the view: there, the swap would leave Q's only peer
  without an entry half of the time).
* merge: ignore our own id, failed/blocked peers and peers already in the view
  (for those only the younger age is kept; addresses are *not* replaced, so
  nobody can redirect an entry we hold to another address); fill empty slots
  first, then replace entries we sent to the other side. At most
  ``max_per_source`` entries (default l) brought by one source (a shuffle
  partner; the caller may key partners by subnet) are held at once, its own
  descriptor not counted: one connected attacker within its request budget
  made up a record per slot and held 92% of a victim's view (100% after 12
  s; tests/integration/test_view_share.py), and so most of whom the victim
  shuffled with and sampled.

Failure detection is the caller's: it reports ``on_failure(peer)`` when a dial,
shuffle or ping fails. The peer leaves the view and the neighbour set and is
remembered as failed for ``failed_memory_s`` so that copies of its descriptor
still circulating in other views are not taken back; ``on_alive(peer)`` clears
that. Since everyone shuffles with their oldest entry, a dead descriptor is
dialled — and dropped — within a few rounds wherever it is held.

Subnet buckets (Sybil limit). At most ``max_per_subnet`` (b) entries of the
view, and at most b neighbours, may share a /24 (IPv4) or /48 (IPv6) subnet,
judged by an entry's first (dialled) address. One host cannot fill a view with
identities it minted; addresses it makes up elsewhere fail on dial and are
evicted. On a local testnet every node is 127.0.0.1, so loopback is exempted
only by the explicit ``allow_loopback_flood=True`` (or raise b) — never by
default.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from murmur.errors import DecodeError, LimitExceeded
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import PeerAddr
from murmur.protocol import subnets
from murmur.protocol.peertable import parse_peer_entry
from murmur.protocol.subnets import SubnetKey

MAX_WIRE_AGE = 1 << 20  # ages are shuffle-round counts; anything larger is nonsense

WireDescriptor = tuple[bytes, list[str], int]


@dataclass(frozen=True)
class SamplerConfig:
    view_size: int = 20                  # c: Cyclon cache size
    shuffle_length: int = 8              # l: entries exchanged per shuffle (incl. own)
    neighbours: int = 6                  # k: default neighbour count
    max_per_subnet: int = 2              # b: per /24 or /48, in view and neighbour set
    allow_loopback_flood: bool = False   # exempt 127.0.0.0/8 and ::1 from b (local testnets)
    neighbour_rotation_rounds: int = 0   # 0 = keep neighbours while alive
    failed_memory_s: float = 300.0       # how long a failed peer is refused back
    max_contacts: int = 4096             # peers remembered as spoken with (neighbour candidates first)
    # How long a peer that refused a learning edge (it is full) is passed over:
    # shorter, for it is up, and in a small network it may be everyone there is.
    refused_memory_s: float = 30.0
    max_failed_memory: int = 4096        # bound on that memory
    max_entry_addrs: int = 4             # addresses kept per descriptor
    max_per_source: int = 0              # view entries one shuffle source may have brought; 0: shuffle_length

    def __post_init__(self) -> None:
        if self.view_size < 1 or self.shuffle_length < 1 or self.shuffle_length > self.view_size:
            raise ValueError("need 1 <= shuffle_length <= view_size")
        if self.neighbours < 0 or self.max_per_subnet < 1 or self.neighbour_rotation_rounds < 0:
            raise ValueError("neighbours >= 0, max_per_subnet >= 1, neighbour_rotation_rounds >= 0")
        if self.max_per_source < 0:
            raise ValueError("max_per_source >= 0")

    @property
    def source_cap(self) -> int:
        """View entries one source may have brought (see :meth:`CyclonSampler.on_shuffle_request`)."""
        return self.max_per_source or self.shuffle_length


@dataclass(frozen=True)
class Descriptor:
    """A Cyclon entry: a peer, where to reach it, and how old this news is."""

    peer: PeerId
    addrs: tuple[PeerAddr, ...]
    age: int = 0

    def to_wire(self) -> WireDescriptor:
        """The ``(peer_raw, [addr str], age)`` form of ShuffleRequest/Response."""
        return (self.peer.raw, [str(a) for a in self.addrs], self.age)


def decode_descriptors(raw: Any, max_entries: int, max_addrs: int) -> list[Descriptor]:
    """Validate shuffle entries received from the network.

    Raises :class:`LimitExceeded` for more than ``max_entries`` entries or too
    many addresses, :class:`DecodeError` for anything malformed. Duplicate
    peers keep their first entry.
    """
    if not isinstance(raw, (list, tuple)):
        raise DecodeError("shuffle entries must be a list")
    if len(raw) > max_entries:
        raise LimitExceeded(f"{len(raw)} shuffle entries (max {max_entries})")
    out: dict[PeerId, Descriptor] = {}
    for item in raw:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise DecodeError("shuffle entry must be (peer, addrs, age)")
        peer_raw, addr_texts, age = item
        if isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= MAX_WIRE_AGE:
            raise DecodeError(f"bad shuffle entry age {age!r}")
        peer, addrs = parse_peer_entry(peer_raw, addr_texts, max_addrs)
        out.setdefault(peer, Descriptor(peer, addrs, age))
    return list(out.values())


def subnet_of(addr: PeerAddr) -> SubnetKey:
    """The /24 (IPv4) or /48 (IPv6) an address belongs to (see :mod:`murmur.protocol.subnets`)."""
    return subnets.subnet_of(addr.host)


class CyclonSampler:
    """Cyclon view + stable neighbour set of one node (sans-IO).

    ``rng`` drives every random choice (seed it for reproducible simulations);
    ``clock`` only times the failed-peer memory; ``is_blocked`` (e.g.
    ``PeerTable.is_banned``) keeps peers out of view and neighbours;
    ``may_neighbour`` keeps peers out of the neighbours only: a peer that runs
    another model is no learning neighbour, but it is a member of the
    network all the same, and the view hands it on (two nodes whose one
    common peer ran another model never met while it dropped them).
    """

    def __init__(
        self,
        self_id: PeerId,
        self_addrs: Sequence[PeerAddr],
        config: SamplerConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        is_blocked: Callable[[PeerId], bool] = lambda _peer: False,
        may_neighbour: Callable[[PeerId], bool] = lambda _peer: True,
    ) -> None:
        self.self_id = self_id
        self.config = config or SamplerConfig()
        self.self_addrs = tuple(a.without_peer() for a in self_addrs)[: self.config.max_entry_addrs]
        self._rng = rng or random.Random()
        self._clock = clock
        self._is_blocked = is_blocked
        self._may_neighbour = may_neighbour
        self._view: dict[PeerId, Descriptor] = {}
        self._sources: dict[PeerId, Hashable] = {}  # view entry -> the source whose shuffle brought it
        self._neighbours: dict[PeerId, Descriptor] = {}  # insertion order = tenure order
        self._target_k = self.config.neighbours
        # peer -> (refuse until, whether we knew no relay circuit of it when it failed)
        self._failed: OrderedDict[PeerId, tuple[float, bool]] = OrderedDict()
        # Peers we have spoken with and where (see on_contact), oldest contact first.
        self._contacts: OrderedDict[PeerId, tuple[PeerAddr, ...]] = OrderedDict()
        self.rounds = 0

    # -- view ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, peer: object) -> bool:
        return peer in self._view

    def view(self) -> list[Descriptor]:
        return list(self._view.values())

    def descriptor(self, peer: PeerId) -> Descriptor | None:
        """Where to reach ``peer`` if it is in the view or a neighbour."""
        return self._view.get(peer) or self._neighbours.get(peer)

    def self_descriptor(self) -> Descriptor:
        return Descriptor(self.self_id, self.self_addrs, 0)

    def add(self, peer: PeerId, addrs: Iterable[PeerAddr], age: int = 0) -> bool:
        """Insert a peer learnt outside Cyclon (bootstrap, peer exchange, mDNS,
        an inbound connection) if there is room and the subnet limit allows.
        Returns True iff it is in the view afterwards."""
        if peer in self._view:
            return True
        addr_tuple = tuple(a.without_peer() for a in addrs)[: self.config.max_entry_addrs]
        desc = Descriptor(peer, addr_tuple, age)
        if not addr_tuple or len(self._view) >= self.config.view_size or not self._admissible(desc.peer, desc.addrs):
            return False
        if not self._subnet_ok(desc, self._view.values(), replacing=None):
            return False
        self._view[peer] = desc
        return True

    def learn_addrs(self, peer: PeerId, addrs: Sequence[PeerAddr]) -> bool:
        """Addresses of ``peer`` learnt after its entry was made (the relay
        circuits a private peer got since): merged into its descriptors right
        after their first address (which keeps its subnet bucket), or a new
        entry as :meth:`add` makes. Returns True iff it is in the view or a neighbour."""
        found = False
        for held in (self._view, self._neighbours):
            desc = held.get(peer)
            if desc is None:
                continue
            found = True
            held[peer] = replace(desc, addrs=self._with(desc.addrs, [a.without_peer() for a in addrs]))
        return found or self.add(peer, addrs)

    def _with(self, held: Sequence[PeerAddr], more: Sequence[PeerAddr]) -> tuple[PeerAddr, ...]:
        """``held`` with ``more`` right after its first address (which keeps its subnet bucket), capped."""
        return tuple(dict.fromkeys((*held[:1], *more, *held[1:])))[: self.config.max_entry_addrs]

    def sample(self, n: int, rng: random.Random | None = None) -> list[PeerId]:
        """Up to ``n`` distinct peers drawn uniformly from the view."""
        peers = list(self._view)
        return (rng or self._rng).sample(peers, min(n, len(peers)))

    # -- neighbours ----------------------------------------------------------
    def neighbours(self, k: int | None = None) -> list[PeerId]:
        """The current k neighbours (filled from the view if short); see module doc."""
        if k is not None:
            self._target_k = k
            for peer in list(self._neighbours)[k:]:  # shrink: drop the most recent
                del self._neighbours[peer]
        self._fill_neighbours()
        return list(self._neighbours)

    def neighbour_descriptors(self) -> list[Descriptor]:
        return list(self._neighbours.values())

    def _fill_neighbours(self, exclude: frozenset[PeerId] = frozenset()) -> list[PeerId]:
        added: list[PeerId] = []
        if len(self._neighbours) >= self._target_k:
            return added
        # Peers we have spoken with first (the latest contact first), then hearsay,
        # freshest first: the lowest age is the most recent sign of life.
        contacts = [Descriptor(peer, addrs) for peer, addrs in reversed(self._contacts.items())]
        hearsay = sorted((d for d in self._view.values() if d.peer not in self._contacts), key=lambda d: d.age)
        for desc in (*contacts, *hearsay):
            if len(self._neighbours) >= self._target_k:
                break
            if desc.peer in self._neighbours or desc.peer in exclude or not self._admissible(desc.peer, desc.addrs):
                continue
            if not self._may_neighbour(desc.peer):
                continue
            if not self._subnet_ok(desc, self._neighbours.values(), replacing=None):
                continue
            self._neighbours[desc.peer] = desc
            added.append(desc.peer)
        return added

    def _rotate_neighbour(self) -> None:
        """Swap the longest-held neighbour for a view entry drawn uniformly
        (one that may be a neighbour, within the subnet limit), if any.

        Uniformly from the view, not as a failed neighbour is replaced (our
        latest contacts first): after a partition a node's latest contacts
        are its own side, and a swap filled from them never linked across
        once it healed (in a testnet, one run of three). Cyclon keeps the
        view a near-uniform sample of the live network, and at most
        ``max_per_source`` of its entries come from one shuffle partner; the
        draw ignores ages, which a shuffle's sender makes up."""
        if not self._neighbours or len(self._neighbours) < self._target_k:
            return
        oldest = next(iter(self._neighbours))
        rest = [d for p, d in self._neighbours.items() if p != oldest]
        candidates = [d for d in self._view.values()
                      if d.peer not in self._neighbours and self._admissible(d.peer, d.addrs)
                      and self._may_neighbour(d.peer) and self._subnet_ok(d, rest, replacing=None)]
        if not candidates:
            return  # nobody to swap with: keep it
        fresh = self._rng.choice(sorted(candidates, key=lambda d: d.peer.raw))
        del self._neighbours[oldest]
        self._neighbours[fresh.peer] = fresh

    def drop_neighbour(self, peer: PeerId) -> list[PeerId]:
        """``peer`` may no longer be a neighbour (``may_neighbour`` says so
        now): out of the neighbours, kept in the view; returns the
        neighbours added in its place (connect to them)."""
        if self._neighbours.pop(peer, None) is None:
            return []
        return self._fill_neighbours()

    # -- failure detection ---------------------------------------------------
    def on_failure(self, peer: PeerId) -> list[PeerId]:
        """``peer`` did not answer: drop it everywhere, refuse it back for a
        while, and return the neighbours added in its place (connect to them)."""
        return self._pass_over(peer, self.config.failed_memory_s)

    def on_refused(self, peer: PeerId) -> list[PeerId]:
        """``peer`` is up but refused (or left) our learning edge: as
        :meth:`on_failure`, for ``refused_memory_s`` only. With the failure
        memory, a node in a network of three or four that all happened to
        refuse it once passed over every one of them for five minutes."""
        return self._pass_over(peer, self.config.refused_memory_s)

    def _pass_over(self, peer: PeerId, memory_s: float) -> list[PeerId]:
        known = self.descriptor(peer)
        direct_only = known is None or not any(a.is_circuit for a in known.addrs)
        self._view.pop(peer, None)
        was_neighbour = self._neighbours.pop(peer, None) is not None
        if memory_s >= self.config.failed_memory_s:  # gone; a refusal (it is up) keeps the contact
            self._contacts.pop(peer, None)
        self._failed[peer] = (self._clock() + memory_s, direct_only)
        self._failed.move_to_end(peer)
        while len(self._failed) > self.config.max_failed_memory:
            self._failed.popitem(last=False)
        return self._fill_neighbours() if was_neighbour else []

    def on_alive(self, peer: PeerId) -> None:
        """Direct evidence ``peer`` is up (it connected, answered): forget a failure."""
        self._failed.pop(peer, None)

    def on_contact(self, peer: PeerId, addrs: Sequence[PeerAddr]) -> None:
        """We have spoken with ``peer``, which listens at ``addrs`` (as we
        observed them): it proved its identity on a connection (it dialled us
        or answered our dial). It goes before hearsay when a neighbour slot
        is filled (see the module doc); a failure forgets it. Bounded by
        ``max_contacts`` (the oldest contact goes)."""
        held = tuple(a.without_peer() for a in addrs)[: self.config.max_entry_addrs]
        if peer == self.self_id or not held:
            return
        self._contacts[peer] = held
        self._contacts.move_to_end(peer)
        while len(self._contacts) > self.config.max_contacts:
            self._contacts.popitem(last=False)

    def _admissible(self, peer: PeerId, addrs: Sequence[PeerAddr] = ()) -> bool:
        """Not us, not blocked, and not a recent failure, unless it failed while
        we knew only its direct addresses and ``addrs`` names a relay circuit:
        a peer behind NAT is reached by its circuits alone, learnt after it started."""
        if peer == self.self_id or self._is_blocked(peer):
            return False
        failed = self._failed.get(peer)
        if failed is None:
            return True
        until, direct_only = failed
        if until <= self._clock() or (direct_only and any(a.is_circuit for a in addrs)):
            del self._failed[peer]
            return True
        return False

    # -- Cyclon shuffle --------------------------------------------------------
    def start_shuffle(self) -> tuple[Descriptor, list[Descriptor]] | None:
        """Begin one shuffle round. Returns ``(target, entries)`` to send to
        ``target`` in a ShuffleRequest, or None if the view is empty. If the
        target turns out dead, report ``on_failure(target.peer)``."""
        if not self._view:
            return None
        self.rounds += 1
        self._view = {p: replace(d, age=d.age + 1) for p, d in self._view.items()}
        target = max(self._view.values(), key=lambda d: d.age)
        del self._view[target.peer]
        others = self._rng.sample(list(self._view.values()), min(self.config.shuffle_length - 1, len(self._view)))
        rotation = self.config.neighbour_rotation_rounds
        if rotation and self.rounds % rotation == 0:
            self._rotate_neighbour()
        return target, [self.self_descriptor(), *others]

    def on_shuffle_request(self, sender: PeerId, entries: Sequence[Descriptor],
                           source: Hashable | None = None) -> list[Descriptor]:
        """Answer a shuffle from ``sender``: up to l random entries of ours
        (never the sender itself), then merge what it sent. What it brings
        counts against ``source`` (by default the sender): at most
        ``max_per_source`` entries of the view came from one source."""
        pool = [d for d in self._view.values() if d.peer != sender]
        reply = self._rng.sample(pool, min(self.config.shuffle_length, len(pool)))
        self._merge(entries, reply, sender, sender if source is None else source)
        return reply

    def on_shuffle_response(self, entries_sent: Sequence[Descriptor], entries_received: Sequence[Descriptor],
                            target: Descriptor | None = None, source: Hashable | None = None) -> None:
        """Merge the reply to our shuffle; slots of what we sent are reused.

        ``target`` (the peer that answered) goes back into the view, fresh,
        if the reply left a slot free. Cyclon hands our entry to it and takes
        its entry from us; in a network smaller than the view (two nodes: the
        user's first pair) the reply has nothing to fill that slot, so each
        node's view held its only peer half of the time, and a neighbour set,
        filled from the view, could stay empty for good when its maintenance
        ticks fell in the other half (a CI failure). A full view keeps the
        Cyclon swap as it is: a merge with nothing sent to replace evicts nobody.
        What the reply brings counts against ``source`` (by default the target)."""
        sender = None if target is None else target.peer
        self._merge(entries_received, entries_sent, sender, sender if source is None else source)
        if target is not None:
            self._merge([replace(target, age=0)], ())

    def _merge(self, received: Sequence[Descriptor], sent: Sequence[Descriptor], sender: PeerId | None = None,
               source: Hashable | None = None) -> None:
        replaceable = [d.peer for d in sent if d.peer != self.self_id]
        for peer in [p for p in self._sources if p not in self._view]:  # left the view since
            del self._sources[peer]
        brought = sum(1 for s in self._sources.values() if s == source) if source is not None else 0
        for entry in received:
            if not entry.addrs or not self._admissible(entry.peer, entry.addrs):
                continue
            held = self._view.get(entry.peer)
            counted = source is not None and entry.peer != sender  # the sender's own descriptor is no hearsay
            if held is None and counted and brought >= self.config.source_cap:
                continue
            if held is not None:
                if entry.age < held.age:
                    # A fresher entry may name circuits the peer reserved since ours was made
                    # (a private peer is reachable by nothing else); its other addresses do not
                    # replace ours, and a bogus circuit costs one failed, authenticated dial.
                    circuits = [a for a in entry.addrs if a.is_circuit and a not in held.addrs]
                    self._view[entry.peer] = replace(held, age=entry.age, addrs=self._with(held.addrs, circuits))
                continue
            victim: PeerId | None = None
            if len(self._view) >= self.config.view_size:
                while replaceable and victim is None:
                    candidate = replaceable.pop(0)
                    if candidate in self._view:
                        victim = candidate
                if victim is None:
                    continue
            entry = replace(entry, addrs=entry.addrs[: self.config.max_entry_addrs])
            if not self._subnet_ok(entry, self._view.values(), replacing=victim):
                if victim is not None:
                    replaceable.insert(0, victim)
                continue
            if victim is not None:
                del self._view[victim]
                if source is not None and self._sources.pop(victim, None) == source:
                    brought -= 1
            self._view[entry.peer] = entry
            if counted:
                self._sources[entry.peer] = source
                brought += 1

    # -- subnet buckets ------------------------------------------------------
    def _bucket(self, desc: Descriptor) -> SubnetKey | None:
        """The subnet an entry counts against, or None if exempt."""
        addr = desc.addrs[0] if desc.addrs else None
        if addr is None:
            return None
        if self.config.allow_loopback_flood and ipaddress.ip_address(addr.host).is_loopback:
            return None
        return subnet_of(addr)

    def _subnet_ok(self, desc: Descriptor, held: Iterable[Descriptor], replacing: PeerId | None) -> bool:
        bucket = self._bucket(desc)
        if bucket is None:
            return True
        used = sum(1 for d in held if d.peer != replacing and self._bucket(d) == bucket)
        return used < self.config.max_per_subnet


__all__ = [
    "CyclonSampler",
    "Descriptor",
    "SamplerConfig",
    "decode_descriptors",
    "subnet_of",
]
