"""Issue 14, connection level: peers that behave *almost* correctly against a real listening node.

Memory is measured where it is spent: the victim is a real ``murmur node
start`` process (learning off) and its RSS is read from /proc; penalties are
read from its HTTP API. Slot floods and the penalty tests run against an
in-process :class:`~murmur.node.daemon.Node`. Attackers bind their sockets to
127.a.b.c source addresses: all of 127.0.0.0/8 is loopback on Linux, so one
machine can come from as many /24s as a test needs. Every test talks to
loopback only and bounds its number of connections and bytes.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from murmur.errors import DecryptError, PeerFault, SendTimeout, WriteStalled
from murmur.node.daemon import Node
from murmur.protocol import multistream
from murmur.protocol.framing import FRAME_LENGTH, FRAME_OVERHEAD, HANDSHAKE_LENGTH, FrameType
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import HostConfig, Libp2pHost, Stream
from murmur.protocol.libp2p.wire import FAST_SECURITY
from murmur.protocol.messages import Hello, Link, MurmurProtocol
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import Libp2pNoiseHandshake
from murmur.protocol.transport import TransportLimits
from tests.integration.cluster import Cluster, node_config, wait_until
from tests.integration.daemons import Daemon, DaemonPool, api_get, peak_rss_bytes
from tests.integration.test_node_faults import QUICK_CLOSE_S, Victim, _victim_saw
from murmur.testnet.hostile import RawPeer, attacker_host, negotiate, open_from
from tests.integration.test_transport import closed_within

MIB = 1024 * 1024
MAX_FRAME = 4 * MIB  # the default transport.max_frame: the largest *legal* frame


# --- the victim as a daemon process -----------------------------------------------------


async def start_victim(pool: DaemonPool, http: aiohttp.ClientSession, **transport: Any) -> tuple[Daemon, Multiaddr]:
    """A learning-off daemon on loopback; returns it and its listen address."""
    daemon = pool.add({
        "node": {"listen": ["/ip4/127.0.0.1/tcp/0"]},
        "api": {"port": 0},
        "learning": {"enabled": False},
        "transport": transport,
    })
    pool.spawn(daemon)
    await pool.wait_api(daemon)
    status = await api_get(http, daemon, "/status")
    return daemon, Multiaddr.parse(status["addrs"][0])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def unread_bytes(port: int) -> int:
    """Bytes sitting in the receive queues of established connections to
    ``port`` (from /proc/net/tcp): 0 once the listener's process has read
    everything sent to it."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # TCP_ESTABLISHED
            total += int(fields[4].split(":")[1], 16)
    return total


def _pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


# --- must have 1: a peer that never reads ---------------------------------------------------

PINGS = 160_000  # ~13 MiB of the largest pings, answered with as many pongs
PING_BATCH = 2_000
DRAIN_TIMEOUT_S = 1.0
NON_READER_RSS_BOUND = 24 * MIB  # the victim's peak RSS growth; unbounded pongs cost ~7x the pings


