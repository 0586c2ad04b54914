"""An emulated internet for tests and the testnet: hosts, home routers with
NAT, link rates, all in Linux network namespaces.

Why: murmur's users sit behind NAT, and a node that only ever ran on
loopback has never met one. Here every host is a network namespace with one
interface; public hosts and the routers' WAN sides share a public segment
(one bridge) on 198.18.0.0/15, the RFC 2544 benchmarking range, which no
real network routes; each router masquerades a private LAN behind its one
public address with nftables:

* ``NatKind.EIM`` (``masquerade``): endpoint-independent mapping. Linux keeps
  a connection's source port when it is free, so one local (address, port)
  shows as the same public (address, port) to every destination; filtering
  is address-and-port dependent (conntrack). The NAT hole punching can cross.
* ``NatKind.SYMMETRIC`` (``masquerade random``): every connection gets a
  random public port, so each destination sees a different mapping; hole
  punching cannot predict it and traffic must be relayed.

Either router drops what arrives unsolicited on its WAN side (no answer, as
a home router does), so only connections its LAN opened come back in.
Per-host link rates are ``tc tbf`` qdiscs: the upload on the host's own
interface, the download on the far end of its cable. Packet loss is an
nftables rule at each end of the host's cable that drops a random share of
what enters there (``numgen random``). Delay is a userspace delay line
(:mod:`murmur.testnet.delayline`) spliced into the cable of each host
planned with one (``Host.delay_line``; the others' cables stay plain veth
and pay nothing): ``eth0`` to ``<p>h`` in the far namespace, the delay line
process, then ``<p>b`` to the bridge port ``<p>``, where rate and loss stay.
So neither needs ``tc netem``, which not every kernel has (this one has
neither netem nor fq nor etf).

Containment: the public segment lives in a namespace of its own, so not one
interface is added to the machine's own namespace, nothing routes to its
real interfaces, and public hosts have no default route at all (a dial to any
address outside the emulation fails at once: ``ENETUNREACH``). Routers have
no default route either. Everything one :class:`Internet` creates carries
its owner's pid and start time in the namespace name; leaving the ``with``
block kills what still runs inside and deletes the namespaces (their
interfaces, qdiscs and nftables rules go with them), also when the block
fails, and :func:`cleanup_stale` removes what a crashed earlier run left.

The module *builds* exact command lines (pure, unit-tested: :func:`plan`,
:func:`setup_commands`, ...) and runs them (:class:`Internet`). It needs
root, ``ip``/``tc`` (iproute2) and ``nft`` (nftables). Processes enter a
host with :func:`exec_prefix` (``ip netns exec``) or, for a forked Python
process, :func:`enter_namespace`; :func:`socket_in` makes a socket inside a
host for a process that stays outside (the controller reading a node's
loopback-only API).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from murmur.errors import MurmurError
from murmur.testnet import delayline
from murmur.testnet.delayline import DelayLine, DelayLineError, LinkSpec, SetDelay

log = logging.getLogger(__name__)

Command = list[str]

PUBLIC_NET = ipaddress.IPv4Network("198.18.0.0/15")
"""The public segment: RFC 2544's benchmarking range, routed nowhere real."""
PUBLIC_HOST_OCTET = 1  # public endpoint k is PUBLIC_NET + 256 k + 1: one /24 each
MAX_PUBLIC_ENDPOINTS = PUBLIC_NET.num_addresses // 256 - 1
DEFAULT_LAN = "10.{router}.0.0/24"  # router j's LAN unless it names one (j counts from 1)
LAN_RANGES = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
"""Where a LAN may be: RFC 1918, and RFC 6598's carrier-grade NAT space."""
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "murmur-net-"
_OWNED = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)\.(\d+)\.\d+-")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # host and router names (part of a namespace name)
HOST_IFACE = "eth0"
WAN_IFACE = "wan0"
LAN_BRIDGE = "lan0"
PUBLIC_BRIDGE = "br0"
NFT_TABLE = "murmur"
LOSS_TABLE = "murmur_loss"  # + "_<iface>": one direction of a host's packet loss, removed whole to end it
LOSS_SCALE = 10_000  # loss is drawn per packet out of this many: percent to two decimals
COMMAND_TIMEOUT_S = 10.0
TBF_LATENCY_MS = 50  # the longest a packet may queue in a rate-limited link
TBF_MIN_BURST_BYTES = 32 * 1024  # well above one 1514-byte frame; GSO packets beyond it are segmented
TBF_BURST_S = 0.004  # burst = what the rate sends in 4 ms (a 250 Hz kernel tick), at least the minimum
WIRE_HOST_SUFFIX = "h"  # <far_iface>h: a delay line's end facing the host's eth0
WIRE_BRIDGE_SUFFIX = "b"  # <far_iface>b: its end facing the bridge port <far_iface>
WIRE_TABLE = "murmur_wire"  # + "_<far_iface>": drops what enters a delay line's ends, for the far stack
IFNAME_MAX = 15  # IFNAMSIZ - 1
DELAY_LINE_MODULE = "murmur.testnet.delayline"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>


