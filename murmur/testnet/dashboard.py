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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from murmur.testnet.reporting.run import describe_event
from murmur.testnet.scenario import Action, Role
from murmur.units import natural_key, natural_sorted

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
class Counter:
    """A node's byte counters across its processes: a restarted node counts
    from 0 again, which must read as more traffic, not as a fall."""

    base: float = 0.0
    last: float | None = None

    def update(self, raw: float) -> tuple[float, bool]:
        """(the total over every process, whether the counter fell)."""
        restarted = self.last is not None and raw < self.last
        if restarted and self.last is not None:
            self.base += self.last
        self.last = raw
        return self.base + raw, restarted


@dataclass
class NodeView:
    name: str
    role: Role = Role.HONEST
    peer_id: str | None = None
    alive: bool = False
    round: int | None = None
    target_rounds: int | None = None
    state: str | None = None  # training, mixing, done, budget_spent, stopped
    accuracy: float | None = None
    attack_rate: float | None = None
    epsilon: float | None = None
    epsilon_budget: float | None = None
    connections: int | None = None
    neighbours: tuple[str, ...] = ()  # peer ids
    weights: Mapping[str, float] = field(default_factory=dict)  # peer id (or "self") -> weight
    phases: Mapping[str, float] = field(default_factory=dict)  # the last round's seconds per phase
    series: list[tuple[int, float]] = field(default_factory=list)  # (round, accuracy)
    epsilon_series: list[tuple[int, float]] = field(default_factory=list)  # (round, ε spent)
    sent: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)
    bytes_sent: float | None = None  # over all its processes
    bytes_received: float | None = None
    traffic: list[tuple[float, float]] = field(default_factory=list)  # (t, bytes/s sent since the poll before)
    _last_poll: tuple[float, float] | None = None  # (t, bytes sent then)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _append(series: list[Any], point: tuple[Any, Any]) -> None:
    series.append(point)
    del series[:-MAX_SERIES_POINTS]


