"""AutoRelay in the node: a private node reserves on a murmur relay
(``[relay] use``), advertises its ``/p2p-circuit`` address, and a third node
that knows only that address reaches it through the relay and learns with it.

Real in-process daemons on loopback (Noise, yamux, circuit relay v2, signed
deltas). The third node is given only the circuit address, and over a relayed
connection the private node's direct addresses are not recorded, so the
circuit is its only way in. Shuffles are slowed down so that the relay does not
hand the private node's direct address around during the test.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

from murmur.node.daemon import Node
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr
from tests.integration.cluster import node_config, wait_until

TRAINER = "tests.trainers:VectorTrainer"


def learning() -> dict[str, Any]:
    return {
        "learning.enabled": True,
        "learning.trainer": TRAINER,
        "learning.num_nodes": 2,
        "learning.rounds": 1000,
        "learning.round_deadline_s": 0.5,
        "learning.trainer_options": {"size": 64},
        "network.neighbours": 2,  # the relay (no learner) takes one slot
        "network.shuffle_interval_s": 60.0,
        "network.hole_punching": False,  # on loopback a punch always succeeds: this is the relay's test
    }


def learnt_from(node: Node, other: Node) -> bool:
    learning = node.status()["learning"]
    return learning is not None and str(other.peer_id) in learning["weights"]


async def test_a_private_node_is_reached_only_through_its_relay_and_learns(tmp_path: Path) -> None:
    relay = Node(node_config(tmp_path / "relay", overrides={
        "relay.service": True, "relay.circuit_duration_s": 3600, "relay.circuit_data_bytes": 1 << 40}))
    await relay.start()
    private = third = None
    try:
        relay_addr = relay.addrs[0]
        private = Node(node_config(tmp_path / "private", overrides={
            **learning(), "relay.use": [str(relay_addr)], "relay.check_interval_s": 0.2}))
        await private.start()
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a reservation on the relay")
        (circuit,) = private.status()["relay_client"]["circuit_addrs"]
        assert circuit == f"{relay_addr.without_peer()}/p2p/{relay.peer_id}/p2p-circuit"
        assert [r["relay"] for r in private.status()["relay_client"]["reservations"]] == [str(relay.peer_id)]
        assert relay.status()["relay"]["reservations"] == 1
        assert circuit in [str(a) for a in private.host.identify_for(private.host.connections[0]).listen_addrs]

        # The third node knows the private one only by its circuit (bootstrap).
        target = f"{circuit}/p2p/{private.peer_id}"
        third = Node(node_config(tmp_path / "third", overrides={**learning(), "network.bootstrap": [target]}))
        await third.start()
        await wait_until(lambda: third.session(private.peer_id) is not None, 10, "a session through the circuit")
        # the dialler's end is up first: the private end and the peer table follow
        await wait_until(lambda: private.session(third.peer_id) is not None
                         and any(p["peer_id"] == str(private.peer_id) for p in third.peers()), 5, "both ends")
        assert third.status()["connection_types"][str(private.peer_id)] == "relayed"
        assert private.status()["connection_types"][str(third.peer_id)] == "relayed"
        assert private.metrics.value("murmur_connections", type="relayed") == 1
        assert private.metrics.value("murmur_connections", type="direct") == 1  # the relay
        assert private.metrics.value("murmur_relay_client_reservations") == 1
        assert relay.metrics.value("murmur_relay_client_reservations") == 0
        assert private.status()["connection_types"][str(relay.peer_id)] == "direct"
        peer_row = next(p for p in third.peers() if p["peer_id"] == str(private.peer_id))
        assert peer_row["connection"] == "relayed"
        # Over a relayed connection the private node's direct address is not
        # recorded (its IP would be the relay's): only the circuit is.
        assert peer_row["addrs"] == [circuit]

        start = {id(n): n.learner.round for n in (private, third)}
        await wait_until(lambda: learnt_from(private, third) and learnt_from(third, private), 30,
                         "each merged the other's delta")
        await wait_until(lambda: all(n.learner.round >= start[id(n)] + 2 for n in (private, third)), 30,
                         "two more rounds each")
        assert learnt_from(private, third) and learnt_from(third, private)
        assert third.status()["connection_types"][str(private.peer_id)] == "relayed"  # still no direct path
        assert relay.status()["relay"]["circuits"] >= 1
        assert relay.status()["relay"]["bytes_relayed"] > 0
        assert private.status()["faults"] == {} and third.status()["faults"] == {}
    finally:
        for node in (third, private):
            if node is not None:
                await node.stop()
        await relay.stop()



async def test_a_private_node_picks_a_relay_among_its_peers_and_is_dialled_through_it(tmp_path: Path) -> None:
    """No relay configured: on loopback the node is private (no public
    address), so it reserves on the one connected peer whose identify lists
    the hop protocol, and not on a peer that does not relay. A peer that
    greeted it before the reservation learns the circuit by identify push.
    A peer given a dead direct address and the circuit falls back to the circuit."""
    relay = Node(node_config(tmp_path / "relay", overrides={"relay.service": True}))
    await relay.start()
    nodes: list[Node] = []
    try:
        # The first check finds no relay connected yet; the next comes 3 s later.
        private = Node(node_config(tmp_path / "private", bootstrap=(relay.addrs[0],),
                                   overrides={"relay.check_interval_s": 3.0, "network.hole_punching": False}))
        await private.start()
        nodes.append(private)
        plain = Node(node_config(tmp_path / "plain", bootstrap=(private.addrs[0],)))
        await plain.start()
        nodes.append(plain)
        assert private.status()["reachability"]["state"] == "private"
        await wait_until(lambda: plain.session(private.peer_id) is not None
                         and plain.session(private.peer_id).hello is not None, 5, "plain greeted")  # type: ignore[union-attr]
        assert not private.status()["relay_client"]["circuit_addrs"]  # greeted before the reservation
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a relay chosen")
        reservations = private.status()["relay_client"]["reservations"]
        assert [r["relay"] for r in reservations] == [str(relay.peer_id)]  # not the peer that does not relay
        (circuit,) = private.autorelay.circuit_addrs()
        await wait_until(lambda: circuit in plain.table.get(private.peer_id).addrs  # type: ignore[union-attr]
                         and circuit in plain.sampler.descriptor(private.peer_id).addrs,  # type: ignore[union-attr]
                         5, "the circuit pushed to a peer that greeted before")

        dialler = Node(node_config(tmp_path / "dialler"))
        await dialler.start()
        nodes.append(dialler)
        dead = Multiaddr("127.0.0.1", closed_port())
        session = await dialler.connect([circuit, dead], private.peer_id)  # direct tried first, then the circuit
        assert session.conn.relay == relay.peer_id
        assert dialler.status()["connection_types"][str(private.peer_id)] == "relayed"
    finally:
        for node in reversed(nodes):
            await node.stop()
        await relay.stop()


async def test_a_circuit_cut_at_the_relays_limit_is_redialled_and_learning_goes_on(tmp_path: Path) -> None:
    """The network's own relay gives its members 2-second circuits (the
    learning class, short here to see cuts): each cut is counted and reported
    by the node, the neighbour is redialled through the relay, and the two
    private nodes keep merging each other's deltas across the cuts."""
    members = [str(Identity.load_or_create(tmp_path / name).peer_id) for name in ("private", "third")]
    relay = Node(node_config(tmp_path / "relay", overrides={
        "relay.service": True, "relay.learning_peers": members, "relay.learning_circuit_duration_s": 2,
        "network.shuffle_interval_s": 60.0}))  # no shuffle hands out the nodes' direct addresses
    await relay.start()
    private = third = None
    try:
        private = Node(node_config(tmp_path / "private", overrides={
            **learning(), "relay.use": [str(relay.addrs[0])], "relay.check_interval_s": 0.2}))
        await private.start()
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a reservation on the relay")
        (circuit,) = private.status()["relay_client"]["circuit_addrs"]
        third = Node(node_config(tmp_path / "third", overrides={
            **learning(), "network.bootstrap": [f"{circuit}/p2p/{private.peer_id}"], "relay.auto": False}))
        await third.start()
        await wait_until(lambda: third.session(private.peer_id) is not None, 10, "a session through the circuit")
        await wait_until(lambda: relay.status()["relay"].get("cut_duration", 0) >= 1, 10, "the circuit cut at 2 s")
        await wait_until(lambda: third.status()["relay_client"]["circuits_cut"] >= 1
                         and private.status()["relay_client"]["circuits_cut"] >= 1, 5, "the cut reported by both")
        last = third.status()["relay_client"]["last_cut"]
        assert last["limit_duration_s"] == 2 and last["relay"] == str(relay.peer_id)
        assert last["peer"] == str(private.peer_id) and last["lasted_s"] >= 1.5
        await wait_until(lambda: relay.status()["relay"]["learning_circuits_total"] >= 2, 10,
                         "the neighbour redialled through the relay (a members' circuit again)")
        start = {id(n): n.learner.round for n in (private, third)}
        await wait_until(lambda: all(n.learner.round >= start[id(n)] + 3 for n in (private, third)), 30,
                         "three more rounds each, across cuts")
        await wait_until(lambda: learnt_from(private, third) and learnt_from(third, private), 30,
                         "each merged the other's delta after the cut")
        assert private.status()["faults"] == {} and third.status()["faults"] == {}
    finally:
        for node in (third, private):
            if node is not None:
                await node.stop()
        await relay.stop()