class InternetError(MurmurError):
    """A command building the emulated internet failed; the message holds the
    command and its stderr. Also: a topology that cannot be built."""


class NatKind(enum.StrEnum):
    """How a router maps its LAN's connections (see the module docstring)."""

    EIM = "eim"  # endpoint-independent mapping: masquerade
    SYMMETRIC = "symmetric"  # endpoint-dependent mapping: masquerade random


class Unsolicited(enum.StrEnum):
    """What a router does with a connection nobody on its LAN asked for."""

    DROP = "drop"  # silence: the dialler waits for its connect timeout (most home routers)
    REJECT = "reject"  # a TCP reset (ICMP for the rest): the dial fails at once


# ------------------------------------------------------------------ topology


@dataclass(frozen=True)
class LinkRate:
    """A host's link in megabits per second, each way; None: unlimited."""

    up_mbit: float | None = None
    down_mbit: float | None = None

    def __post_init__(self) -> None:
        for rate in (self.up_mbit, self.down_mbit):
            if rate is not None and not rate > 0:
                raise ValueError(f"a link rate must be > 0 Mbit/s, got {rate}")


@dataclass(frozen=True)
class Router:
    """A home router: ``nat`` in front of the private ``lan`` (default
    10.<j>.0.0/24 for the j-th router); ``address``: its public one (default:
    the next free /24 of the public segment); ``unsolicited``: what it does
    with connections from outside that nobody inside asked for."""

    name: str
    nat: NatKind = NatKind.EIM
    lan: str | None = None
    address: str | None = None
    unsolicited: Unsolicited = Unsolicited.DROP


@dataclass(frozen=True)
class Host:
    """A machine: public on the segment (``router`` None) or on a router's LAN."""

    name: str
    router: str | None = None
    rate: LinkRate = field(default_factory=LinkRate)
    address: str | None = None  # public hosts only; default: the next free /24
    delay_line: bool = False  # its cable gets a delay line: Internet.set_latency works on it


@dataclass(frozen=True)
class Topology:
    hosts: tuple[Host, ...]
    routers: tuple[Router, ...] = ()


# ---------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Wire:
    """The two interfaces of a host's delay line, both in its far namespace."""

    host_side: str  # peer of the host's eth0: what the host sends arrives here
    bridge_side: str  # peer of the bridge port far_iface


def wire_for(far_iface: str) -> Wire:
    """Named after the bridge port, which is unique in its namespace, as
    these then are (several hosts' cables end in one namespace)."""
    wire = Wire(far_iface + WIRE_HOST_SUFFIX, far_iface + WIRE_BRIDGE_SUFFIX)
    assert max(len(wire.host_side), len(wire.bridge_side)) <= IFNAME_MAX, wire
    return wire


@dataclass(frozen=True)
class HostPlan:
    name: str
    ns: str
    address: str  # its own interface's address (private behind a router)
    prefix_len: int
    gateway: str | None  # the router's LAN address; None for a public host
    router: str | None
    rate: LinkRate
    far_ns: str  # where the other end of its cable is (the router, or the public segment)
    far_iface: str  # its cable's port on the bridge there
    wire: Wire | None = None  # its delay line's interfaces (None: a plain cable)


@dataclass(frozen=True)
class RouterPlan:
    name: str
    ns: str
    nat: NatKind
    wan_address: str
    lan: ipaddress.IPv4Network
    far_iface: str  # its WAN cable's port on the public segment
    unsolicited: Unsolicited = Unsolicited.DROP


