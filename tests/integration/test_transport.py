"""Connections over real loopback sockets on uvloop: upgrade, identity, keepalive, flow control.

Two :class:`~murmur.protocol.libp2p.Libp2pHost` s; murmur's fast path unless a
test says otherwise (``paths``: both). The helpers at the top are shared with
``test_transport_faults.py`` and the node-level hostile tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from murmur.errors import IdentityMismatch, PeerFault
from murmur.protocol.framing import DEFAULT_SCRATCH_BYTES
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p import FastConnection, HostConfig, Libp2pConnection, Libp2pHost, Stream, YamuxConnection
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed, TransportLimits

FAST = TransportLimits(
    connect_timeout_s=1.0,
    handshake_timeout_s=0.5,
    idle_timeout_s=1.0,
    ping_interval_s=0.2,
)
TEST_DEADLINE_S = 30.0
ECHO = "/murmur-test/message-echo/1.0.0"
PATHS = {"fast": FastConnection, "standard": YamuxConnection}
paths = pytest.mark.parametrize("path", list(PATHS))


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one scenario on uvloop, the loop the daemon uses."""
    uvloop.run(asyncio.wait_for(scenario(), TEST_DEADLINE_S))


async def eventually(predicate: Callable[[], bool], within_s: float = 2.0) -> None:
    """Wait for a condition the event loop will make true (e.g. a counter after connection_lost)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def host(limits: TransportLimits = FAST, path: str = "fast", **kw: Any) -> Libp2pHost:
    """A host with ``limits``, on murmur's fast path or (``path="standard"``) /noise + /yamux only."""
    limits = dataclasses.replace(limits, fast_path=path == "fast")
    return Libp2pHost(Identity.generate(), HostConfig(limits=limits, identify_on_connect=False), **kw)


async def message_echo(stream: Stream) -> None:
    while (message := await stream.recv_message()) is not None:
        await stream.send_message(message)
    await stream.close_write()


class EchoNode:
    """A real host serving a message echo; it records its connections and every fault it saw."""

    def __init__(self, limits: TransportLimits = FAST, path: str = "fast") -> None:
        self.host = host(limits, path, on_connection=self.connections_append, on_fault=self._fault)
        self.identity = self.host.identity
        self.host.set_handler(ECHO, message_echo)
        self.connections: list[Libp2pConnection] = []
        self.faults: asyncio.Queue[tuple[PeerId | None, PeerFault]] = asyncio.Queue()
        self.addr: Multiaddr | None = None

    def connections_append(self, conn: Libp2pConnection) -> None:
        self.connections.append(conn)

    def _fault(self, peer: PeerId | None, fault: PeerFault) -> None:
        self.faults.put_nowait((peer, fault))

    async def start(self) -> Multiaddr:
        (self.addr,) = await self.host.listen("127.0.0.1", 0)
        return self.addr

    async def next_fault(self, within_s: float = 3.0) -> tuple[PeerId | None, PeerFault]:
        return await asyncio.wait_for(self.faults.get(), within_s)


async def assert_serves_good_peer(node: EchoNode, size: int = 1000, path: str = "fast") -> None:
    """The node still upgrades a well-behaved peer's connection and echoes a message."""
    assert node.addr is not None
    async with host(FAST, path) as client:
        conn = await client.dial(node.addr)
        assert conn.peer_id == node.identity.peer_id and type(conn) is PATHS[path]
        stream = await conn.open_stream(ECHO)
        payload = os.urandom(size)
        await stream.send_message(payload)
        assert await stream.recv_message() == payload


async def closed_within(reader: asyncio.StreamReader, within_s: float) -> float:
    """Seconds until the other side closed the socket; fails if it stays open longer."""
    start = time.monotonic()

    async def drain() -> None:
        while True:
            try:
                if not await reader.read(65536):
                    return
            except ConnectionError:
                return

    await asyncio.wait_for(drain(), within_s)
    return time.monotonic() - start


