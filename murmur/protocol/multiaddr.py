"""The subset of multiaddr murmur uses: ``/ip4|ip6/<addr>/tcp/<port>[/p2p/<id>]``.

Text form only; we never put binary multiaddrs on the wire.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from murmur.protocol.identity import PeerId


@dataclass(frozen=True)
class Multiaddr:
    host: str
    port: int
    peer_id: PeerId | None = None

    @property
    def family(self) -> str:
        return "ip6" if ":" in self.host else "ip4"

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        parts = text.strip().split("/")
        if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            raise ValueError(f"unsupported multiaddr {text!r}: expected /ip4|ip6/<addr>/tcp/<port>[/p2p/<id>]")
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            raise ValueError(f"bad IP address in multiaddr {text!r}") from None
        if (parts[1] == "ip4") != (ip.version == 4):
            raise ValueError(f"address family mismatch in multiaddr {text!r}")
        try:
            port = int(parts[4])
        except ValueError:
            raise ValueError(f"bad port in multiaddr {text!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range in multiaddr {text!r}")
        peer = None
        rest = parts[5:]
        if rest:
            if len(rest) != 2 or rest[0] != "p2p":
                raise ValueError(f"unsupported multiaddr suffix in {text!r}")
            peer = PeerId.from_string(rest[1])
        return cls(str(ip), port, peer)

    def with_peer(self, peer_id: PeerId) -> Multiaddr:
        return Multiaddr(self.host, self.port, peer_id)

    def without_peer(self) -> Multiaddr:
        return Multiaddr(self.host, self.port, None)

    def __str__(self) -> str:
        base = f"/{self.family}/{self.host}/tcp/{self.port}"
        return f"{base}/p2p/{self.peer_id}" if self.peer_id else base
