"""Hostile peers against ONE running Node, from raw sockets and a hand-driven upgrade
(multistream-select, murmur's fast-path handshake, its muxer).

After every bad peer the same victim must still accept a fresh, well-behaved
Node and exchange gossip with it both ways: a fault costs the faulty peer,
never the node.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from murmur.errors import (
    DecodeError,
    DecryptError,
    FrameError,
    FrameTooLarge,
    IdentityMismatch,
    MuxerError,
    TimeoutFault,
)
from murmur.node.daemon import Node
from murmur.protocol import multistream
from murmur.protocol.framing import FRAME_LENGTH, HANDSHAKE_LENGTH, FrameType
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p.wire import FAST_SECURITY
from murmur.protocol.messages import (
    Gossip,
    Hello,
    Message,
    MurmurProtocol,
    PeerExchangeResponse,
    SchemaError,
    ShuffleRequest,
    ShuffleResponse,
    encode,
)
from murmur.protocol.noise import Libp2pNoiseHandshake
from murmur.protocol.gossip import message_id
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed
from tests.integration.cluster import Cluster, wait_until
from murmur.testnet import hostile
from murmur.testnet.hostile import negotiate, upgrade
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


class RawPeer(hostile.RawPeer):
    """A peer driven by hand over a plain socket: the upgrade by hand, records by hand."""

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @classmethod
    async def to(cls, node: Node) -> RawPeer:
        peer = await hostile.RawPeer.connect(node.addrs[0], max_frame=node.config.transport.max_frame)
        return cls(peer.reader, peer.writer, peer.identity, peer.enc, peer.dec)

    def push(self, msg: Message) -> None:
        """One message on its protocol's stream (opened first if new), without waiting."""
        self.writer.write(self.frames(msg))

    def push_bytes(self, payload: bytes, protocol: str = MurmurProtocol.GOSSIP) -> None:
        self.writer.write(self.message(payload, protocol))

    def gossip(self, payload: bytes) -> Gossip:
        mid = message_id(self.peer_id, int.from_bytes(os.urandom(4), "big"), TOPIC, payload)
        return Gossip(msg_id=mid, origin=self.peer_id, ttl=4, topic=TOPIC, payload=payload)


async def _victim_saw(victim: Victim, peer: PeerId, fault: type, before: dict[str, int]) -> None:
    """The victim penalised ``peer`` for exactly one ``fault`` and has no session with it."""
    name = fault.__name__
    await wait_until(lambda: victim.faults().get(name, 0) == before.get(name, 0) + 1, 2.0, f"{name} counted")
    assert victim.node.table.score(peer) < 0
    await wait_until(lambda: victim.node.session(peer) is None, 2.0, "faulty peer dropped")
    assert victim.node.metrics.value("murmur_peer_faults_total", type=name) == before.get(name, 0) + 1


# -- before any identity exists ------------------------------------------------------


