"""Real ``murmur node start`` daemons behind two endpoint-independent NATs on
the emulated internet, and a public murmur relay: the second knows the first
only by its circuit address, so they meet through the relay; the first, inbound
on that relayed connection, punches a hole (DCUtR), both move onto the punched
connection, the relayed one closes, and they learn over the direct path. Root
only (skipped otherwise, with the reason)."""

from __future__ import annotations

import pytest

from murmur.testnet.internet import Host, Internet, NatKind, Router, Topology
from tests.integration.cluster import wait_until
from tests.integration.daemons import Daemon, DaemonPool
from tests.integration.emulation import require_internet
from tests.integration.test_internet_nodes import (
    LEARNED_S,
    TOGETHER,
    _established_from,
    all_rounds_run,
    meet_through_relay,
    _rounds,
    _status,
)


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


async def test_two_nodes_behind_eim_nats_punch_a_hole_and_learn_over_it(pool: DaemonPool) -> None:
    topology = Topology(hosts=(Host("relay"), Host("a", router="home_a"), Host("b", router="home_b")),
                        routers=(Router("home_a", nat=NatKind.EIM), Router("home_b", nat=NatKind.EIM)))
    with Internet(topology) as net:
        try:
            # strangers' limits: learning over the relay would be cut
            a, b, relay = await meet_through_relay(pool, net, lambda ids: {})
            a_id, b_id = str(a.peer_id), str(b.peer_id)

            async def punched() -> bool:
                types = [(await _status(net, h, d))["connection_types"].get(o) for h, d, o in
                         (("a", a, b_id), ("b", b, a_id))]
                return types == ["punched", "punched"]

            await wait_until(punched, LEARNED_S, "both on the punched connection")
            a_status = await _status(net, "a", a)
            assert a_status["dcutr"]["successes"] == 1 and a_status["dcutr"]["failures"] == 0  # a drove it
            # the punched connection runs between the two routers' public addresses, on the listen ports
            assert net.plan.public_address("b") in _established_from(net, "a")
            assert net.plan.public_address("a") in _established_from(net, "b")
            await wait_until(lambda: _circuits(net, relay), 10, "the circuit closed on the relay")

            await all_rounds_run(net, {"a": a, "b": b})
            with_other = {d.peer_id: [r["round"] for r in _rounds(d) if o.peer_id in r.get("neighbours", [])]
                          for d, o in ((a, b), (b, a))}
            assert all(len(rounds) >= TOGETHER for rounds in with_other.values()), with_other
            relayed = (await _status(net, "relay", relay))["relay"]
            assert relayed["bytes_relayed"] < 128 * 1024, relayed  # the deltas did not go through it
            for daemon in (a, b):
                assert _rounds(daemon)[-1]["accuracy"] > 0.5
        finally:
            pool.teardown()


async def _circuits(net: Internet, relay: Daemon) -> bool:
    """Whether the relay carries no circuit now."""
    return bool((await _status(net, "relay", relay))["relay"]["circuits"] == 0)