# --- tests ---------------------------------------------------------------------------------


@paths
def test_upgrade_both_directions_proves_identities(path: str) -> None:
    async def scenario() -> None:
        seen: dict[str, list[Libp2pConnection]] = {"a": [], "b": []}
        a = host(path=path, on_connection=seen["a"].append)
        b = host(path=path, on_connection=seen["b"].append)
        for h in (a, b):
            h.set_handler(ECHO, message_echo)
        async with a, b:
            (addr_a,) = await a.listen("127.0.0.1", 0)
            (addr_b,) = await b.listen("127.0.0.1", 0)
            assert addr_a.peer_id == a.peer_id and addr_a.port > 0
            a_to_b = await a.dial(addr_b)
            b_to_a = await b.dial(addr_a.without_peer())  # no expected id: whatever is proved
            assert a_to_b.peer_id == b.peer_id and a_to_b.outbound and type(a_to_b) is PATHS[path]
            assert b_to_a.peer_id == a.peer_id and b_to_a.outbound
            await eventually(lambda: len(seen["a"]) == 2 and len(seen["b"]) == 2)
            inbound_a = next(c for c in seen["a"] if not c.outbound)
            assert inbound_a.peer_id == b.peer_id and inbound_a.security == a_to_b.security
            # both directions carry messages, each on its own stream
            for conn, text in ((a_to_b, b"from a"), (b_to_a, b"from b"), (inbound_a, b"back over b's dial")):
                stream = await conn.open_stream(ECHO)
                await stream.send_message(text)
                assert await stream.recv_message() == text
            assert a_to_b.bytes_sent >= len(b"from a") and a_to_b.bytes_received >= len(b"from a")

    run(scenario)


def test_dial_with_wrong_peer_id_raises_and_node_keeps_serving() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            impostor = Identity.generate().peer_id
            async with host() as client:
                with pytest.raises(IdentityMismatch):
                    await client.dial(addr.with_peer(impostor))
                assert client.connections == []
            # the listener saw the dialler vanish mid-handshake; nothing was opened on its side
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


@paths
def test_large_messages_roundtrip_and_counters(path: str) -> None:
    async def scenario() -> None:
        node = EchoNode(path=path)
        async with node.host:
            addr = await node.start()
            async with host(path=path) as client:
                conn = await client.dial(addr)
                stream = await conn.open_stream(ECHO)
                sizes = [0, 1, 65535, 65536, 300_000, FAST.max_frame]
                payloads = [os.urandom(n) for n in sizes]

                async def send_all() -> None:  # while we read: yamux's windows would otherwise fill both ways
                    for p in payloads:
                        await stream.send_message(p)

                sender = asyncio.create_task(send_all())
                for p in payloads:
                    assert await stream.recv_message() == p
                await sender
                assert conn.bytes_sent >= sum(sizes) and conn.bytes_received >= sum(sizes)
                with pytest.raises(ValueError):
                    await stream.send_message(bytes(FAST.max_frame + 1))

    run(scenario)


@paths
def test_keepalive_holds_idle_connection_and_pings_never_reach_a_stream(path: str) -> None:
    async def scenario() -> None:
        node = EchoNode(path=path)
        async with node.host:
            addr = await node.start()
            async with host(path=path) as client:
                conn = await client.dial(addr)
                stream = await conn.open_stream(ECHO)
                # Stay silent for 2x the idle timeout: only pings/pongs flow.
                await asyncio.sleep(2 * FAST.idle_timeout_s)
                assert not conn.closed and node.faults.empty()
                received = conn.bytes_received
                await stream.send_message(b"still here")
                assert await stream.recv_message() == b"still here"  # no control frame surfaced first
                assert conn.bytes_received - received == len(b"still here") + (path == "standard")  # + its prefix

    run(scenario)


