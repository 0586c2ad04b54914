"""Hostile peers against ONE running Node, from raw sockets and a hand-driven Noise handshake.

After every bad peer the same victim must still accept a fresh, well-behaved
Node and exchange gossip with it both ways: a fault costs the faulty peer,
never the node.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from murmur.errors import DecodeError, DecryptError, FrameError, FrameTooLarge, IdentityMismatch, TimeoutFault
from murmur.node.daemon import Node
from murmur.protocol.framing import FRAME_LENGTH, HANDSHAKE_LENGTH, FrameDecoder, FrameEncoder, FrameType
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import Gossip, Message, PeerExchangeResponse, ShuffleResponse, encode
from murmur.protocol.noise import Libp2pNoiseHandshake
from murmur.protocol.gossip import message_id
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed
from tests.integration.cluster import Cluster, wait_until
from murmur.testnet.hostile import noise_handshake
from tests.integration.test_transport import closed_within

HANDSHAKE_TIMEOUT_S = 0.5
IDLE_TIMEOUT_S = 1.5
FAST = {
    "transport.connect_timeout_s": 1.0,
    "transport.handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
    "transport.idle_timeout_s": IDLE_TIMEOUT_S,
    "transport.ping_interval_s": 0.3,
}
QUICK_CLOSE_S = 0.4  # under the handshake timeout: the node reacted, no timer fired
TOPIC = "probe"


class Victim:
    """The node under attack, plus what it delivered on the probe topic."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.node = cluster.node(0)
        self.delivered: list[bytes] = []
        self.node.subscribe(TOPIC, lambda _origin, payload: self.delivered.append(payload))
        self.good_rounds = 0

    def faults(self) -> dict[str, int]:
        return dict(self.node.status()["faults"])

    async def serves_good_peer(self) -> None:
        """A fresh honest Node connects and gossips with the victim both ways."""
        self.good_rounds += 1
        good = await self.cluster.add_node()
        got: list[bytes] = []
        good.subscribe(TOPIC, lambda _origin, payload: got.append(payload))
        try:
            await good.connect(self.node.addrs, self.node.peer_id)
            ping, pong = f"ping {self.good_rounds}".encode(), f"pong {self.good_rounds}".encode()
            await wait_until(lambda: self.node.session(good.peer_id) is not None, 2.0, "victim sees the good peer")
            assert await good.publish(TOPIC, ping) == 1
            await wait_until(lambda: ping in self.delivered, 2.0, "victim got the good peer's gossip")
            assert await self.node.publish(TOPIC, pong) >= 1
            await wait_until(lambda: got == [pong], 2.0, "good peer got the victim's gossip")
            assert self.node.table.score(good.peer_id) >= 0
        finally:
            await good.stop()


@pytest.fixture
async def victim(tmp_path: Path) -> AsyncIterator[Victim]:
    async with Cluster(1, tmp_path, overrides=FAST) as cluster:
        yield Victim(cluster)


