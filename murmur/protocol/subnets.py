"""The subnet a host counts against for Sybil limits (inbound caps, view buckets).

One host can mint any number of identities but rarely many addresses across
subnets, so limits are per /24 (IPv4) or /48 (IPv6). An IPv4-mapped IPv6
address counts as the IPv4 address it maps, so nobody dodges a /24 cap by
connecting over a dual-stack socket.
"""

from __future__ import annotations

import ipaddress

IPV4_SUBNET_PREFIX = 24
IPV6_SUBNET_PREFIX = 48

SubnetKey = ipaddress.IPv4Network | ipaddress.IPv6Network


def subnet_of(host: str) -> SubnetKey:
    ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_SUBNET_PREFIX if ip.version == 4 else IPV6_SUBNET_PREFIX
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, or mapped)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
