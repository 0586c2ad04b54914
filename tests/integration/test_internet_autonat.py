"""AutoNAT v2 on the emulated internet: three public servers in distinct
subnets dial a public node back and reach it, and cannot reach a node behind
a NAT at its router's address, so the reachability tracker's state rests on
dial-backs (public, private); a NATed client naming another machine's
address pays the amplification price before any server dials it, and
gets no verdict: that machine never sent its nonce. Root only
(skipped otherwise, with the reason)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from murmur.protocol.libp2p import Libp2pHost
from murmur.protocol.libp2p.autonat import AutoNATClient, AutoNATConfig, AutoNATServer
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.reachability import Basis, Reachability, ReachabilityTracker
from murmur.testnet.internet import Host, Internet, NatKind, Router, Topology
from tests.integration.emulation import ns_host, require_internet

PORT = 4001
SERVERS = ("s1", "s2", "s3")
CONFIG = AutoNATConfig(dial_timeout_s=2.0, request_timeout_s=10.0)


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


@pytest.fixture
def net() -> Iterator[Internet]:
    topology = Topology(hosts=(*(Host(s) for s in SERVERS), Host("pub"), Host("home", router="router")),
                        routers=(Router("router", nat=NatKind.EIM),))
    with Internet(topology) as emulated:
        yield emulated


def _host(net: Internet, name: str) -> Libp2pHost:
    return ns_host(net, name)


async def test_dial_backs_decide_public_and_private_and_other_ips_pay_first(net: Internet) -> None:
    hosts: list[Libp2pHost] = []
    servers: list[AutoNATServer] = []
    try:
        server_addrs = []
        for name in SERVERS:
            host = _host(net, name)
            hosts.append(host)
            servers.append(AutoNATServer(host, CONFIG))
            (addr,) = await host.listen(net.address(name), PORT)
            server_addrs.append(addr)
        verdicts: dict[str, ReachabilityTracker] = {}
        for name in ("pub", "home"):
            host = _host(net, name)
            hosts.append(host)
            await host.listen(net.address(name), PORT)
            client = AutoNATClient(host, CONFIG)
            # the address others would dial: its own for the public node, its router's for the NATed one
            candidate = Multiaddr(net.plan.public_address(name), PORT)
            tracker = verdicts[name] = ReachabilityTracker()
            for addr in server_addrs:
                conn = await host.dial(addr)
                result = await client.check(conn, [candidate])
                assert result.addr == candidate and result.reachable is (name == "pub"), (name, result)
                tracker.record_dial_back(candidate, bool(result.reachable), result.server, conn.remote[0],
                                         time.monotonic())
        assert verdicts["pub"].state(time.monotonic()) == (Reachability.PUBLIC, Basis.AUTONAT)
        assert verdicts["home"].state(time.monotonic()) == (Reachability.PRIVATE, Basis.AUTONAT)
        dialled = sum(s.stats["dialed_ok"] + s.stats["dial_error"] for s in servers)
        assert dialled == 6 and sum(s.stats["paid_for"] for s in servers) == 0  # each its own IP: free

        # the NATed node names the public node's address: another IP than its router's, so it pays
        # first; and the dial-back reaches a node that never sent that nonce: no verdict for the asker
        home, home_client = hosts[-1], AutoNATClient(hosts[-1], CONFIG)
        victim = Multiaddr(net.address("pub"), PORT)
        conn = next(c for c in home.connections if c.remote[0] == net.address("s1"))
        servers[0].config = AutoNATConfig(dial_timeout_s=2.0, request_timeout_s=10.0, per_peer_interval_s=0.0)
        paid = await home_client.check(conn, [victim])
        assert paid.reachable is None and paid.addr == victim and servers[0].stats["paid_for"] == 1
        assert servers[0].stats["dial_back_error"] == 1
        stingy = AutoNATClient(home, AutoNATConfig(max_pay_bytes=1000))
        refused = await stingy.check(conn, [victim])
        assert refused.reachable is None and servers[0].stats["paid_for"] == 1
    finally:
        for server in servers:
            await server.close()
        for host in hosts:
            await host.close()
