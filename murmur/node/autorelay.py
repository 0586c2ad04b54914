"""AutoRelay: a node behind NAT holds reservations on relays and advertises
its ``/p2p-circuit`` addresses, so that peers can reach it at all.

Which relays: the operator's static list (``[relay] use``), else, while the
node's reachability is private, up to ``max_relays`` connected peers whose
identify lists the relay protocol (``/libp2p/circuit/relay/0.2.0/hop``), over
a direct connection (a reservation must rest on one). A reservation is held by
:meth:`RelayClient.keep` (refreshed at half its life); when it is lost (refused,
the relay gone), the next check picks again. The circuit addresses are
advertised in Hello and, through the sampler's own descriptor, in shuffles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from murmur.errors import MurmurError, PeerFault
from murmur.protocol import circuit
from murmur.protocol.discovery import resolve
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p.connection import Libp2pConnection
from murmur.protocol.libp2p.relay import RelayClient
from murmur.protocol.multiaddr import CircuitAddr, DialAddr, Multiaddr
from murmur.protocol.transport import ConnectionClosed

log = logging.getLogger(__name__)


class _Session(Protocol):
    peer: PeerId
    conn: Libp2pConnection


class RelayHost(Protocol):
    """What AutoRelay needs of the node."""

    async def relay_connection(self, addrs: Sequence[Multiaddr], relay: PeerId) -> Libp2pConnection: ...

    def sessions(self) -> Sequence[_Session]: ...

    def peer_protocols(self, peer: PeerId) -> Sequence[str]: ...


class AutoRelay:
    """Chooses relays and keeps reservations on them (see the module docstring)."""

    def __init__(self, node: RelayHost, client: RelayClient, static: Sequence[DialAddr], auto: bool,
                 max_relays: int, private: Callable[[], bool]) -> None:
        self.node = node
        self.client = client
        self.static = tuple(static)
        self.auto = auto
        self.max_relays = max_relays
        self.private = private

    def live(self) -> dict[PeerId, float]:
        """Relays we hold a reservation on now -> its expiry (Unix seconds)."""
        now = time.time()
        return {relay: float(res.expire) for relay, res in self.client.reservations.items() if res.expire > now}

    def circuit_addrs(self) -> list[CircuitAddr]:
        """Our circuit addresses, without our own id (as every listen address is advertised)."""
        return [CircuitAddr.parse(str(a)).without_peer() for a in self.client.circuit_addrs()]

    async def check(self) -> None:
        """One pass: (re)hold a reservation on each static relay, or choose
        relays among connected peers while private."""
        if self.static:
            for addr in self.static:
                assert addr.peer_id is not None  # config validation
                if not self.client.keeping(addr.peer_id):
                    await self._keep_static(addr)
            return
        if not self.auto or not self.private():
            return
        held = sum(1 for s in self.node.sessions() if self.client.keeping(s.peer))
        for session in self.node.sessions():
            if held >= self.max_relays:
                break
            if (session.conn.relay is None and not session.conn.closed and not self.client.keeping(session.peer)
                    and circuit.HOP in self.node.peer_protocols(session.peer)):
                self._keep(session.conn)
                held += 1

    async def _keep_static(self, addr: DialAddr) -> None:
        try:
            targets = [t.without_peer() for t in await resolve(addr)]
            assert addr.peer_id is not None
            conn = await self.node.relay_connection(targets, addr.peer_id)
        except (OSError, PeerFault, ConnectionClosed, MurmurError) as exc:
            log.info("relay unreachable", extra={"event": "relay_unreachable", "relay": str(addr), "error": str(exc)})
            return
        self._keep(conn)

    def _keep(self, conn: Libp2pConnection) -> None:
        log.info("reserving on relay", extra={"event": "relay_keep", "relay": str(conn.peer_id)})
        self.client.keep(conn)

    def status(self) -> dict[str, object]:
        """For ``/status``: the relays we hold reservations on and the addresses advertised through them."""
        now = time.time()
        return {
            "reservations": [{"relay": str(relay), "expires_in_s": round(expire - now, 1)}
                             for relay, expire in sorted(self.live().items(), key=lambda kv: str(kv[0]))],
            "circuit_addrs": [str(a) for a in self.circuit_addrs()],
            "static": [str(a) for a in self.static],
            "auto": self.auto,
            # relayed connections whose circuit the relay cut (a limit) or lost; neighbours are redialled
            "circuits_cut": self.client.stats["circuits_cut"],
            "last_cut": self.client.last_cut,
        }
