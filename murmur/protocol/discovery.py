"""How a node finds its first peers: bootstrap list, peer exchange, mDNS.

* :func:`resolve` turns a bootstrap address (:class:`~murmur.protocol.multiaddr.DialAddr`:
  an IP address or a DNS name, or a relay circuit) into TCP addresses to dial.
* :class:`Bootstrap` tracks the configured bootstrap addresses and when each
  may be dialled again (exponential back-off with jitter). It is sans-IO: the
  daemon asks :meth:`Bootstrap.due` what to dial now and reports outcomes.
* :class:`PeerExchange` chooses which known peers to tell a requester about and
  validates what a peer told us (every entry is untrusted network input).
* :class:`MdnsDiscovery` advertises this node as ``_murmur._tcp.local.`` on the
  LAN and reports other murmur nodes found there. Off by default
  (``MdnsConfig.enabled``): multicast is noisy, and announces our presence to
  everybody on the link. Anything learnt via mDNS is unauthenticated; the Noise
  handshake on dial proves the peer id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import socket
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from murmur.errors import ConfigError, DecodeError, LimitExceeded, PeerFault
from murmur.protocol.addresses import advertised
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import DialAddr, Multiaddr, Proto
from murmur.protocol.peertable import PeerTable, parse_peer_entry
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

PeerEntry = tuple[PeerId, tuple[Multiaddr, ...]]
WirePeerEntry = tuple[bytes, list[str]]


# -- bootstrap ----------------------------------------------------------------

@dataclass(frozen=True)
class BackoffPolicy:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.2  # +-20 %: nodes restarted together must not retry in lockstep

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.factor < 1 or self.max_s < self.initial_s or not 0 <= self.jitter < 1:
            raise ValueError("bad back-off policy")


def backoff_delay(attempt: int, policy: BackoffPolicy, u: float = 0.5) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (1-based).

    Pure: the jitter comes from ``u`` in [0, 1) (pass ``rng.random()``); u = 0.5
    gives the un-jittered schedule initial·factor^(attempt-1), capped at max_s.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    exponent = attempt - 1
    if policy.factor == 1.0:
        base = policy.initial_s
    else:  # compare exponents first: factor**huge would overflow long after the cap applies
        steps_to_cap = math.log(policy.max_s / policy.initial_s) / math.log(policy.factor)
        base = policy.max_s if exponent >= steps_to_cap else min(policy.max_s, policy.initial_s * policy.factor**exponent)
    return base * (1.0 + policy.jitter * (2.0 * u - 1.0))


def parse_bootstrap(texts: Iterable[str]) -> list[DialAddr]:
    """Parse bootstrap multiaddrs from config/CLI; one bad entry is a ConfigError."""
    out: list[DialAddr] = []
    for text in texts:
        try:
            addr = DialAddr.parse(text)
        except ValueError as exc:
            raise ConfigError(f"bad bootstrap address: {exc}") from None
        if addr not in out:
            out.append(addr)
    return out


MAX_RESOLVED = 8  # addresses of one DNS name dialled, at most
_FAMILIES = {Proto.DNS: socket.AF_UNSPEC, Proto.DNS4: socket.AF_INET, Proto.DNS6: socket.AF_INET6}


async def resolve(addr: DialAddr) -> list[Multiaddr]:
    """The TCP addresses to dial for ``addr``: itself for an IP address, the
    records of a DNS name (``/dns4``: IPv4 only, ``/dns6``: IPv6 only,
    ``/dns``: both), none for a relay circuit (not dialled yet). The peer
    id, if any, goes with each. ``OSError`` when the name does not resolve."""
    direct = addr.direct()
    if direct is not None:
        return [direct]
    if addr.is_circuit:
        return []
    family = _FAMILIES[addr.components[0].proto]
    infos = await asyncio.get_running_loop().getaddrinfo(addr.host, addr.port, family=family,
                                                         type=socket.SOCK_STREAM)
    out: list[Multiaddr] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        target = Multiaddr(str(sockaddr[0]), addr.port, addr.peer_id)
        if target not in out:
            out.append(target)
    return out[:MAX_RESOLVED]


class Bootstrap:
    """Dial schedule of the bootstrap addresses.

    Each address is *idle* (due at ``next_at``), *dialling* (returned by
    :meth:`due`, outcome pending) or *connected*. A failure reschedules it with
    back-off; a disconnect makes it due again at once, with a clean slate.
    """

    def __init__(self, addrs: Sequence[Multiaddr], policy: BackoffPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng or random.Random()
        self._next_at: dict[Multiaddr, float] = {a: 0.0 for a in addrs}
        self._failures: dict[Multiaddr, int] = {a: 0 for a in addrs}
        self._busy: set[Multiaddr] = set()  # dialling or connected

    @property
    def addrs(self) -> list[Multiaddr]:
        return list(self._next_at)

    def due(self, now: float) -> list[Multiaddr]:
        """Addresses to dial now; they count as dialling until reported."""
        ready = [a for a, t in self._next_at.items() if a not in self._busy and t <= now]
        self._busy.update(ready)
        return ready

    def next_wakeup(self) -> float | None:
        """When the next address becomes due (None: nothing idle)."""
        pending = [t for a, t in self._next_at.items() if a not in self._busy]
        return min(pending) if pending else None

    def on_success(self, addr: Multiaddr) -> None:
        self._failures[addr] = 0
        self._busy.add(addr)

    def on_failure(self, addr: Multiaddr, now: float) -> float:
        """Record a failed dial; returns the delay until the next attempt."""
        self._failures[addr] += 1
        delay = backoff_delay(self._failures[addr], self.policy, self._rng.random())
        self._next_at[addr] = now + delay
        self._busy.discard(addr)
        return delay

    def on_disconnect(self, addr: Multiaddr, now: float) -> None:
        self._next_at[addr] = now
        self._busy.discard(addr)

    def failures(self, addr: Multiaddr) -> int:
        return self._failures[addr]


# -- peer exchange ------------------------------------------------------------

@dataclass(frozen=True)
class PeerExchangeConfig:
    max_peers: int = 32        # most entries we send or accept per response
    max_addrs_per_peer: int = 4


class PeerExchange:
    """Choose peers to share and validate peers received (PeerExchangeRequest/Response)."""

    def __init__(self, self_id: PeerId, config: PeerExchangeConfig | None = None) -> None:
        self.self_id = self_id
        self.config = config or PeerExchangeConfig()

    def choose(self, table: PeerTable, n: int, rng: random.Random,
               exclude: Collection[PeerId] = ()) -> list[PeerEntry]:
        """Up to ``n`` (capped) random peers worth telling others about.

        Only peers we have *seen ourselves* (``last_seen > 0``), that are not
        banned and whose last dial did not fail: second-hand hearsay is not
        passed on, so an attacker's invented ids do not spread transitively.
        Random rather than best-first, so requesters learn different peers.
        """
        n = min(n, self.config.max_peers)
        pool = [r for r in table.usable() if r.last_seen > 0 and r.failures == 0 and r.peer_id not in exclude
                and r.peer_id != self.self_id]
        chosen = rng.sample(pool, min(n, len(pool)))
        return [(r.peer_id, tuple(r.addrs[: self.config.max_addrs_per_peer])) for r in chosen]

    @staticmethod
    def to_wire(entries: Iterable[PeerEntry]) -> list[WirePeerEntry]:
        return [(peer.raw, [str(a) for a in addrs]) for peer, addrs in entries]

    def validate(self, raw: Any, is_banned: Callable[[PeerId], bool], requested: int | None = None) -> list[PeerEntry]:
        """Parse a received PeerExchangeResponse body.

        More entries than asked for (or than ``max_peers``) is a
        :class:`LimitExceeded`; a malformed entry a :class:`DecodeError` (honest
        nodes only relay entries they validated). Our own id and banned peers
        are dropped silently; duplicates keep the first entry.
        """
        cap = self.config.max_peers if requested is None else min(requested, self.config.max_peers)
        if not isinstance(raw, (list, tuple)):
            raise DecodeError("peer exchange entries must be a list")
        if len(raw) > cap:
            raise LimitExceeded(f"{len(raw)} peer exchange entries (max {cap})")
        out: dict[PeerId, tuple[Multiaddr, ...]] = {}
        for item in raw:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise DecodeError("peer exchange entry must be (peer, addrs)")
            peer, addrs = parse_peer_entry(item[0], item[1], self.config.max_addrs_per_peer)
            if peer == self.self_id or is_banned(peer):
                continue
            out.setdefault(peer, addrs)
        return list(out.items())


# -- mDNS ---------------------------------------------------------------------

SERVICE_TYPE = "_murmur._tcp.local."
TXT_ID_KEY = "id"
TXT_ADDR_PREFIX = "a"  # a0, a1, ...: one multiaddr each (a TXT string holds <= 255 bytes)
MAX_TXT_ADDRS = 8
MAX_RESOLVING = 16
"""Announced names resolved at once, at most; others are passed over until
announced again. Each resolve sends queries for up to ``resolve_timeout_ms``:
40 multicast packets naming 2000 made-up services had 1900 resolves under
way at once, and the node multicast about 3800 queries for them."""

FoundCallback = Callable[[PeerId, tuple[Multiaddr, ...]], None]


@dataclass(frozen=True)
class MdnsConfig:
    enabled: bool = False
    service_type: str = SERVICE_TYPE
    interfaces: tuple[str, ...] | None = None  # None: all interfaces
    resolve_timeout_ms: int = 3000


class MdnsDiscovery:
    """Advertise this node on the LAN and report other murmur nodes.

    ``async with MdnsDiscovery(peer_id, listen_addrs, on_found, config):`` —
    while open, ``on_found(peer_id, addrs)`` is called (in the event loop) for
    every murmur service that resolves, ours excluded. With
    ``config.enabled`` False it does nothing, so the daemon can use it
    unconditionally. Malformed announcements are logged and ignored: mDNS is
    unauthenticated and nobody can be penalised for them.
    """

    def __init__(self, peer_id: PeerId, listen_addrs: Sequence[Multiaddr], on_found: FoundCallback,
                 config: MdnsConfig | None = None) -> None:
        self.peer_id = peer_id
        self.config = config or MdnsConfig()
        self._listen_addrs = [a.without_peer() for a in listen_addrs]
        self._on_found = on_found
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks = TaskManager(f"mdns:{peer_id.short()}")
        self._resolving: set[str] = set()  # names whose resolve is under way
        self.passed_over = 0  # announcements not resolved: MAX_RESOLVING were under way

    @property
    def instance_name(self) -> str:
        return f"{self.peer_id.text}.{self.config.service_type}"

    async def __aenter__(self) -> MdnsDiscovery:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        if not self.config.enabled:
            return
        from zeroconf import InterfaceChoice
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        advertised = self._advertised_addrs()
        if not advertised:
            raise ConfigError("mDNS needs at least one listen address with a concrete IP")
        interfaces: Any = list(self.config.interfaces) if self.config.interfaces else InterfaceChoice.All
        self._zc = AsyncZeroconf(interfaces=interfaces)
        properties = {TXT_ID_KEY: self.peer_id.text}
        properties.update({f"{TXT_ADDR_PREFIX}{i}": str(a) for i, a in enumerate(advertised[:MAX_TXT_ADDRS])})
        self._info = AsyncServiceInfo(
            self.config.service_type,
            self.instance_name,
            port=advertised[0].port,
            addresses=[ipaddress.ip_address(a.host).packed for a in advertised],
            properties=properties,
            server=f"murmur-{self.peer_id.text[-12:].lower()}.local.",
        )
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, self.config.service_type,
                                            handlers=[self._on_service_state_change])

    async def close(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        if self._browser is not None:
            await self._browser.async_cancel()
        await self._tasks.shutdown()
        try:
            await zc.async_unregister_service(self._info)
        finally:
            await zc.async_close()

    def _advertised_addrs(self) -> list[Multiaddr]:
        """Listen addresses, a wildcard expanded to this host's interface
        addresses (``addresses.advertised``)."""
        return list(dict.fromkeys(a for addr in self._listen_addrs for a in advertised(addr)))

    def _on_service_state_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated) or name == self.instance_name:
            return
        if name in self._resolving:
            return  # the resolve under way reads the updated records
        if len(self._resolving) >= MAX_RESOLVING:
            self.passed_over += 1  # unauthenticated multicast: a flood must not fan out into tasks and queries
            return
        self._resolving.add(name)
        self._tasks.spawn(f"resolve:{name}", lambda: self._resolve(service_type, name), replace=True)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        zc = self._zc
        if zc is None:
            self._resolving.discard(name)
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            resolved = await info.async_request(zc.zeroconf, self.config.resolve_timeout_ms)
        finally:
            self._resolving.discard(name)
        if not resolved:
            log.debug("mDNS: %s did not resolve", name)
            return
        try:
            peer, addrs = parse_txt(info.properties or {}, info.port, info.parsed_addresses())
        except (PeerFault, ValueError) as exc:
            log.info("mDNS: ignoring malformed announcement %s: %s", name, exc)
            return
        if peer != self.peer_id:
            self._on_found(peer, addrs)


def parse_txt(properties: dict[bytes, bytes | None], port: int | None, addresses: Sequence[str]) -> PeerEntry:
    """Peer id and addresses from an mDNS TXT record (falling back to the
    A/AAAA records and SRV port if it lists no addresses)."""
    raw_id = properties.get(TXT_ID_KEY.encode())
    if not raw_id:
        raise DecodeError("mDNS TXT record without peer id")
    peer = PeerId.from_string(raw_id.decode("ascii", "replace"))
    texts = [v.decode("ascii", "replace") for k, v in sorted(properties.items())
             if k.startswith(TXT_ADDR_PREFIX.encode()) and k[1:].isdigit() and v]
    if not texts and port:
        texts = [str(Multiaddr(str(ipaddress.ip_address(a)), port)) for a in addresses]
    _, addrs = parse_peer_entry(peer.raw, texts[:MAX_TXT_ADDRS], MAX_TXT_ADDRS)
    return peer, addrs


__all__ = [
    "BackoffPolicy",
    "Bootstrap",
    "MdnsConfig",
    "MdnsDiscovery",
    "PeerExchange",
    "PeerExchangeConfig",
    "SERVICE_TYPE",
    "backoff_delay",
    "parse_bootstrap",
    "resolve",
    "parse_txt",
]
