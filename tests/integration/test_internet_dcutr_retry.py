"""A failed hole punch is tried again later while the relayed connection
lives (DCUtR retry, ``DcutrConfig.retry_delays_s``), not only when a new
relayed connection arrives.

Two hosts behind endpoint-independent NATs meet through a public relay;
nftables rules on both routers drop what each sends to the other router,
so every punch of the first upgrade fails. Once that upgrade
has failed the rule goes; the retry, on the same relayed connection, punches
through. Retry delays are seconds here (30 s and up in a node). Root only
(skipped otherwise, with the reason); the emulation is removed whatever
happens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from murmur.protocol.libp2p.dcutr import DcutrConfig, HolePuncher
from murmur.protocol.libp2p.relay import RelayClient, RelayService
from murmur.protocol.multiaddr import DialAddr
from murmur.testnet.internet import Host, Internet, Router, Topology
from tests.integration.cluster import wait_until
from tests.integration.emulation import ns_host, require_internet

RELAY_PORT = 4001
X_PORT, Y_PORT = 4101, 4102
CONNECT_TIMEOUT_S = 1.0  # a dropped SYN: that punch round failed
RETRY_DELAYS_S = (2.0, 2.0)  # the second catches the punch should the rule outlive the first
BLOCK_TABLE = "murmur_test_block"


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    topology = Topology(hosts=(Host("relay"), Host("x", router="rx"), Host("y", router="ry")),
                        routers=(Router("rx"), Router("ry")))
    with Internet(topology) as emulated:
        yield emulated


def _nft(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True, timeout=10)


def _block(net: Internet) -> None:
    """Each router drops what its LAN sends to the other's public address, in
    its forward chain: before its NAT maps anything, so no half-open
    conntrack entry outlives the block (one would let a late SYN through and
    spoil the next punch's 4-tuple)."""
    for router, other in (("rx", "y"), ("ry", "x")):
        ns = net.plan.routers[router].ns
        for args in (("add", "table", "ip", BLOCK_TABLE),
                     ("add", "chain", "ip", BLOCK_TABLE, "forward",
                      "{ type filter hook forward priority -10 ; policy accept ; }"),
                     ("add", "rule", "ip", BLOCK_TABLE, "forward", "ip", "daddr", net.plan.public_address(other),
                      "drop")):
            done = _nft(ns, *args)
            assert done.returncode == 0, done.stderr


def _unblock(net: Internet) -> None:
    for router in ("rx", "ry"):
        _nft(net.plan.routers[router].ns, "delete", "table", "ip", BLOCK_TABLE)  # absent: nothing to do


async def test_a_failed_punch_is_retried_on_the_same_relayed_connection(net: Internet) -> None:
    relay = ns_host(net, "relay")
    RelayService(relay)
    x, y = ns_host(net, "x", CONNECT_TIMEOUT_S), ns_host(net, "y", CONNECT_TIMEOUT_S)
    x_punch = HolePuncher(x)
    y_punch = HolePuncher(y, DcutrConfig(retry_delays_s=RETRY_DELAYS_S))
    blocked = False
    try:
        (relay_addr,) = await relay.listen(net.address("relay"), RELAY_PORT)
        await x.listen(net.address("x"), X_PORT)
        await y.listen(net.address("y"), Y_PORT)
        await x.dial(relay_addr)  # from the listen ports: the relay observes both NATs' mappings
        to_relay = await y.dial(relay_addr)
        await RelayClient(y).reserve(to_relay)
        await wait_until(lambda: x.observed_addrs and y.observed_addrs, 5, "both identified by the relay")

        blocked = True
        _block(net)

        circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{y.peer_id}")
        x_conn = await RelayClient(x).dial_addr(circuit)
        await wait_until(lambda: any(c.relay is not None for c in y.connections), 5, "y has the circuit")
        y_conn = next(c for c in y.connections if c.relay is not None)
        y_punch.on_relayed(y_conn)  # as the node does for an inbound relayed connection

        # both ends done with the first upgrade: a SYN of its last round
        # retransmitted once the rule is gone would leave a half-made
        # connection, and its TIME_WAIT would keep the next punch's 4-tuple busy
        await wait_until(lambda: y_punch.stats["failures"] == 1 and x_punch.stats["failures"] == 1, 30,
                         "the first upgrade failed on both ends")
        assert y_punch.stats["attempts"] == DcutrConfig().attempts and y_punch.stats["retries"] == 0
        assert not any(c.relay is None and c.peer_id == x.peer_id for c in y.connections)
        _unblock(net)
        blocked = False

        await wait_until(lambda: y_punch.stats["successes"] == 1, 30, "a retry punched through")
        direct = next(c for c in y.connections if c.relay is None and c.peer_id == x.peer_id)
        assert direct.punched and direct.remote[0] == net.plan.public_address("x")
        assert 1 <= y_punch.stats["retries"] <= len(RETRY_DELAYS_S)
        # bounded: three punch rounds per upgrade at most, whatever happened in between
        assert y_punch.stats["attempts"] <= DcutrConfig().attempts * (1 + y_punch.stats["retries"])
        assert not x_conn.closed and not y_conn.closed  # the retry ran on the relayed connection it had
        (rtt,) = await y.ping(direct)
        assert rtt < 5.0
    finally:
        if blocked:
            _unblock(net)
        for punch in (x_punch, y_punch):
            await punch.close()
        for host in (x, y, relay):
            await host.close()


async def test_retries_stop_when_the_relayed_connection_closes(net: Internet) -> None:
    """No punch retry outlives its relayed connection: with the rule up for
    good, closing the circuit after the first failed upgrade leaves nothing
    to retry."""
    relay = ns_host(net, "relay")
    RelayService(relay)
    x, y = ns_host(net, "x", CONNECT_TIMEOUT_S), ns_host(net, "y", CONNECT_TIMEOUT_S)
    x_punch, y_punch = HolePuncher(x), HolePuncher(y, DcutrConfig(retry_delays_s=(0.5, 0.5, 0.5)))
    try:
        (relay_addr,) = await relay.listen(net.address("relay"), RELAY_PORT + 1)
        await x.listen(net.address("x"), X_PORT + 10)
        await y.listen(net.address("y"), Y_PORT + 10)
        await x.dial(relay_addr)
        to_relay = await y.dial(relay_addr)
        await RelayClient(y).reserve(to_relay)
        await wait_until(lambda: x.observed_addrs and y.observed_addrs, 5, "both identified by the relay")
        _block(net)
        x_conn = await RelayClient(x).dial_addr(DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{y.peer_id}"))
        await wait_until(lambda: any(c.relay is not None for c in y.connections), 5, "y has the circuit")
        y_conn = next(c for c in y.connections if c.relay is not None)
        y_punch.on_relayed(y_conn)
        await wait_until(lambda: y_punch.stats["failures"] == 1, 30, "the first upgrade failed")
        await x_conn.close()
        await wait_until(lambda: y_conn.closed, 10, "y saw the circuit close")
        failures = y_punch.stats["failures"]
        await wait_until(lambda: f"upgrade-{y_conn.name}" not in y_punch._tasks, 5, "the retry task ended")
        assert y_punch.stats["failures"] <= failures + 1  # at most the upgrade that was running
        assert y_punch.stats["retries"] <= 1
    finally:
        _unblock(net)
        for punch in (x_punch, y_punch):
            await punch.close()
        for host in (x, y, relay):
            await host.close()