async def test_the_connection_a_reservation_rests_on_is_not_closed_as_transient(tmp_path: Path) -> None:
    """A relay and a private node with no learning link between them (the
    sampler moved on) exchange no murmur message for long: neither may close
    their connection as an idle transient one, or the reservation (and every
    circuit to the private node) goes with it (it did, 15 s after the sampler
    moved off the relay)."""
    quiet = {"network.shuffle_interval_s": 600.0}
    relay = Node(node_config(tmp_path / "relay", overrides={**quiet, "relay.service": True}))
    await relay.start()
    nodes = [relay]
    try:
        private = Node(node_config(tmp_path / "private", bootstrap=(relay.addrs[0],), overrides={
            **quiet, "relay.use": [str(relay.addrs[0])], "relay.check_interval_s": 0.2}))
        await private.start()
        nodes.append(private)
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a reservation on the relay")
        ttl = 0.5
        for node, other in ((private, relay), (relay, private)):
            node.membership.config = dataclasses.replace(node.membership.config, transient_ttl_s=ttl)
            link = node.session(other.peer_id)
            assert link is not None
            await node.membership.unlink(link, cooldown_s=600.0)  # no learning link between them from here
        session = private.session(relay.peer_id)
        assert session is not None
        await wait_until(lambda: time.monotonic() - session.last_message_at > 4 * ttl + 2.0, 10,
                         "the relay's session idle for several maintenance passes")
        assert not session.closed and private.session(relay.peer_id) is session
        assert relay.session(private.peer_id) is not None
        assert relay.relay is not None and private.peer_id in relay.relay.reservations
        assert private.status()["relay_client"]["circuit_addrs"]
    finally:
        for node in reversed(nodes):
            await node.stop()