class RawPeer:
    """A peer driven by hand over a plain socket: Noise by hand, frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                 enc: FrameEncoder, dec: FrameDecoder) -> None:
        self.reader, self.writer, self.identity, self.enc, self.dec = reader, writer, identity, enc, dec

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @classmethod
    async def connect(cls, node: Node) -> RawPeer:
        addr = node.addrs[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        identity = Identity.generate()
        hs = Libp2pNoiseHandshake(identity, initiator=True, expected=node.peer_id)
        enc, dec = await noise_handshake(reader, writer, hs, node.config.transport.max_frame)
        return cls(reader, writer, identity, enc, dec)

    def send(self, msg: Message) -> None:
        self.send_bytes(encode(msg))

    def send_bytes(self, plaintext: bytes) -> None:
        self.writer.write(bytes(self.enc.encode(FrameType.DATA, plaintext)))

    def gossip(self, payload: bytes) -> Gossip:
        mid = message_id(self.peer_id, int.from_bytes(os.urandom(4), "big"), TOPIC, payload)
        return Gossip(msg_id=mid, origin=self.peer_id, ttl=4, topic=TOPIC, payload=payload)

    def close(self) -> None:
        self.writer.close()


async def _victim_saw(victim: Victim, peer: PeerId, fault: type, before: dict[str, int]) -> None:
    """The victim penalised ``peer`` for exactly one ``fault`` and has no session with it."""
    name = fault.__name__
    await wait_until(lambda: victim.faults().get(name, 0) == before.get(name, 0) + 1, 2.0, f"{name} counted")
    assert victim.node.table.score(peer) < 0
    await wait_until(lambda: victim.node.session(peer) is None, 2.0, "faulty peer dropped")
    assert victim.node.metrics.value("murmur_peer_faults_total", type=name) == before.get(name, 0) + 1


# -- before any identity exists ------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "eof"),
    [
        (b"\xff\xff" + b"x" * 32, False),  # handshake length prefix over the cap
        (HANDSHAKE_LENGTH.pack(32) + b"\x01" * 10, True),  # truncated message 1, then EOF
        (os.urandom(300), False),  # garbage
        (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", False),  # the wrong protocol on the wrong port
    ],
    ids=["oversized-prefix", "truncated", "garbage", "http"],
)
async def test_garbage_before_handshake(victim: Victim, wire: bytes, eof: bool) -> None:
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    writer.write(wire)
    if eof:
        writer.write_eof()
    await closed_within(reader, QUICK_CLOSE_S)
    writer.close()
    assert victim.node.sessions() == []
    assert victim.faults() == {}  # nobody to blame: no identity was proved
    await victim.serves_good_peer()


async def test_wrong_identity_both_directions(victim: Victim) -> None:
    # Inbound: a client that expects somebody else aborts before proving itself.
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    impostor_target = Identity.generate().peer_id
    with pytest.raises(IdentityMismatch):
        await noise_handshake(reader, writer, Libp2pNoiseHandshake(Identity.generate(), True, expected=impostor_target))
    writer.close()
    await wait_until(lambda: not victim.node.transport._protocols, 2.0, "half-done handshake cleaned up")
    assert victim.node.sessions() == []
    await victim.serves_good_peer()

    # Outbound: the victim dials an address whose owner is not the peer it asked for.
    other = await victim.cluster.add_node()
    wanted = Identity.generate().peer_id
    with pytest.raises(IdentityMismatch):
        await victim.node.connect(other.addrs, wanted)
    assert victim.node.session(wanted) is None and victim.node.session(other.peer_id) is None
    await other.stop()
    await victim.serves_good_peer()


# -- inside an authenticated session ----------------------------------------------------

BadFrame = Callable[[RawPeer], bytes]


@pytest.mark.parametrize(
    ("make", "eof", "fault"),
    [
        (lambda p: bytes(p.enc.encode(FrameType.DATA, b"z" * 64))[:-9], True, FrameError),  # truncated frame
        (lambda p: FRAME_LENGTH.pack(0x7FFF_FFFF) + b"x" * 16, False, FrameTooLarge),  # oversized length prefix
        (lambda p: FRAME_LENGTH.pack(48) + os.urandom(48), False, DecryptError),  # garbage ciphertext
        (lambda p: bytes(p.enc.encode(FrameType.DATA, b"\xc1garbage msgpack")), False, DecodeError),
        (lambda p: bytes(p.enc.encode(FrameType.DATA, encode(p.gossip(b"")).replace(b"probe", b"prob\xff"))),
         False, DecodeError),  # well-formed msgpack, invalid UTF-8 topic
    ],
    ids=["truncated-frame", "oversized-frame", "bad-aead", "undecodable", "bad-utf8"],
)
async def test_bad_frames_in_session(victim: Victim, make: BadFrame, eof: bool, fault: type) -> None:
    before = victim.faults()
    peer = await RawPeer.connect(victim.node)
    peer.send(peer.gossip(b"good before bad"))  # a valid message first: it must be processed
    await wait_until(lambda: b"good before bad" in victim.delivered, 2.0, "the good message")
    peer.writer.write(make(peer))
    if eof:
        peer.writer.write_eof()
    await closed_within(peer.reader, QUICK_CLOSE_S)
    peer.close()
    await _victim_saw(victim, peer.peer_id, fault, before)
    await victim.serves_good_peer()


async def test_slowloris_half_open_connections_are_cut(victim: Victim) -> None:
    """More half-open TCP connections than one subnet may hold, each stuck in
    (or dribbling) the handshake: all are cut by the handshake timeout, and
    the slots they held are free again for an honest peer."""
    limit = victim.node.config.transport.max_inbound_per_subnet
    addr = victim.node.addrs[0]
    conns = [await asyncio.open_connection(addr.host, addr.port) for _ in range(limit + 4)]
    for i, (_reader, writer) in enumerate(conns):
        if i % 2:
            writer.write(HANDSHAKE_LENGTH.pack(32) + b"\x01")  # one byte of message 1, never the rest
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(closed_within(r, HANDSHAKE_TIMEOUT_S + 1.5) for r, _w in conns))
    took = asyncio.get_running_loop().time() - started
    assert took < HANDSHAKE_TIMEOUT_S + 1.5
    for _r, writer in conns:
        writer.close()
    await wait_until(lambda: not victim.node.transport._protocols, 2.0, "no half-open connection left")
    await victim.serves_good_peer()


async def test_dribbling_authenticated_peer_is_cut_by_idle_timeout(victim: Victim) -> None:
    """Bytes that never complete a frame are not activity: the idle timeout cuts the peer."""
    before = victim.faults()
    peer = await RawPeer.connect(victim.node)
    frame = bytes(peer.enc.encode(FrameType.DATA, encode(peer.gossip(b"slow"))))

    async def dribble() -> None:
        for byte in frame[:-1]:
            peer.writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(dribble())
    try:
        await closed_within(peer.reader, IDLE_TIMEOUT_S + 1.5)
    finally:
        task.cancel()
        peer.close()
    await _victim_saw(victim, peer.peer_id, TimeoutFault, before)
    await victim.serves_good_peer()


async def test_unsolicited_responses_are_penalised_not_dropped(victim: Victim) -> None:
    before = victim.faults()
    peer = await RawPeer.connect(victim.node)
    peer.send(ShuffleResponse(entries=()))
    peer.send(PeerExchangeResponse(peers=()))
    await wait_until(lambda: victim.faults().get("LimitExceeded", 0) == before.get("LimitExceeded", 0) + 2,
                     2.0, "two LimitExceeded")
    assert victim.node.table.score(peer.peer_id) < 0
    # Still connected: the same session delivers a gossip message afterwards.
    peer.send(peer.gossip(b"still here"))
    await wait_until(lambda: b"still here" in victim.delivered, 2.0, "gossip after the penalties")
    assert victim.node.session(peer.peer_id) is not None
    await victim.serves_good_peer()
    peer.close()


async def test_repeated_small_faults_end_in_a_ban_and_a_drop(victim: Victim) -> None:
    """Non-dropping faults add up: once the score passes the ban threshold the
    peer is disconnected and its reconnection is refused."""
    peer = await RawPeer.connect(victim.node)
    fake_addr = Multiaddr("127.0.0.1", 9, None)
    assert victim.node.sampler.add(peer.peer_id, [fake_addr])  # as if it had been learnt by a shuffle
    threshold = victim.node.table.config.ban_threshold
    penalty = 5  # LimitExceeded
    needed = int(-threshold // penalty) + 2
    for _ in range(needed):
        peer.send(ShuffleResponse(entries=()))
    await wait_until(lambda: victim.node.table.is_banned(peer.peer_id), 2.0, "banned")
    await closed_within(peer.reader, QUICK_CLOSE_S)  # well before the idle timeout could do it
    peer.close()
    assert "TimeoutFault" not in victim.faults()
    assert peer.peer_id not in victim.node.sampler, "a banned peer stays out of the Cyclon view"
    with pytest.raises(ConnectionClosed):
        await victim.node.connect([fake_addr], peer.peer_id)  # and is never dialled
    assert victim.node.session(peer.peer_id) is None
    # A banned identity that comes back is turned away at once.
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    await noise_handshake(reader, writer, Libp2pNoiseHandshake(peer.identity, True, expected=victim.node.peer_id))
    await closed_within(reader, QUICK_CLOSE_S)
    writer.close()
    assert victim.node.session(peer.peer_id) is None
    await victim.serves_good_peer()


async def test_cancelled_dial_fails_its_co_waiters_cleanly(victim: Victim) -> None:
    """A peer that accepts TCP and never answers the handshake. Two tasks wait
    for the same dial; cancelling the one that started it must give the other
    an ordinary ConnectionClosed, not a CancelledError (which would silently end
    a periodic task such as the shuffle)."""
    silent_peer = Identity.generate().peer_id
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    addrs = [Multiaddr("127.0.0.1", port, None)]
    try:
        first = asyncio.create_task(victim.node.connect(addrs, silent_peer))
        await wait_until(lambda: silent_peer in victim.node._dials, 2.0, "dial in flight")
        second = asyncio.create_task(victim.node.connect(addrs, silent_peer))
        await asyncio.sleep(0)  # let the second caller join the shared dial
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(ConnectionClosed):
            await second
        assert not second.cancelled()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    await victim.serves_good_peer()
