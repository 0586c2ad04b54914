"""Two libp2p hosts over real TCP on 127.0.0.1: the upgrade, streams, identify,
ping, and hostile peers that get typed faults while a good peer is served.

Every test that does not poke one muxer's internals runs on both paths:
murmur's fast path (``/murmur/noise-fast/2.0.0`` + ``/murmur/mux/2.0.0``,
what two murmur hosts agree on) and the standard one (``/noise`` +
``/yamux/1.0.0``, with ``fast_path`` off)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import pytest

from murmur.errors import DecryptError, LimitExceeded, MuxerError, NegotiationError, NoCommonProtocol, PeerFault, StreamRefused
from murmur.protocol import multistream
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import (
    ConnectionClosed,
    FastConnection,
    Libp2pConnection,
    Libp2pHost,
    StreamResetError,
    YamuxConnection,
    echo_handler,
)
from murmur.protocol.identify import IDENTIFY_PUSH, PING, PING_SIZE, IdentifyInfo
from murmur.protocol.libp2p.host import MAX_OBSERVED_ADDRS, PING_BURST, HostConfig
from murmur.protocol.multiaddr import AnyMultiaddr
from murmur.protocol.framing import SPLIT_MIN_TAIL
from murmur.protocol.framing import FrameType as RecordType
from murmur.protocol.transport import TransportLimits
from murmur.protocol.yamux import HEADER, FrameType, StreamError
from murmur.testnet.hostile import RawPeer
from tests.integration.cluster import wait_until

ECHO = "/murmur-test/echo/1.0.0"
WHOLE = "/murmur-test/whole/1.0.0"
PARTS = "/murmur-test/parts/1.0.0"
MIB = 1024 * 1024
PATHS = {"fast": FastConnection, "standard": YamuxConnection}


def config(path: str = "fast", **limits) -> HostConfig:  # type: ignore[no-untyped-def]
    return HostConfig(limits=TransportLimits(fast_path=path == "fast", **limits))


paths = pytest.mark.parametrize("path", list(PATHS))


class Faults:
    def __init__(self) -> None:
        self.seen: list[PeerFault] = []

    def __call__(self, peer: object, fault: PeerFault) -> None:
        self.seen.append(fault)

    def of(self, kind: type[PeerFault]) -> list[PeerFault]:
        return [f for f in self.seen if isinstance(f, kind)]


async def _pair(server_config: HostConfig = HostConfig(), path: str = "fast",  # type: ignore[no-untyped-def]
                sink: bool = True):
    faults = Faults()
    server = Libp2pHost(Identity.generate(), server_config, on_fault=faults if sink else None)
    server.set_handler(ECHO, echo_handler)
    client = Libp2pHost(Identity.generate(), config(path))
    client.set_handler(ECHO, echo_handler)
    addrs = await server.listen("127.0.0.1", 0)
    conn = await client.dial(addrs[0])
    assert type(conn) is PATHS[path]
    return server, client, conn, faults, addrs[0]


async def _echo(conn: Libp2pConnection, data: bytes) -> bytes:
    stream = await conn.open_stream(ECHO)

    async def send() -> None:
        await stream.write(data)
        await stream.close_write()

    sender = asyncio.create_task(send())
    got = await stream.read_all(len(data) + 1)
    await sender
    return got


@paths
async def test_upgrade_identify_both_ways_ping_and_clean_close(path: str) -> None:
    server, client, conn, faults, addr = await _pair(path=path)
    try:
        assert conn.peer_id == server.peer_id
        await asyncio.wait_for(conn.identified.wait(), 5)
        assert conn.identify is not None and ECHO in conn.identify.protocols
        assert conn.identify.agent_version.startswith("murmur/")
        assert [str(a) for a in conn.identify.listen_addrs] == [str(addr.without_peer())]
        # the server saw our ephemeral port: that is what it tells us
        assert str(conn.identify.observed_addr) == f"/ip4/127.0.0.1/tcp/{conn.local[1]}"
        assert len(client.observed_addrs) == 1
        await wait_until(lambda: server.connections and server.connections[0].identify is not None, 5, "identify back")
        back = server.connections[0]
        assert back.peer_id == client.peer_id and "/ipfs/ping/1.0.0" in back.identify.protocols  # type: ignore[union-attr]
        rtts = await client.ping(conn, 3)
        assert len(rtts) == 3 and all(0 < r < 1 for r in rtts)
        if isinstance(conn, YamuxConnection):
            assert 0 < await conn.yamux_ping() < 1
        await conn.close()
        await wait_until(lambda: not server.connections, 5, "server sees the close")
        assert faults.seen == []
    finally:
        await client.close()
        await server.close()


@paths
async def test_sockets_have_nagle_off_on_any_event_loop(path: str) -> None:
    """asyncio's own loop (this test's) turns Nagle off only on sockets made
    with ``proto=IPPROTO_TCP``; the host's are made with ``proto=0``, so it
    sets ``TCP_NODELAY`` itself, on dialled and accepted sockets. Without it
    every stream's negotiation waited out a delayed ACK (~88 ms per stream
    opened on loopback instead of ~0.3 ms)."""
    server, client, conn, _faults, _addr = await _pair(config(path), path)
    try:
        accepted = next(iter(server.connections))
        for end in (conn, accepted):
            sock = end._tr.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), end
    finally:
        await client.close()
        await server.close()


@paths
async def test_four_mib_echo_hundred_concurrent_streams_and_a_reset(path: str) -> None:
    server, client, conn, faults, _ = await _pair(path=path)
    try:
        data = os.urandom(4 * MIB)
        assert await _echo(conn, data) == data
        payloads = [os.urandom(10_000 + i) for i in range(100)]
        results = await asyncio.gather(*(_echo(conn, p) for p in payloads))
        assert results == payloads
        # a stream reset mid-transfer: the others and the connection carry on
        victim = await conn.open_stream(ECHO)
        await victim.write(os.urandom(300_000))
        others = [asyncio.create_task(_echo(conn, p)) for p in payloads[:10]]
        victim.reset()
        with pytest.raises(StreamResetError):
            await victim.read()
        assert await asyncio.gather(*others) == payloads[:10]
        assert await _echo(conn, b"after") == b"after"
        await wait_until(lambda: conn.budget.used <= 2 * MIB, 5, "windows given back")
        assert faults.seen == [] and not conn.closed
    finally:
        await client.close()
        await server.close()


@paths
async def test_a_message_with_a_large_tail_arrives_whole_or_with_its_tail_sealed(path: str) -> None:
    """The fast path seals a message's large last part as a split frame's
    tail: a reader of messages gets the message joined, a reader of parts
    (the delta assembler's way) the tail still sealed, to open where it
    belongs. The standard path hands both the message whole."""
    server, client, conn, faults, _ = await _pair(path=path)
    got: asyncio.Queue[object] = asyncio.Queue()

    async def whole(stream) -> None:  # type: ignore[no-untyped-def]
        got.put_nowait(bytes(await stream.recv_message()))

    async def parts(stream) -> None:  # type: ignore[no-untyped-def]
        got.put_nowait(await stream.recv_parts())

    server.set_handler(WHOLE, whole)
    server.set_handler(PARTS, parts)
    head, tail = b"envelope", os.urandom(SPLIT_MIN_TAIL + 1)
    try:
        await (await conn.open_stream(WHOLE)).send_message(head, tail)
        assert await asyncio.wait_for(got.get(), 5) == head + tail
        await (await conn.open_stream(PARTS)).send_message(head, tail)
        first, sealed = await asyncio.wait_for(got.get(), 5)  # type: ignore[misc]
        if path == "fast":
            assert bytes(first) == head and sealed.nbytes == len(tail)
            opened = bytearray(len(tail))
            sealed.open_into(memoryview(opened))
            assert opened == tail
        else:
            assert sealed is None and bytes(first) == head + tail
        assert faults.seen == [] and not conn.closed
    finally:
        await client.close()
        await server.close()


async def test_a_forged_tail_drops_its_connection_when_opened_while_a_good_peer_is_served() -> None:
    server, client, conn, faults, addr = await _pair()
    peer = await RawPeer.connect(addr)
    try:
        stream, opening = peer.stream_for(ECHO)
        forged = peer.enc.encode(RecordType.DATA, stream, b"head", tail=os.urandom(SPLIT_MIN_TAIL))
        forged[-1] ^= 1  # the tail's tag: the head authenticates, the tail does not
        peer.write(opening + bytes(forged))
        await wait_until(lambda: faults.of(DecryptError), 5, "the forged tail is a fault")
        await asyncio.wait_for(peer.reader.read(), 5)  # the server hung up
        assert len(server.connections) == 1 and await _echo(conn, b"still here") == b"still here"
    finally:
        peer.close()
        await client.close()
        await server.close()


@paths
async def test_unknown_protocol_is_no_common_protocol(path: str) -> None:
    server, client, conn, _, _ = await _pair(path=path)
    try:
        with pytest.raises(NoCommonProtocol):
            await conn.open_stream(["/nobody/1.0.0", "/plaintext/2.0.0"])
        assert await _echo(conn, b"still here") == b"still here"
    finally:
        await client.close()
        await server.close()


async def test_identify_pushes_are_not_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """A peer pushes identify at will, one stream each: a flood of pushes with
    long protocol ids must not write one INFO line (12 KiB) per push, or it
    rotates the node's log files away in seconds; what is logged of a peer's
    protocols is bounded too."""
    server = Libp2pHost(Identity.generate())
    addrs = await server.listen("127.0.0.1", 0)
    pusher = Libp2pHost(Identity.generate())
    long_ids = tuple(f"/x/{'a' * 900}/{i}" for i in range(16))
    try:
        caplog.set_level(logging.INFO)
        conn = await pusher.dial(addrs[0])
        await asyncio.wait_for(conn.identified.wait(), 5)
        for _ in range(20):
            stream = await conn.open_stream(IDENTIFY_PUSH)
            await stream.write(IdentifyInfo(protocols=long_ids, has_protocols=True).encode())
            await stream.close_write()
        served = next(iter(server.connections))
        await wait_until(lambda: served.identify is not None and served.identify.protocols == long_ids, 5,
                         "the pushes read")
        await wait_until(lambda: not conn._streams, 5, "every push read")
        about_pusher = [r for r in caplog.records
                        if getattr(r, "event", None) == "identified" and r.peer == str(pusher.peer_id)]
        assert not [r for r in about_pusher if r.levelno >= logging.INFO]
        caplog.set_level(logging.DEBUG)
        await pusher.push_identify(conn)
        await wait_until(lambda: len([r for r in caplog.records if getattr(r, "event", None) == "identified"
                                      and r.peer == str(pusher.peer_id)]) > len(about_pusher), 5, "a push logged")
        assert all(len(p) <= 64 for r in caplog.records if getattr(r, "event", None) == "identified"
                   for p in r.protocols)
    finally:
        await pusher.close()
        await server.close()


async def _raw(addr, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    writer.close()
    return out


async def test_endless_na_loop_and_plaintext_are_cut_while_a_good_peer_is_served() -> None:
    server, client, conn, faults, addr = await _pair(config(max_negotiation_attempts=4))
    try:
        proposals = multistream.encode_message(multistream.PROTOCOL_ID) + b"".join(
            multistream.encode_message(p) for p in ["/plaintext/2.0.0", "/tls/1.0.0", "/x", "/y", "/z"])
        answer = await _raw(addr, proposals)  # returns once the server hung up
        assert answer.startswith(multistream.encode_message(multistream.PROTOCOL_ID))
        assert b"/plaintext" not in answer and b"/tls" not in answer  # nothing was ever echoed
        assert faults.of(NegotiationError)
        garbage = await _raw(addr, b"\xff" * 20)  # a malformed varint
        assert garbage == multistream.encode_message(multistream.PROTOCOL_ID)
        assert await _echo(conn, b"good") == b"good"
    finally:
        await client.close()
        await server.close()


def _frame(ftype: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + payload


@pytest.mark.parametrize(
    "hostile",
    [
        lambda sid: _frame(FrameType.WINDOW_UPDATE, 0, sid, 2**32 - 1),  # window overflow
        lambda sid: _frame(FrameType.DATA, 0, sid + 1000, 4, b"junk"),  # a stream never opened
        lambda sid: _frame(FrameType.DATA, 0, sid, 2 * MIB, bytes(100)),  # beyond the window
    ],
    ids=["window-overflow", "unknown-stream", "beyond-window"],
)
async def test_yamux_violations_drop_the_offender_only(hostile) -> None:  # type: ignore[no-untyped-def]
    server, client, conn, faults, addr = await _pair(config("standard"), "standard")
    good = await client.dial(addr)
    try:
        stream = await conn.open_stream(ECHO)
        await stream.write(b"x")
        assert await stream.read() == b"x"
        conn._write(conn._channel.encrypt(hostile(stream.id)))
        await wait_until(lambda: faults.of(MuxerError), 5, "the violation is reported")
        await wait_until(lambda: conn.closed, 5, "the offender is dropped")
        assert await _echo(good, b"served") == b"served"
    finally:
        await client.close()
        await server.close()


@paths
async def test_stream_flood_refused_then_dropped(path: str, caplog: pytest.LogCaptureFixture) -> None:
    server_config = config(path, max_streams=8, max_refused_streams=20)
    # no fault sink: the host logs the faults itself, rate-limited per subnet
    server, client, conn, _, addr = await _pair(server_config, path, sink=False)
    good = await client.dial(addr)
    faults = server.faults
    try:
        session = conn._session
        # bare opens the client never negotiates on: 8 fill the server's limit, the rest are refused
        for _ in range(12):
            session.open_stream()
        conn._flush()
        await wait_until(lambda: faults[StreamRefused.__name__] >= 4, 5, "refusals")
        assert not faults[MuxerError.__name__]
        for _ in range(30):
            session.open_stream()
        conn._flush()
        await wait_until(lambda: faults[MuxerError.__name__], 5, "the flood is cut")
        await wait_until(lambda: conn.closed, 5, "the flooder is dropped")
        assert await _echo(good, b"served") == b"served"
        # 20+ faults from one peer, at most warnings_per_subnet lines in the log
        lines = [r for r in caplog.records if getattr(r, "event", None) == "libp2p_fault"]
        assert sum(faults.values()) > 20 and len(lines) <= server_config.limits.warnings_per_subnet
    finally:
        await client.close()
        await server.close()


@paths
async def test_streams_opened_and_reset_as_fast_as_possible_drop_the_flooder(path: str) -> None:
    """Each stream is reset at once, so none reaches max_streams or the
    refused-in-a-row bound: before the open rate was limited, 30,000 a
    second held 25-65% of the victim's core and left no fault on its score."""
    server, client, conn, faults, addr = await _pair(config(path), path)
    good = await client.dial(addr)
    try:
        session = conn._session
        with contextlib.suppress(StreamError):  # the victim's goodbye (GO_AWAY) ends the flood
            for _ in range(100):
                if conn.closed:
                    break
                for _ in range(64):
                    session.reset(session.open_stream())
                conn._flush()
                await asyncio.sleep(0)
        await wait_until(lambda: faults.of(MuxerError), 5, "the flood is cut")
        await wait_until(lambda: conn.closed, 5, "the flooder is dropped")
        assert faults.of(StreamRefused)
        assert await _echo(good, b"served") == b"served"
    finally:
        await client.close()
        await server.close()


@paths
async def test_a_ping_flood_is_cut_and_charged_while_pings_at_a_human_pace_are_answered(path: str) -> None:
    """One stream writing 32-byte pings as fast as TCP took them had every one
    echoed (30,000 a second, 17% of the victim's core) and no fault."""
    server, client, conn, faults, addr = await _pair(config(path), path)
    try:
        assert len(await client.ping(conn, 3)) == 3
        stream = await conn.open_stream(PING)
        await stream.write(bytes(PING_SIZE * 4 * PING_BURST))
        echoed = b""
        with pytest.raises(StreamResetError):
            async with asyncio.timeout(5):  # unlimited, every ping is echoed and the stream stays open
                while data := await stream.read():
                    echoed += data
        assert len(echoed) <= PING_SIZE * (PING_BURST + 2)
        await wait_until(lambda: faults.of(LimitExceeded), 5, "the flood is charged")
        assert not conn.closed and len(await client.ping(conn, 3)) == 3  # a new stream, a new budget
    finally:
        await client.close()
        await server.close()


async def test_wrong_peer_id_is_refused_before_streams() -> None:
    server = Libp2pHost(Identity.generate())
    client = Libp2pHost(Identity.generate())
    try:
        addr = (await server.listen("127.0.0.1", 0))[0]
        with pytest.raises(PeerFault):
            await client.dial(addr.with_peer(Identity.generate().peer_id))
        conn = await client.dial(addr)
        await conn.close()
        with pytest.raises(ConnectionClosed):
            await conn.open_stream(ECHO)
    finally:
        await client.close()
        await server.close()


@paths
async def test_identify_pushes_leave_no_stream_open(path: str) -> None:
    """A push is one message on a stream of its own: the receiver closes its
    side once read, so pushes past ``max_streams`` over one connection all go
    through and neither muxer keeps a stream of them (before, each push left
    a half-open stream on both ends until the pusher could open none)."""
    limits = {"max_streams": 8}
    server, client, conn, faults, _addr = await _pair(config(path, **limits), path)
    try:
        await asyncio.wait_for(conn.identified.wait(), 5)
        served = next(iter(server.connections))
        for _ in range(3 * limits["max_streams"]):
            await client.push_identify(conn)
            await wait_until(lambda: not conn._streams and not served._streams, 5, "the push stream closed")
        assert not faults.seen and not conn.closed
    finally:
        await client.close()
        await server.close()


async def test_window_update_starved_by_the_pool_goes_out_when_the_pool_frees() -> None:
    """A stream reads its window while someone else takes the node's pool: the
    window update cannot be paid, the sender stops, the reader waits. When the
    pool gets bytes back the update goes out by itself, no further read needed."""
    from murmur.protocol.budget import BytePool, PeerBudget

    pool = BytePool(64 * MIB)
    squeeze: list[PeerBudget] = []
    received: list[int] = []

    async def squeezed_sink(stream) -> None:  # type: ignore[no-untyped-def]
        total = len(await stream.read(64 * 1024))  # under half a window: no update due yet
        other = pool.budget(pool.capacity, 0)  # another holder takes everything the pool has left
        other.try_acquire(other.headroom())
        squeeze.append(other)
        while data := await stream.read():
            total += len(data)
        received.append(total)
        await stream.close_write()

    standard = HostConfig(limits=TransportLimits(peer_reserve_bytes=0, fast_path=False), identify_on_connect=False)
    server = Libp2pHost(Identity.generate(), standard, pool=pool)
    server.set_handler("/sink", squeezed_sink)
    client = Libp2pHost(Identity.generate(), standard)
    try:
        conn = await client.dial((await server.listen("127.0.0.1", 0))[0])
        stream = await conn.open_stream("/sink")
        sender = asyncio.create_task(stream.write(bytes(2 * MIB)))
        await wait_until(lambda: server.connections and server.connections[0]._session is not None
                         and server.connections[0]._session.starved, 5, "the window update starves")
        assert not sender.done()
        squeeze[0].close()  # the pool gets its bytes back
        await asyncio.wait_for(sender, 10)
        await stream.close_write()
        await wait_until(lambda: received == [2 * MIB], 10, "all of it arrives")
    finally:
        await client.close()
        await server.close()


async def test_observed_addresses_a_peer_claims_are_tallied_within_a_bound() -> None:
    """Identify's observed address is whatever the peer says: peers claiming a
    new one each time must not grow the host's tally without bound, and one
    peer changing its claim moves its one vote."""
    server, client, conn, _faults, _addr = await _pair()
    try:
        await asyncio.wait_for(conn.identified.wait(), 5)
        for port in range(1, 3 * MAX_OBSERVED_ADDRS):
            client._observed(Identity.generate().peer_id, AnyMultiaddr.parse(f"/ip4/198.18.0.9/tcp/{port}"))
        assert len(client.observed_addrs) == MAX_OBSERVED_ADDRS
        known = list(client.observed_addrs)[-1]  # one the connection's peer did not claim
        before = client.observed_addrs[known]
        client._learn(conn, IdentifyInfo(observed_addr=known))
        assert client.observed_addrs[known] == before + 1  # a known address is still counted
        moved = AnyMultiaddr.parse("/ip4/198.18.0.9/tcp/1")
        client._learn(conn, IdentifyInfo(observed_addr=moved))
        assert client.observed_addrs[known] == before and known != moved  # the same peer's vote moved
    finally:
        await client.close()
        await server.close()


async def test_one_peer_pushing_an_observed_address_again_and_again_casts_one_vote() -> None:
    """The tally orders DCUtR's CONNECT addresses (most common first): a peer
    repeating identify push with a made-up observed address must not outvote
    the peers that saw our real one (before, each push was one more vote: 50
    pushes put the made-up address first)."""
    server = Libp2pHost(Identity.generate())
    addrs = await server.listen("127.0.0.1", 0)
    honest = [Libp2pHost(Identity.generate()) for _ in range(2)]
    attacker = Libp2pHost(Identity.generate())
    try:
        for peer in honest:
            await asyncio.wait_for((await peer.dial(addrs[0])).identified.wait(), 5)
        await wait_until(lambda: sum(server.observed_addrs.values()) == 2, 5, "both honest votes")
        real = server.observed_addrs.most_common(1)[0][0]
        conn = await attacker.dial(addrs[0])
        await asyncio.wait_for(conn.identified.wait(), 5)
        made_up = AnyMultiaddr.parse("/ip4/203.0.113.7/tcp/80")
        for _ in range(50):
            stream = await conn.open_stream(IDENTIFY_PUSH)
            await stream.write(IdentifyInfo(observed_addr=made_up).encode())
            await stream.close_write()
        await wait_until(lambda: made_up in server.observed_addrs, 5, "the attacker's claim")
        await wait_until(lambda: not conn._streams, 5, "every push read")
        assert server.observed_addrs[made_up] == 1
        assert server.observed_addrs.most_common(1)[0][0] == real
    finally:
        for host in (attacker, *honest, server):
            await host.close()
