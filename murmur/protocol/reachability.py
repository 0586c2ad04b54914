"""Whether other machines can dial this node: public, private or unknown.
Sans-IO: the node feeds it facts, it keeps bounded state and answers.

Three kinds of fact, from weakest to strongest:

* the node's own addresses (:meth:`ReachabilityTracker.set_local`): a public
  one suggests *public* (not proven: a firewall may drop every dial), only
  private, shared (carrier NAT) or loopback ones mean *private*;
* observed addresses (identify's ``observedAddr``, :meth:`observe`): how
  peers saw our connections. They reveal a NAT's public side but prove no
  reachability (a mapping for an outbound connection shows up the same), so
  they never decide the state: an address is *confirmed* as a candidate to
  advertise once peers in ``confirmations`` distinct subnets (/24, /48)
  report it. Each peer has one vote (its latest), votes expire, and their
  number is bounded: a Sybil crowd from one subnet counts once, and a
  forged address can neither flip the state nor grow the tracker;
* dial-back results (AutoNAT, :meth:`record_dial_back`): a server dialled
  one of our addresses and reached us, or not. Results from
  ``autonat_confirmations`` distinct subnets decide the state (*public* as
  soon as that many reached us; *private* when that many failed and none
  reached us), over what the local addresses suggest. The AutoNAT client
  that checks nonces and amplification costs (:mod:`murmur.node.autonat`)
  feeds this; the tracker only counts.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from murmur.protocol.addresses import REACHABLE_FROM_ELSEWHERE, Scope, scope
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.subnets import SubnetKey, subnet_of


class Reachability(enum.StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


class Basis(enum.StrEnum):
    """What the current state rests on."""

    NONE = "none"  # no address at all yet
    INTERFACES = "interfaces"  # the node's own addresses: a guess
    AUTONAT = "autonat"  # dial-backs from distinct subnets: a measurement


@dataclass(frozen=True)
class ReachabilityConfig:
    confirmations: int = 4  # distinct observer subnets that confirm an observed address (go-libp2p: 4)
    autonat_confirmations: int = 3  # distinct server subnets whose dial-backs decide the state
    ttl_s: float = 30 * 60.0  # an observation or dial-back result counts this long
    max_votes: int = 256  # observers (and, separately, dial-back servers) remembered at once

    def __post_init__(self) -> None:
        if min(self.confirmations, self.autonat_confirmations, self.max_votes) < 1 or not self.ttl_s > 0:
            raise ValueError(f"invalid reachability config {self}")


@dataclass(frozen=True)
class _Vote:
    addr: Multiaddr
    subnet: SubnetKey
    at: float
    reachable: bool = True  # dial-back votes only


class _Ballot:
    """One vote per voter (its latest), the oldest forgotten past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._votes: OrderedDict[Hashable, _Vote] = OrderedDict()

    def cast(self, voter: Hashable, vote: _Vote) -> None:
        self._votes.pop(voter, None)
        self._votes[voter] = vote
        while len(self._votes) > self.limit:
            self._votes.popitem(last=False)

    def live(self, now: float, ttl_s: float) -> list[_Vote]:
        while self._votes:  # oldest first: expire from the front
            voter, vote = next(iter(self._votes.items()))
            if now - vote.at <= ttl_s:
                break
            del self._votes[voter]
        return list(self._votes.values())

    def __len__(self) -> int:
        return len(self._votes)


def _subnets_by_addr(votes: Iterable[_Vote]) -> dict[Multiaddr, set[SubnetKey]]:
    out: dict[Multiaddr, set[SubnetKey]] = {}
    for vote in votes:
        out.setdefault(vote.addr, set()).add(vote.subnet)
    return out


def _dialable(addr: Multiaddr) -> bool:
    try:
        return scope(addr.host) in REACHABLE_FROM_ELSEWHERE and 0 < addr.port
    except ValueError:
        return False


class ReachabilityTracker:
    """See the module docstring. Times are the caller's clock (monotonic s)."""

    def __init__(self, config: ReachabilityConfig | None = None) -> None:
        self.config = config or ReachabilityConfig()
        self._local: tuple[Multiaddr, ...] = ()
        self._observed = _Ballot(self.config.max_votes)
        self._dial_backs = _Ballot(self.config.max_votes)

    # -- facts in

    def set_local(self, addrs: Iterable[Multiaddr]) -> None:
        """The addresses the node listens on and advertises."""
        self._local = tuple(a.without_peer() for a in addrs)

    def observe(self, addr: Multiaddr, observer: Hashable, observer_host: str, now: float) -> bool:
        """Peer ``observer``, connected from ``observer_host``, saw us at
        ``addr``. Returns whether that vote counted (an address nobody else
        could dial, or an observer host that is no IP address, does not)."""
        addr = addr.without_peer()
        if not _dialable(addr):
            return False
        try:
            subnet = subnet_of(observer_host)
        except ValueError:
            return False
        self._observed.cast(observer, _Vote(addr, subnet, now))
        return True

    def record_dial_back(self, addr: Multiaddr, reachable: bool, server: Hashable, server_host: str,
                         now: float) -> None:
        """A dial-back (AutoNAT) from ``server``, at ``server_host``, to our ``addr``: it reached us or not."""
        try:
            subnet = subnet_of(server_host)
        except ValueError:
            return
        self._dial_backs.cast(server, _Vote(addr.without_peer(), subnet, now, reachable))

    # -- answers

    def confirmed(self, now: float) -> list[Multiaddr]:
        """Observed addresses that peers in ``confirmations`` distinct
        subnets report now, the best supported first."""
        support = _subnets_by_addr(self._observed.live(now, self.config.ttl_s))
        ranked = sorted(support.items(), key=lambda item: (-len(item[1]), str(item[0])))
        return [addr for addr, subnets in ranked if len(subnets) >= self.config.confirmations]

    def state(self, now: float) -> tuple[Reachability, Basis]:
        need = self.config.autonat_confirmations
        votes = self._dial_backs.live(now, self.config.ttl_s)
        reached = {v.subnet for v in votes if v.reachable}
        failed = {v.subnet for v in votes if not v.reachable}
        if len(reached) >= need:
            return Reachability.PUBLIC, Basis.AUTONAT
        if len(failed) >= need and not reached:
            return Reachability.PRIVATE, Basis.AUTONAT
        scopes = {scope(a.host) for a in self._local}
        if not scopes:
            return Reachability.UNKNOWN, Basis.NONE
        if Scope.PUBLIC in scopes:
            return Reachability.PUBLIC, Basis.INTERFACES
        return Reachability.PRIVATE, Basis.INTERFACES

    def reachability(self, now: float) -> Reachability:
        return self.state(now)[0]

    def snapshot(self, now: float) -> Mapping[str, Any]:
        """For ``/status``: ``{"state", "basis", "observed", "observers"}``."""
        state, basis = self.state(now)
        return {
            "state": state.value,
            "basis": basis.value,
            "observed": [str(a) for a in self.confirmed(now)],
            "observers": len(self._observed),
        }
