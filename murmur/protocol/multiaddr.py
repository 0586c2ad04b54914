"""Multiaddrs: murmur's dialable TCP address, and any libp2p multiaddr, in text and binary.

:class:`Multiaddr` is what murmur dials and listens on:
``/ip4|ip6/<addr>/tcp/<port>[/p2p/<id>]``. :class:`AnyMultiaddr` is any
address a libp2p peer may tell us (identify's listen and observed addresses,
bootstrap lists, relay circuits): a sequence of ``(protocol, value)``
components, with the binary form libp2p puts on the wire (each component
``uvarint code | value``, where a variable-length value carries its own
uvarint length) and the text form (``/dns4/example.org/tcp/4001/p2p/12D3…``,
``/ip4/…/tcp/…/p2p/<relay>/p2p-circuit/p2p/<target>``). Protocols outside
:class:`Proto` are refused with ``ValueError``; a caller reading a peer's
list skips that address rather than the whole list.

:class:`DialAddr` is what an operator may write where murmur dials (the
bootstrap list, ``--bootstrap``): TCP on an IP address or a DNS name
(``/dns``, ``/dns4``, ``/dns6``, resolved when dialled), with an optional
``/p2p/<id>``, or a relay circuit through such an address
(``…/p2p/<relay>/p2p-circuit/p2p/<target>``, parsed and kept; dialling
circuits comes with NAT traversal).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from murmur.errors import DecodeError
from murmur.protocol import uvarint
from murmur.protocol.identity import PeerId, b58decode, b58encode

MAX_BINARY = 1024  # bytes of one binary multiaddr we parse
MAX_COMPONENTS = 16


class Proto(enum.IntEnum):
    """Multicodec codes (multiformats table) of the protocols murmur reads."""

    IP4 = 0x04
    TCP = 0x06
    IP6 = 0x29
    DNS = 0x35
    DNS4 = 0x36
    DNS6 = 0x37
    DNSADDR = 0x38
    UDP = 0x0111
    P2P_CIRCUIT = 0x0122
    P2P = 0x01A5
    TLS = 0x01C0
    QUIC_V1 = 0x01CD
    WS = 0x01DD
    WSS = 0x01DE

    @property
    def text(self) -> str:
        return _NAMES[self]


_NAMES = {Proto.IP4: "ip4", Proto.TCP: "tcp", Proto.IP6: "ip6", Proto.DNS: "dns", Proto.DNS4: "dns4",
          Proto.DNS6: "dns6", Proto.DNSADDR: "dnsaddr", Proto.UDP: "udp", Proto.P2P_CIRCUIT: "p2p-circuit",
          Proto.P2P: "p2p", Proto.TLS: "tls", Proto.QUIC_V1: "quic-v1", Proto.WS: "ws", Proto.WSS: "wss"}
_BY_NAME = {name: proto for proto, name in _NAMES.items()} | {"ipfs": Proto.P2P}  # /ipfs/ is p2p's old name
_PORTS = {Proto.TCP, Proto.UDP}
_NAMES_VALUED = {Proto.DNS, Proto.DNS4, Proto.DNS6, Proto.DNSADDR}
_NO_VALUE = {Proto.P2P_CIRCUIT, Proto.TLS, Proto.QUIC_V1, Proto.WS, Proto.WSS}
MAX_DNS_NAME = 255
DNS_PROTOS = frozenset({Proto.DNS, Proto.DNS4, Proto.DNS6})
_HOST_PROTOS = frozenset({Proto.IP4, Proto.IP6}) | DNS_PROTOS

Value = str | int | bytes | None


@dataclass(frozen=True)
class Component:
    proto: Proto
    value: Value = None  # ip text, port, DNS name, peer id multihash bytes, or None


def _check_value(proto: Proto, value: Value) -> Value:
    """Normalise and validate one component's value (text or binary origin alike)."""
    if proto is Proto.IP4 or proto is Proto.IP6:
        ip = ipaddress.ip_address(value if isinstance(value, str) else bytes(value or b""))  # type: ignore[arg-type]
        if (ip.version == 4) != (proto is Proto.IP4):
            raise ValueError(f"address family mismatch for /{proto.text}")
        return str(ip)
    if proto in _PORTS:
        port = int(value)  # type: ignore[arg-type]
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        return port
    if proto in _NAMES_VALUED:
        name = str(value)
        if not name or len(name.encode()) > MAX_DNS_NAME or "/" in name:
            raise ValueError(f"bad DNS name {name!r}")
        return name
    if proto is Proto.P2P:
        raw = bytes(value) if isinstance(value, (bytes, bytearray)) else b58decode(str(value))
        if not raw or len(raw) > 128:
            raise ValueError("bad /p2p peer id")
        return raw
    if value is not None:
        raise ValueError(f"/{proto.text} takes no value")
    return None


