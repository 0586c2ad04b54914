"""A murmur node as a libp2p peer, in process on loopback: what the node's glue adds
on top of the host (tested in test_libp2p_host.py and tests/interop).

* identify on every connection, kept in the peer table and shown by ``/peers``;
* the two paths between murmur nodes: the fast one by default, the standard
  one (``/noise`` + ``/yamux/1.0.0``) when a node turns its fast path off;
* libp2p peers that speak no murmur protocol: kept for identify and ping,
  never a session, never a learning neighbour, out of the sampler's view;
* bootstrap addresses as libp2p writes them (``/dns4``, ``/p2p``, circuits kept);
* the address identify says a peer saw us at is a vote for our reachability.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.node.session import ProtocolNotSupported
from murmur.protocol.addresses import REACHABLE_FROM_ELSEWHERE, interface_hosts, scope
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import FastConnection, Libp2pHost, YamuxConnection
from murmur.protocol.messages import MurmurProtocol
from tests.integration.cluster import node_config, wait_until

TOPIC = "t"


async def _node(tmp_path: Path, name: str, **overrides: object) -> Node:
    node = Node(node_config(tmp_path / name, overrides=overrides))
    await node.start()
    return node


def _peer_entry(node: Node, peer: object) -> dict:
    (entry,) = [p for p in node.peers() if p["peer_id"] == str(peer)]
    return dict(entry)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "standard-path"])
async def test_identify_lands_in_the_peer_table_on_either_path(tmp_path: Path, fast_path: bool) -> None:
    a = await _node(tmp_path, "a")
    b = await _node(tmp_path, "b", **{"transport.fast_path": fast_path})  # b dials: its choice decides
    try:
        got: list[bytes] = []
        a.subscribe(TOPIC, lambda _origin, payload: got.append(payload))
        session = await b.connect(a.addrs, a.peer_id)
        assert type(session.conn) is (FastConnection if fast_path else YamuxConnection)
        assert session.conn.muxer == ("/murmur/mux/2.0.0" if fast_path else "/yamux/1.0.0")
        await wait_until(lambda: a.session(b.peer_id) is not None, 2.0, "a has b's session")
        assert await b.publish(TOPIC, b"over " + session.conn.security.encode()) == 1
        await wait_until(lambda: got == [b"over " + session.conn.security.encode()], 2.0, "gossip over the path")

        def identified() -> bool:
            return bool(_peer_entry(b, a.peer_id)["agent"]) and bool(_peer_entry(a, b.peer_id)["agent"])

        await wait_until(identified, 3.0, "identify both ways in the peer tables")
        seen_by_b = _peer_entry(b, a.peer_id)
        assert seen_by_b["agent"].startswith("murmur/") and seen_by_b["connected"] and seen_by_b["murmur"]
        assert {MurmurProtocol.HELLO, MurmurProtocol.DELTA, "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"} <= set(
            seen_by_b["protocols"])
        assert seen_by_b["listen_addrs"] == [str(a.addrs[0].without_peer())]
        # the address a saw b's connection come from: b's end of it
        local = session.conn.local
        assert seen_by_b["observed"] == f"/ip4/{local[0]}/tcp/{local[1]}"
        assert _peer_entry(a, b.peer_id)["observed"] == f"/ip4/127.0.0.1/tcp/{session.conn.remote[1]}"
        assert a.status()["faults"] == {} and b.status()["faults"] == {}
    finally:
        await b.stop()
        await a.stop()


async def test_a_libp2p_peer_without_murmur_protocols_is_kept_for_identify_and_ping_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both ways round: it dials the node, and the node dials it (as a bootstrap peer)."""
    caplog.set_level(logging.INFO, logger="murmur")
    stranger = Libp2pHost(Identity.generate())  # identify and ping, no /murmur/... handler
    addr = (await stranger.listen("127.0.0.1", 0))[0]
    node = await _node(tmp_path, "node", **{"network.bootstrap": [str(addr)]})
    try:
        # the node dials it (bootstrap): no session, the connection stays
        await wait_until(lambda: stranger.peer_id in node._incompatible, 5.0, "the node sees it speaks no murmur")
        conn = next(c for c in node.host.connections if c.peer_id == stranger.peer_id)
        with pytest.raises(ProtocolNotSupported):
            await node.connect([addr], stranger.peer_id)  # no second dial: the known connection answers
        assert [c for c in node.host.connections if c.peer_id == stranger.peer_id] == [conn]
        assert node.session(stranger.peer_id) is None and stranger.peer_id not in node.sampler
        assert stranger.peer_id not in {s.peer for s in node.membership.learning_neighbours()}
        # identify both ways, ping both ways
        await asyncio.wait_for(conn.identified.wait(), 5)
        theirs = stranger.connections[0]
        await asyncio.wait_for(theirs.identified.wait(), 5)
        assert MurmurProtocol.HELLO in theirs.identify.protocols  # type: ignore[union-attr]
        assert len(await node.host.ping(conn, 2)) == 2 and len(await stranger.ping(theirs, 2)) == 2
        entry = _peer_entry(node, stranger.peer_id)
        assert entry["connected"] and entry["murmur"] is False and entry["agent"].startswith("murmur/")
        # a second one dials the node: the same
        other = Libp2pHost(Identity.generate())
        try:
            inbound = await other.dial(node.addrs[0])
            await wait_until(lambda: other.peer_id in node._incompatible, 5.0, "the inbound stranger refused")
            assert not inbound.closed and node.session(other.peer_id) is None
            assert len(await other.ping(inbound, 1)) == 1
        finally:
            await other.close()
        assert node.status()["faults"] == {}  # not speaking murmur is no fault
        assert [r for r in caplog.records if getattr(r, "event", None) == "foreign_peer"]
    finally:
        await node.stop()
        await stranger.close()


