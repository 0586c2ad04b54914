"""Local status API against a real aiohttp server and client, plus NodeMetrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from murmur.errors import DecodeError, FrameTooLarge
from murmur.node.api import NodeStatusSource, StatusApi
from murmur.node.metrics import Direction, NodeMetrics, Split
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr


class TinyNode:
    """A minimal real NodeStatusSource: identity, addresses, counters."""

    def __init__(self, seed: int = 1) -> None:
        self.identity = Identity.from_seed(bytes([seed]) * 32)
        self.addrs = [Multiaddr("127.0.0.1", 4731, self.identity.peer_id)]
        self.round = 0
        self.accuracy: float = math.nan  # not evaluated yet
        self.known: list[Identity] = [Identity.from_seed(bytes([seed + 1 + i]) * 32) for i in range(2)]
        self.fail = False
        self.failed_tasks: list[dict[str, Any]] = []

    def status(self) -> Mapping[str, Any]:
        if self.fail:
            raise RuntimeError("node state inconsistent")
        return {
            "id": self.identity.peer_id,
            "addrs": self.addrs,
            "peers": len(self.known),
            "round": self.round,
            "bytes_in": 1234,
            "bytes_out": np.int64(4321),
            "accuracy": self.accuracy,
            "epsilon": np.float32(0.25),
        }

    def peers(self) -> Sequence[Mapping[str, Any]]:
        return [{"id": p.peer_id, "score": 10.0} for p in self.known]

    def health(self) -> Mapping[str, Any]:
        if not self.failed_tasks:
            return {"ok": True}
        return {"ok": False, "failed_tasks": self.failed_tasks}


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, str]:
    async with session.get(url, **kw) as resp:
        body = await resp.text()
        ctype = resp.headers.get("Content-Type", "")
        data = await resp.json(content_type=None) if ctype.startswith("application/json") else body
        return resp.status, data, ctype


def test_tiny_node_satisfies_protocol():
    assert isinstance(TinyNode(), NodeStatusSource)


async def test_status_peers_and_health_over_real_http():
    node = TinyNode()
    async with StatusApi(node, NodeMetrics(), "127.0.0.1", 0) as api, aiohttp.ClientSession() as session:
        assert api.port > 0
        status, data, ctype = await get(session, f"{api.url}/status")
        assert status == 200 and ctype.startswith("application/json")
        assert data["id"] == str(node.identity.peer_id) and data["id"].startswith("12D3KooW")
        assert data["addrs"] == [f"/ip4/127.0.0.1/tcp/4731/p2p/{node.identity.peer_id}"]
        assert data["bytes_out"] == 4321 and data["epsilon"] == 0.25
        assert data["accuracy"] is None  # NaN is not JSON: rendered as null, never as invalid JSON

        node.round, node.accuracy = 7, 0.91  # live state, not a snapshot taken at start
        _, data, _ = await get(session, f"{api.url}/status")
        assert (data["round"], data["accuracy"]) == (7, 0.91)

        status, peers, _ = await get(session, f"{api.url}/peers")
        assert status == 200
        assert [p["id"] for p in peers] == [str(p.peer_id) for p in node.known]

        status, health, _ = await get(session, f"{api.url}/healthz")
        assert (status, health) == (200, {"ok": True})

        # a crashed task: 503 (what load balancers and probes act on), and the body says what failed
        node.failed_tasks = [{"task": "rounds", "state": "crashed", "error": "TrainerError: X.train() returned dict"}]
        status, health, ctype = await get(session, f"{api.url}/healthz")
        assert status == 503 and ctype.startswith("application/json")
        assert health == {"ok": False, "failed_tasks": node.failed_tasks}

        status, _, _ = await get(session, f"{api.url}/nope")
        assert status == 404
        async with session.post(f"{api.url}/status") as resp:
            assert resp.status == 405


async def test_metrics_endpoint_serves_this_nodes_registry_only():
    metrics_a, metrics_b = NodeMetrics(), NodeMetrics()
    metrics_a.add_bytes(Direction.IN, 1000)
    metrics_a.add_bytes(Direction.OUT, 250)
    metrics_a.message(Direction.IN, "delta_chunk", 3)
    metrics_a.peers_connected.set(5)
    metrics_a.round.set(12)
    metrics_a.set_eval(Split.TRAIN, loss=0.4, accuracy=0.8)
    metrics_a.epsilon_spent.set(1.5)
    metrics_a.fault(DecodeError("bad msgpack"))
    metrics_a.fault(FrameTooLarge)
    metrics_a.set_aggregation_weights({"self": 0.5, "12D3KooWa": 0.25, "12D3KooWb": 0.25})
    metrics_a.set_aggregation_weights({"self": 0.6, "12D3KooWa": 0.4})  # b left the neighbourhood
    metrics_b.add_bytes(Direction.IN, 7)

    async with StatusApi(TinyNode(), metrics_a) as api, aiohttp.ClientSession() as session:
        status, text, ctype = await get(session, f"{api.url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("murmur_bytes_total", (("direction", "in"),))] == 1000
    assert samples[("murmur_bytes_total", (("direction", "out"),))] == 250
    assert samples[("murmur_messages_total", (("direction", "in"), ("kind", "delta_chunk")))] == 3
    assert samples[("murmur_peers_connected", ())] == 5
    assert samples[("murmur_round", ())] == 12
    assert samples[("murmur_accuracy", (("split", "train"),))] == 0.8
    assert samples[("murmur_privacy_epsilon_spent", ())] == 1.5
    assert samples[("murmur_peer_faults_total", (("type", "DecodeError"),))] == 1
    assert samples[("murmur_peer_faults_total", (("type", "FrameTooLarge"),))] == 1
    weights = {dict(k[1])["peer"]: v for k, v in samples.items() if k[0] == "murmur_aggregation_weight"}
    assert weights == {"self": 0.6, "12D3KooWa": 0.4}
    # per-node registries: b's bytes are not in a's exposition, nothing leaked into the global registry
    assert metrics_b.value("murmur_bytes_total", direction="in") == 7
    assert prometheus_client.REGISTRY.get_sample_value("murmur_bytes_total", {"direction": "in"}) is None


async def test_ephemeral_ports_are_distinct_and_released():
    async with StatusApi(TinyNode(1), NodeMetrics()) as a, StatusApi(TinyNode(2), NodeMetrics()) as b:
        assert a.port != b.port
        async with aiohttp.ClientSession() as session:
            _, da, _ = await get(session, f"{a.url}/status")
            _, db, _ = await get(session, f"{b.url}/status")
        assert da["id"] != db["id"]
        url = a.url
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(session, f"{url}/healthz")


async def test_foreign_host_header_is_refused():
    """DNS rebinding: a browser sends the attacker's host name."""
    async with StatusApi(TinyNode(), NodeMetrics()) as api, aiohttp.ClientSession() as session:
        status, data, _ = await get(session, f"{api.url}/status", headers={"Host": "evil.example:80"})
        assert status == 403 and data == {"error": "forbidden host"}
        status, _, _ = await get(session, f"{api.url}/status", headers={"Host": f"localhost:{api.port}"})
        assert status == 200


async def test_failing_source_gives_500_and_server_survives(caplog):
    node = TinyNode()
    async with StatusApi(node, NodeMetrics()) as api, aiohttp.ClientSession() as session:
        node.fail = True
        status, data, _ = await get(session, f"{api.url}/status")
        assert status == 500 and data == {"error": "internal error"}  # no traceback to the client
        assert "status API handler failed" in caplog.text
        node.fail = False
        status, _, _ = await get(session, f"{api.url}/status")
        assert status == 200


async def test_port_in_use_raises_oserror():
    async with StatusApi(TinyNode(), NodeMetrics()) as first:
        with pytest.raises(OSError):
            async with StatusApi(TinyNode(), NodeMetrics(), port=first.port):
                pass
