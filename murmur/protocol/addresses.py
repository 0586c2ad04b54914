"""A node's own addresses: what a wildcard listener advertises, and the
scope of an address (who can reach it).

Why: a node listening on ``0.0.0.0`` used to advertise ``127.0.0.1``, an
address no other machine can dial. A wildcard listener now advertises the
machine's interface addresses of its family (read with ``ifaddr``), public
ones first, never loopback or link-local unless the machine has nothing
else (then only local peers exist to reach it anyway).

Scopes follow the IANA special-purpose registries, with one deliberate
difference from :mod:`ipaddress`'s ``is_private``: only RFC 1918 (and IPv6
unique-local) space is *private* and RFC 6598's carrier-grade NAT space is
*shared*; the other special ranges (documentation, benchmarking) count as
public, because a node can only have such an address on a network that
routes it (the emulated internet of the tests uses 198.18.0.0/15).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Sequence

from murmur.protocol.multiaddr import Multiaddr


class Scope(enum.IntEnum):
    """Who can reach an address; ordered from the widest."""

    PUBLIC = 0
    SHARED = 1  # 100.64.0.0/10: behind a carrier's NAT
    PRIVATE = 2  # RFC 1918, fc00::/7: behind a NAT or on a LAN
    LINK_LOCAL = 3  # 169.254.0.0/16, fe80::/10: this link only, needs a scope id
    LOOPBACK = 4  # this machine only
    UNSPECIFIED = 5  # 0.0.0.0, ::: a listener's wildcard, never an address to dial


PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
SHARED_NET = ipaddress.ip_network("100.64.0.0/10")
REACHABLE_FROM_ELSEWHERE = frozenset({Scope.PUBLIC, Scope.SHARED, Scope.PRIVATE})
"""Scopes worth telling another machine."""


def scope(host: str) -> Scope:
    """The scope of an IP address (``ValueError`` for anything else)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return Scope.UNSPECIFIED
    if ip.is_loopback:
        return Scope.LOOPBACK
    if ip.is_link_local:
        return Scope.LINK_LOCAL
    if any(ip in net for net in PRIVATE_NETS if net.version == ip.version):
        return Scope.PRIVATE
    if ip in SHARED_NET:
        return Scope.SHARED
    return Scope.PUBLIC


def interface_hosts(version: int) -> list[str]:
    """The IP addresses (4 or 6) on this machine's interfaces, as the OS lists them."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if version == 4 and isinstance(ip.ip, str):
                out.append(ip.ip)
            elif version == 6 and isinstance(ip.ip, tuple):
                out.append(ip.ip[0])
    return out


InterfaceHosts = Callable[[int], Sequence[str]]


def advertised(addr: Multiaddr, interfaces: InterfaceHosts = interface_hosts) -> list[Multiaddr]:
    """What a listener bound to ``addr`` tells other machines: ``addr``
    itself, or for a wildcard every interface address of its family that
    another machine could dial, the widest scope first (in interface order
    within one scope). With none of those: loopback (only this machine's peers
    can reach the node, and they can there)."""
    if scope(addr.host) is not Scope.UNSPECIFIED:
        return [addr]
    version = ipaddress.ip_address(addr.host).version
    hosts: dict[str, Scope] = {}
    for host in interfaces(version):
        try:
            hosts.setdefault(str(ipaddress.ip_address(host)), scope(host))
        except ValueError:
            continue  # an address the OS lists in a form we do not dial (zone ids)
    usable = sorted((h for h, s in hosts.items() if s in REACHABLE_FROM_ELSEWHERE), key=hosts.__getitem__)
    if not usable:
        usable = ["127.0.0.1" if version == 4 else "::1"]
    return [Multiaddr(h, addr.port, addr.peer_id) for h in usable]
