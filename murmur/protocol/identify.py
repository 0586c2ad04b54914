"""libp2p identify (``/ipfs/id/1.0.0``, ``/ipfs/id/push/1.0.0``) and ping
(``/ipfs/ping/1.0.0``) messages, sans-IO.

Identify: the answering side writes one ``Identify`` protobuf, prefixed with
its uvarint length as go-, js- and py-libp2p do, and closes the stream; a
push is the same message sent unasked. It says which protocols the peer
speaks, where it listens, how it saw our address (``observed_addr``: the
NAT-traversal work starts from there), its agent and protocol version, and
its public key, which must be the key of the peer the connection proved.

Reading is bounded (:data:`MAX_IDENTIFY_BYTES`, at most
:data:`MAX_PROTOCOLS` protocol ids and :data:`MAX_ADDRS` addresses kept);
an address murmur cannot parse is skipped, not fatal, since peers speak
transports we do not. A malformed message is a
:class:`~murmur.errors.DecodeError`, a key of another peer an
:class:`~murmur.errors.IdentityMismatch`.

Ping: the dialler writes 32 random bytes, the listener echoes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from murmur.errors import DecodeError, IdentityMismatch
from murmur.protocol import pb, uvarint
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import AnyMultiaddr
from murmur.protocol.noise import HandshakeError, decode_public_key, encode_public_key

IDENTIFY = "/ipfs/id/1.0.0"
IDENTIFY_PUSH = "/ipfs/id/push/1.0.0"
PING = "/ipfs/ping/1.0.0"
PING_SIZE = 32
MAX_IDENTIFY_BYTES = 64 * 1024
MAX_PROTOCOLS = 256
MAX_PROTOCOL_ID = 1024
MAX_ADDRS = 64
MAX_TEXT = 1024  # agent and protocol version


@dataclass(frozen=True)
class IdentifyInfo:
    """What one identify message said (``None``/empty: the field was absent, as a push may leave it)."""

    protocol_version: str | None = None
    agent_version: str | None = None
    public_key: bytes | None = None  # libp2p PublicKey protobuf
    listen_addrs: tuple[AnyMultiaddr, ...] = ()
    observed_addr: AnyMultiaddr | None = None
    protocols: tuple[str, ...] = ()
    has_protocols: bool = False  # a push without protocols keeps the ones known
    has_listen_addrs: bool = False
    skipped_addrs: int = 0  # addresses we could not parse

    def encode(self) -> bytes:
        """The message with its uvarint length prefix, as written on the stream."""
        msg = pb.Identify(
            listenAddrs=[a.to_bytes() for a in self.listen_addrs],
            protocols=list(self.protocols),
        )
        if self.protocol_version is not None:
            msg.protocolVersion = self.protocol_version
        if self.agent_version is not None:
            msg.agentVersion = self.agent_version
        if self.public_key is not None:
            msg.publicKey = self.public_key
        if self.observed_addr is not None:
            msg.observedAddr = self.observed_addr.to_bytes()
        body = pb.serialize(msg)
        return uvarint.encode(len(body)) + body

    def peer_id(self) -> PeerId | None:
        """The peer the public key names (Ed25519 keys only), else ``None``."""
        if self.public_key is None:
            return None
        try:
            return PeerId.from_public_key(decode_public_key(self.public_key))
        except HandshakeError:
            return None

    def merged(self, push: IdentifyInfo) -> IdentifyInfo:
        """This information updated by a push: fields the push left out stay."""
        return IdentifyInfo(
            protocol_version=push.protocol_version if push.protocol_version is not None else self.protocol_version,
            agent_version=push.agent_version if push.agent_version is not None else self.agent_version,
            public_key=push.public_key if push.public_key is not None else self.public_key,
            listen_addrs=push.listen_addrs if push.has_listen_addrs else self.listen_addrs,
            observed_addr=push.observed_addr if push.observed_addr is not None else self.observed_addr,
            protocols=push.protocols if push.has_protocols else self.protocols,
            has_protocols=self.has_protocols or push.has_protocols,
            has_listen_addrs=self.has_listen_addrs or push.has_listen_addrs,
            skipped_addrs=push.skipped_addrs,
        )


def make_identify(
    public_key_ed25519: bytes,
    protocols: Sequence[str],
    listen_addrs: Sequence[AnyMultiaddr],
    observed_addr: AnyMultiaddr | None,
    agent_version: str,
    protocol_version: str,
) -> IdentifyInfo:
    return IdentifyInfo(
        protocol_version=protocol_version,
        agent_version=agent_version,
        public_key=encode_public_key(public_key_ed25519),
        listen_addrs=tuple(listen_addrs),
        observed_addr=observed_addr,
        protocols=tuple(protocols),
        has_protocols=True,
        has_listen_addrs=True,
    )


def identify_length(prefix: bytes | bytearray) -> tuple[int, int] | None:
    """``(body length, prefix length)`` once the uvarint prefix is complete; the bound is checked here."""
    got = uvarint.decode_partial(prefix, 0, DecodeError)
    if got is None:
        return None
    length, used = got
    if length > MAX_IDENTIFY_BYTES:
        raise DecodeError(f"identify message of {length} bytes exceeds {MAX_IDENTIFY_BYTES}")
    return length, used


def _addr(raw: bytes) -> AnyMultiaddr | None:
    try:
        return AnyMultiaddr.from_bytes(raw)
    except ValueError:
        return None


def decode_identify(body: bytes, expected: PeerId | None = None) -> IdentifyInfo:
    """Parse an identify message body (without its length prefix)."""
    if len(body) > MAX_IDENTIFY_BYTES:
        raise DecodeError(f"identify message of {len(body)} bytes exceeds {MAX_IDENTIFY_BYTES}")
    msg = pb.parse(pb.Identify, body, DecodeError, "identify message")
    if len(msg.protocols) > MAX_PROTOCOLS or len(msg.listenAddrs) > MAX_ADDRS:
        raise DecodeError(f"identify lists {len(msg.protocols)} protocols and {len(msg.listenAddrs)} addresses")
    protocols = tuple(pb.text(p, DecodeError, "a protocol id") for p in msg.protocols)
    if any(not p or len(p) > MAX_PROTOCOL_ID or "\n" in p for p in protocols):
        raise DecodeError("identify lists an invalid protocol id")
    addrs = [_addr(bytes(raw)) for raw in msg.listenAddrs]
    observed = _addr(bytes(msg.observedAddr)) if msg.HasField("observedAddr") and msg.observedAddr else None

    def text(name: str) -> str | None:
        if not msg.HasField(name):
            return None
        value = pb.text(getattr(msg, name), DecodeError, name)
        return value[:MAX_TEXT]

    info = IdentifyInfo(
        protocol_version=text("protocolVersion"),
        agent_version=text("agentVersion"),
        public_key=bytes(msg.publicKey) if msg.HasField("publicKey") else None,
        listen_addrs=tuple(a for a in addrs if a is not None),
        observed_addr=observed,
        protocols=protocols,
        has_protocols=bool(protocols),
        has_listen_addrs=bool(msg.listenAddrs),
        skipped_addrs=sum(a is None for a in addrs),
    )
    if expected is not None and info.public_key is not None and info.peer_id() != expected:
        raise IdentityMismatch(f"identify carries another peer's key than {expected.short()}'s")
    return info
