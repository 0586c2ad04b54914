"""A murmur node serving circuit relay v2 when its operator says so
(``[relay] service``): bare libp2p hosts reserve on it and reach one another
through it, and ``/status`` counts what it relayed."""

from __future__ import annotations

import os
from pathlib import Path

from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import Libp2pHost, echo_handler
from murmur.protocol.libp2p.relay import RelayClient
from murmur.protocol.multiaddr import DialAddr
from murmur.node.daemon import Node
from tests.integration.cluster import node_config, wait_until

ECHO = "/murmur-test/echo/1.0.0"


async def test_a_node_relays_only_when_its_operator_says_so(tmp_path: Path) -> None:
    off = Node(node_config(tmp_path / "off"))
    relay = Node(node_config(tmp_path / "relay", overrides={"relay.service": True, "relay.max_reservations_per_ip": 4}))
    private, dialler = Libp2pHost(Identity.generate()), Libp2pHost(Identity.generate())
    private.set_handler(ECHO, echo_handler)
    private_client, dialler_client = RelayClient(private), RelayClient(dialler)
    await off.start()
    await relay.start()
    try:
        assert off.status()["relay"] is None
        assert "/libp2p/circuit/relay/0.2.0/hop" not in off.host.protocols()
        assert relay.status()["relay"] == {"reservations": 0, "circuits": 0, "learning_circuits": 0}

        await private_client.reserve(await private.dial(relay.addrs[0]))
        (advertised,) = private_client.circuit_addrs()
        conn = await dialler_client.dial_addr(DialAddr.parse(str(advertised)))
        data = os.urandom(10_000)
        stream = await conn.open_stream(ECHO)
        await stream.write(data)
        await stream.close_write()
        assert await stream.read_all(len(data) + 1) == data
        status = relay.status()["relay"]
        assert status["reservations"] == 1 and status["circuits"] == 1  # live now
        assert status["reservations_total"] == 1 and status["circuits_total"] == 1
        assert status["bytes_relayed"] > 2 * len(data)
        metrics = relay.metrics
        assert metrics.value("murmur_relay_reservations") == 1 and metrics.value("murmur_relay_circuits") == 1
        assert metrics.value("murmur_relay_events", event="bytes_relayed") == status["bytes_relayed"]
        assert metrics.value("murmur_relay_events", event="refused_no_reservation") == 0
        assert off.metrics.value("murmur_relay_reservations") is None
        await conn.close()
        await wait_until(lambda: relay.status()["relay"]["circuits"] == 0, 5, "circuit released")
        assert relay.status()["relay"]["circuits_total"] == 1
    finally:
        await dialler.close()
        await private.close()
        await relay.stop()
        await off.stop()
