"""AutoNAT in the node: in-process daemons on loopback (a test network, so
``allow_private``) ask each other to dial them back, the verdicts show in
``/status``, and the server's counters with them. Off (``client = false``)
the node asks nobody."""

from __future__ import annotations

from pathlib import Path

from tests.integration.cluster import Cluster, wait_until

AUTONAT = {"autonat.allow_private": True, "autonat.check_interval_s": 0.3, "autonat.per_peer_interval_s": 0.0}


def _verdicts(status: dict) -> list[bool | None]:  # type: ignore[type-arg]
    return [v["reachable"] for v in status["autonat"]["last"]]


async def test_nodes_dial_each_other_back_and_say_so_in_status(tmp_path: Path) -> None:
    async with Cluster(3, tmp_path, overrides=AUTONAT) as cluster:
        nodes = list(cluster)
        # one server per subnet and pass: on loopback all peers share one
        await wait_until(lambda: all(_verdicts(n.status()) == [True] for n in nodes), 20,
                         "each node dialled back")
        for node in nodes:
            status = node.status()["autonat"]
            own = {str(a.without_peer()) for a in node.addrs}
            assert {v["addr"] for v in status["last"]} <= own
            assert status["stats"]["reachable"] >= 1
        assert sum(n.status()["autonat"]["server"].get("dialed_ok", 0) for n in nodes) >= 3


async def test_a_node_with_the_client_off_asks_nobody(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, overrides={**AUTONAT, "autonat.client": False}) as cluster:
        first, second = list(cluster)
        await wait_until(lambda: first.sessions() and second.sessions(), 20, "both connected")
        assert "autonat" not in first.tasks and first.status()["autonat"]["stats"] == {}
        assert second.status()["autonat"]["server"].get("served", 0) == 0
