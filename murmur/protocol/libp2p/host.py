"""A minimal libp2p host: listen and dial TCP, upgrade (``/noise``, ``/yamux/1.0.0``),
route inbound streams to handlers by protocol id, and speak identify, identify
push and ping.

It does not replace murmur's :class:`~murmur.protocol.transport.Transport`
yet: the node integrates it later (its own message protocols each on a
``/murmur/...`` stream, the fast path offered first between murmur nodes). What
is shaped for that now:

* handlers are ``async def handler(stream)`` registered per protocol id; a
  node protocol runs one stream per exchange or one long-lived stream, as it
  likes;
* receive memory comes from a :class:`~murmur.protocol.budget.BytePool`
  passed in (``pool=``): the node's pool, shared with the fast path, so a
  peer's yamux windows and its fast-path frames draw from one budget;
* peer faults go to ``on_fault(conn, fault)`` (the node's penalty table), and
  every connection's proved peer, identify data (:attr:`Libp2pConnection.identify`)
  and the addresses others observed for us (:attr:`Libp2pHost.observed_addrs`)
  are there to read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from murmur import __version__
from murmur.errors import DecodeError, PeerFault, TimeoutFault
from murmur.protocol import identify as idp
from murmur.protocol.budget import BytePool
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p.connection import ConnectionClosed, Handler, Libp2pConnection, Stream, _Wire
from murmur.protocol.multiaddr import AnyMultiaddr, Multiaddr, Proto
from murmur.protocol.subnets import subnet_of
from murmur.protocol.yamux import YamuxLimits
from murmur.ratelog import LogBudget, RateLimitedLog
from murmur.tasks import TaskManager

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_PING_STREAMS = 2  # per connection (ping spec: the listener SHOULD accept at most two)


@dataclass(frozen=True)
class HostConfig:
    """Every bound of the libp2p host, named once."""

    agent_version: str = f"murmur/{__version__}"
    protocol_version: str = PROTOCOL_VERSION
    connect_timeout_s: float = 5.0
    upgrade_timeout_s: float = 10.0  # TCP to a muxed connection: both negotiations and the handshake
    negotiate_timeout_s: float = 10.0  # one stream's protocol negotiation
    identify_timeout_s: float = 10.0
    ping_interval_s: float = 15.0  # yamux keepalive
    idle_timeout_s: float = 60.0  # nothing received this long: close
    max_connections: int = 256  # inbound and outbound, upgrading ones included
    max_negotiation_attempts: int = 16  # proposals one channel may make (multistream.Listener)
    max_peer_buffered_bytes: int = 64 * 1024 * 1024  # per connection, the yamux windows drawn from it
    peer_reserve_bytes: int = 256 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024  # the pool, when the host makes its own
    yamux: YamuxLimits = field(default_factory=YamuxLimits)
    identify_on_connect: bool = True
    warning_interval_s: float = 10.0  # fault warnings peers cause: per interval in all,
    warnings_per_interval: int = 10
    warnings_per_subnet: int = 3  # and per /24 or /48; one summary line counts the rest


class Libp2pHost:
    def __init__(
        self,
        identity: Identity,
        config: HostConfig = HostConfig(),
        pool: BytePool | None = None,
        on_connection: Callable[[Libp2pConnection], Awaitable[None]] | None = None,
        on_fault: Callable[[Libp2pConnection | None, PeerFault], None] | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.pool = pool if pool is not None else BytePool(config.max_buffered_bytes)
        self._on_connection = on_connection
        self._on_fault = on_fault
        self._handlers: dict[str, Handler] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._wires: set[_Wire] = set()
        self._conns: set[Libp2pConnection] = set()
        self._numbers = itertools.count(1)
        self._tasks = TaskManager(f"libp2p {identity.peer_id.short()}")
        self._ping_streams: Counter[Libp2pConnection] = Counter()
        self._closing = False
        self.listen_addrs: list[Multiaddr] = []
        self.observed_addrs: Counter[AnyMultiaddr] = Counter()  # how peers saw us, by how many said so
        self.faults: Counter[str] = Counter()
        self._warnings = RateLimitedLog("libp2p warnings", log, LogBudget(
            per_key=config.warnings_per_subnet, total=config.warnings_per_interval,
            window_s=config.warning_interval_s))
        self.set_handler(idp.IDENTIFY, self._serve_identify)
        self.set_handler(idp.IDENTIFY_PUSH, self._serve_identify_push)
        self.set_handler(idp.PING, self._serve_ping)

    # --- handlers -------------------------------------------------------------------

    def set_handler(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler

    def remove_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    def handles(self, protocol: str) -> bool:
        return protocol in self._handlers

    def handler_for(self, protocol: str) -> Handler | None:
        return self._handlers.get(protocol)

    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def connections(self) -> list[Libp2pConnection]:
        return [c for c in self._conns if not c.closed]

    # --- listen and dial ---------------------------------------------------------------

    async def listen(self, host: str, port: int) -> list[Multiaddr]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Wire(self, False, next(self._numbers)), host, port,
                                          reuse_address=True)
        self._servers.append(server)
        if "warning-summaries" not in self._tasks:
            self._tasks.periodic("warning-summaries", self.config.warning_interval_s, self._flush_warnings,
                                 delay_s=self.config.warning_interval_s)
        addrs = [Multiaddr(s.getsockname()[0], s.getsockname()[1], self.peer_id) for s in server.sockets]
        self.listen_addrs += addrs
        log.info("libp2p listening", extra={"event": "libp2p_listen", "addrs": [str(a) for a in addrs]})
        return addrs

    async def dial(self, addr: Multiaddr) -> Libp2pConnection:
        """Connect, upgrade, prove ``addr.peer_id`` if set. Raises ``OSError``,
        :class:`~murmur.errors.TimeoutFault`, or the upgrade's :class:`~murmur.errors.PeerFault`."""
        if self._closing:
            raise ConnectionClosed("host is closed")
        loop = asyncio.get_running_loop()
        try:
            _, wire = await asyncio.wait_for(
                loop.create_connection(lambda: _Wire(self, True, next(self._numbers), addr.peer_id),
                                       addr.host, addr.port),
                self.config.connect_timeout_s)
        except TimeoutError:
            raise TimeoutFault(f"connect to {addr} timed out") from None
        return await self._upgraded(wire)

    async def _upgraded(self, wire: _Wire) -> Libp2pConnection:
        try:
            conn = await asyncio.wait_for(asyncio.shield(wire.ready), self.config.upgrade_timeout_s)
        except TimeoutError:
            fault = TimeoutFault(f"upgrade not finished within {self.config.upgrade_timeout_s}s")
            wire.fail(fault)
            raise fault from None
        self._conns.add(conn)
        log.info("libp2p connection open", extra={
            "event": "libp2p_connected", "conn": conn.name, "peer": str(conn.peer_id),
            "remote": f"{conn.remote[0]}:{conn.remote[1]}", "outbound": conn.outbound})
        if self.config.identify_on_connect:
            conn.tasks.spawn("identify", lambda: self._identify(conn))
        if self._on_connection is not None:
            conn.tasks.spawn("on_connection", lambda: self._on_connection(conn))  # type: ignore[misc]
        return conn

    async def _accept(self, wire: _Wire) -> None:
        try:
            await self._upgraded(wire)
        except (PeerFault, ConnectionClosed, OSError):
            return  # reported by the wire

    async def close(self) -> None:
        self._closing = True
        for server in self._servers:
            server.close()
        await asyncio.gather(*(c.close() for c in list(self._conns)), return_exceptions=True)
        for wire in list(self._wires):
            if wire.tr is not None:
                wire.tr.abort()
        await self._tasks.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._warnings.close()

    async def _flush_warnings(self) -> None:
        self._warnings.flush()

    async def __aenter__(self) -> Libp2pHost:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- identify ---------------------------------------------------------------------

    def identify_for(self, conn: Libp2pConnection) -> idp.IdentifyInfo:
        """What we tell ``conn``'s peer: our protocols, listen addresses, and its address as we see it."""
        host, port = conn.remote
        observed = AnyMultiaddr.of((Proto.IP6 if ":" in host else Proto.IP4, host), (Proto.TCP, port))
        return idp.make_identify(
            self.peer_id.public_key_bytes, self.protocols(),
            [a.without_peer().to_any() for a in self.listen_addrs], observed,
            self.config.agent_version, self.config.protocol_version,
        )

    async def _serve_identify(self, stream: Stream) -> None:
        await stream.write(self.identify_for(stream.conn).encode())
        await stream.close_write()

    async def _read_identify(self, stream: Stream) -> idp.IdentifyInfo:
        prefix = bytearray()
        while (got := idp.identify_length(prefix)) is None:
            byte = await stream.read(1)
            if not byte:
                raise DecodeError("identify stream ended before its message")
            prefix += byte
        length, _ = got
        body = await stream.readexactly(length)
        return idp.decode_identify(body, expected=stream.peer_id)

    async def _identify(self, conn: Libp2pConnection) -> None:
        """Ask the peer who it is; keep the answer on the connection."""
        try:
            async with asyncio.timeout(self.config.identify_timeout_s):
                stream = await conn.open_stream(idp.IDENTIFY)
                info = await self._read_identify(stream)
                await stream.close_write()
        except PeerFault as fault:
            self._report(conn, fault)
            conn.identified.set()
            return
        except (TimeoutError, ConnectionClosed, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("identify failed", extra={"event": "identify_failed", "conn": conn.name, "error": repr(exc)})
            conn.identified.set()
            return
        except Exception as exc:  # a StreamError: the stream or connection went away
            log.debug("identify failed", extra={"event": "identify_failed", "conn": conn.name, "error": repr(exc)})
            conn.identified.set()
            return
        self._learn(conn, info)

    def _learn(self, conn: Libp2pConnection, info: idp.IdentifyInfo) -> None:
        conn.identify = info if conn.identify is None else conn.identify.merged(info)
        if info.observed_addr is not None:
            self.observed_addrs[info.observed_addr] += 1
        conn.identified.set()
        log.info("peer identified", extra={
            "event": "identified", "conn": conn.name, "peer": str(conn.peer_id),
            "agent": conn.identify.agent_version, "protocols": list(conn.identify.protocols),
            "observed": str(info.observed_addr) if info.observed_addr else None})

    async def _serve_identify_push(self, stream: Stream) -> None:
        async with asyncio.timeout(self.config.identify_timeout_s):
            info = await self._read_identify(stream)
        self._learn(stream.conn, info)

    async def push_identify(self, conn: Libp2pConnection) -> None:
        """Tell the peer our current identify data (``/ipfs/id/push/1.0.0``)."""
        stream = await conn.open_stream(idp.IDENTIFY_PUSH)
        await stream.write(self.identify_for(conn).encode())
        await stream.close_write()

    # --- ping ------------------------------------------------------------------------

    async def _serve_ping(self, stream: Stream) -> None:
        conn = stream.conn
        if self._ping_streams[conn] >= MAX_PING_STREAMS:
            stream.reset()
            return
        self._ping_streams[conn] += 1
        try:
            while True:
                try:
                    payload = await stream.readexactly(idp.PING_SIZE)
                except asyncio.IncompleteReadError:
                    break
                await stream.write(payload)
            await stream.close_write()
        finally:
            self._ping_streams[conn] -= 1
            if not self._ping_streams[conn]:
                del self._ping_streams[conn]

    async def ping(self, conn: Libp2pConnection, count: int = 1) -> list[float]:
        """Round trips (seconds) of ``count`` libp2p pings on one stream."""
        stream = await conn.open_stream(idp.PING)
        rtts = []
        try:
            for _ in range(count):
                payload = os.urandom(idp.PING_SIZE)
                start = time.perf_counter()
                await stream.write(payload)
                echoed = await stream.readexactly(idp.PING_SIZE)
                rtts.append(time.perf_counter() - start)
                if echoed != payload:
                    raise DecodeError("ping answer differs from the payload")
        finally:
            await stream.close_write()
        return rtts

    # --- bookkeeping ----------------------------------------------------------------

    def _admit(self, wire: _Wire) -> bool:
        if self._closing or len(self._wires) >= self.config.max_connections:
            return False
        self._wires.add(wire)
        if not wire.outbound:
            self._tasks.spawn(f"accept-{wire.conn_no}", lambda: self._accept(wire))
        return True

    def _forget_wire(self, wire: _Wire) -> None:
        self._wires.discard(wire)

    def _forget(self, conn: Libp2pConnection) -> None:
        self._conns.discard(conn)
        self._ping_streams.pop(conn, None)

    def _report(self, conn: Libp2pConnection | None, fault: PeerFault, remote: tuple[str, int] | None = None) -> None:
        """Count, log (rate-limited per subnet: a peer causes these) and hand on a peer fault."""
        self.faults[type(fault).__name__] += 1
        remote = remote or (conn.remote if conn is not None else None)
        try:
            key: object = subnet_of(remote[0]) if remote else None
        except ValueError:
            key = remote[0] if remote else None
        self._warnings.warning(log, key, "libp2p peer fault", extra={
            "event": "libp2p_fault", "fault": type(fault).__name__, "detail": str(fault),
            "conn": conn.name if conn else None,
            "peer": str(conn.peer_id) if conn is not None and conn.peer_id is not None else None,
            "remote": f"{remote[0]}:{remote[1]}" if remote else None, "drop": fault.drop})
        if self._on_fault is not None:
            self._on_fault(conn, fault)


async def echo_handler(stream: Stream) -> None:
    """Writes back everything it reads until the peer's FIN, then FIN (for tests and interop)."""
    while data := await stream.read():
        await stream.write(data)
    await stream.close_write()
