"""The dashboard in a real browser: real aiohttp server, real headless Chromium."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from murmur.protocol.identity import Identity
from murmur.testnet.dashboard import DashboardServer, DashboardState
from murmur.testnet.scenario import Role
from tests.browser import BrowserPage, BrowserUnavailable, dump_dom, ensure_chromium

HONEST = ["node0", "node1", "node2", "node3"]
SYBIL = "sybil0-0"


def _state() -> tuple[DashboardState, dict[str, str]]:
    ids = {n: str(Identity.generate().peer_id) for n in [*HONEST, SYBIL]}
    state = DashboardState(clock=lambda: 12.5)  # a still clock: snapshots compare equal
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
                # status round = rounds finished; the accuracy is of the last of them
                "learning": {"round": rnd + 1, "accuracy": 0.2 + 0.1 * rnd, "attack_rate": 0.05, "weights": weights,
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
    assert node2["alive"] is False and node2["round"] == 5


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
        for rnd in (6, 7):
            state.record_round("node0", rnd, 0.8, 0.01, {ids["node1"]: 0.3, ids[SYBIL]: 0.0, "self": 0.7})
        state.record_round("node1", 7, 0.75, 0.02, {ids["node0"]: 0.4, ids["node3"]: 0.05, ids[SYBIL]: 0.0})
        dom = await asyncio.to_thread(dump_dom, server.url)
        assert _rows(dom) == [("node0", SYBIL), ("node1", "node3"), ("node1", SYBIL)]
        assert _polyline_points(dom, "node0") == 7
        assert 'class="node-dead"' in dom and '<tr class="dead" data-node="node2">' in dom


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _busy_state(n: int = 24) -> tuple[DashboardState, Clock]:
    """A network the size the issue saw (24 nodes), privacy on, a restart
    and a partition in force: what made the old table overflow."""
    clock = Clock()
    state = DashboardState(clock=clock)
    names = [f"node{i}" for i in range(n)]
    ids = {name: str(Identity.generate().peer_id) for name in names}
    for name in names:
        state.add_node(name, Role.HONEST, ids[name])
    sent = dict.fromkeys(names, 0)
    for rnd in range(1, 9):
        clock.now = rnd * 0.5
        for i, name in enumerate(names):
            sent[name] = 40_000 * rnd if not (name == "node3" and rnd >= 5) else 40_000 * (rnd - 4)  # restarted
            peers = [names[(i + 1) % n], names[(i - 1) % n]]
            state.update_from_status(name, {
                "peer_id": ids[name], "neighbours": [ids[p] for p in peers], "connections": 5 + i % 3,
                "bytes_in": sent[name], "bytes_out": sent[name],
                "learning": {"round": rnd, "target_rounds": 10, "state": "training", "accuracy": 0.1 * rnd,
                             "epsilon": 0.9 * rnd, "epsilon_spent": 0.9 * rnd, "epsilon_budget": 10.0,
                             "weights": {}, "last_round_s": {"train": 0.05, "commit": 0.24, "send": 0.01,
                                                             "wait": 0.1, "aggregate": 0.01, "eval": 0.02}},
            })
        if rnd == 4:
            state.add_event({"round": 4, "t": 2.1, "action": "crash", "nodes": ["node3"]})
        if rnd == 5:
            state.add_event({"round": 5, "t": 2.6, "action": "restart", "nodes": ["node3"]})
        if rnd == 6:
            state.add_event({"round": 6, "t": 3.1, "action": "partition", "nodes": names[:12]})
    return state, clock


def test_snapshot_has_epsilon_connections_traffic_and_the_partition() -> None:
    state, _ = _busy_state()
    snap = state.snapshot()
    node3 = next(n for n in snap["nodes"] if n["name"] == "node3")
    # the restarted node's counter fell from 160000 to 40000: it sent more, never less
    assert node3["bytes_sent"] == 160_000 + 4 * 40_000
    assert node3["epsilon"] == pytest.approx(7.2) and node3["connections"] == 5 and node3["target_rounds"] == 10
    assert snap["epsilon_budget"] == 10.0 and snap["epsilon_series"]["node0"][-1] == [7, pytest.approx(7.2)]
    assert all(rate > 0 for _, rate in snap["traffic"])
    assert snap["partition"] == [[f"node{i}" for i in range(12)], [f"node{i}" for i in range(12, 24)]]
    assert [e["label"] for e in snap["events"]] == ["crash node3", "restart node3", f"partition {' '.join(f'node{i}' for i in range(12))} | rest"]
    assert [n["name"] for n in snap["nodes"]][:3] == ["node0", "node1", "node2"]  # natural order
    state.add_event({"round": 7, "action": "heal", "nodes": []})
    assert state.snapshot()["partition"] is None


async def test_dashboard_in_a_browser_shows_epsilon_connections_and_fits(tmp_path) -> None:
    try:
        await asyncio.to_thread(ensure_chromium)
    except BrowserUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")
    state, _ = _busy_state()
    async with DashboardServer(state) as server, BrowserPage(1280, 900) as page:
        await page.goto(server.url)
        assert await page.wait_for("document.querySelectorAll('#nodes tbody tr').length === 24")
        seen = await page.evaluate("""({
          header: [...document.querySelectorAll('#nodes thead th')].map(th => th.textContent),
          node3: [...document.querySelector('#nodes tr[data-node="node3"]').cells].map(td => td.textContent),
          overflowing: [...document.querySelectorAll('.panel, .scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)
                         .map(e => e.id || e.className),
          page: document.documentElement.scrollWidth - window.innerWidth,
          epsilonShown: !document.getElementById('epsilon-panel').hidden,
          budget: [...document.querySelectorAll('#epsilon text')].some(t => t.textContent === 'budget ε = 10'),
          epsilonLines: document.querySelectorAll('#epsilon polyline').length,
          traffic: document.querySelectorAll('#traffic polyline.mean').length,
          trafficEvents: [...document.querySelectorAll('#traffic .event-label')].map(t => t.textContent),
          phases: document.querySelectorAll('#phases rect[data-phase="commit"]').length,
          sides: [document.querySelectorAll('#graph .node-side0').length, document.querySelectorAll('#graph .node-side1').length],
          crossing: document.querySelectorAll('#graph .edge.crossing').length,
          events: [...document.querySelectorAll('#events li')].map(li => li.textContent),
          downweights: !document.getElementById('downweights-panel').hidden,
        })""")
        size = await page.screenshot(tmp_path / "dashboard.png")
    assert seen["header"][4:8] == ["accuracy", "ε", "connections", "neighbours"]
    assert seen["node3"][3:] == ["8 / 10", "0.800", "7.20", "5", "2", "312.5 KiB", "312.5 KiB"]
    assert seen["overflowing"] == [] and seen["page"] <= 0, seen["overflowing"]
    assert seen["epsilonShown"] and seen["budget"] and seen["epsilonLines"] == 24
    assert seen["traffic"] == 1 and seen["trafficEvents"][:2] == ["crash node3", "restart node3"]
    assert seen["phases"] == 24
    assert seen["sides"] == [12, 12] and seen["crossing"] == 2  # the ring crosses the cut twice
    assert seen["events"][0] == "2.1 s · round 4 · crash node3"
    assert not seen["downweights"]  # no attackers: no attack panel
    assert size[0] == 1280 and (tmp_path / "dashboard.png").stat().st_size > 10_000