async def test_bootstrap_by_dns_name_and_a_kept_circuit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murmur")
    seed = await _node(tmp_path, "seed")
    relay = Identity.generate().peer_id
    boot = [f"/dns4/localhost/tcp/{seed.addrs[0].port}/p2p/{seed.peer_id}",
            f"/dns4/localhost/tcp/9/p2p/{relay}/p2p-circuit/p2p/{seed.peer_id}"]  # through a named relay: kept
    node = await _node(tmp_path, "node", **{"network.bootstrap": boot})
    try:
        await wait_until(lambda: node.session(seed.peer_id) is not None, 5.0, "bootstrapped through a DNS name")
        assert node.session(seed.peer_id).conn.remote[0] == "127.0.0.1"  # type: ignore[union-attr]
        assert [str(a) for a in node.config.network.bootstrap] == boot  # the circuit is kept as written
        (circuits,) = [r for r in caplog.records if getattr(r, "event", None) == "bootstrap_circuits"]
        assert circuits.addrs == boot[1:]  # type: ignore[attr-defined]
        assert ("127.0.0.1", 9) not in {c.remote for c in node.host.connections}  # not dialled
    finally:
        await node.stop()
        await seed.stop()


def _interface_ipv4() -> str | None:
    """One of this machine's IPv4 addresses another machine could dial, if any."""
    for host in interface_hosts(4):
        try:
            if scope(host) in REACHABLE_FROM_ELSEWHERE:
                return host
        except ValueError:
            continue
    return None


@contextlib.contextmanager
def _some_interface_ipv4() -> Iterator[str]:
    """An interface address: the machine's own, or (as root, on a machine
    with loopback only) one on a veth link made for the test and
    always removed, so CI always runs the test below."""
    host = _interface_ipv4()
    if host is not None:
        yield host
        return
    if os.geteuid() != 0:  # as root (CI) it never skips: a missing `ip` fails below
        pytest.skip("this machine has no IPv4 address but loopback, and making one needs root")
    link = f"mm-v4-{os.getpid() % 100000}"
    # a veth pair (the kernel may lack the dummy link type); deleting one end removes both
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{DUMMY_IPV4}/32", "dev", link], check=True)
        subprocess.run(["ip", "link", "set", f"{link}p", "up"], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        yield DUMMY_IPV4
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)


DUMMY_IPV4 = "192.0.2.201"  # TEST-NET-1, on a veth link only for the test's lifetime


async def test_the_address_identify_saw_us_at_is_a_reachability_vote(tmp_path: Path) -> None:
    with _some_interface_ipv4() as host:
        await _identify_vote(tmp_path, host)


async def _identify_vote(tmp_path: Path, host: str) -> None:
    """On loopback nobody else could dial what a peer observes, so the vote
    needs an interface address: both nodes listen on it, b dials a there, and
    a's identify tells b where b's connection came from."""
    listen = {"node.listen": [f"/ip4/{host}/tcp/0"]}
    a = await _node(tmp_path, "a", **listen)
    b = await _node(tmp_path, "b", **listen)
    try:
        assert b.status()["reachability"]["observers"] == 0
        session = await b.connect(a.addrs, a.peer_id)
        await wait_until(lambda: b.status()["reachability"]["observers"] == 1, 3.0, "a's observation counted by b")
        assert session.conn.local[0] == host  # what a observed: b's end of the connection
        assert _peer_entry(b, a.peer_id)["observed"] == f"/ip4/{host}/tcp/{session.conn.local[1]}"
    finally:
        await b.stop()
        await a.stop()