async def test_a_node_whose_view_emptied_reseeds_it_from_its_connections(tmp_path: Path) -> None:
    """Every peer a node knew failed (behind NAT: it dialled their routers
    before their circuits were known) and its view is empty: its next shuffle
    puts the peers it is connected to back in it and asks one for peers,
    instead of never shuffling again (and being forgotten by everyone)."""
    quiet = {"network.shuffle_interval_s": 600.0}
    hub = Node(node_config(tmp_path / "hub", overrides=quiet))
    await hub.start()
    nodes = [hub]
    try:
        for name in ("a", "b"):
            node = Node(node_config(tmp_path / name, bootstrap=(hub.addrs[0],), overrides=quiet))
            await node.start()
            nodes.append(node)
        lonely = nodes[1]
        def greeted(node: Node, other: Node) -> bool:
            session = node.session(other.peer_id)
            return session is not None and session.hello is not None

        # greeted, not only connected: the reseed takes the sessions whose Hello arrived
        await wait_until(lambda: greeted(hub, nodes[2]) and greeted(lonely, hub) and hub.peer_id in lonely.sampler
                         and hub.sampler.descriptor(nodes[2].peer_id) is not None, 10, "all connected and greeted")
        for desc in lonely.sampler.view():
            lonely.sampler.on_failure(desc.peer)
        assert len(lonely.sampler) == 0
        await lonely.membership.shuffle()
        assert hub.peer_id in lonely.sampler
        await wait_until(lambda: nodes[2].peer_id in lonely.sampler, 5, "a peer from the hub's peer exchange")
    finally:
        for node in reversed(nodes):
            await node.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
