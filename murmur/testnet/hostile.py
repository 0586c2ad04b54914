"""Hostile peers for tests and benchmarks: the attacks a node must survive.

Every attacker here is a real peer on a real socket: a real TCP connection
(from any 127.x source address, so one machine can play many /24s), the real
libp2p upgrade (multistream-select, murmur's fast-path Noise handshake under a
fresh Ed25519 identity, its muxer), real encrypted records and real protocol
messages on real streams. What makes them hostile is only what they do with
that: never reading, squatting slots, linking and going silent, announcing
the largest legal record and stalling, flooding Hellos or requests. Each
attack runs until its ``stop`` event is set, with its rate and connection
count bounded by its arguments, and closes everything it opened.

Only ever aim these at nodes you started yourself on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from murmur.errors import NegotiationError
from murmur.protocol import multistream, murmux
from murmur.protocol.framing import FRAME_LENGTH, FRAME_OVERHEAD, HANDSHAKE_LENGTH, FrameDecoder, FrameEncoder, FrameType
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p.wire import FAST_SECURITY
from murmur.protocol.messages import (
    Hello,
    LearnerInfo,
    Link,
    Message,
    ModelRequest,
    MurmurProtocol,
    PeerExchangeRequest,
    encode,
    protocol_of,
)
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import Libp2pNoiseHandshake

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
FRAME_HEADER = FRAME_LENGTH  # a record's length prefix (see protocol.framing)
NEGOTIATION_READ = 1024


def attacker_host(subnet: int, host: int, base: int = 20) -> str:
    """Host ``host`` of attacker /24 number ``subnet``: 127.<base>.<subnet>.<host+1>,
    never the nodes' own 127.0.0.0/24."""
    return f"127.{base}.{subnet}.{host + 1}"