@dataclass(frozen=True)
class Plan:
    """Every name and address of one emulated internet; pure data."""

    owner: str
    inet_ns: str
    hosts: dict[str, HostPlan]
    routers: dict[str, RouterPlan]

    @property
    def namespaces(self) -> list[str]:
        """Hosts, then routers, then the public segment: the order to tear down in."""
        return [h.ns for h in self.hosts.values()] + [r.ns for r in self.routers.values()] + [self.inet_ns]

    def public_address(self, host: str) -> str:
        """Where ``host`` shows on the public segment: its own address, or its router's."""
        h = self.hosts[host]
        return h.address if h.router is None else self.routers[h.router].wan_address


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


_instances = iter(range(1 << 62))


def new_owner() -> str:
    """A tag unique to this process and instance: ``<pid>.<start ticks>.<n>``.
    The start time tells a crashed owner from a later process given its pid."""
    pid = os.getpid()
    return f"{pid}.{_process_start_ticks(pid) or 0}.{next(_instances)}"


def _check_name(kind: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise InternetError(f"{kind} name {name!r} must match {NAME.pattern}")


def _public_address(address: str, what: str) -> str:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InternetError(f"{what}: {address!r} is not an IPv4 address") from None
    if ip not in PUBLIC_NET or ip in (PUBLIC_NET.network_address, PUBLIC_NET.broadcast_address):
        raise InternetError(f"{what}: {address} is not a host address in the public segment {PUBLIC_NET}")
    return str(ip)


def plan(topology: Topology, owner: str | None = None) -> Plan:
    """Names and addresses for ``topology``; raises :class:`InternetError`
    for one that cannot be built (duplicate names, a host behind an unknown
    router, addresses outside their ranges, too many endpoints)."""
    owner = owner or new_owner()
    base = f"{NS_PREFIX}{owner}-"
    names = [("router", r.name) for r in topology.routers] + [("host", h.name) for h in topology.hosts]
    seen: set[str] = set()
    for kind, name in names:
        _check_name(kind, name)
        if name in seen:
            raise InternetError(f"{kind} name {name!r} is used twice")
        seen.add(name)
    explicit = {_public_address(x.address, x.name) for x in (*topology.routers, *topology.hosts) if x.address}
    if len(explicit) < sum(1 for x in (*topology.routers, *topology.hosts) if x.address):
        raise InternetError("two public endpoints were given the same address")
    auto = (str(PUBLIC_NET.network_address + 256 * k + PUBLIC_HOST_OCTET) for k in range(1, MAX_PUBLIC_ENDPOINTS + 1))
    free = (a for a in auto if a not in explicit)
    endpoints = 0

    def public(given: str | None) -> tuple[str, str]:
        nonlocal endpoints
        endpoints += 1
        try:
            address = given or next(free)
        except StopIteration:
            raise InternetError(f"more than {MAX_PUBLIC_ENDPOINTS} public endpoints") from None
        return address, f"p{endpoints}"

    routers: dict[str, RouterPlan] = {}
    lans: list[ipaddress.IPv4Network] = []
    for j, r in enumerate(topology.routers, start=1):
        text = r.lan or DEFAULT_LAN.format(router=j)
        try:
            lan = ipaddress.IPv4Network(text)
        except ValueError as exc:
            raise InternetError(f"router {r.name}: lan {text!r}: {exc}") from None
        if not any(lan.subnet_of(r) for r in LAN_RANGES) or lan.prefixlen > 29:
            ranges = ", ".join(map(str, LAN_RANGES))
            raise InternetError(f"router {r.name}: lan {lan} must be a /29 or larger inside {ranges}")
        lans.append(lan)
        address, port = public(r.address)
        routers[r.name] = RouterPlan(r.name, f"{base}r-{r.name}", NatKind(r.nat), address, lan, port,
                                     Unsolicited(r.unsolicited))
    hosts: dict[str, HostPlan] = {}
    on_lan: dict[str, int] = {}
    for h in topology.hosts:
        if h.router is None:
            address, port = public(h.address)
            hosts[h.name] = HostPlan(h.name, f"{base}h-{h.name}", address, PUBLIC_NET.prefixlen, None, None,
                                     h.rate, f"{base}inet", port, wire_for(port) if h.delay_line else None)
            continue
        router = routers.get(h.router)
        if router is None:
            raise InternetError(f"host {h.name}: no router named {h.router!r}")
        if h.address is not None:
            raise InternetError(f"host {h.name}: only public hosts take an address (it is behind {h.router})")
        i = on_lan[h.router] = on_lan.get(h.router, 0) + 1
        if i + 1 >= router.lan.num_addresses - 1:
            raise InternetError(f"router {h.router}: lan {router.lan} has no room for host {h.name}")
        hosts[h.name] = HostPlan(h.name, f"{base}h-{h.name}", str(router.lan.network_address + 1 + i),
                                 router.lan.prefixlen, str(router.lan.network_address + 1), h.router, h.rate,
                                 router.ns, f"p{i}", wire_for(f"p{i}") if h.delay_line else None)
    return Plan(owner, f"{base}inet", hosts, routers)


# ------------------------------------------------------------------ builders


def _in(ns: str, *argv: str) -> Command:
    """Run a command that has no ``-n`` option inside ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def _namespace(ns: str) -> list[Command]:
    """A namespace with loopback up and IPv6 off: no link-local chatter, and
    IPv4 only, so nothing travels that the plan did not address."""
    return [
        ["ip", "netns", "add", ns],
        _in(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"),
        _in(ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"),
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]


def _cable(ns: str, iface: str, far_ns: str, far_iface: str, bridge: str) -> list[Command]:
    """A veth pair from ``ns`` to a port of ``bridge`` in ``far_ns``: created
    inside the namespaces, never in the machine's own."""
    return [
        ["ip", "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", far_iface, "netns", far_ns],
        ["ip", "-n", far_ns, "link", "set", far_iface, "master", bridge],
        ["ip", "-n", far_ns, "link", "set", far_iface, "up"],
        ["ip", "-n", ns, "link", "set", iface, "up"],
    ]


def _wired_cable(host: HostPlan, bridge: str) -> list[Command]:
    """A host's cable with a delay line spliced in: ``eth0`` to the wire's
    host side, and a second pair from its bridge side to the bridge port
    ``far_iface`` (so rate and loss act where they do on a plain cable).
    Neither wire end has an address, and nftables drops whatever enters
    them before the far namespace's stack sees it (the delay line's packet
    sockets got it already): a router must not answer ARP on them."""
    assert host.wire is not None
    far, w = host.far_ns, host.wire
    nft = ["ip", "netns", "exec", far, "nft"]
    table = f"{WIRE_TABLE}_{host.far_iface}"
    cmds = [
        ["ip", "-n", host.ns, "link", "add", HOST_IFACE, "type", "veth", "peer", "name", w.host_side, "netns", far],
        ["ip", "-n", far, "link", "add", w.bridge_side, "type", "veth", "peer", "name", host.far_iface],
        [*nft, "add", "table", "netdev", table],
    ]
    for iface in (w.host_side, w.bridge_side):  # a chain per device, named after it
        cmds.append([*nft, "add", "chain", "netdev", table, iface,
                     f"{{ type filter hook ingress device {iface} priority filter ; policy drop ; }}"])
    return cmds + [
        ["ip", "-n", far, "link", "set", host.far_iface, "master", bridge],
        *(["ip", "-n", far, "link", "set", iface, "up"] for iface in (host.far_iface, w.bridge_side, w.host_side)),
        ["ip", "-n", host.ns, "link", "set", HOST_IFACE, "up"],
    ]


def nat_commands(router: RouterPlan) -> list[Command]:
    """The router's nftables: masquerade (``random`` for symmetric) out of
    the WAN side; nothing unsolicited in from it (dropped without an answer,
    or rejected: a TCP reset, ICMP for other protocols)."""
    nft = ["ip", "netns", "exec", router.ns, "nft"]
    masquerade = ["masquerade", "random"] if router.nat is NatKind.SYMMETRIC else ["masquerade"]
    refuse = [["drop"]] if router.unsolicited is Unsolicited.DROP else [
        ["meta", "l4proto", "tcp", "reject", "with", "tcp", "reset"], ["reject"]]
    cmds = [
        [*nft, "add", "table", "ip", NFT_TABLE],
        [*nft, "add", "chain", "ip", NFT_TABLE, "postrouting",
         "{ type nat hook postrouting priority srcnat ; policy accept ; }"],
        [*nft, "add", "rule", "ip", NFT_TABLE, "postrouting", "oifname", WAN_IFACE, *masquerade],
    ]
    for chain in ("forward", "input"):
        cmds += [
            [*nft, "add", "chain", "ip", NFT_TABLE, chain,
             f"{{ type filter hook {chain} priority filter ; policy accept ; }}"],
            [*nft, "add", "rule", "ip", NFT_TABLE, chain, "iifname", WAN_IFACE, "ct", "state",
             "established,related", "accept"],
        ] + [[*nft, "add", "rule", "ip", NFT_TABLE, chain, "iifname", WAN_IFACE, *verdict] for verdict in refuse]
    return cmds


def tbf_burst_bytes(mbit: float) -> int:
    return max(TBF_MIN_BURST_BYTES, int(mbit * 1e6 / 8 * TBF_BURST_S))


def _rate(ns: str, iface: str, mbit: float | None) -> list[Command]:
    if mbit is None:
        return []
    return [["tc", "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", f"{round(mbit * 1000)}kbit",
             "burst", str(tbf_burst_bytes(mbit)), "latency", f"{TBF_LATENCY_MS}ms"]]


def rate_commands(host: HostPlan, rate: LinkRate) -> list[Command]:
    """Set ``host``'s link rate: upload on its interface, download on the
    far end of its cable. An unlimited direction drops its qdisc (the ``-``
    prefix lets that fail when there was none)."""
    cmds = []
    for ns, iface, mbit in ((host.ns, HOST_IFACE, rate.up_mbit), (host.far_ns, host.far_iface, rate.down_mbit)):
        cmds += _rate(ns, iface, mbit) if mbit is not None else [
            ["-", "tc", "-n", ns, "qdisc", "del", "dev", iface, "root"]]
    return cmds


def loss_commands(host: HostPlan, percent: float) -> list[Command]:
    """Drop ``percent`` % of ``host``'s packets, each way, independently per
    packet (0: none again), as a lossy cable would: what it sends is dropped
    where it enters the far end of its cable, what it receives where it
    enters its own interface (nftables ``netdev`` ingress, so neither sender
    is told: a drop on a host's own output would fail its ``send`` instead).
    Its loopback (the node's API) is never touched."""
    if not 0.0 <= percent <= 100.0:
        raise InternetError(f"host {host.name}: loss must be 0-100 %, got {percent}")
    drawn = round(percent / 100.0 * LOSS_SCALE)
    return _loss_at(host.far_ns, host.far_iface, drawn) + _loss_at(host.ns, HOST_IFACE, drawn)


def _loss_at(ns: str, iface: str, drawn: int) -> list[Command]:
    """Drop ``drawn`` in LOSS_SCALE of the packets entering ``iface`` in
    ``ns``; the table of the previous setting goes first (the ``-``: there
    may be none), and 0 leaves none."""
    nft = ["ip", "netns", "exec", ns, "nft"]
    table = f"{LOSS_TABLE}_{iface}"  # several hosts' cables end in one namespace
    cmds = [["-", *nft, "delete", "table", "netdev", table]]
    if drawn:
        cmds += [
            [*nft, "add", "table", "netdev", table],
            [*nft, "add", "chain", "netdev", table, "ingress",
             f"{{ type filter hook ingress device {iface} priority filter ; policy accept ; }}"],
            [*nft, "add", "rule", "netdev", table, "ingress",
             "numgen", "random", "mod", str(LOSS_SCALE), "<", str(drawn), "drop"],
        ]
    return cmds


def setup_commands(p: Plan) -> list[Command]:
    """Everything :class:`Internet` runs to build ``p``, in order."""
    inet = p.inet_ns
    cmds = _namespace(inet) + [
        ["ip", "-n", inet, "link", "add", PUBLIC_BRIDGE, "type", "bridge"],
        ["ip", "-n", inet, "link", "set", PUBLIC_BRIDGE, "up"],
    ]
    for r in p.routers.values():
        cmds += _namespace(r.ns) + _cable(r.ns, WAN_IFACE, inet, r.far_iface, PUBLIC_BRIDGE) + [
            ["ip", "-n", r.ns, "addr", "add", f"{r.wan_address}/{PUBLIC_NET.prefixlen}", "dev", WAN_IFACE],
            ["ip", "-n", r.ns, "link", "add", LAN_BRIDGE, "type", "bridge"],
            ["ip", "-n", r.ns, "addr", "add", f"{r.lan.network_address + 1}/{r.lan.prefixlen}", "dev", LAN_BRIDGE],
            ["ip", "-n", r.ns, "link", "set", LAN_BRIDGE, "up"],
            _in(r.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
        ] + nat_commands(r)
    for h in p.hosts.values():
        bridge = PUBLIC_BRIDGE if h.router is None else LAN_BRIDGE
        cable = _cable(h.ns, HOST_IFACE, h.far_ns, h.far_iface, bridge) if h.wire is None else _wired_cable(h, bridge)
        cmds += _namespace(h.ns) + cable + [
            ["ip", "-n", h.ns, "addr", "add", f"{h.address}/{h.prefix_len}", "dev", HOST_IFACE],
        ]
        if h.gateway is not None:
            cmds.append(["ip", "-n", h.ns, "route", "add", "default", "via", h.gateway])
        cmds += [c for c in rate_commands(h, h.rate) if c[0] != "-"]
    return cmds


def exec_prefix(ns: str) -> Command:
    """Prepend to an argv so that it runs inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def delay_line_commands(p: Plan, python: str = sys.executable) -> dict[str, Command]:
    """Far namespace -> the delay line process to start there, one for all
    the wired hosts whose cables end in it (so at most one per router, and
    one on the public segment)."""
    links: dict[str, list[str]] = {}
    for h in p.hosts.values():
        if h.wire is not None:
            links.setdefault(h.far_ns, []).append(LinkSpec(h.name, h.wire.host_side, h.wire.bridge_side).arg())
    return {ns: [*exec_prefix(ns), python, "-m", DELAY_LINE_MODULE, *(a for arg in args for a in ("--link", arg))]
            for ns, args in links.items()}


def latency_command(host: HostPlan, ms: float) -> SetDelay:
    """``ms`` of one-way delay each way on ``host``'s link: what it sends
    and what it receives (its round trip to anyone grows by 2 ``ms``)."""
    if host.wire is None:
        raise InternetError(f"host {host.name} has no delay line (plan it with Host(..., delay_line=True))")
    try:
        return SetDelay(host.name, ms, ms)
    except ValueError as exc:
        raise InternetError(f"host {host.name}: {exc}") from None


# ------------------------------------------------------------------- running

Runner = Callable[[Command], subprocess.CompletedProcess[str]]


def _default_runner(cmd: Command) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def run(cmds: Sequence[Command], runner: Runner = _default_runner) -> None:
    """Run commands in order; the first failure raises :class:`InternetError`.
    A command starting with ``"-"`` may fail (``make``'s convention)."""
    for cmd in cmds:
        optional = cmd[0] == "-"
        argv = cmd[1:] if optional else cmd
        result = runner(argv)
        if result.returncode != 0 and not optional:
            raise InternetError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


def _pids_in(ns: str) -> list[int]:
    result = _default_runner(["ip", "netns", "pids", ns])
    return [int(p) for p in result.stdout.split() if p.isdigit()] if result.returncode == 0 else []


def remove_namespaces(names: Iterable[str], runner: Runner = _default_runner) -> list[str]:
    """SIGKILL whatever still runs in each namespace (only processes started
    into it are there), then delete it. Returns the problems, never raises:
    teardown must go on to the next one."""
    names = list(names)
    problems = []
    for ns in names:
        for pid in _pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for ns in names:
        if not (NETNS_DIR / ns).exists():
            continue
        result = runner(["ip", "netns", "del", ns])
        if result.returncode != 0:
            problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
    return problems


def owned_namespaces() -> list[str]:
    """Namespaces some :class:`Internet` created (alive or not)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if _OWNED.match(p.name))
    except OSError:
        return []


def stale_namespaces() -> list[str]:
    """Namespaces whose owning process is gone (a crashed earlier run's)."""
    stale = []
    for name in owned_namespaces():
        m = _OWNED.match(name)
        assert m is not None
        pid, ticks = int(m.group(1)), int(m.group(2))
        if _process_start_ticks(pid) != ticks:
            stale.append(name)
    return stale


def cleanup_stale() -> list[str]:
    """Remove what crashed earlier runs left behind; returns the names removed.
    Never touches a namespace whose owner still runs (a concurrent run)."""
    stale = stale_namespaces()
    problems = remove_namespaces(stale)
    for problem in problems:
        log.warning("could not remove a stale namespace", extra={"error": problem})
    if stale:
        log.info("removed stale namespaces", extra={"namespaces": stale})
    return stale


class Internet:
    """``with Internet(topology) as net:`` builds it; leaving the block tears
    it down (processes still inside are killed), whatever ends the block.

    ``net.plan`` has every name and address; ``net.ns(host)`` the namespace
    to run a host's processes in. The delay lines (one per far namespace
    with wired hosts) log to ``log_dir/delayline-<far>.log`` when given,
    else to this process's stderr."""

    def __init__(self, topology: Topology | Plan, runner: Runner = _default_runner, *,
                 log_dir: Path | None = None) -> None:
        self.plan = topology if isinstance(topology, Plan) else plan(topology)
        self._runner = runner
        self._log_dir = log_dir
        self._up = False
        self._lines: dict[str, DelayLine] = {}  # far namespace -> its delay line

    def ns(self, host: str) -> str:
        return self.plan.hosts[host].ns

    def address(self, host: str) -> str:
        return self.plan.hosts[host].address

    def exec_prefix(self, host: str) -> Command:
        return exec_prefix(self.ns(host))

    def set_rate(self, host: str, rate: LinkRate) -> None:
        run(rate_commands(self.plan.hosts[host], rate), self._runner)

    def set_loss(self, host: str, percent: float) -> None:
        """Drop ``percent`` % of ``host``'s packets each way (0: none)."""
        run(loss_commands(self.plan.hosts[host], percent), self._runner)

    def set_latency(self, host: str, ms: float) -> None:
        """Delay ``host``'s packets by ``ms`` each way (0: none); returns once
        its delay line took it. Only a host planned with ``delay_line``."""
        h = self.plan.hosts[host]
        cmd = latency_command(h, ms)
        line = self._lines.get(h.far_ns)
        if line is None:
            raise InternetError(f"host {host}: its delay line is not running")
        try:
            line.set(cmd)
        except DelayLineError as exc:
            raise InternetError(str(exc)) from None

    @property
    def delay_line_pids(self) -> list[int]:
        return [line.pid for line in self._lines.values()]

    def start(self) -> None:
        cleanup_stale()
        self._up = True  # from the first command on, close() has something to remove
        try:
            run(setup_commands(self.plan), self._runner)
            self._start_delay_lines()
        except BaseException:
            self.close(quiet=True)
            raise
        log.info("emulated internet up", extra={"hosts": len(self.plan.hosts), "routers": len(self.plan.routers),
                                                "owner": self.plan.owner})

    def _start_delay_lines(self) -> None:
        base = f"{NS_PREFIX}{self.plan.owner}-"
        for ns, argv in delay_line_commands(self.plan).items():
            log_path = None if self._log_dir is None else self._log_dir / f"delayline-{ns.removeprefix(base)}.log"
            try:
                self._lines[ns] = DelayLine.start(argv, log_path=log_path, timeout_s=COMMAND_TIMEOUT_S)
            except DelayLineError as exc:
                raise InternetError(str(exc)) from None
            log.info("delay line up", extra={"ns": ns, "pid": self._lines[ns].pid, "argv": argv})

    def _stop_delay_lines(self) -> list[str]:
        problems = []
        lines, self._lines = self._lines, {}
        for ns, line in lines.items():
            code = line.close()
            if code != 0:
                problems.append(f"delay line {line.pid} in {ns}: exit {code}")
        return problems

    def close(self, *, quiet: bool = False) -> None:
        """Remove everything; a namespace that would not go raises
        :class:`InternetError` after the others went (``quiet``: logged).
        The delay lines go first (reaped here, whatever
        :func:`remove_namespaces` would kill), and one that did not exit
        cleanly is reported too."""
        if not self._up:
            return
        self._up = False
        problems = self._stop_delay_lines()
        problems += remove_namespaces(self.plan.namespaces, self._runner)
        if problems and quiet:
            log.error("emulated internet not fully removed", extra={"problems": problems})
        elif problems:
            raise InternetError("; ".join(problems))

    def __enter__(self) -> Internet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(quiet=exc is not None)  # never hide what ended the block


# ------------------------------------------------------------ namespace entry


def _setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.setns  # type: ignore[no-any-return]


def _enter(ns: str) -> None:
    """Move the calling thread into network namespace ``ns``."""
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _setns()(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter_namespace(ns: str) -> None:
    """Move this process into ``ns`` (``ip netns exec`` for a process that is
    already running, e.g. one forked from the testnet's fork server). Only
    while it has one thread: setns moves the calling thread alone, and
    threads started later inherit its namespace."""
    if threading.active_count() != 1:
        raise InternetError(f"cannot enter {ns}: the process already runs {threading.active_count()} threads")
    try:
        _enter(ns)
    except OSError as exc:
        raise InternetError(f"cannot enter network namespace {ns}: {exc}") from None


def socket_in(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace ``ns``, made by a short-lived thread
    that enters it (a socket keeps the namespace it was made in): the way a
    process outside reaches a host's loopback."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            _enter(ns)
            out.append(socket.socket(family, type, proto))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.append(exc)

    thread = threading.Thread(target=make, name=f"socket-in-{ns}", daemon=True)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def socket_factory(ns: str) -> Callable[[tuple[int, int, int, str, tuple[str, int]]], socket.socket]:
    """For ``aiohttp.TCPConnector(socket_factory=...)``: an HTTP client whose
    connections start inside ``ns``."""
    def make(addr_info: tuple[int, int, int, str, tuple[str, int]]) -> socket.socket:
        family, kind, proto = addr_info[:3]
        return socket_in(ns, family, kind, proto)

    return make


# -------------------------------------------------------------------- probe


@dataclass(frozen=True)
class Capabilities:
    """For each feature, None when this machine has it, else why not."""

    netns: str | None  # namespaces, veth, bridges (iproute2)
    nat: str | None  # nftables masquerade
    rate: str | None  # tc tbf
    delay: str | None  # the delay line: packet sockets with virtio_net_hdr, nftables netdev ingress

    @property
    def internet(self) -> str | None:
        """Why :class:`Internet` cannot run here (None: it can)."""
        return self.netns or self.nat or self.rate


def probe(runner: Runner = _default_runner) -> Capabilities:
    """Find out, by trying in a throw-away namespace, what this machine allows."""
    if os.geteuid() != 0:
        why = "needs root (network namespaces, nftables, tc); not running as root"
        return Capabilities(why, why, why, why)
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (iproute2)"
        return Capabilities(why, why, why, why)
    ns = f"{NS_PREFIX}{new_owner()}-probe"
    try:
        run([["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"]], runner)
    except InternetError as exc:
        why = f"cannot create network namespaces: {exc}"
        return Capabilities(why, why, why, why)
    try:
        def attempt(cmds: list[Command], why: str) -> str | None:
            try:
                run(cmds, runner)
            except InternetError as exc:
                return f"{why}: {exc}"
            return None

        nat = ("nft not installed (apt-get install nftables)" if shutil.which("nft") is None else
               attempt([_in(ns, "nft", "add", "table", "ip", NFT_TABLE)], "nftables unavailable"))
        rate = attempt(_rate(ns, "lo", 10.0), "tc tbf unavailable")
        delay = nat or attempt([_in(ns, "nft", "add", "table", "netdev", WIRE_TABLE),
                                _in(ns, "nft", "add", "chain", "netdev", WIRE_TABLE, "probe",
                                    "{ type filter hook ingress device lo priority filter ; policy accept ; }")],
                               "nftables netdev ingress unavailable") or _probe_packet_socket(ns)
    finally:
        remove_namespaces([ns], runner)
    return Capabilities(None, nat, rate, delay)


def _probe_packet_socket(ns: str) -> str | None:
    """Why the delay line's packet socket cannot be made in ``ns`` (None: it can)."""
    try:
        sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(delayline.ETH_P_ALL))
    except OSError as exc:
        return f"packet sockets unavailable: {exc}"
    with sock:
        try:
            sock.setsockopt(delayline.SOL_PACKET, delayline.PACKET_VNET_HDR, 1)
            sock.setsockopt(delayline.SOL_PACKET, delayline.PACKET_IGNORE_OUTGOING, 1)
        except OSError as exc:
            return f"packet sockets without virtio_net_hdr or ignore-outgoing (Linux 4.20+): {exc}"
    return None


def skipped(what: str, reason: str) -> None:
    """The one way an impairment that cannot run is reported."""
    log.warning("skipped: %s: %s", what, reason)
