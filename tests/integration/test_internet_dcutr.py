"""The connectivity matrix on the emulated internet: hosts that are public,
behind endpoint-independent NATs, behind a symmetric NAT, and two behind the
same NAT, with one public relay. Every pair connects; a pair where one side
is public or both NATs are endpoint-independent ends direct (dialled, or
upgraded by DCUtR: a unilateral dial or a hole punch) in >= 95% of its
tries; a pair with the symmetric NAT on one side stays relayed.

Each try is what ``Node.connect`` and the node's DCUtR do, on fresh libp2p
hosts (new identities and ports) in the same network namespaces: both
reserve-or-dial through the relay from their listen port (so the relay
observes their NAT mapping), the dialler tries the target's own address, then
its circuit; the target, inbound on the relayed connection, upgrades it.
Fresh ports per try keep a closed try's TIME_WAIT 4-tuples out of the next
one's way; the hosts behind one NAT listen on distinct ports, since Linux's
masquerade keeps a port only while the public (address, port, destination)
is free. Root only (skipped otherwise, with the reason); the emulation is
removed whatever happens.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from murmur.errors import ConnectionClosed, PeerFault
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost
from murmur.protocol.libp2p.dcutr import HolePuncher
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayService
from murmur.protocol.multiaddr import DialAddr, Multiaddr
from murmur.testnet.internet import Host, Internet, NatKind, Router, Topology
from tests.integration.cluster import wait_until
from tests.integration.emulation import ns_host, require_internet

RELAY_PORT = 4001
BASE_PORT = 20000  # each try's hosts listen on fresh ports from here
TRIES = 20  # the bar: direct in >= 95% of 20 tries
RELAYED_TRIES = 4  # a pair that stays relayed: every try costs three punches' connect timeouts
DIRECT_SHARE = 0.95
PAIRS_AT_ONCE = 4  # pairs tried side by side (their hosts' ports differ: no mapping is shared)
CONNECT_TIMEOUT_S = 1.0  # a dropped SYN: the punch round failed (a crossing SYN needs no retransmit)

KINDS = {"pub": None, "eim1": "r1", "eim2": "r2", "sym": "r3", "same1": "r4", "same2": "r4"}
SYMMETRIC = {"sym"}


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    routers = (Router("r1"), Router("r2"), Router("r3", nat=NatKind.SYMMETRIC), Router("r4"))
    hosts = (Host("relay"), *(Host(name, router=router) for name, router in KINDS.items()))
    with Internet(Topology(hosts=hosts, routers=routers)) as emulated:
        yield emulated


@dataclass
class Side:
    name: str
    host: Libp2pHost
    relay: RelayClient
    punch: HolePuncher


def _side(net: Internet, name: str) -> Side:
    host = ns_host(net, name, CONNECT_TIMEOUT_S)
    return Side(name, host, RelayClient(host), HolePuncher(host))


def _expect_direct(x: str, y: str) -> bool:
    return KINDS[x] is None or KINDS[y] is None or not {x, y} & SYMMETRIC


_ports = itertools.count(BASE_PORT, 2)  # fresh for every try, whichever pair


async def _try(net: Internet, relay_addr: Multiaddr, x_name: str, y_name: str) -> str:
    """x connects to y as a node would; returns how they ended up connected:
    dialled, unilateral, punched or relayed (the connection carries a ping)."""
    x, y = _side(net, x_name), _side(net, y_name)
    port = next(_ports)
    try:
        for side, p in ((x, port), (y, port + 1)):
            await side.host.listen(net.address(side.name), p)
            await side.host.dial(relay_addr)  # from the listen port: the relay observes the NAT's mapping
        to_relay = next(c for c in y.host.connections if c.peer_id == relay_addr.peer_id)
        await y.relay.reserve(to_relay)
        await wait_until(lambda: x.host.observed_addrs and y.host.observed_addrs, 5, "both identified by the relay")
        try:  # y's own address first (only its LAN's or a public host's answers)
            conn = await x.host.dial(Multiaddr(net.address(y_name), port + 1, y.host.peer_id))
            return await _works(conn, "dialled")
        except (OSError, PeerFault, ConnectionClosed):
            pass
        circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{y.host.peer_id}")
        x_conn = await x.relay.dial_addr(circuit)
        await wait_until(lambda: any(c.relay is not None for c in y.host.connections), 5, "y has the circuit")
        y_conn = next(c for c in y.host.connections if c.relay is not None)
        direct = await y.punch.upgrade(y_conn)
        if direct is None:
            return await _works(x_conn, "relayed")
        if direct.punched:  # across both NATs: each sees the other's router, at the mapping it observed
            assert direct.remote[0] == net.plan.public_address(x_name)
        return await _works(direct, "punched" if direct.punched else "unilateral")
    finally:
        for side in (x, y):
            await side.punch.close()
            await side.relay.close()
            await side.host.close()


async def _works(conn: Libp2pConnection, outcome: str) -> str:
    (rtt,) = await conn.host.ping(conn)
    assert rtt < 5.0
    return outcome


# Slow (45 s on 2 cores): every pair of NAT kinds. The default suite keeps one
# punch behind EIM NATs (test_internet_node_dcutr.py) and the retries (test_internet_dcutr_retry.py).
@pytest.mark.slow
async def test_connectivity_matrix(net: Internet) -> None:
    relay = ns_host(net, "relay")
    RelayService(relay, RelayConfig(max_reservations_per_ip=64))
    pairs = list(itertools.combinations(KINDS, 2))
    lanes = asyncio.Semaphore(PAIRS_AT_ONCE)

    async def tries(x: str, y: str) -> Counter[str]:
        counts: Counter[str] = Counter()
        async with lanes:
            for i in range(TRIES if _expect_direct(x, y) else RELAYED_TRIES):
                # both directions: either side may be the one dialling
                counts[await _try(net, relay_addr, *((x, y) if i % 2 == 0 else (y, x)))] += 1
        return counts

    started = time.monotonic()
    try:
        (relay_addr,) = await relay.listen(net.address("relay"), RELAY_PORT)
        outcomes = dict(zip(pairs, await asyncio.gather(*(tries(x, y) for x, y in pairs)), strict=True))
    finally:
        await relay.close()
    took = time.monotonic() - started
    print(f"\nconnectivity matrix ({took:.0f} s): pair: outcomes of its tries")
    for (x, y), counts in outcomes.items():
        print(f"  {x:>5} - {y:<5} {'direct expected' if _expect_direct(x, y) else 'relayed expected':16} "
              f"{dict(sorted(counts.items()))}")
    for (x, y), counts in outcomes.items():
        tries = sum(counts.values())
        if _expect_direct(x, y):
            assert counts["relayed"] <= tries * (1 - DIRECT_SHARE), (x, y, counts)
        else:
            assert counts == Counter(relayed=tries), (x, y, counts)
    punched = sum(c["punched"] for c in outcomes.values())
    assert punched >= 5 * TRIES * DIRECT_SHARE  # eim1-eim2 and eim1/2-same1/2: nobody to dial but a punch