async def open_from(addr: Multiaddr, source: str = "127.0.0.1", rcvbuf: int | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to ``addr`` from ``source`` (optionally with a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (addr.host, addr.port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str) -> None:
    """multistream-select by hand, in the clear: propose ``protocol``, wait for the echo."""
    dialer = multistream.Dialer([protocol])
    writer.write(dialer.start())
    while not dialer.done:
        data = await reader.read(NEGOTIATION_READ)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        dialer.feed(data)
    if dialer.leftover:
        raise NegotiationError("bytes behind the echo before our handshake started")


async def noise_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: Libp2pNoiseHandshake,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> tuple[FrameEncoder, FrameDecoder]:
    """Drive murmur's fast-path handshake by hand over plain streams (after
    :func:`negotiate` chose it)."""
    outgoing = hs.start()
    while True:
        if outgoing is not None:
            writer.write(HANDSHAKE_LENGTH.pack(len(outgoing)) + outgoing)
            await writer.drain()
        if hs.complete:
            send, recv = hs.split()
            return FrameEncoder(send, max_frame), FrameDecoder(recv, max_frame)
        (length,) = HANDSHAKE_LENGTH.unpack(await reader.readexactly(HANDSHAKE_LENGTH.size))
        outgoing = hs.receive(await reader.readexactly(length))


async def read_record(reader: asyncio.StreamReader, dec: FrameDecoder) -> list:
    """The records one more length-prefixed record completes (usually one)."""
    header = await reader.readexactly(FRAME_LENGTH.size)
    (length,) = FRAME_LENGTH.unpack(header)
    return dec.feed(header + await reader.readexactly(length))


async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: Libp2pNoiseHandshake,
                  max_frame: int = DEFAULT_MAX_FRAME) -> tuple[FrameEncoder, FrameDecoder]:
    """The whole fast-path upgrade by hand: security negotiated, handshake,
    ``/murmur/mux/2.0.0`` negotiated on stream 0. Returns the record codec."""
    await negotiate(reader, writer, FAST_SECURITY)
    enc, dec = await noise_handshake(reader, writer, hs, max_frame)
    dialer = multistream.Dialer([murmux.PROTOCOL_ID])
    writer.write(bytes(enc.encode(FrameType.DATA, 0, dialer.start())))
    while not dialer.done:
        for frame in await read_record(reader, dec):
            if frame.type is not FrameType.DATA or frame.stream != 0:
                raise NegotiationError(f"{frame.type.name} record before the muxer was agreed")
            dialer.feed(frame.payload)
    return enc, dec


class RawPeer:
    """One upgraded connection driven by hand: records are written as the
    caller says; nothing is read unless the caller reads.

    Messages go on the stream of their protocol, opened (OPEN, then the
    multistream-select proposal) the first time one is sent and never
    waited for: the proposal, and the messages behind it, go out at once,
    as a pipelining libp2p dialler may send them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                 enc: FrameEncoder, dec: FrameDecoder | None = None) -> None:
        self.reader, self.writer, self.identity, self.enc, self.dec = reader, writer, identity, enc, dec
        self._streams: dict[str, int] = {}
        self._next_stream = 1  # the dialler opens odd stream ids

    @classmethod
    async def connect(cls, addr: Multiaddr, identity: Identity | None = None, source: str = "127.0.0.1",
                      rcvbuf: int | None = None, max_frame: int = DEFAULT_MAX_FRAME) -> RawPeer:
        reader, writer = await open_from(addr, source, rcvbuf)
        identity = identity or Identity.generate()
        try:
            hs = Libp2pNoiseHandshake(identity, initiator=True, expected=addr.peer_id)
            enc, dec = await upgrade(reader, writer, hs, max_frame)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, identity, enc, dec)

    def frame(self, ftype: FrameType, payload: bytes = b"", stream: int = 0, tail: bytes | None = None) -> bytes:
        """One record (two, given a ``tail``: a split DATA frame, the tail sealed alone)."""
        return bytes(self.enc.encode(ftype, stream, payload, tail=tail))

    def stream_for(self, protocol: str) -> tuple[int, bytes]:
        """Our stream for ``protocol``, and the records that open it if it is new."""
        stream = self._streams.get(protocol)
        if stream is not None:
            return stream, b""
        stream = self._streams[protocol] = self._next_stream
        self._next_stream += 2
        proposal = multistream.Dialer([protocol]).start()
        return stream, self.frame(FrameType.OPEN, stream=stream) + self.frame(FrameType.DATA, proposal, stream)

    def message(self, payload: bytes, protocol: str, tail: bytes | None = None) -> bytes:
        """Records that carry ``payload`` (and ``tail``, split) as one message of
        ``protocol`` (its stream opened if new)."""
        stream, opening = self.stream_for(protocol)
        return opening + self.frame(FrameType.DATA, payload, stream, tail)

    def frames(self, msg: Message) -> bytes:
        return self.message(encode(msg), protocol_of(type(msg)))

    async def send(self, messages: Sequence[Message]) -> None:
        for msg in messages:
            self.writer.write(self.frames(msg))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def write(self, data: bytes) -> None:
        """Raw bytes after the upgrade (a forged record header, say); never waits."""
        self.writer.write(data)

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    def close(self) -> None:
        self.writer.close()


def hello(round_: int = 0) -> Hello:
    return Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="hostile", round=round_, degree=1)


# ---------------------------------------------------------------- attacks


@dataclass
class AttackStats:
    """What an attack managed, for the bench's report."""

    name: str
    connects: int = 0
    failures: int = 0
    messages: int = 0
    errors: list[str] = field(default_factory=list)

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if len(self.errors) < 3:
            self.errors.append(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Target:
    """The victim: where it listens, and (for peers that claim its model) its LearnerInfo."""

    addr: Multiaddr
    learner_info: LearnerInfo | None = None


Attack = Callable[[Target, asyncio.Event], Awaitable[AttackStats]]


async def _until(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True once it is."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _top_up(peers: list[RawPeer], count: int, stats: AttackStats,
                  connect: Callable[[int], Awaitable[RawPeer]]) -> list[RawPeer]:
    """``peers`` without the ones the node dropped, refilled to ``count`` with
    ``connect(n)`` (n: connections made so far); stops at the first failure."""
    alive = [p for p in peers if not p.writer.is_closing() and not p.reader.at_eof()]
    while len(alive) < count:
        try:
            alive.append(await connect(stats.connects))
            stats.connects += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            stats.failed(exc)
            break
    return alive


def _claims(target: Target) -> list[Message]:
    info = target.learner_info
    out: list[Message] = [hello()]
    if info is not None:  # the victim's own fingerprint: looks like a learning peer
        out.append(LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0, initial=info.initial))
    return out


async def non_reader(target: Target, stop: asyncio.Event, connections: int = 4, interval_s: float = 0.01) -> AttackStats:
    """Authenticated peers that ask for peer lists (the node answers each)
    with a tiny receive buffer and never read: every answer piles up on
    the node's side of the socket."""
    stats = AttackStats("non_reader")
    peers: list[RawPeer] = []
    try:
        for _ in range(connections):
            try:
                peers.append(await RawPeer.connect(target.addr, rcvbuf=4096))
                stats.connects += 1
                await peers[-1].send([hello()])
            except (OSError, asyncio.IncompleteReadError) as exc:
                stats.failed(exc)
        while not await _until(stop, interval_s):
            for peer in list(peers):
                if peer.writer.is_closing():
                    peers.remove(peer)
                    continue
                peer.writer.write(peer.frames(PeerExchangeRequest(max_peers=32)))
                stats.messages += 1
    finally:
        for peer in peers:
            peer.close()
    return stats


async def half_open(target: Target, stop: asyncio.Event, subnets: int = 8, per_subnet: int = 8) -> AttackStats:
    """TCP connections from many /24s that never start the handshake, remade when dropped."""
    stats = AttackStats("half_open")
    held: list[asyncio.StreamWriter] = []
    try:
        while not stop.is_set():
            held = [w for w in held if not w.is_closing() and not w.transport.is_closing()]
            for subnet in range(subnets):
                for host in range(per_subnet):
                    if len(held) >= subnets * per_subnet:
                        break
                    try:
                        _, writer = await open_from(target.addr, attacker_host(subnet, host, base=30))
                        held.append(writer)
                        stats.connects += 1
                    except OSError as exc:
                        stats.failed(exc)
            if await _until(stop, 0.5):
                break
    finally:
        for writer in held:
            writer.close()
    return stats


async def squatters(target: Target, stop: asyncio.Event, count: int = 16, subnets: int = 8) -> AttackStats:
    """Authenticated identities from many /24s that say Hello, claim the
    victim's model, ask to be a learning neighbour, ping every 5 s and
    send nothing else: slots and neighbourship for free, if the node lets them."""
    stats = AttackStats("squatters")
    peers: list[RawPeer] = []

    async def connect(n: int) -> RawPeer:
        peer = await RawPeer.connect(target.addr, source=attacker_host(n % subnets, (n // subnets) % 250, base=40))
        await peer.send([*_claims(target), Link(active=1, degree=1)])
        return peer

    try:
        while not stop.is_set():
            peers = await _top_up(peers, count, stats, connect)
            for peer in peers:
                peer.write(peer.frame(FrameType.PING, b"x"))
            if await _until(stop, 5.0):
                break
    finally:
        for peer in peers:
            peer.close()
    return stats


async def big_headers(target: Target, stop: asyncio.Event, connections: int = 16,
                      max_frame: int = DEFAULT_MAX_FRAME) -> AttackStats:
    """Authenticated connections that announce the largest legal frame, send
    a few bytes of it and stall (remade when dropped)."""
    stats = AttackStats("big_headers")
    peers: list[RawPeer] = []

    async def connect(n: int) -> RawPeer:
        peer = await RawPeer.connect(target.addr, source=attacker_host(n % 8, (n // 8) % 250, base=50))
        peer.write(FRAME_HEADER.pack(max_frame + FRAME_OVERHEAD) + b"\0" * 64)  # the largest legal record
        return peer

    try:
        while not stop.is_set():
            peers = await _top_up(peers, connections, stats, connect)
            if await _until(stop, 1.0):
                break
    finally:
        for peer in peers:
            peer.close()
    return stats


async def hello_flood(target: Target, stop: asyncio.Event, per_second: float = 20.0) -> AttackStats:
    """Fresh identities that connect, say Hello and hang up: peer-table churn."""
    stats = AttackStats("hello_flood")
    while not await _until(stop, 1.0 / per_second):
        try:
            peer = await RawPeer.connect(target.addr, source=attacker_host(random.randrange(64), 0, base=60))
            await peer.send([hello()])
            stats.connects += 1
            stats.messages += 1
            await peer.hang_up()
        except (OSError, asyncio.IncompleteReadError) as exc:
            stats.failed(exc)
    return stats


async def requests(target: Target, stop: asyncio.Event, connections: int = 4, per_second: float = 50.0) -> AttackStats:
    """Peers that claim the victim's model and ask for its public model, and
    send malformed messages, over and over: upload and log volume for free."""
    stats = AttackStats("requests")
    peers: list[RawPeer] = []

    async def connect(n: int) -> RawPeer:  # dropped for the garbage: come back as someone new
        peer = await RawPeer.connect(target.addr, source=attacker_host(n % 64, 0, base=70))
        await peer.send(_claims(target))
        return peer

    try:
        while not await _until(stop, 1.0 / per_second):
            peers = await _top_up(peers, connections, stats, connect)
            for peer in peers:
                peer.write(peer.frames(ModelRequest(round=0)))
                peer.write(peer.message(b"\x93\x02\x7f\x80", MurmurProtocol.DELTA))  # an unknown message kind
                stats.messages += 2
    finally:
        for peer in peers:
            peer.close()
    return stats


async def resets(target: Target, stop: asyncio.Event, per_second: float = 20.0) -> AttackStats:
    """TCP connections reset (SO_LINGER 0) right after connecting."""
    stats = AttackStats("resets")
    while not await _until(stop, 1.0 / per_second):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (target.addr.host, target.addr.port))
            stats.connects += 1
        except OSError as exc:
            stats.failed(exc)
        finally:
            sock.close()
    return stats


ALL_ATTACKS: dict[str, Attack] = {
    "non_reader": non_reader,
    "half_open": half_open,
    "squatters": squatters,
    "big_headers": big_headers,
    "hello_flood": hello_flood,
    "requests": requests,
    "resets": resets,
}


async def run_attacks(target: Target, seconds: float, names: Sequence[str] = tuple(ALL_ATTACKS)) -> list[AttackStats]:
    """Every named attack at once for ``seconds``; their stats."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(ALL_ATTACKS[name](target, stop), name=f"attack-{name}") for name in names]
    await _until(stop, seconds)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    out = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            stats = AttackStats(name)
            stats.failed(result)
            out.append(stats)
        else:
            out.append(result)
    return out


__all__ = [
    "ALL_ATTACKS",
    "AttackStats",
    "RawPeer",
    "Target",
    "attacker_host",
    "negotiate",
    "noise_handshake",
    "open_from",
    "upgrade",
    "run_attacks",
]
