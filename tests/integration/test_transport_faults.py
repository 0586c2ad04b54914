"""Hostile peers on raw sockets. Each test ends by proving the same node still serves a good peer."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from murmur.errors import PeerFault, DecryptError, FrameError, FrameTooLarge, HandshakeError, IdentityMismatch, TimeoutFault
from murmur.protocol.framing import FRAME_LENGTH, FrameType
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import HandshakePayload, Libp2pNoiseHandshake
from murmur.protocol.transport import Transport, TransportLimits
from murmur.testnet.hostile import noise_handshake
from tests.integration.test_transport import (
    FAST,
    EchoNode,
    _ignore,
    assert_serves_good_peer,
    closed_within,
    eventually,
    run,
)

QUICK_CLOSE_S = 0.3  # well under FAST.handshake_timeout_s: the node reacted, not a timer


class ForgingHandshake(Libp2pNoiseHandshake):
    """A real identity that signs some other Noise static key."""

    def _payload(self) -> bytes:
        other = X25519PrivateKey.generate().public_key().public_bytes_raw()
        return HandshakePayload.sign(self.identity, other).encode()


def _faults(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "fault", "") for r in caplog.records if getattr(r, "event", "") == "handshake_failed"]


@pytest.mark.parametrize(
    ("wire", "eof", "fault"),
    [
        (b"\xff\xff", False, FrameTooLarge),  # handshake length prefix over the cap
        (b"\x00\x05hello", False, HandshakeError),  # message 1 shorter than an X25519 key
        (b"\x00\x20" + b"\x01" * 10, True, FrameError),  # truncated message 1, then EOF
        (b"GET / HTTP/1.1\r\n\r\n", False, FrameTooLarge),  # a plaintext protocol
    ],
)
def test_garbage_before_handshake(wire: bytes, eof: bool, fault: type, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            writer.write(wire)
            if eof:
                writer.write_eof()
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert _faults(caplog) == [fault.__name__]
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


async def _authenticated_raw(addr: Multiaddr) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, object]:
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    hs = Libp2pNoiseHandshake(Identity.generate(), initiator=True, expected=addr.peer_id)
    enc, _ = await noise_handshake(reader, writer, hs)
    return reader, writer, enc


@pytest.mark.parametrize(
    ("make_wire", "eof", "fault"),
    [
        (lambda enc: FRAME_LENGTH.pack(FAST.max_frame + 18) + b"x" * 64, False, FrameTooLarge),
        (lambda enc: FRAME_LENGTH.pack(100) + os.urandom(100), False, DecryptError),
        (lambda enc: bytes(enc.encode(FrameType.DATA, b"a" * 50))[:-10], True, FrameError),
        (lambda enc: FRAME_LENGTH.pack(3) + b"abc", False, FrameError),
    ],
)
def test_bad_frames_after_handshake(make_wire, eof: bool, fault: type) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            reader, writer, enc = await _authenticated_raw(addr)
            writer.write(bytes(enc.encode(FrameType.DATA, b"first is fine")))  # type: ignore[attr-defined]
            writer.write(make_wire(enc))
            if eof:
                writer.write_eof()
            ended = await node.next_end()
            # The echo of the good frame may hit the closed connection first:
            # send() then raises ConnectionClosed chained to the fault.
            assert type(ended if isinstance(ended, PeerFault) else ended.__cause__) is fault
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert node.connections[0].bytes_received == len(b"first is fine")
            assert node.connections[0].closed
            await assert_serves_good_peer(node)

    run(scenario)


def test_forged_static_key_signature_inbound(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                enc, _ = await noise_handshake(reader, writer, ForgingHandshake(Identity.generate(), True))
                await reader.readexactly(1)  # the node must have hung up instead of talking
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert _faults(caplog) == ["IdentityMismatch"]
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


def test_forged_static_key_signature_outbound() -> None:
    """Dialling a responder that cannot bind its static key to its identity fails with IdentityMismatch."""

    async def scenario() -> None:
        mallory = Identity.generate()

        async def forging_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await noise_handshake(reader, writer, ForgingHandshake(mallory, False))
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(forging_responder, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with Transport(Identity.generate(), _ignore, FAST) as client:
            with pytest.raises(IdentityMismatch):
                await client.dial(Multiaddr("127.0.0.1", port, mallory.peer_id))
            assert client.connections == []
        server.close()
        await server.wait_closed()
        node = EchoNode()
        async with node.transport:
            await node.start()
            await assert_serves_good_peer(node)

    run(scenario)


def test_slowloris_during_handshake_cut_by_handshake_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            message_one = b"\x00\x20" + os.urandom(32)

            async def dribble() -> None:
                for byte in message_one[:-1]:  # never completes message 1
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)

            dribbler = asyncio.create_task(dribble())
            took = await closed_within(reader, 3 * FAST.handshake_timeout_s)
            dribbler.cancel()
            writer.close()
            assert FAST.handshake_timeout_s * 0.9 <= took
            assert _faults(caplog) == ["TimeoutFault"]
            await assert_serves_good_peer(node)

    run(scenario)


def test_slowloris_after_handshake_cut_by_idle_timeout() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.transport:
            addr = await node.start()
            reader, writer, enc = await _authenticated_raw(addr)
            frame = bytes(enc.encode(FrameType.DATA, b"z" * 1000))  # type: ignore[attr-defined]

            async def dribble() -> None:  # bytes keep arriving, but never a whole frame
                for i in range(0, len(frame) - 1, 20):
                    writer.write(frame[i : i + 20])
                    await asyncio.sleep(0.05)

            dribbler = asyncio.create_task(dribble())
            ended = await node.next_end(within_s=3 * FAST.idle_timeout_s)
            dribbler.cancel()
            assert isinstance(ended, TimeoutFault)
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            await assert_serves_good_peer(node)

    run(scenario)


def test_inbound_caps_per_subnet_and_eviction_when_full(caplog: pytest.LogCaptureFixture) -> None:
    """A full subnet refuses; a full node evicts for a newcomer, from the most
    crowded subnet and the oldest there, instead of refusing it."""
    limits = TransportLimits(
        connect_timeout_s=1.0, handshake_timeout_s=5.0, idle_timeout_s=5.0, ping_interval_s=1.0,
        max_inbound=3, max_inbound_per_subnet=2,
    )

    async def scenario() -> None:
        node = EchoNode(limits)
        caplog.set_level(logging.WARNING, logger="murmur.protocol.transport")
        async with node.transport:
            addr = await node.start()

            async def raw_from(local_host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.open_connection(addr.host, addr.port, local_addr=(local_host, 0))

            held = [await raw_from("127.0.0.1")]
            await eventually(lambda: node.transport.inbound == 1)
            held.append(await raw_from("127.0.0.2"))  # both in 127.0.0.0/24
            await eventually(lambda: node.transport.inbound == 2)
            refused_reader, refused_writer = await raw_from("127.0.0.3")  # third in the /24
            await closed_within(refused_reader, QUICK_CLOSE_S)
            refused_writer.close()
            other_subnet = await raw_from("127.0.1.1")  # a different /24 is still welcome
            await eventually(lambda: node.transport.inbound == 3)
            newcomer = await raw_from("127.0.2.1")  # over the overall cap of 3: somebody gives way
            await closed_within(held[0][0], QUICK_CLOSE_S)  # the oldest of the crowded /24
            assert node.transport.inbound == 3 and node.transport.evictions == {"admission": 1}
            refusals = [getattr(r, "limit", "") for r in caplog.records if getattr(r, "event", "") == "inbound_refused"]
            assert refusals == ["max_inbound_per_subnet"]
            assert not other_subnet[0].at_eof() and not held[1][0].at_eof() and not newcomer[0].at_eof()

            for _, writer in [*held, other_subnet, newcomer]:
                writer.close()
            await eventually(lambda: node.transport.inbound == 0)
            await assert_serves_good_peer(node)

    run(scenario)
