"""Local HTTP API: status, peers, Prometheus metrics, health.

Read-only and unauthenticated, hence loopback only (enforced by the config)
and with a Host-header check: a web page open in the operator's browser could
otherwise use DNS rebinding to read the node's status through a hostile
domain that resolves to 127.0.0.1.

The API knows nothing about the node's internals. It reads from a
:class:`NodeStatusSource` — the daemon's ``Node`` implements it — so it can be
tested against any small real implementation.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from murmur.node.metrics import PROMETHEUS_CONTENT_TYPE, NodeMetrics

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
LOCAL_HOST_NAMES = frozenset({"localhost"})


@runtime_checkable
class NodeStatusSource(Protocol):
    """What the API reads. All calls are cheap, synchronous snapshots of
    in-memory state, returning JSON-serialisable values (anything else is
    rendered with ``str``)."""

    def status(self) -> Mapping[str, Any]:
        """E.g. ``{"id", "addrs", "peers", "round", "bytes_in", "bytes_out",
        "accuracy", "epsilon", ...}``."""
        ...

    def peers(self) -> Sequence[Mapping[str, Any]]:
        """One entry per known/connected peer (id, addrs, score, ...)."""
        ...

    def health(self) -> Mapping[str, Any]:
        """``{"ok": bool, ...}``: ``GET /healthz`` answers 200 when ok, else
        503, with this as the body (the node adds what failed)."""
        ...


def plain_json(obj: Any) -> Any:
    """Make a status snapshot strictly JSON: NaN/inf become null (JSON has no
    such numbers), numpy/torch values become Python numbers or lists, and
    anything else (PeerId, Multiaddr, enums) its ``str``."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_json(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return plain_json(tolist())
    return str(obj)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(plain_json(data), status=status, dumps=functools.partial(json.dumps, allow_nan=False))


def _host_allowed(host_header: str | None, bound: str) -> bool:
    if not host_header:
        return False
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    host = host.strip("[]").lower()
    if host in LOCAL_HOST_NAMES or host == bound:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StatusApi:
    """``async with StatusApi(source, metrics, host, port) as api:`` serves
    until the block ends; ``api.port`` is the bound port (useful with 0)."""

    def __init__(self, source: NodeStatusSource, metrics: NodeMetrics, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.source = source
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self.port: int = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/status", self._status)
        app.router.add_get("/peers", self._peers)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not _host_allowed(request.headers.get("Host"), self.host):
            return _json({"error": "forbidden host"}, status=403)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            # a bug in a status source must not kill the API, and must not leak a traceback to the client
            log.exception("status API handler failed", extra={"path": request.path})
            return _json({"error": "internal error"}, status=500)

    async def _status(self, _request: web.Request) -> web.Response:
        return _json(self.source.status())

    async def _peers(self, _request: web.Request) -> web.Response:
        return _json(list(self.source.peers()))

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def _healthz(self, _request: web.Request) -> web.Response:
        health = self.source.health()
        return _json(health, status=200 if health.get("ok") is True else 503)

    async def start(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("status API listening", extra={"url": self.url})

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> StatusApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
