"""The node asks its peers to dial it back (AutoNAT v2), so that its
reachability rests on a measurement, not on what its interfaces suggest.

Why: a public interface address does not make a node reachable (a firewall
may drop every inbound connection), and addresses peers observed for us
prove nothing either (an outbound connection's NAT mapping looks the same).
Each pass asks up to ``servers_per_check`` connected peers that serve
``/libp2p/autonat/2/dial-request``, over direct connections, one per subnet
(a Sybil crowd in one subnet is one opinion, as the tracker counts them), to
dial one of our candidate addresses: the observed addresses peers confirmed,
then our own public ones. What they say goes to the
:class:`~murmur.protocol.reachability.ReachabilityTracker`, whose state
(public when servers in enough distinct subnets reached us, private when as
many failed and none did) drives AutoRelay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from murmur.errors import ConnectionClosed, PeerFault
from murmur.protocol import autonat
from murmur.protocol.addresses import Scope, scope
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.autonat import AutoNATClient, CheckResult
from murmur.protocol.libp2p.connection import Libp2pConnection
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.reachability import ReachabilityTracker
from murmur.protocol.subnets import subnet_of

log = logging.getLogger(__name__)

_PRIVATE_SCOPES = frozenset({Scope.SHARED, Scope.PRIVATE, Scope.LOOPBACK})


class _Session(Protocol):
    peer: PeerId
    conn: Libp2pConnection


class ProbeHost(Protocol):
    """What the prober needs of the node."""

    addrs: list[Multiaddr]

    def sessions(self) -> Sequence[_Session]: ...

    def peer_protocols(self, peer: PeerId) -> Sequence[str]: ...


class AutoNATProber:
    """One pass per :meth:`check` (see the module docstring)."""

    def __init__(self, node: ProbeHost, client: AutoNATClient, tracker: ReachabilityTracker, *,
                 servers_per_check: int, allow_private: bool) -> None:
        self.node = node
        self.client = client
        self.tracker = tracker
        self.servers_per_check = servers_per_check
        self.allow_private = allow_private
        self.last: list[CheckResult] = []

    def candidates(self, now: float) -> list[Multiaddr]:
        """Addresses worth a dial-back, best first: confirmed observed ones,
        then our own that another machine could dial (public; private ones
        too on a network that allows them)."""
        out: list[Multiaddr] = []
        for addr in [*self.tracker.confirmed(now), *(a.without_peer() for a in self.node.addrs)]:
            try:
                where = scope(addr.host)
            except ValueError:
                continue
            if (where is Scope.PUBLIC or (self.allow_private and where in _PRIVATE_SCOPES)) and addr not in out:
                out.append(addr)
        return out[:autonat.MAX_ADDRS]

    def servers(self) -> list[Libp2pConnection]:
        """Direct connections to peers that serve AutoNAT, one per subnet."""
        chosen: dict[object, Libp2pConnection] = {}
        for session in self.node.sessions():
            conn = session.conn
            if conn.closed or conn.relay is not None or autonat.DIAL_REQUEST not in self.node.peer_protocols(session.peer):
                continue
            try:
                subnet = subnet_of(conn.remote[0])
            except ValueError:
                continue
            chosen.setdefault(subnet, conn)
            if len(chosen) >= self.servers_per_check:
                break
        return list(chosen.values())

    async def check(self) -> None:
        now = time.monotonic()
        addrs = self.candidates(now)
        servers = self.servers()
        if not addrs or not servers:
            return
        before = self.tracker.state(now)
        results = await asyncio.gather(*(self._ask(conn, addrs) for conn in servers))
        self.last = [r for r in results if r is not None]
        now = time.monotonic()
        for result in self.last:
            if result.reachable is not None and result.addr is not None:
                self.tracker.record_dial_back(result.addr, result.reachable, result.server, result.server_host, now)
        after = self.tracker.state(now)
        if after != before:
            log.info("reachability changed", extra={"event": "reachability", "state": after[0].value,
                                                    "basis": after[1].value})

    async def _ask(self, conn: Libp2pConnection, addrs: list[Multiaddr]) -> CheckResult | None:
        try:
            return await self.client.check(conn, addrs)
        except (PeerFault, ConnectionClosed, OSError, TimeoutError) as exc:
            log.debug("autonat check failed", extra={"event": "autonat_failed", "peer": str(conn.peer_id),
                                                      "error": repr(exc)})
            return None

    def status(self) -> dict[str, object]:
        """For ``/status``: the last pass's verdicts and the client's counters."""
        return {
            "last": [{"server": str(r.server), "addr": str(r.addr) if r.addr else None, "reachable": r.reachable,
                      "status": r.status.name if r.status is not None else None} for r in self.last],
            "stats": dict(self.client.stats),
        }