GARBAGE = [
    (b"\xff\xff" + b"x" * 32, False),  # a length prefix over the cap
    (HANDSHAKE_LENGTH.pack(32) + b"\x01" * 10, True),  # truncated, then EOF
    # garbage whose prefix declares exactly what follows: a random prefix falls
    # between 298 and the 1024 cap in ~1% of runs, and then the victim rightly
    # waits for the rest of the message until the handshake timeout
    (HANDSHAKE_LENGTH.pack(298) + os.urandom(298), False),
    (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", False),  # the wrong protocol on the wrong port
]


@pytest.mark.parametrize("negotiated", [False, True], ids=["before-negotiation", "in-handshake"])
@pytest.mark.parametrize(("wire", "eof"), GARBAGE, ids=["oversized-prefix", "truncated", "garbage", "http"])
async def test_garbage_before_handshake(victim: Victim, wire: bytes, eof: bool, negotiated: bool) -> None:
    """In the clear, where multistream-select is to choose the security protocol,
    and after murmur's fast path was chosen, where the handshake is to begin."""
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    if negotiated:
        await negotiate(reader, writer, FAST_SECURITY)
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
        await upgrade(reader, writer, Libp2pNoiseHandshake(Identity.generate(), True, expected=impostor_target))
    writer.close()
    await wait_until(lambda: not victim.node.host._wires, 2.0, "half-done handshake cleaned up")
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
        (lambda p: p.frame(FrameType.DATA, b"z" * 64, 1)[:-9], True, FrameError),  # truncated record
        (lambda p: FRAME_LENGTH.pack(0x7FFF_FFFF) + b"x" * 16, False, FrameTooLarge),  # oversized length prefix
        (lambda p: FRAME_LENGTH.pack(48) + os.urandom(48), False, DecryptError),  # garbage ciphertext
        (lambda p: p.message(b"\xc1garbage msgpack", MurmurProtocol.GOSSIP), False, DecodeError),
        (lambda p: p.message(encode(p.gossip(b"")).replace(b"probe", b"prob\xff"), MurmurProtocol.GOSSIP),
         False, DecodeError),  # well-formed msgpack, invalid UTF-8 topic
        (lambda p: p.frame(FrameType.DATA, b"x", 99), False, MuxerError),  # a stream never opened
        (lambda p: p.frame(FrameType.OPEN, stream=4), False, MuxerError),  # the victim's parity
        (lambda p: p.frame(FrameType.SPLIT, b"head", 1), True, FrameError),  # a split frame's head, no tail
        (lambda p: p.message(encode(p.gossip(b"g")), MurmurProtocol.GOSSIP, tail=b"t" * 100), False,
         SchemaError),  # a kind with no tail, split
    ],
    ids=["truncated-frame", "oversized-frame", "bad-aead", "undecodable", "bad-utf8", "unknown-stream",
         "wrong-parity", "head-without-tail", "split-untailed-kind"],
)
async def test_bad_frames_in_session(victim: Victim, make: BadFrame, eof: bool, fault: type) -> None:
    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    peer.push(peer.gossip(b"good before bad"))  # a valid message first: it must be processed
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
            writer.write(multistream.Dialer([FAST_SECURITY]).start()[:5])  # a proposal that never completes
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(closed_within(r, HANDSHAKE_TIMEOUT_S + 1.5) for r, _w in conns))
    took = asyncio.get_running_loop().time() - started
    assert took < HANDSHAKE_TIMEOUT_S + 1.5
    for _r, writer in conns:
        writer.close()
    await wait_until(lambda: not victim.node.host._wires, 2.0, "no half-open connection left")
    await victim.serves_good_peer()


async def test_dribbling_authenticated_peer_is_cut_by_idle_timeout(victim: Victim) -> None:
    """Bytes that never complete a frame are not activity: the idle timeout cuts the peer."""
    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    stream, opening = peer.stream_for(MurmurProtocol.GOSSIP)
    peer.write(opening)  # a stream opened at once: only the message record dribbles
    frame = peer.frame(FrameType.DATA, encode(peer.gossip(b"slow")), stream)

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
    peer = await RawPeer.to(victim.node)
    peer.push(ShuffleResponse(entries=()))
    peer.push(PeerExchangeResponse(peers=()))
    await wait_until(lambda: victim.faults().get("LimitExceeded", 0) == before.get("LimitExceeded", 0) + 2,
                     2.0, "two LimitExceeded")
    assert victim.node.table.score(peer.peer_id) < 0
    # Still connected: the same session delivers a gossip message afterwards.
    peer.push(peer.gossip(b"still here"))
    await wait_until(lambda: b"still here" in victim.delivered, 2.0, "gossip after the penalties")
    assert victim.node.session(peer.peer_id) is not None
    await victim.serves_good_peer()
    peer.close()