@paths
def test_close_is_seen_by_peer_and_cancels_every_task(path: str) -> None:
    async def scenario() -> None:
        node = EchoNode(path=path)
        before = asyncio.all_tasks()
        async with node.host:
            addr = await node.start()
            client = host(path=path)
            conn = await client.dial(addr)
            stream = await conn.open_stream(ECHO)
            await stream.send_message(b"x")
            assert await stream.recv_message() == b"x"
            await conn.close()
            await eventually(lambda: node.connections[0].closed)
            assert node.connections[0].fault is None and node.faults.empty()
            with pytest.raises(ConnectionClosed):
                await stream.send_message(b"late")
            with pytest.raises(ConnectionClosed):
                await conn.open_stream(ECHO)
            await client.close()
        leftover = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        assert leftover == []

    run(scenario)


def test_receive_rate_limit_delays_but_never_drops() -> None:
    rate = 2 * 1024 * 1024
    limits = TransportLimits(
        max_frame=64 * 1024, idle_timeout_s=5.0, ping_interval_s=1.0, max_peer_rate_bytes_s=rate
    )

    async def scenario() -> None:
        node = EchoNode(limits)
        async with node.host:
            addr = await node.start()
            async with host(limits) as client:
                conn = await client.dial(addr)
                stream = await conn.open_stream(ECHO)
                chunks = [os.urandom(limits.max_frame) for _ in range(32)]  # 2 MiB
                start = time.monotonic()

                async def sender() -> None:
                    for c in chunks:
                        await stream.send_message(c)

                send_task = asyncio.create_task(sender())
                for c in chunks:
                    assert await stream.recv_message() == c
                await send_task
                elapsed = time.monotonic() - start
        burst = max(rate * 0.1, limits.max_frame + 25)
        # the echo node reads at <= rate after its burst; a little slack for timer granularity
        assert elapsed >= 0.8 * (len(chunks) * limits.max_frame - burst) / rate

    run(scenario)


def test_send_blocks_on_buffered_memory_limit_until_peer_reads() -> None:
    limit = 256 * 1024
    limits = TransportLimits(max_frame=64 * 1024, idle_timeout_s=10.0, ping_interval_s=1.0,
                             max_peer_buffered_bytes=limit)
    HOLD = "/murmur-test/hold/1.0.0"

    async def scenario() -> None:
        accepted: asyncio.Queue[Stream] = asyncio.Queue()
        release = asyncio.Event()

        async def hold(stream: Stream) -> None:
            await accepted.put(stream)  # does not read until told
            await release.wait()

        async with host(limits) as server:
            server.set_handler(HOLD, hold)
            (addr,) = await server.listen("127.0.0.1", 0)
            async with host(limits) as client:
                conn = await client.dial(addr)
                stream = await conn.open_stream(HOLD)
                inbound = await accepted.get()
                chunks = [os.urandom(limits.max_frame) for _ in range(400)]  # 25 MiB >> all buffers
                sent = 0
                max_buffered = 0

                async def sender() -> None:
                    nonlocal sent, max_buffered
                    for c in chunks:
                        await stream.send_message(c)
                        sent += 1
                        max_buffered = max(max_buffered, conn._tr.get_write_buffer_size())

                task = asyncio.create_task(sender())
                done, _ = await asyncio.wait({task}, timeout=1.0)
                assert not done, "send_message() should be blocked by backpressure"
                assert sent < len(chunks)
                assert max_buffered <= limit + limits.max_frame + 25 + 4
                # The receiver stops reading once its budget is spent, but what one
                # read already brought is charged (budget.py): below the limit before
                # the read, plus at most the decoder's scratch of whole frames. Under
                # load the kernel queues several frames, so one read may bring them all.
                assert limit <= inbound.conn.budget.used < limit + DEFAULT_SCRATCH_BYTES  # streams draw from it
                for c in chunks:
                    assert await inbound.recv_message() == c
                await task
                assert inbound.conn.bytes_received >= len(chunks) * limits.max_frame
                assert inbound.conn.budget.peak < limit + DEFAULT_SCRATCH_BYTES  # held throughout, not only at first
                release.set()

    run(scenario)