class DashboardState:
    """What the dashboard shows; the controller writes, the server reads.

    ``clock`` gives seconds since the run started, the origin of the events'
    ``t``: traffic and events share one time axis."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._nodes: dict[str, NodeView] = {}
        self._events: list[dict[str, Any]] = []
        started = time.monotonic()
        self._clock = clock or (lambda: time.monotonic() - started)

    def add_node(self, name: str, role: Role, peer_id: str | None = None) -> None:
        self._nodes[name] = NodeView(name=name, role=role, peer_id=peer_id)

    def set_alive(self, name: str, alive: bool) -> None:
        self._nodes[name].alive = alive

    def update_from_status(self, name: str, status: Mapping[str, Any] | None) -> None:
        """Fold one ``GET /status`` answer in (None: the node did not answer)."""
        view = self._nodes[name]
        if status is None:
            view.alive = False
            view._last_poll = None
            return
        view.alive = True
        view.peer_id = status.get("peer_id") or view.peer_id
        view.neighbours = tuple(str(p) for p in status.get("neighbours") or ())
        connections = status.get("connections")
        view.connections = connections if isinstance(connections, int) else None
        self._traffic(view, _number(status.get("bytes_in")), _number(status.get("bytes_out")))
        learning = status.get("learning")
        if learning:
            view.target_rounds = learning.get("target_rounds")
            view.state = learning.get("state")
            view.epsilon_budget = _number(learning.get("epsilon_budget"))
            view.phases = {str(k): float(v) for k, v in (learning.get("last_round_s") or {}).items()
                           if _number(v) is not None}
            self.record_round(name, learning.get("round"), learning.get("accuracy"), learning.get("attack_rate"),
                              learning.get("weights") or {},
                              _number(learning.get("epsilon_spent", learning.get("epsilon"))))

    def _traffic(self, view: NodeView, bytes_in: float | None, bytes_out: float | None) -> None:
        if bytes_in is None or bytes_out is None:
            return
        now = self._clock()
        view.bytes_received, _ = view.received.update(bytes_in)
        view.bytes_sent, restarted = view.sent.update(bytes_out)
        last, view._last_poll = view._last_poll, (now, view.bytes_sent)
        if last is not None and not restarted and now > last[0]:
            _append(view.traffic, (round(now, 3), (view.bytes_sent - last[1]) / (now - last[0])))

    def record_round(self, name: str, rnd: int | None, accuracy: float | None, attack_rate: float | None,
                     weights: Mapping[str, float], epsilon: float | None = None) -> None:
        view = self._nodes[name]
        view.round, view.accuracy, view.attack_rate = rnd, accuracy, attack_rate
        view.weights = dict(weights)
        if epsilon is not None:
            view.epsilon = epsilon
        # ``round`` is how many rounds the node finished; the point is the last of them
        if rnd is None or rnd < 1:
            return
        if accuracy is not None and (not view.series or view.series[-1][0] != rnd - 1):
            _append(view.series, (rnd - 1, accuracy))
        if epsilon is not None and (not view.epsilon_series or view.epsilon_series[-1][0] != rnd - 1):
            _append(view.epsilon_series, (rnd - 1, epsilon))

    def add_event(self, event: Mapping[str, Any]) -> None:
        self._events.append(dict(event) | {"label": describe_event(event)})
        del self._events[:-MAX_EVENTS]

    # ------------------------------------------------------------------ views

    def _names_by_peer(self) -> dict[str, str]:
        return {v.peer_id: v.name for v in self._nodes.values() if v.peer_id}

    def _sorted(self) -> list[NodeView]:
        return [self._nodes[n] for n in natural_sorted(self._nodes)]

    def edges(self) -> list[list[str]]:
        """Undirected neighbour edges between known nodes, by name, in natural order."""
        by_peer = self._names_by_peer()
        pairs = {
            tuple(natural_sorted((v.name, by_peer[p])))
            for v in self._nodes.values() for p in v.neighbours if p in by_peer and by_peer[p] != v.name
        }
        return [list(p) for p in sorted(pairs, key=lambda p: (natural_key(p[0]), natural_key(p[1])))]

    def downweights(self) -> list[dict[str, Any]]:
        """Which honest nodes give whom a weight under DOWNWEIGHT_RATIO of their top peer weight."""
        by_peer = self._names_by_peer()
        out = []
        for v in self._sorted():
            if v.role is not Role.HONEST:
                continue
            peers = {p: float(w) for p, w in v.weights.items() if p != SELF_WEIGHT_KEY}
            top = max(peers.values(), default=0.0)
            if top <= 0.0:
                continue
            for peer, w in sorted(peers.items(), key=lambda kv: natural_key(by_peer.get(kv[0], kv[0]))):
                if w < DOWNWEIGHT_RATIO * top:
                    out.append({"from": v.name, "to": by_peer.get(peer, peer), "weight": w, "relative": w / top})
        return out

    def partition(self) -> list[list[str]] | None:
        """The partition in force (its two sides), None when there is none."""
        for event in reversed(self._events):
            if event.get("action") == Action.HEAL.value:
                return None
            if event.get("action") == Action.PARTITION.value:
                named = set(event.get("nodes") or ())
                names = natural_sorted(self._nodes)
                return [[n for n in names if n in named], [n for n in names if n not in named]]
        return None

    def network_traffic(self) -> list[list[float]]:
        """The network's sent bytes/s: the nodes' rates summed per poll time."""
        totals: dict[float, float] = {}
        for v in self._nodes.values():
            for t, rate in v.traffic:
                key = round(t * 2) / 2  # polls of one sweep land within half a second
                totals[key] = totals.get(key, 0.0) + rate
        return [[t, r] for t, r in sorted(totals.items())]

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/state`` document."""
        nodes = self._sorted()
        budgets = [v.epsilon_budget for v in nodes if v.epsilon_budget is not None]
        return {
            "t": round(self._clock(), 3),
            "nodes": [
                {"name": v.name, "peer_id": v.peer_id, "alive": v.alive, "round": v.round,
                 "target_rounds": v.target_rounds, "state": v.state, "accuracy": v.accuracy,
                 "attack_rate": v.attack_rate, "epsilon": v.epsilon, "connections": v.connections,
                 "neighbours": len(v.neighbours), "bytes_sent": v.bytes_sent, "bytes_received": v.bytes_received,
                 "phases": dict(v.phases), "role": v.role.value}
                for v in nodes
            ],
            "edges": self.edges(),
            "partition": self.partition(),
            "accuracy_series": {v.name: [list(p) for p in v.series] for v in nodes},
            "epsilon_series": {v.name: [list(p) for p in v.epsilon_series] for v in nodes if v.epsilon_series},
            "epsilon_budget": max(budgets) if budgets else None,
            "traffic": self.network_traffic(),
            "downweights": self.downweights(),
            "attackers": any(v.role is Role.ATTACKER for v in nodes),
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
