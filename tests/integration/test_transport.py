"""Transport over real loopback sockets on uvloop: handshake, identity, keepalive, flow control.

The helpers at the top are shared with ``test_transport_faults.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from murmur.errors import IdentityMismatch, PeerFault
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import ConnectionClosed, SecureConnection, Transport, TransportLimits

FAST = TransportLimits(
    connect_timeout_s=1.0,
    handshake_timeout_s=0.5,
    idle_timeout_s=1.0,
    ping_interval_s=0.2,
)
TEST_DEADLINE_S = 30.0


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


class EchoNode:
    """A real Transport whose on_connection echoes every message and records what ended it."""

    def __init__(self, limits: TransportLimits = FAST) -> None:
        self.identity = Identity.generate()
        self.transport = Transport(self.identity, self._serve, limits)
        self.ended: asyncio.Queue[BaseException] = asyncio.Queue()
        self.connections: list[SecureConnection] = []
        self.addr: Multiaddr | None = None

    async def start(self) -> Multiaddr:
        (self.addr,) = await self.transport.listen("127.0.0.1", 0)
        return self.addr

    async def _serve(self, conn: SecureConnection) -> None:
        self.connections.append(conn)
        try:
            while True:
                await conn.send(await conn.recv())
        except (PeerFault, ConnectionClosed) as exc:
            await self.ended.put(exc)

    async def next_end(self, within_s: float = 3.0) -> BaseException:
        return await asyncio.wait_for(self.ended.get(), within_s)


async def _ignore(conn: SecureConnection) -> None:
    return None


async def assert_serves_good_peer(node: EchoNode, size: int = 1000) -> None:
    """The node still completes a handshake and echoes a message for a well-behaved peer."""
    assert node.addr is not None
    async with Transport(Identity.generate(), _ignore, FAST) as client:
        conn = await client.dial(node.addr)
        assert conn.peer_id == node.identity.peer_id
        payload = os.urandom(size)
        await conn.send(payload)
        assert await conn.recv() == payload


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


def test_handshake_both_directions_proves_identities() -> None:
    async def scenario() -> None:
        seen: dict[str, list[SecureConnection]] = {"a": [], "b": []}

        def recorder(key: str) -> Callable[[SecureConnection], Awaitable[None]]:
            async def on_connection(conn: SecureConnection) -> None:
                seen[key].append(conn)
                await conn.send(b"hello from " + key.encode())

            return on_connection

        ida, idb = Identity.generate(), Identity.generate()
        async with Transport(ida, recorder("a"), FAST) as a, Transport(idb, recorder("b"), FAST) as b:
            (addr_a,) = await a.listen("127.0.0.1", 0)
            (addr_b,) = await b.listen("127.0.0.1", 0)
            assert addr_a.peer_id == ida.peer_id and addr_a.port > 0
            a_to_b = await a.dial(addr_b)
            b_to_a = await b.dial(addr_a.without_peer())  # no expected id: whatever is proved
            assert a_to_b.peer_id == idb.peer_id and a_to_b.outbound
            assert b_to_a.peer_id == ida.peer_id and b_to_a.outbound
            await eventually(lambda: len(seen["a"]) == 2 and len(seen["b"]) == 2)
            inbound_a = next(c for c in seen["a"] if not c.outbound)
            assert inbound_a.peer_id == idb.peer_id
            # each on_connection greeted its peer; both directions carry data
            assert await a_to_b.recv() == b"hello from b"
            assert await b_to_a.recv() == b"hello from a"
            await a_to_b.send(b"ping-a")
            inbound_b = next(c for c in seen["b"] if not c.outbound)
            assert await inbound_b.recv() == b"hello from a"
            assert await inbound_b.recv() == b"ping-a"
            assert a_to_b.bytes_sent == len(b"ping-a") + len(b"hello from a")
            assert inbound_b.bytes_received == len(b"hello from a") + len(b"ping-a")

    run(scenario)


def test_dial_with_wrong_peer_id_raises_and_node_keeps_serving() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            impostor = Identity.generate().peer_id
            async with Transport(Identity.generate(), _ignore, FAST) as client:
                with pytest.raises(IdentityMismatch):
                    await client.dial(addr.with_peer(impostor))
                assert client.connections == []
            # the listener saw the dialler vanish mid-handshake; nothing was opened on its side
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


def test_large_messages_roundtrip_and_counters() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            async with Transport(Identity.generate(), _ignore, FAST) as client:
                conn = await client.dial(addr)
                sizes = [0, 1, 65535, 65536, 300_000, FAST.max_frame]
                payloads = [os.urandom(n) for n in sizes]
                for p in payloads:
                    await conn.send(p)
                for p in payloads:
                    assert await conn.recv() == p
                assert conn.bytes_sent == conn.bytes_received == sum(sizes)
                with pytest.raises(ValueError):
                    await conn.send(bytes(FAST.max_frame + 1))

    run(scenario)


def test_keepalive_holds_idle_connection_and_pings_never_reach_recv() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            async with Transport(Identity.generate(), _ignore, FAST) as client:
                conn = await client.dial(addr)
                # Stay silent for 2x the idle timeout: only pings/pongs flow.
                await asyncio.sleep(2 * FAST.idle_timeout_s)
                assert not conn.closed and node.ended.empty()
                await conn.send(b"still here")
                assert await conn.recv() == b"still here"  # no control frame surfaced first
                assert conn.bytes_received == len(b"still here")

    run(scenario)


def test_close_is_seen_by_peer_and_cancels_every_task() -> None:
    async def scenario() -> None:
        node = EchoNode()
        before = asyncio.all_tasks()
        async with node.transport:
            addr = await node.start()
            client = Transport(Identity.generate(), _ignore, FAST)
            conn = await client.dial(addr)
            await conn.send(b"x")
            assert await conn.recv() == b"x"
            await conn.close()
            assert isinstance(await node.next_end(), ConnectionClosed)
            with pytest.raises(ConnectionClosed):
                await conn.send(b"late")
            with pytest.raises(ConnectionClosed):
                await conn.recv()
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
        async with node.transport:
            addr = await node.start()
            async with Transport(Identity.generate(), _ignore, limits) as client:
                conn = await client.dial(addr)
                chunks = [os.urandom(limits.max_frame) for _ in range(32)]  # 2 MiB
                start = time.monotonic()

                async def sender() -> None:
                    for c in chunks:
                        await conn.send(c)

                send_task = asyncio.create_task(sender())
                for c in chunks:
                    assert await conn.recv() == c
                await send_task
                elapsed = time.monotonic() - start
        burst = max(rate * 0.1, limits.max_frame + 17)
        # the echo node reads at <= rate after its burst; a little slack for timer granularity
        assert elapsed >= 0.8 * (len(chunks) * limits.max_frame - burst) / rate

    run(scenario)


def test_send_blocks_on_buffered_memory_limit_until_peer_reads() -> None:
    limit = 256 * 1024
    limits = TransportLimits(max_frame=64 * 1024, idle_timeout_s=10.0, ping_interval_s=1.0,
                             max_peer_buffered_bytes=limit)

    async def scenario() -> None:
        accepted: asyncio.Queue[SecureConnection] = asyncio.Queue()

        async def hold(conn: SecureConnection) -> None:
            await accepted.put(conn)  # does not read until told

        async with Transport(Identity.generate(), hold, limits) as server:
            (addr,) = await server.listen("127.0.0.1", 0)
            async with Transport(Identity.generate(), _ignore, limits) as client:
                conn = await client.dial(addr)
                inbound = await accepted.get()
                chunks = [os.urandom(limits.max_frame) for _ in range(400)]  # 25 MiB >> all buffers
                sent = 0
                max_buffered = 0

                async def sender() -> None:
                    nonlocal sent, max_buffered
                    for c in chunks:
                        await conn.send(c)
                        sent += 1
                        max_buffered = max(max_buffered, conn._tr.get_write_buffer_size())

                task = asyncio.create_task(sender())
                done, _ = await asyncio.wait({task}, timeout=1.0)
                assert not done, "send() should be blocked by backpressure"
                assert sent < len(chunks)
                assert max_buffered <= limit + limits.max_frame + 17 + 4
                for c in chunks:
                    assert await inbound.recv() == c
                await task
                assert inbound.bytes_received == len(chunks) * limits.max_frame

    run(scenario)