async def test_gossip_beyond_its_budget_is_penalised_and_not_forwarded(victim: Victim) -> None:
    """Every gossip message is forwarded to every session: unmetered, one
    peer's 19 MiB of fresh ids made 324 MiB across five nodes, at no cost
    to it. Past its budget a peer's gossip is dropped and charged."""
    from murmur.node.daemon import GOSSIP_BURST, GOSSIP_UNIT_BYTES

    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    big = GOSSIP_UNIT_BYTES * 8  # costs 9 units
    sent = 3 * (GOSSIP_BURST // 9)  # three bursts' worth, at once
    for i in range(sent):
        peer.push(peer.gossip(bytes([i]) * big))
    await wait_until(lambda: len(victim.delivered) + victim.faults().get("LimitExceeded", 0)
                     - before.get("LimitExceeded", 0) == sent, 5.0, "every message read")
    assert GOSSIP_BURST // 9 <= len(victim.delivered) < sent  # the burst (and what refilled meanwhile), not all
    assert victim.node.table.score(peer.peer_id) < 0
    await victim.serves_good_peer()
    peer.close()


async def test_answers_to_overlapping_shuffles_are_solicited(victim: Victim, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer re-learnt from a third node's shuffle may be shuffled with again
    before it answered the first request (a node busy with a big model answers
    late); every answer is a reply, not a fault (seen as a LimitExceeded in a
    3.2 M-parameter testnet of three honest nodes)."""
    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    await wait_until(lambda: victim.node.session(peer.peer_id) is not None, 2.0, "victim sees the raw peer")
    session = victim.node.session(peer.peer_id)
    assert session is not None
    sent: list[Message] = []

    async def taken(msg: Message, deadline: float | None = None) -> None:
        sent.append(msg)

    # A hand-driven peer answers no stream negotiation, so the victim's own
    # shuffle stream to it would time out (a TimeoutFault, the peer marked
    # failed): its requests are taken as sent here; the answers are real frames.
    monkeypatch.setattr(session, "send", taken)
    sampler = victim.node.sampler
    requests = 0  # shuffles the victim started with the raw peer (its periodic ones included)
    start = sampler.start_shuffle

    def counted() -> Any:
        nonlocal requests
        started = start()
        requests += started is not None and started[0].peer == peer.peer_id
        return started

    monkeypatch.setattr(sampler, "start_shuffle", counted)
    for _ in range(10):  # bounded: the view holds the raw peer only, so each shuffle is with it
        if requests >= 2:
            break
        sampler.add(peer.peer_id, [Multiaddr("127.0.0.1", 9, None)])  # as a third node's shuffle would
        await victim.node.membership.shuffle()
    assert requests >= 2 and sum(isinstance(m, ShuffleRequest) for m in sent) == requests
    for _ in range(requests):
        peer.push(ShuffleResponse(entries=()))
    peer.push(peer.gossip(b"after the answers"))  # handled after every response
    await wait_until(lambda: b"after the answers" in victim.delivered, 2.0, "gossip after the answers")
    assert victim.faults() == before
    peer.close()


async def test_repeated_small_faults_end_in_a_ban_and_a_drop(victim: Victim) -> None:
    """Non-dropping faults add up: once the score passes the ban threshold the
    peer is disconnected and its reconnection is refused."""
    peer = await RawPeer.to(victim.node)
    fake_addr = Multiaddr("127.0.0.1", 9, None)
    assert victim.node.sampler.add(peer.peer_id, [fake_addr])  # as if it had been learnt by a shuffle
    threshold = victim.node.table.config.ban_threshold
    penalty = 5  # LimitExceeded
    needed = int(-threshold // penalty) + 2
    for _ in range(needed):
        peer.push(ShuffleResponse(entries=()))
    await wait_until(lambda: victim.node.table.is_banned(peer.peer_id), 2.0, "banned")
    await closed_within(peer.reader, QUICK_CLOSE_S)  # well before the idle timeout could do it
    peer.close()
    assert "TimeoutFault" not in victim.faults()
    assert peer.peer_id not in victim.node.sampler, "a banned peer stays out of the Cyclon view"
    shown = {p["peer_id"]: p for p in victim.node.peers()}[str(peer.peer_id)]  # murmur peers says so
    assert 0 < shown["banned_for_s"] <= victim.node.table.config.ban_duration_s
    with pytest.raises(ConnectionClosed):
        await victim.node.connect([fake_addr], peer.peer_id)  # and is never dialled
    assert victim.node.session(peer.peer_id) is None
    # A banned identity that comes back is turned away at once.
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    await upgrade(reader, writer, Libp2pNoiseHandshake(peer.identity, True, expected=victim.node.peer_id))
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


async def test_a_message_on_another_protocols_stream_is_a_schema_error(victim: Victim) -> None:
    """Each kind has its protocol's stream: a Hello on the gossip stream is refused
    (the victim drops the peer for it), after the good gossip before it was delivered."""
    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    peer.push(peer.gossip(b"on the right stream"))
    await wait_until(lambda: b"on the right stream" in victim.delivered, 2.0, "the good message")
    peer.push_bytes(encode(Hello(listen_addrs=(), agent="misplaced", round=0, degree=1)), MurmurProtocol.GOSSIP)
    await closed_within(peer.reader, QUICK_CLOSE_S)
    peer.close()
    await _victim_saw(victim, peer.peer_id, SchemaError, before)
    await victim.serves_good_peer()


async def test_streams_of_unknown_protocols_get_na_and_the_peer_stays(victim: Victim) -> None:
    """A stream for a protocol the node does not speak is refused with ``na``
    (no penalty: not speaking a protocol is no fault); the connection carries on."""
    peer = await RawPeer.to(victim.node)
    assert peer.dec is not None
    peer.write(peer.message(b"ignored", "/someone-else/1.0.0"))
    header, na = multistream.encode_message(multistream.PROTOCOL_ID), multistream.encode_message(multistream.NA)
    answer = b""
    while na not in answer:  # the victim's own streams (Hello, identify) interleave: pick stream 1's records
        for frame in await hostile.read_record(peer.reader, peer.dec):
            if frame.stream == 1 and frame.type is FrameType.DATA:
                answer += frame.payload
    assert answer == header + na
    peer.push(peer.gossip(b"still welcome"))
    await wait_until(lambda: b"still welcome" in victim.delivered, 2.0, "gossip after the refusal")
    assert victim.faults() == {} and victim.node.session(peer.peer_id) is not None
    peer.close()
    await victim.serves_good_peer()


RELAY = Identity.generate().peer_id
CIRCUIT = f"/ip4/198.18.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit"


@pytest.mark.parametrize("addrs, fault", [
    ((f"/dns4/relay.example/tcp/4001/p2p/{RELAY}/p2p-circuit",), "DecodeError"),  # we resolve nothing for strangers
    (("/ip4/198.18.0.1/tcp/4001/p2p-circuit",), "DecodeError"),  # no relay named
    ((f"{CIRCUIT}/p2p-circuit",), "DecodeError"),
    ((f"{CIRCUIT}/p2p/{Identity.generate().peer_id}",), "DecodeError"),  # a circuit to someone else
    (tuple(f"/ip4/198.18.0.{i}/tcp/4001/p2p/{Identity.generate().peer_id}/p2p-circuit" for i in range(3)),
     "LimitExceeded"),  # more circuits than a private node holds reservations
])
async def test_garbage_circuits_in_hello_are_typed_faults(victim: Victim, addrs: tuple[str, ...], fault: str) -> None:
    before = victim.faults()
    peer = await RawPeer.to(victim.node)
    peer.push(Hello(listen_addrs=addrs, agent="circuits", round=0, degree=1))
    await wait_until(lambda: victim.faults().get(fault, 0) > before.get(fault, 0), 2.0, fault)
    record = victim.node.table.get(peer.peer_id)
    assert record is None or not any(a.is_circuit for a in record.addrs)
    peer.close()
    await victim.serves_good_peer()


async def test_a_circuit_in_hello_is_kept_beside_the_observed_address(victim: Victim) -> None:
    peer = await RawPeer.to(victim.node)
    peer.push(Hello(listen_addrs=("/ip4/10.1.2.3/tcp/4001", f"{CIRCUIT}/p2p/{peer.peer_id}"), agent="private",
                    round=0, degree=1))
    await wait_until(lambda: victim.node.table.get(peer.peer_id) is not None
                     and len(victim.node.table.get(peer.peer_id).addrs) == 2, 2.0, "Hello handled")  # type: ignore[union-attr]
    assert [str(a) for a in victim.node.table.get(peer.peer_id).addrs] == [  # type: ignore[union-attr]
        "/ip4/127.0.0.1/tcp/4001", CIRCUIT]  # the direct one where we saw it, the circuit as named
    peer.close()
