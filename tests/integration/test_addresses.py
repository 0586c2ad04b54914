"""What a node advertises and how reachable it says it is, on this machine's
real interfaces (the emulated internet's public and NATed nodes:
test_internet_nodes.py)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from murmur.node.daemon import Node
from murmur.protocol.addresses import REACHABLE_FROM_ELSEWHERE, Scope, interface_hosts, scope
from tests.integration.cluster import node_config


async def _metrics(node: Node) -> str:
    url = node.state.read_api_info().url
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        return await resp.text()


async def test_a_wildcard_listener_advertises_the_interfaces_never_loopback(tmp_path: Path) -> None:
    dialable = {h for h in interface_hosts(4) if scope(h) in REACHABLE_FROM_ELSEWHERE}
    node = Node(node_config(tmp_path / "wild", overrides={"node.listen": ["/ip4/0.0.0.0/tcp/0"]}))
    async with node:
        hosts = {a.host for a in node.addrs}
        port = node.addrs[0].port
        assert all(a.port == port and a.peer_id == node.peer_id for a in node.addrs)
        if dialable:  # any machine on a network: its addresses, and loopback is nobody else's
            assert hosts == dialable and "127.0.0.1" not in hosts
        else:  # a machine with loopback alone: only its own peers exist to reach it
            assert hosts == {"127.0.0.1"}
        status = node.status()
        assert status["addrs"] == [str(a) for a in node.addrs]
        expected = "public" if any(scope(h) is Scope.PUBLIC for h in hosts) else "private"
        assert status["reachability"] == {"state": expected, "basis": "interfaces", "observed": [], "observers": 0}
        # every advertised address is one a peer really reaches the node at
        for addr in node.addrs:
            other = Node(node_config(tmp_path / f"dialer-{addr.host}"))
            async with other:
                session = await other.connect([addr], node.peer_id)
                assert session.peer == node.peer_id
        text = await _metrics(node)
        assert f'murmur_reachability{{state="{expected}"}} 1.0' in text
        others = {"public", "private", "unknown"} - {expected}
        assert all(f'murmur_reachability{{state="{s}"}} 0.0' in text for s in others)


async def test_a_loopback_node_says_it_is_private(tmp_path: Path) -> None:
    node = Node(node_config(tmp_path / "lo"))
    async with node:
        assert node.status()["reachability"]["state"] == "private"
        assert 'murmur_reachability{state="private"} 1.0' in await _metrics(node)
