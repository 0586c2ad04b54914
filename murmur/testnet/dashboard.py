"""Live testnet dashboard: a small aiohttp server on loopback.

The controller owns a :class:`DashboardState` and updates it from what it polls
(each node's ``/status``) and what it does (churn events). The server only
reads it: ``GET /api/state`` returns :meth:`DashboardState.snapshot` and the
static page (plain JS + inline SVG, no CDN) polls that every second.

State and server live on the controller's one event loop, so updates and
snapshots never interleave and need no lock.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from murmur.testnet.scenario import Role

HOST = "127.0.0.1"
#: A peer counts as down-weighted when an honest node gives it less than this
#: fraction of the largest weight it gives any peer in the same aggregation.
#: Relative, because normalised weights shrink with the degree (1/(k+1) for plain
#: averaging), so an absolute cut would flag every edge of a well-connected node.
DOWNWEIGHT_RATIO = 0.5
MAX_SERIES_POINTS = 2000  # per node; the oldest points are dropped beyond this
MAX_EVENTS = 500
SELF_WEIGHT_KEY = "self"
STATIC_PACKAGE = "murmur.testnet"
STATIC_DIR = "static"
INDEX_FILE = "dashboard.html"
NO_CACHE = {"Cache-Control": "no-store"}


@dataclass
class NodeView:
    name: str
    role: Role = Role.HONEST
    peer_id: str | None = None
    alive: bool = False
    round: int | None = None
    accuracy: float | None = None
    attack_rate: float | None = None
    neighbours: tuple[str, ...] = ()  # peer ids
    weights: Mapping[str, float] = field(default_factory=dict)  # peer id (or "self") -> weight
    series: list[tuple[int, float]] = field(default_factory=list)  # (round, accuracy)


class DashboardState:
    """What the dashboard shows; the controller writes, the server reads."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeView] = {}
        self._events: list[dict[str, Any]] = []

    def add_node(self, name: str, role: Role, peer_id: str | None = None) -> None:
        self._nodes[name] = NodeView(name=name, role=role, peer_id=peer_id)

    def set_alive(self, name: str, alive: bool) -> None:
        self._nodes[name].alive = alive

    def update_from_status(self, name: str, status: Mapping[str, Any] | None) -> None:
        """Fold one ``GET /status`` answer in (None: the node did not answer)."""
        view = self._nodes[name]
        if status is None:
            view.alive = False
            return
        view.alive = True
        view.peer_id = status.get("peer_id") or view.peer_id
        view.neighbours = tuple(str(p) for p in status.get("neighbours") or ())
        learning = status.get("learning")
        if learning:
            self.record_round(name, learning.get("round"), learning.get("accuracy"), learning.get("attack_rate"),
                              learning.get("weights") or {})

    def record_round(self, name: str, rnd: int | None, accuracy: float | None, attack_rate: float | None,
                     weights: Mapping[str, float]) -> None:
        view = self._nodes[name]
        view.round, view.accuracy, view.attack_rate = rnd, accuracy, attack_rate
        view.weights = dict(weights)
        if rnd is not None and accuracy is not None and (not view.series or view.series[-1][0] != rnd):
            view.series.append((rnd, accuracy))
            del view.series[:-MAX_SERIES_POINTS]

    def add_event(self, event: Mapping[str, Any]) -> None:
        self._events.append(dict(event))
        del self._events[:-MAX_EVENTS]

    # ------------------------------------------------------------------ views

    def _names_by_peer(self) -> dict[str, str]:
        return {v.peer_id: v.name for v in self._nodes.values() if v.peer_id}

    def edges(self) -> list[list[str]]:
        """Undirected neighbour edges between known nodes, by name, sorted."""
        by_peer = self._names_by_peer()
        pairs = {
            tuple(sorted((v.name, by_peer[p])))
            for v in self._nodes.values() for p in v.neighbours if p in by_peer and by_peer[p] != v.name
        }
        return [list(p) for p in sorted(pairs)]

    def downweights(self) -> list[dict[str, Any]]:
        """Which honest nodes give whom a weight under DOWNWEIGHT_RATIO of their top peer weight."""
        by_peer = self._names_by_peer()
        out = []
        for v in sorted(self._nodes.values(), key=lambda v: v.name):
            if v.role is not Role.HONEST:
                continue
            peers = {p: float(w) for p, w in v.weights.items() if p != SELF_WEIGHT_KEY}
            top = max(peers.values(), default=0.0)
            if top <= 0.0:
                continue
            for peer, w in sorted(peers.items(), key=lambda kv: by_peer.get(kv[0], kv[0])):
                if w < DOWNWEIGHT_RATIO * top:
                    out.append({"from": v.name, "to": by_peer.get(peer, peer), "weight": w, "relative": w / top})
        return out

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/state`` document."""
        nodes = sorted(self._nodes.values(), key=lambda v: v.name)
        return {
            "nodes": [
                {"name": v.name, "peer_id": v.peer_id, "alive": v.alive, "round": v.round, "accuracy": v.accuracy,
                 "attack_rate": v.attack_rate, "role": v.role.value}
                for v in nodes
            ],
            "edges": self.edges(),
            "accuracy_series": {v.name: [list(p) for p in v.series] for v in nodes},
            "downweights": self.downweights(),
            "events": list(self._events),
        }


def _static_root() -> Path:
    root = importlib.resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    return Path(str(root))  # installed as plain files (package data), never zipped


class DashboardServer:
    """Serves the page and ``/api/state`` on ``127.0.0.1`` (port 0 = ephemeral)."""

    def __init__(self, state: DashboardState, port: int = 0) -> None:
        self.state = state
        self._port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _app(self) -> web.Application:
        static = _static_root()

        async def index(_: web.Request) -> web.FileResponse:
            return web.FileResponse(static / INDEX_FILE, headers=NO_CACHE)

        async def api_state(_: web.Request) -> web.Response:
            return web.json_response(self.state.snapshot(), headers=NO_CACHE)

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/api/state", api_state)
        app.router.add_static("/static/", static, follow_symlinks=False)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def fill_from_specs(state: DashboardState, specs: Sequence[Any], peer_ids: Mapping[str, str]) -> None:
    """Register every scenario node (``NodeSpec``) with its provisioned peer id."""
    for spec in specs:
        state.add_node(spec.name, spec.role, peer_ids.get(spec.name))
