"""The dashboard in a real browser: real aiohttp server, real headless Chromium."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from murmur.protocol.identity import Identity
from murmur.testnet.dashboard import DashboardServer, DashboardState
from murmur.testnet.scenario import Role
from tests.browser import BrowserUnavailable, dump_dom, ensure_chromium

HONEST = ["node0", "node1", "node2", "node3"]
SYBIL = "sybil0-0"


def _state() -> tuple[DashboardState, dict[str, str]]:
    ids = {n: str(Identity.generate().peer_id) for n in [*HONEST, SYBIL]}
    state = DashboardState()
    for name in HONEST:
        state.add_node(name, Role.HONEST, ids[name])
    state.add_node(SYBIL, Role.ATTACKER, ids[SYBIL])
    ring = {n: [HONEST[(i - 1) % 4], HONEST[(i + 1) % 4]] for i, n in enumerate(HONEST)}
    ring["node0"].append(SYBIL)
    ring["node1"].append(SYBIL)
    for rnd in range(5):
        for name in [*HONEST, SYBIL]:
            peers = ring.get(name, ["node0", "node1"])
            weights = {ids[p]: (0.0 if p == SYBIL else 0.3) for p in peers} | {"self": 0.4}
            state.update_from_status(name, {
                "peer_id": ids[name], "neighbours": [ids[p] for p in peers],
                "learning": {"round": rnd, "accuracy": 0.2 + 0.1 * rnd, "attack_rate": 0.05, "weights": weights,
                             "role": "attacker" if name == SYBIL else "honest"},
            })
    state.add_event({"round": 3, "action": "crash", "nodes": ["node2"]})
    return state, ids


def test_snapshot_edges_and_downweights() -> None:
    state, _ = _state()
    snap = state.snapshot()
    assert ["node0", "sybil0-0"] in snap["edges"] and ["node0", "node1"] in snap["edges"]
    assert len(snap["edges"]) == 6
    assert [(d["from"], d["to"]) for d in snap["downweights"]] == [("node0", SYBIL), ("node1", SYBIL)]
    assert snap["accuracy_series"]["node0"] == [[r, pytest.approx(0.2 + 0.1 * r)] for r in range(5)]
    # the Sybil's own weights never count: only honest nodes' opinions are shown
    assert all(d["from"] != SYBIL for d in snap["downweights"])


def test_dead_node_keeps_its_history() -> None:
    state, _ = _state()
    state.update_from_status("node2", None)
    node2 = next(n for n in state.snapshot()["nodes"] if n["name"] == "node2")
    assert node2["alive"] is False and node2["round"] == 4


async def test_http_endpoints() -> None:
    state, _ = _state()
    async with DashboardServer(state) as server, aiohttp.ClientSession() as http:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
        async with http.get(server.url + "api/state") as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            assert await resp.json() == state.snapshot()
        async with http.get(server.url) as resp:
            assert "/static/dashboard.js" in await resp.text()
        for asset in ("dashboard.js", "dashboard.css"):
            async with http.get(server.url + "static/" + asset) as resp:
                assert resp.status == 200
        async with http.get(server.url + "static/../dashboard.py") as resp:
            assert resp.status in (403, 404)


def _rows(dom: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr class="downweight"><td>([^<]+)</td><td>([^<]+)</td>', dom)


def _polyline_points(dom: str, name: str) -> int:
    match = re.search(rf'<polyline points="([^"]+)"[^>]*data-node="{re.escape(name)}"', dom)
    assert match, f"no accuracy polyline for {name}"
    return len(match.group(1).split())


async def test_page_renders_in_headless_chromium() -> None:
    try:
        await asyncio.to_thread(ensure_chromium)
    except BrowserUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")
    state, ids = _state()
    async with DashboardServer(state) as server:
        dom = await asyncio.to_thread(dump_dom, server.url)
        for name in [*HONEST, SYBIL]:
            assert f'<g data-node="{name}">' in dom
        assert _rows(dom) == [("node0", SYBIL), ("node1", SYBIL)]
        assert _polyline_points(dom, "node0") == 5
        assert 'class="edge downweight" data-edge="node0-sybil0-0"' in dom
        assert dom.count('class="node-attacker"') == 1 and "node-dead" not in dom

        # the controller learns more: node2 went down, node1 now distrusts node3, two more rounds
        state.update_from_status("node2", None)
        for rnd in (5, 6):
            state.record_round("node0", rnd, 0.8, 0.01, {ids["node1"]: 0.3, ids[SYBIL]: 0.0, "self": 0.7})
        state.record_round("node1", 6, 0.75, 0.02, {ids["node0"]: 0.4, ids["node3"]: 0.05, ids[SYBIL]: 0.0})
        dom = await asyncio.to_thread(dump_dom, server.url)
        assert _rows(dom) == [("node0", SYBIL), ("node1", "node3"), ("node1", SYBIL)]
        assert _polyline_points(dom, "node0") == 7
        assert 'class="node-dead"' in dom and '<tr class="dead" data-node="node2">' in dom
