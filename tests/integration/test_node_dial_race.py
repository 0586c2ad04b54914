"""Dialling a NATed peer: its direct address swallows the SYN (as a home
router does), its circuit answers; the node reaches it through the circuit
in well under the connect timeout, because the circuit's dial starts
``CIRCUIT_DIAL_DELAY_S`` after the direct one instead of after the direct
one timed out (murmur/node/dialrace.py).

Real in-process daemons on loopback (a relay, a private node holding a
reservation on it, a third node). The swallowing address is a loopback
listener whose accept queue is full: the kernel drops further SYNs, so a
dial to it hangs until its connect timeout, as one to a router that drops
unsolicited connections does.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.node.dialrace import CIRCUIT_DIAL_DELAY_S
from murmur.protocol.multiaddr import CircuitAddr, Multiaddr
from tests.integration.cluster import node_config, wait_until

CONNECT_TIMEOUT_S = 10.0  # what the old sequential dial waited before trying the circuit
NO_HOLE_PUNCHING = {"network.hole_punching": False, "network.shuffle_interval_s": 60.0,
                    "transport.connect_timeout_s": CONNECT_TIMEOUT_S}


@pytest.fixture
def black_hole() -> Iterator[Multiaddr]:
    """A loopback address whose SYNs go unanswered: a listener with a full accept queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)  # takes the queue's one place
    try:
        probe = socket.socket()
        probe.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the premise: a dial to it hangs
            probe.connect(listener.getsockname())
        probe.close()
        yield Multiaddr("127.0.0.1", listener.getsockname()[1])
    finally:
        filler.close()
        listener.close()


@contextlib.asynccontextmanager
async def relay_private_third(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, CircuitAddr, Node]]:
    """A relay, a private node holding a reservation on it (and its circuit
    address), and a third node to dial it; all stopped after."""
    relay = Node(node_config(tmp_path / "relay", overrides={**NO_HOLE_PUNCHING, "relay.service": True}))
    await relay.start()
    nodes: list[Node] = []
    try:
        private = Node(node_config(tmp_path / "private", overrides={
            **NO_HOLE_PUNCHING, "relay.use": [str(relay.addrs[0])], "relay.check_interval_s": 0.2}))
        await private.start()
        nodes.append(private)
        await wait_until(lambda: private.status()["relay_client"]["circuit_addrs"], 10, "a reservation on the relay")
        (circuit,) = private.status()["relay_client"]["circuit_addrs"]
        third = Node(node_config(tmp_path / "third", overrides=NO_HOLE_PUNCHING))
        await third.start()
        nodes.append(third)
        yield relay, private, CircuitAddr.parse(circuit), third
    finally:
        for node in reversed(nodes):
            await node.stop()
        await relay.stop()


async def test_a_peer_behind_a_silent_address_is_reached_through_its_circuit_quickly(
        tmp_path: Path, black_hole: Multiaddr) -> None:
    async with relay_private_third(tmp_path) as (relay, private, circuit, third):

        started = time.monotonic()
        session = await third.connect([black_hole, circuit], private.peer_id)
        took = time.monotonic() - started
        assert session.conn.relay == relay.peer_id  # through the circuit: the direct dial was still hanging
        assert CIRCUIT_DIAL_DELAY_S <= took < CONNECT_TIMEOUT_S / 2, took
        assert third.status()["connection_types"][str(private.peer_id)] == "relayed"


async def test_a_peer_that_answers_directly_is_not_dialled_through_its_circuit(tmp_path: Path) -> None:
    """The circuit lane waits: a direct address that answers within the delay
    costs the relay nothing."""
    async with relay_private_third(tmp_path) as (relay, private, circuit, third):
        circuits_before = relay.status()["relay"].get("circuits_total", 0)
        session = await third.connect([private.addrs[0], circuit], private.peer_id)
        assert session.conn.relay is None
        assert relay.status()["relay"].get("circuits_total", 0) == circuits_before
