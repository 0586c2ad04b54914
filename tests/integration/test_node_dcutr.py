"""DCUtR in the node: a peer reached through a relay is upgraded to a direct
(punched) connection; the learning session moves onto it, the relayed
connection and its circuit close, and status and metrics count it.

Real in-process daemons on loopback, as test_autorelay.py (a relay, a private
node holding a reservation on it, a third node that knows it only by its
circuit). On loopback nothing is in the way of a punch: the NAT traversal
itself is tested on the emulated internet (test_internet_dcutr.py)."""

from __future__ import annotations

from pathlib import Path

from murmur.node.daemon import Node
from tests.integration.cluster import node_config, wait_until
from tests.integration.test_autorelay import learning, learnt_from


def _relayed(node: Node, other: Node) -> list[object]:
    return [c for c in node.host.connections if c.peer_id == other.peer_id and c.relay is not None]


async def test_a_relayed_peer_is_punched_to_a_direct_connection_and_learns_over_it(tmp_path: Path) -> None:
    relay = Node(node_config(tmp_path / "relay", overrides={
        "relay.service": True, "relay.circuit_duration_s": 3600, "relay.circuit_data_bytes": 1 << 40}))
    await relay.start()
    nodes: list[Node] = []
    try:
        punching = {**learning(), "network.hole_punching": True}
        private = Node(node_config(tmp_path / "private", overrides={
            **punching, "relay.use": [str(relay.addrs[0])], "relay.check_interval_s": 0.2}))
        await private.start()
        nodes.append(private)
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a reservation on the relay")
        (circuit,) = private.status()["relay_client"]["circuit_addrs"]
        third = Node(node_config(tmp_path / "third", overrides={
            **punching, "network.bootstrap": [f"{circuit}/p2p/{private.peer_id}"]}))
        await third.start()
        nodes.append(third)

        def punched() -> bool:
            return (private.status()["connection_types"].get(str(third.peer_id)) == "punched"
                    and third.status()["connection_types"].get(str(private.peer_id)) == "punched")

        await wait_until(punched, 15, "both ends on the punched connection")
        # the relayed connection closed at both ends, and its circuit on the relay
        await wait_until(lambda: not _relayed(private, third) and not _relayed(third, private), 5, "relayed closed")
        await wait_until(lambda: relay.status()["relay"]["circuits"] == 0, 5, "the circuit gone")
        relayed_bytes = relay.status()["relay"]["bytes_relayed"]
        # private drove the upgrade (its connection was the inbound relayed one); third answered
        assert private.status()["dcutr"] == {"attempts": 1, "successes": 1, "failures": 0, "unilateral": 0,
                                             "refused": 0, "retries": 0}
        assert third.status()["dcutr"]["successes"] == 1
        for node in (private, third):
            assert node.status()["connection_types"][str(relay.peer_id)] == "direct"
            assert node.metrics.value("murmur_connections", type="punched") == 1
            assert node.metrics.value("murmur_connections", type="relayed") == 0
            assert node.metrics.value("murmur_dcutr_events", event="successes") == 1
        assert b'murmur_dcutr_events{event="attempts"} 1.0' in private.metrics.exposition()
        row = next(p for p in third.peers() if p["peer_id"] == str(private.peer_id))
        assert row["connection"] == "punched"

        # learning goes on over the direct connection: deltas both ways, none through the relay
        session = third.session(private.peer_id)
        assert session is not None and session.conn.relay is None
        start = {id(n): n.learner.round for n in (private, third)}
        await wait_until(lambda: all(n.learner.round >= start[id(n)] + 3 for n in (private, third)), 30,
                         "three more rounds each")
        assert learnt_from(private, third) and learnt_from(third, private)
        assert relay.status()["relay"]["bytes_relayed"] == relayed_bytes
        assert third.session(private.peer_id) is session  # no flapping back to the relay
        assert private.status()["faults"] == {} and third.status()["faults"] == {}
    finally:
        for node in reversed(nodes):
            await node.stop()
        await relay.stop()