async def test_a_peer_that_never_reads_costs_bounded_memory_and_is_cut_and_penalised(
    pool: DaemonPool, http: aiohttp.ClientSession
) -> None:
    daemon, addr = await start_victim(pool, http, drain_timeout_s=DRAIN_TIMEOUT_S)
    before = peak_rss_bytes(_pid(daemon))
    peer = await RawPeer.connect(addr, rcvbuf=4096)  # and never reads a byte
    ping = b"p" * 64
    cut_at = None
    started = time.monotonic()
    try:
        for _ in range(PINGS // PING_BATCH):
            peer.writer.write(b"".join(peer.frame(FrameType.PING, ping) for _ in range(PING_BATCH)))
            await peer.writer.drain()
        while time.monotonic() - started < 30:  # keep pinging (never reading) until the victim hangs up
            peer.writer.write(peer.frame(FrameType.PING, ping))
            await peer.writer.drain()
            await asyncio.sleep(0.05)
    except ConnectionError:
        cut_at = time.monotonic() - started
    finally:
        peer.close()
    grown = peak_rss_bytes(_pid(daemon)) - before
    assert grown <= NON_READER_RSS_BOUND, f"victim RSS grew {grown / MIB:.0f} MiB"
    assert cut_at is not None, "the victim never cut a peer that reads nothing"
    status = await api_get(http, daemon, "/status")
    assert status["faults"].get("WriteStalled") == 1, status["faults"]
    peers = {p["peer_id"]: p for p in await api_get(http, daemon, "/peers")}
    assert peers[str(peer.identity.peer_id)]["score"] < 0


def test_send_with_a_deadline_gives_up_on_a_peer_that_does_not_read() -> None:
    """The round loop's sends are bounded: past the deadline, SendTimeout,
    nothing half-sent, the connection still open; later the stall cuts it."""
    limits = TransportLimits(max_frame=256 * 1024, idle_timeout_s=5.0, ping_interval_s=1.0, drain_timeout_s=1.5)
    HOLD = "/murmur-test/hold/1.0.0"

    async def scenario() -> None:
        accepted: asyncio.Queue[Stream] = asyncio.Queue()
        faults: list[PeerFault] = []

        async def hold(stream: Stream) -> None:
            await accepted.put(stream)
            await stream.conn.wait_closed()

        async with Libp2pHost(Identity.generate(), HostConfig(limits=limits, identify_on_connect=False),
                              on_fault=lambda peer, fault: faults.append(fault)) as server:
            server.set_handler(HOLD, hold)
            (addr,) = await server.listen("127.0.0.1", 0)
            peer = await RawPeer.connect(addr, rcvbuf=4096, max_frame=limits.max_frame)  # then never reads again
            peer.write(peer.stream_for(HOLD)[1])  # a stream the server may write to
            stream = await asyncio.wait_for(accepted.get(), 2.0)
            conn = stream.conn
            chunk = os.urandom(limits.max_frame)
            deadline_s = 0.5
            started = time.monotonic()
            with pytest.raises(SendTimeout):
                for _ in range(200):  # 50 MiB: far more than any socket buffer
                    await stream.send_message(chunk, deadline=started + deadline_s)
            took = time.monotonic() - started
            assert deadline_s <= took < deadline_s + 0.5
            assert not conn.closed
            await asyncio.wait_for(conn.wait_closed(), limits.drain_timeout_s + 2.0)
            assert isinstance(conn.fault, WriteStalled) and faults == [conn.fault]
            peer.close()

    uvloop.run(asyncio.wait_for(scenario(), 20))


# --- must have 2: memory by announcement -------------------------------------------------------

HEADER_CONNECTIONS = 48
HEADER_BODY = 32 * 1024  # what each sends of its 4 MiB frame
HEADER_RSS_BOUND = 48 * MIB  # 1 MiB per connection; buffers allocated on the header cost 4 MiB each
AFTER_RSS_BOUND = 24 * MIB  # what may stay resident after they all closed


async def test_largest_legal_frame_headers_on_many_connections_cost_what_arrived(
    pool: DaemonPool, http: aiohttp.ClientSession
) -> None:
    daemon, addr = await start_victim(pool, http)
    pid = _pid(daemon)
    baseline = rss_bytes(pid)
    per_subnet = 16  # transport.max_inbound_per_subnet
    peers = [await RawPeer.connect(addr, source=attacker_host(i // per_subnet, i % per_subnet))
             for i in range(HEADER_CONNECTIONS)]
    header = FRAME_LENGTH.pack(MAX_FRAME + FRAME_OVERHEAD)
    for peer in peers:
        peer.writer.write(header + os.urandom(HEADER_BODY))
    await wait_until(lambda: unread_bytes(addr.port) == 0, 5.0, "the victim read every header")
    held = rss_bytes(pid) - baseline
    assert held <= HEADER_RSS_BOUND, f"{HEADER_CONNECTIONS} headers hold {held / MIB:.0f} MiB"
    for peer in peers:
        peer.close()
    await wait_until(lambda: _connections(http, daemon, 0), 5.0, "every attacker gone")
    after = rss_bytes(pid) - baseline
    assert after <= AFTER_RSS_BOUND, f"{after / MIB:.0f} MiB still resident after the burst"


POOL_BYTES = 16 * MIB
FULL_FRAME_CONNECTIONS = 24  # each sends all of a largest frame but its last byte: 96 MiB
POOL_RSS_BOUND = 48 * MIB


async def test_almost_complete_large_frames_are_bounded_by_the_node_pool(
    pool: DaemonPool, http: aiohttp.ClientSession
) -> None:
    """Peers that do send their bytes: the node's pool bounds them all together,
    and unproven holders are evicted to make room, so a newcomer still gets in."""
    daemon, addr = await start_victim(pool, http, max_buffered_bytes=POOL_BYTES)
    pid = _pid(daemon)
    before = peak_rss_bytes(pid)
    peers = [await RawPeer.connect(addr, source=attacker_host(i // 16, i % 16)) for i in range(FULL_FRAME_CONNECTIONS)]
    body = os.urandom(MAX_FRAME + FRAME_OVERHEAD - 1)
    for peer in peers:
        peer.writer.write(FRAME_LENGTH.pack(MAX_FRAME + FRAME_OVERHEAD) + body)
    await wait_until(lambda: unread_bytes(addr.port) == 0, 10.0, "every byte read or its connection evicted")
    grown = peak_rss_bytes(pid) - before
    assert grown <= POOL_RSS_BOUND, f"victim peak RSS grew {grown / MIB:.0f} MiB"
    status = await api_get(http, daemon, "/status")
    assert status["connections"] <= POOL_BYTES // (MAX_FRAME // 2), "holders beyond the pool were evicted"
    async with Libp2pHost(Identity.generate()) as client:
        conn = await asyncio.wait_for(client.dial(addr), 3.0)
        assert conn.peer_id == addr.peer_id
    for peer in peers:
        peer.close()


async def _ignore(conn: Any) -> None:
    return None


async def _connections(http: aiohttp.ClientSession, daemon: Daemon, n: int) -> bool:
    return int((await api_get(http, daemon, "/status"))["connections"]) == n


# --- must have 3: slots that cannot be squatted ------------------------------------------------

MAX_INBOUND = 32
PER_SUBNET = 4  # so the attacker needs MAX_INBOUND / PER_SUBNET = 8 /24s
SLOTS = {"transport.max_inbound": MAX_INBOUND, "transport.max_inbound_per_subnet": PER_SUBNET,
         "transport.handshake_timeout_s": 5.0}
NEWCOMER_TRIES = 5
NEWCOMER_BOUND_S = 2.0  # each try must be connected within this (the handshake timeout is 5 s)
MAX_ATTACKER_CONNECTS = 1500
RECONNECT_PAUSE_S = 0.02  # per slot: up to 1600 connects/s over 32 slots, as fast as the refill


@pytest.fixture
async def slotted(tmp_path: Path) -> AsyncIterator[Victim]:
    async with Cluster(1, tmp_path, overrides=SLOTS) as cluster:
        yield Victim(cluster)


Opener = Callable[[Multiaddr, str], Awaitable[Any]]


class Squatter:
    """Holds MAX_INBOUND connections to the victim from MAX_INBOUND / PER_SUBNET
    /24s and reopens each one the victim closes (MAX_ATTACKER_CONNECTS in all)."""

    def __init__(self, addr: Multiaddr, opener: Opener) -> None:
        self.addr = addr
        self._open = opener
        self.connects = 0
        self.closed_by_victim = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._hold(i)) for i in range(MAX_INBOUND)]

    async def _hold(self, i: int) -> None:
        source = attacker_host(i % (MAX_INBOUND // PER_SUBNET), i // (MAX_INBOUND // PER_SUBNET))
        while self.connects < MAX_ATTACKER_CONNECTS:
            self.connects += 1
            held: Any = None
            try:
                held = await self._open(self.addr, source)
                reader = held[0] if isinstance(held, tuple) else held.reader
                while await reader.read(65536):
                    pass  # the victim's handshake message, Hello, pings: keep the slot
            except (OSError, asyncio.IncompleteReadError, PeerFault):
                pass
            finally:
                if held is not None:
                    (held[1] if isinstance(held, tuple) else held.writer).close()
            self.closed_by_victim += 1
            await asyncio.sleep(RECONNECT_PAUSE_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _newcomer_gets_in(victim: Victim) -> None:
    """An honest node from another /24 (127.0.0.1) connects, NEWCOMER_TRIES
    times, each within the bound, and each into full slots: the squatters
    refill the one the last newcomer left before the next one dials (a
    newcomer that found it still free would prove nothing, and the callers
    count one eviction a newcomer)."""
    node = victim.node
    for _ in range(NEWCOMER_TRIES):
        await wait_until(lambda: node.host.inbound >= MAX_INBOUND, 5.0, "the squatters refilled the slots")
        good = await victim.cluster.add_node()
        try:
            started = time.monotonic()
            await asyncio.wait_for(good.connect(node.addrs, node.peer_id), NEWCOMER_BOUND_S)
            await wait_until(lambda: node.session(good.peer_id) is not None,
                             NEWCOMER_BOUND_S - (time.monotonic() - started), "the victim has the newcomer")
        finally:
            await good.stop()


async def test_half_open_flood_from_many_subnets_cannot_squat_the_slots(slotted: Victim) -> None:
    async def half_open(addr: Multiaddr, source: str) -> Any:
        return await open_from(addr, source)  # connects, never sends a byte

    squatter = Squatter(slotted.node.addrs[0], half_open)
    squatter.start()
    try:
        await wait_until(lambda: slotted.node.host.inbound == MAX_INBOUND, 2.0, "the slots are full")
        await _newcomer_gets_in(slotted)
    finally:
        await squatter.stop()
    assert squatter.closed_by_victim >= NEWCOMER_TRIES


async def test_authenticated_idle_identities_cannot_squat_the_slots(slotted: Victim) -> None:
    """Identities that send Hello and Link(active=1), then only keep the
    connection alive, are evicted for newcomers; the newcomer keeps its slot."""
    victim_addr = slotted.node.addrs[0]

    async def identity(addr: Multiaddr, source: str) -> RawPeer:
        peer = await RawPeer.connect(addr, source=source)
        hello = Hello(listen_addrs=(), agent="squatter", round=0, degree=1)
        peer.writer.write(peer.frames(hello) + peer.frames(Link(active=1, degree=1)))
        return peer

    squatter = Squatter(victim_addr, identity)
    squatter.start()
    try:
        await wait_until(lambda: len(slotted.node.sessions()) == MAX_INBOUND, 5.0, "every slot authenticated")
        await _newcomer_gets_in(slotted)
        # A newcomer that stays is not pushed out by the reconnecting squatters:
        # its /24 holds one connection, theirs PER_SUBNET each.
        good = await slotted.cluster.add_node()
        await good.connect(slotted.node.addrs, slotted.node.peer_id)
        await wait_until(lambda: squatter.closed_by_victim >= NEWCOMER_TRIES + 1 + 20, 5.0, "squatters churn")
        assert slotted.node.session(good.peer_id) is not None
    finally:
        await squatter.stop()


async def test_a_useful_connection_is_never_evicted(slotted: Victim) -> None:
    """The node protects what it marks useful: a full set of useful inbound
    connections refuses a newcomer rather than dropping one of them."""
    addr = slotted.node.addrs[0]
    peers = [await RawPeer.connect(addr, source=attacker_host(i // PER_SUBNET, i % PER_SUBNET))
             for i in range(MAX_INBOUND)]
    await wait_until(lambda: len(slotted.node.sessions()) == MAX_INBOUND, 5.0, "every slot authenticated")
    for session in slotted.node.sessions():
        session.mark_useful()
    reader, writer = await open_from(addr, attacker_host(30, 0))
    await closed_within(reader, QUICK_CLOSE_S)  # refused: nobody to evict
    writer.close()
    assert len(slotted.node.sessions()) == MAX_INBOUND
    assert all(not p.reader.at_eof() for p in peers)
    for peer in peers:
        peer.close()


# --- must have 5: penalties from the first byte, quiet logs, no tracebacks ------------------------


@pytest.fixture
async def victim(tmp_path: Path) -> AsyncIterator[Victim]:
    async with Cluster(1, tmp_path) as cluster:
        yield Victim(cluster)


async def test_a_bad_frame_in_the_segment_of_handshake_message_3_is_penalised(victim: Victim) -> None:
    before = victim.faults()
    addr = victim.node.addrs[0]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    await negotiate(reader, writer, FAST_SECURITY)
    identity = Identity.generate()
    hs = Libp2pNoiseHandshake(identity, initiator=True, expected=victim.node.peer_id)
    message_1 = hs.start()
    assert message_1 is not None
    writer.write(HANDSHAKE_LENGTH.pack(len(message_1)) + message_1)
    (length,) = HANDSHAKE_LENGTH.unpack(await reader.readexactly(HANDSHAKE_LENGTH.size))
    message_3 = hs.receive(await reader.readexactly(length))
    assert message_3 is not None and hs.complete
    garbage = FRAME_LENGTH.pack(48) + os.urandom(48)  # cannot authenticate: DecryptError
    writer.write(HANDSHAKE_LENGTH.pack(len(message_3)) + message_3 + garbage)  # one write, one segment
    await closed_within(reader, QUICK_CLOSE_S)
    writer.close()
    await _victim_saw(victim, identity.peer_id, DecryptError, before)
    await victim.serves_good_peer()


FLOOD_TRIES = 300
WARNING_INTERVAL_S = 1.0
WARNINGS_PER_INTERVAL = 3
LOG_BOUND = 16 * 1024  # bytes of log for the whole flood; one line per try wrote ~75 KiB


async def test_a_handshake_flood_writes_a_bounded_log_with_a_summary(
    pool: DaemonPool, http: aiohttp.ClientSession
) -> None:
    daemon, addr = await start_victim(pool, http, warning_interval_s=WARNING_INTERVAL_S,
                                      warnings_per_interval=WARNINGS_PER_INTERVAL)  # 3 per subnet by default
    log_path = daemon.log[-1]
    await wait_until(lambda: "node started" in log_path.read_text(), 5.0, "start-up logged")
    start_size = log_path.stat().st_size
    message_1 = Libp2pNoiseHandshake(Identity.generate(), initiator=True).start()
    assert message_1 is not None
    proposal = multistream.Dialer([FAST_SECURITY]).start()
    for i in range(FLOOD_TRIES):  # the security proposal and a valid message 1, then garbage where message 3 goes
        reader, writer = await open_from(addr, attacker_host(i % 16, i // 16))
        writer.write(proposal + HANDSHAKE_LENGTH.pack(len(message_1)) + message_1 + HANDSHAKE_LENGTH.pack(5) + b"xxxxx")
        await closed_within(reader, 2.0)
        writer.close()

    def accounted() -> int:
        """Tries the log speaks of: lines written, and those its summaries counted."""
        flood_log = log_path.read_bytes()[start_size:]
        counts = [int(n) for n in re.findall(rb" suppressed=(\d+)", flood_log)]
        return sum(counts) + flood_log.count(b"handshake failed") if counts else 0

    # A flood slower than one interval (a busy machine) has a summary written
    # mid-flood; the one for the rest comes an interval after the last try.
    await wait_until(lambda: accounted() >= FLOOD_TRIES, 3 * WARNING_INTERVAL_S, "summaries of every try")
    flood_log = log_path.read_bytes()[start_size:]
    assert len(flood_log) <= LOG_BOUND, f"{FLOOD_TRIES} failed handshakes wrote {len(flood_log)} bytes of log"
    assert accounted() == FLOOD_TRIES


def test_a_reset_right_after_connect_makes_no_traceback(tmp_path: Path) -> None:
    """Connections reset while still in the listen backlog reach the node with
    no peer address (uvloop gives ``None``): nothing to admit, nothing to log."""
    errors: list[str] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(str(ctx.get("message"))))
        async with Node(node_config(tmp_path / "victim")) as node:
            addr = node.addrs[0]
            for _ in range(20):
                # Blocking, with the loop not running: the kernel completes the
                # connect from the backlog and the RST lands before the accept.
                sock = socket.create_connection((addr.host, addr.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            async with Node(node_config(tmp_path / "good")) as good:
                await good.connect(node.addrs, node.peer_id)  # accepted after the 20: they were all handled
                assert node.host.inbound == 1  # the good one; none of the resets holds a slot

    uvloop.run(asyncio.wait_for(scenario(), 20))
    assert errors == []


async def test_an_address_dropped_again_and_again_waits_before_it_may_connect(slotted: Victim) -> None:
    """A peer dropped for garbage comes back as a new identity from the same
    address: after a few such drops that address is refused at accept, before
    any handshake, while other addresses are served (the soak bench's request
    attack went from 2,665 handshakes a minute to 384)."""
    node = slotted.node
    addr = node.addrs[0]
    offender = attacker_host(7, 0, base=71)
    for n in range(node.host.cooloff.offences):
        peer = await RawPeer.connect(addr, source=offender)
        await peer.send([Hello(listen_addrs=(), agent="garbage", round=0, degree=1)])
        peer.write(peer.message(b"\x93\x02\x7f\x80", MurmurProtocol.DELTA))  # an unknown message kind: dropped
        last = n + 1 == node.host.cooloff.offences  # the last offence starts the cool-off (and clears the count)
        await wait_until(lambda n=n, last=last: (node.host.cooloff.cooling_until(offender) is not None if last
                                                 else node.host.cooloff.recent(offender) == n + 1), 5.0, "dropped")
        peer.close()
    refused_before = node.host.cooloff.refused
    with pytest.raises((OSError, asyncio.IncompleteReadError, PeerFault)):
        await RawPeer.connect(addr, source=offender)  # a fresh identity: refused before the handshake
    assert node.host.cooloff.refused == refused_before + 1
    other = await RawPeer.connect(addr, source=attacker_host(8, 0, base=71))  # another address: served
    await other.send([Hello(listen_addrs=(), agent="other", round=0, degree=1)])
    await wait_until(lambda: node.session(other.identity.peer_id) is not None, 5.0, "the other address is served")
    other.close()
