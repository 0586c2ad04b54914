"""A circuit the relay refuses is a failed dial, never a crashed daemon.

A relay answers CONNECT with a refusal (NO_RESERVATION: the peer behind it
was killed, or never reserved) and the dial ends in ``RelayRefused``, which
is no ``OSError``, ``PeerFault`` or ``ConnectionClosed``. Membership caught
only those: a bootstrap address through a relay whose peer was down ended
the ``bootstrap`` task as a crash, and a circuit record in the view (any
stranger may shuffle one in) picked as a neighbour ended its ``link-*``
task so; either stopped the daemon with exit 1.
"""

from __future__ import annotations

from pathlib import Path

from murmur.node.daemon import Node
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import CircuitAddr
from tests.integration.cluster import node_config, wait_until


def circuit_through(relay: Node) -> CircuitAddr:
    """A circuit through ``relay`` to a fresh identity that holds no reservation there."""
    return CircuitAddr.parse(f"{relay.addrs[0].without_peer()}/p2p/{relay.peer_id}/p2p-circuit/p2p/{Identity.generate().peer_id}")


async def test_refused_circuits_are_failed_dials(tmp_path: Path) -> None:
    relay = Node(node_config(tmp_path / "relay", overrides={"relay.service": True}))
    await relay.start()
    try:
        down = circuit_through(relay)
        # No shuffle of its own (that dial is a periodic task's): the neighbour's is the link task's.
        node = Node(node_config(tmp_path / "node", overrides={"network.bootstrap": [str(down)],
                                                              "network.shuffle_interval_s": 600.0}))
        await node.start()
        try:
            refused = lambda: relay.metrics.value("murmur_relay_events", event="refused_no_reservation") or 0  # noqa: E731
            await wait_until(lambda: refused() >= 1, 10.0, "the relay refused the bootstrap circuit")
            await wait_until(lambda: node.session(relay.peer_id) is not None, 5.0, "the relay's session")
            assert node.tasks.crashes() == [], node.tasks.crashes()
            # A circuit record from hearsay, picked as a neighbour.
            hearsay = circuit_through(relay)
            assert hearsay.peer_id is not None
            node.sampler.add(hearsay.peer_id, [hearsay.without_peer()])
            await wait_until(lambda: refused() >= 2, 10.0, "the relay refused the neighbour's circuit")
            await wait_until(lambda: hearsay.peer_id not in node.sampler.neighbours(), 5.0, "the neighbour replaced")
            assert node.tasks.crashes() == [], node.tasks.crashes()
            assert node.healthy(), node.status()["health"]
        finally:
            await node.stop()
    finally:
        await relay.stop()