@dataclass(frozen=True)
class AnyMultiaddr:
    """Any multiaddr of :class:`Proto` components (see the module docstring)."""

    components: tuple[Component, ...]

    @classmethod
    def of(cls, *parts: tuple[Proto, Value] | Proto) -> AnyMultiaddr:
        comps = []
        for part in parts:
            proto, value = (part, None) if isinstance(part, Proto) else part
            comps.append(Component(proto, _check_value(proto, value)))
        return cls(tuple(comps))

    @classmethod
    def parse(cls, text: str) -> AnyMultiaddr:
        """The text form; ``ValueError`` for anything else."""
        parts = text.strip().split("/")
        if len(parts) < 2 or parts[0] != "":
            raise ValueError(f"multiaddr {text!r} must start with /")
        comps: list[Component] = []
        i = 1
        while i < len(parts):
            name = parts[i]
            proto = _BY_NAME.get(name)
            if proto is None:
                raise ValueError(f"unsupported multiaddr protocol /{name} in {text!r}")
            if proto in _NO_VALUE:
                comps.append(Component(proto))
                i += 1
                continue
            if i + 1 >= len(parts) or not parts[i + 1]:
                raise ValueError(f"/{name} needs a value in {text!r}")
            try:
                comps.append(Component(proto, _check_value(proto, parts[i + 1])))
            except ValueError as exc:
                raise ValueError(f"bad multiaddr {text!r}: {exc}") from None
            i += 2
        if not comps or len(comps) > MAX_COMPONENTS:
            raise ValueError(f"multiaddr {text!r} has no components or too many")
        return cls(tuple(comps))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> AnyMultiaddr:
        """The binary form; ``ValueError`` for anything malformed or unsupported."""
        buf = bytes(data)
        if not buf or len(buf) > MAX_BINARY:
            raise ValueError(f"binary multiaddr of {len(buf)} bytes")
        comps: list[Component] = []
        pos = 0
        try:
            while pos < len(buf):
                if len(comps) >= MAX_COMPONENTS:
                    raise ValueError("too many multiaddr components")
                code, pos = uvarint.decode(buf, pos)
                try:
                    proto = Proto(code)
                except ValueError:
                    raise ValueError(f"unsupported multiaddr protocol code {code:#x}") from None
                if proto is Proto.IP4 or proto is Proto.IP6:
                    size = 4 if proto is Proto.IP4 else 16
                    raw: bytes | None = buf[pos : pos + size]
                    pos += size
                    if len(raw) != size:  # type: ignore[arg-type]
                        raise ValueError("truncated IP address")
                    value: Value = _check_value(proto, raw)
                elif proto in _PORTS:
                    if pos + 2 > len(buf):
                        raise ValueError("truncated port")
                    value = int.from_bytes(buf[pos : pos + 2], "big")
                    pos += 2
                elif proto in _NO_VALUE:
                    value = None
                else:
                    length, pos = uvarint.decode(buf, pos)
                    if pos + length > len(buf):
                        raise ValueError("truncated multiaddr value")
                    raw = buf[pos : pos + length]
                    pos += length
                    value = _check_value(proto, raw.decode() if proto in _NAMES_VALUED else raw)
                comps.append(Component(proto, value))
        except (DecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed binary multiaddr: {exc}") from None
        return cls(tuple(comps))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for comp in self.components:
            out += uvarint.encode(comp.proto)
            value = comp.value
            if comp.proto is Proto.IP4 or comp.proto is Proto.IP6:
                out += ipaddress.ip_address(value).packed  # type: ignore[arg-type]
            elif comp.proto in _PORTS:
                out += int(value).to_bytes(2, "big")  # type: ignore[arg-type]
            elif comp.proto in _NAMES_VALUED or comp.proto is Proto.P2P:
                raw = str(value).encode() if comp.proto in _NAMES_VALUED else bytes(value)  # type: ignore[arg-type]
                out += uvarint.encode(len(raw)) + raw
        return bytes(out)

    def __str__(self) -> str:
        out = []
        for comp in self.components:
            out.append("/" + comp.proto.text)
            if comp.proto is Proto.P2P:
                out.append("/" + b58encode(comp.value))  # type: ignore[arg-type]
            elif comp.value is not None:
                out.append(f"/{comp.value}")
        return "".join(out)

    @property
    def protocols(self) -> tuple[Proto, ...]:
        return tuple(c.proto for c in self.components)

    @property
    def is_circuit(self) -> bool:
        return Proto.P2P_CIRCUIT in self.protocols

    @property
    def peer_id(self) -> PeerId | None:
        """The last ``/p2p`` component's peer, if it is one murmur can verify (Ed25519)."""
        for comp in reversed(self.components):
            if comp.proto is Proto.P2P:
                try:
                    return PeerId.from_bytes(comp.value)  # type: ignore[arg-type]
                except ValueError:
                    return None
        return None

    def to_tcp(self) -> Multiaddr | None:
        """The :class:`Multiaddr` murmur can dial directly, or ``None``
        (a DNS name, a circuit, another transport)."""
        comps = self.components
        if not 2 <= len(comps) <= 3 or comps[0].proto not in (Proto.IP4, Proto.IP6) or comps[1].proto is not Proto.TCP:
            return None
        peer = None
        if len(comps) == 3:
            if comps[2].proto is not Proto.P2P:
                return None
            peer = self.peer_id
            if peer is None:
                return None
        return Multiaddr(str(comps[0].value), int(comps[1].value), peer)  # type: ignore[arg-type]


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

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Multiaddr:
        """The binary form of a TCP address; ``ValueError`` for any other."""
        addr = AnyMultiaddr.from_bytes(data).to_tcp()
        if addr is None:
            raise ValueError("not an /ip4|ip6/…/tcp/…[/p2p/…] multiaddr")
        return addr

    def to_any(self) -> AnyMultiaddr:
        ip = Proto.IP6 if self.family == "ip6" else Proto.IP4
        parts: list[tuple[Proto, Value]] = [(ip, self.host), (Proto.TCP, self.port)]
        if self.peer_id is not None:
            parts.append((Proto.P2P, self.peer_id.raw))
        return AnyMultiaddr.of(*parts)

    def to_bytes(self) -> bytes:
        return self.to_any().to_bytes()

    def with_peer(self, peer_id: PeerId) -> Multiaddr:
        return Multiaddr(self.host, self.port, peer_id)

    def without_peer(self) -> Multiaddr:
        return Multiaddr(self.host, self.port, None)

    is_circuit = False  # beside CircuitAddr (see PeerAddr)

    def __str__(self) -> str:
        base = f"/{self.family}/{self.host}/tcp/{self.port}"
        return f"{base}/p2p/{self.peer_id}" if self.peer_id else base


@dataclass(frozen=True)
class DialAddr(AnyMultiaddr):
    """A multiaddr murmur can dial: ``/<ip4|ip6|dns|dns4|dns6>/<host>/tcp/<port>[/p2p/<id>]``,
    or a relay circuit through one (``…/p2p/<relay>/p2p-circuit[/p2p/<target>]``).
    Every ``/p2p`` must be an identity murmur can verify (Ed25519), the port not 0."""

    @classmethod
    def parse(cls, text: str) -> DialAddr:
        return cls.of(AnyMultiaddr.parse(text))

    @classmethod
    def of(cls, addr: AnyMultiaddr) -> DialAddr:  # type: ignore[override]
        comps = addr.components
        if len(comps) < 2 or comps[0].proto not in _HOST_PROTOS or comps[1].proto is not Proto.TCP:
            raise ValueError(f"multiaddr {addr} is not TCP on an IP address or DNS name "
                             "(/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>[/p2p/<id>])")
        if comps[1].value == 0:
            raise ValueError(f"multiaddr {addr} has port 0")
        rest = comps[2:]
        if rest and rest[0].proto is Proto.P2P:
            rest = rest[1:]
        if rest and rest[0].proto is Proto.P2P_CIRCUIT:
            if len(comps) < 4 or comps[2].proto is not Proto.P2P:
                raise ValueError(f"multiaddr {addr}: a circuit needs its relay's /p2p/<id> before /p2p-circuit")
            rest = rest[1:]
            if rest and rest[0].proto is Proto.P2P:
                rest = rest[1:]
        if rest:
            raise ValueError(f"multiaddr {addr}: murmur dials TCP only, and /p2p-circuit through a relay")
        for comp in comps:
            if comp.proto is Proto.P2P:
                try:
                    PeerId.from_bytes(comp.value)  # type: ignore[arg-type]
                except ValueError:
                    raise ValueError(f"multiaddr {addr}: /p2p/{b58encode(comp.value)} is not an Ed25519 peer id "  # type: ignore[arg-type]
                                     "(murmur verifies those only)") from None
        return cls(comps)

    @property
    def host(self) -> str:
        """The IP address or DNS name of the first hop (the relay, for a circuit)."""
        return str(self.components[0].value)

    @property
    def port(self) -> int:
        return int(self.components[1].value)  # type: ignore[arg-type]

    @property
    def dns(self) -> bool:
        """The first hop is a DNS name: resolved when dialled."""
        return self.components[0].proto in DNS_PROTOS

    @property
    def peer_id(self) -> PeerId | None:
        """The peer this address reaches: its ``/p2p``, or for a circuit the one after ``/p2p-circuit``."""
        comps = self.components
        if self.is_circuit:
            last = comps[-1]
            return PeerId.from_bytes(last.value) if last.proto is Proto.P2P else None  # type: ignore[arg-type]
        return PeerId.from_bytes(comps[2].value) if len(comps) > 2 else None  # type: ignore[arg-type]

    @property
    def relay(self) -> PeerId | None:
        """For a circuit, the relay's peer id."""
        if not self.is_circuit:
            return None
        return PeerId.from_bytes(self.components[2].value)  # type: ignore[arg-type]

    def direct(self) -> Multiaddr | None:
        """The :class:`Multiaddr` to dial as it stands (an IP address, no circuit), else ``None``."""
        if self.dns or self.is_circuit:
            return None
        return Multiaddr(self.host, self.port, self.peer_id)


MAX_CIRCUIT_ADDRS = 2
"""Relay circuits one peer entry (a Hello, peer exchange, a shuffle) may name:
a private node keeps a reservation or two, and each relay address it names is
a dial we may make, so more is a peer asking us to spend dials for it."""


@dataclass(frozen=True)
class CircuitAddr:
    """Where a private peer is reached through a relay it reserved on:
    ``/ip4|ip6/<relay host>/tcp/<port>/p2p/<relay>/p2p-circuit[/p2p/<target>]``.

    It stands beside :class:`Multiaddr` wherever murmur keeps a peer's addresses
    (peer table, sampler, peer exchange), so it has the same small surface:
    ``host``/``port``/``family`` are the relay's (a subnet limit counts the
    relay's subnet: Sybils behind one relay are one subnet), ``peer_id`` is the
    target (dropped by :meth:`without_peer`, as a record's key names it)."""

    relay: Multiaddr  # the relay's TCP address, its /p2p/<id> required
    peer_id: PeerId | None = None  # the peer behind the relay

    is_circuit = True

    def __post_init__(self) -> None:
        if self.relay.peer_id is None:
            raise ValueError(f"circuit through {self.relay} needs the relay's /p2p/<id>")

    @property
    def host(self) -> str:
        return self.relay.host

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def family(self) -> str:
        return self.relay.family

    @classmethod
    def parse(cls, text: str) -> CircuitAddr:
        """``ValueError`` for anything but a circuit through an IP address (a DNS
        relay is resolved by whoever advertises it, never by us for a stranger)."""
        addr = DialAddr.parse(text)
        if not addr.is_circuit or addr.dns:
            raise ValueError(f"{text!r} is not a circuit through /ip4|ip6/…/tcp/…/p2p/<relay>")
        assert addr.relay is not None
        return cls(Multiaddr(addr.host, addr.port, addr.relay), addr.peer_id)

    def with_peer(self, peer_id: PeerId) -> CircuitAddr:
        return CircuitAddr(self.relay, peer_id)

    def without_peer(self) -> CircuitAddr:
        return CircuitAddr(self.relay, None)

    def to_dial(self) -> DialAddr:
        return DialAddr.parse(str(self))

    def __str__(self) -> str:
        base = f"{self.relay}/p2p-circuit"
        return f"{base}/p2p/{self.peer_id}" if self.peer_id else base


PeerAddr = Multiaddr | CircuitAddr
"""An address of another peer: direct TCP or through a relay."""


def parse_peer_addr(text: str) -> PeerAddr:
    """A direct address or a relay circuit (``ValueError`` for anything else)."""
    return CircuitAddr.parse(text) if "/p2p-circuit" in text else Multiaddr.parse(text)
