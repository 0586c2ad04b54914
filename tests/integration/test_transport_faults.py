"""Hostile peers on raw sockets against a host. Each test ends by proving the same host still serves a good peer.

The wire is the libp2p upgrade: multistream-select in the clear, murmur's
fast-path handshake, then its records and muxer. Garbage is tried at each
step: before the security protocol is agreed, after it (in the handshake),
and after the upgrade (records, muxer frames).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from murmur.errors import (
    DecryptError,
    FrameError,
    FrameTooLarge,
    HandshakeError,
    IdentityMismatch,
    MuxerError,
    NegotiationError,
    NoCommonProtocol,
    PeerFault,
    TimeoutFault,
)
from murmur.protocol import multistream
from murmur.protocol.framing import FRAME_LENGTH, FRAME_OVERHEAD, FrameEncoder, FrameType
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p.wire import FAST_SECURITY
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.noise import HandshakePayload, Libp2pNoiseHandshake
from murmur.protocol.transport import TransportLimits
from murmur.testnet.hostile import negotiate, noise_handshake, upgrade
from tests.integration.test_transport import (
    ECHO,
    FAST,
    EchoNode,
    assert_serves_good_peer,
    closed_within,
    eventually,
    host,
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
    ("negotiated", "wire", "eof", "fault"),
    [
        (False, b"\xff\xff\x7f", False, NegotiationError),  # a varint far over the message bound
        (False, b"\x00\x05hello", False, NegotiationError),  # not the multistream header
        (False, multistream.encode_message(multistream.PROTOCOL_ID)[:7], True, NegotiationError),  # cut, then EOF
        (False, b"GET / HTTP/1.1\r\n\r\n", False, NegotiationError),  # a plaintext protocol
        (True, b"\xff\xff", False, FrameTooLarge),  # handshake length prefix over the cap
        (True, b"\x00\x05hello", False, HandshakeError),  # message 1 shorter than an X25519 key
        (True, b"\x00\x20" + b"\x01" * 10, True, FrameError),  # truncated message 1, then EOF
        (True, b"GET / HTTP/1.1\r\n\r\n", False, FrameTooLarge),  # a plaintext protocol, past negotiation
    ],
)
def test_garbage_before_the_upgrade(negotiated: bool, wire: bytes, eof: bool, fault: type,
                                    caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            if negotiated:
                await negotiate(reader, writer, FAST_SECURITY)
            writer.write(wire)
            if eof:
                writer.write_eof()
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert _faults(caplog) == [fault.__name__]
            peer, seen = await node.next_fault()
            assert peer is None and type(seen) is fault  # no identity to blame
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


def test_a_plaintext_proposal_is_refused_and_an_endless_na_loop_cut() -> None:
    """Never a plaintext protocol, whatever a dialler proposes; after
    ``max_negotiation_attempts`` refusals the connection is closed."""
    limits = dataclasses.replace(FAST, max_negotiation_attempts=3)

    async def scenario() -> None:
        node = EchoNode(limits)
        async with node.host:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            header = multistream.encode_message(multistream.PROTOCOL_ID)
            writer.write(header)
            assert await reader.readexactly(len(header)) == header
            na = multistream.encode_message(multistream.NA)
            for proposal in ["/plaintext/2.0.0", "/plaintext/1.0.0", "/tls/1.0.0"]:
                writer.write(multistream.encode_message(proposal))
                assert await reader.readexactly(len(na)) == na
            writer.write(multistream.encode_message("/noise-please"))  # one more than allowed
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            _, seen = await node.next_fault()
            assert isinstance(seen, NegotiationError)
            await assert_serves_good_peer(node)

    run(scenario)


async def _authenticated_raw(addr: Multiaddr) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameEncoder]:
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    hs = Libp2pNoiseHandshake(Identity.generate(), initiator=True, expected=addr.peer_id)
    enc, _ = await upgrade(reader, writer, hs)
    return reader, writer, enc


def _record(enc: FrameEncoder, ftype: FrameType, stream: int, payload: bytes = b"") -> bytes:
    return bytes(enc.encode(ftype, stream, payload))


PROPOSAL = multistream.Dialer([ECHO]).start()


@pytest.mark.parametrize(
    ("make_wire", "eof", "fault"),
    [
        (lambda enc: FRAME_LENGTH.pack(FAST.max_frame + FRAME_OVERHEAD + 1) + b"x" * 64, False, FrameTooLarge),
        (lambda enc: FRAME_LENGTH.pack(100) + os.urandom(100), False, DecryptError),
        (lambda enc: _record(enc, FrameType.DATA, 1, b"a" * 50)[:-10], True, FrameError),
        (lambda enc: FRAME_LENGTH.pack(3) + b"abc", False, FrameError),
        (lambda enc: _record(enc, FrameType.DATA, 7, b"never opened"), False, MuxerError),
        (lambda enc: _record(enc, FrameType.OPEN, 2), False, MuxerError),  # the listener's parity
        (lambda enc: _record(enc, FrameType.OPEN, 1), False, MuxerError),  # stream 1 again
        (lambda enc: _record(enc, FrameType.FIN, 1) + _record(enc, FrameType.DATA, 1, b"late"), False, MuxerError),
        (lambda enc: _record(enc, FrameType.PING, 0, b"p" * 65), False, FrameError),
        (lambda enc: _record(enc, FrameType.DATA, 0, b"stream 0 is not a stream"), False, MuxerError),
    ],
    ids=["oversized", "bad-aead", "truncated", "too-short", "unknown-stream", "wrong-parity", "reopened",
         "data-after-fin", "big-ping", "data-on-stream-0"],
)
def test_bad_records_after_the_upgrade(make_wire, eof: bool, fault: type) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            reader, writer, enc = await _authenticated_raw(addr)
            good = b"first is fine"
            writer.write(_record(enc, FrameType.OPEN, 1) + _record(enc, FrameType.DATA, 1, PROPOSAL)
                         + _record(enc, FrameType.DATA, 1, good))
            await eventually(lambda: bool(node.connections) and node.connections[0].bytes_received == len(PROPOSAL) + len(good))
            writer.write(make_wire(enc))
            if eof:
                writer.write_eof()
            peer, seen = await node.next_fault()
            assert type(seen) is fault and peer is not None  # blamed on the proved peer
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert node.connections[0].closed and node.connections[0].fault is seen
            await assert_serves_good_peer(node)

    run(scenario)


def test_forged_static_key_signature_inbound(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            await negotiate(reader, writer, FAST_SECURITY)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await noise_handshake(reader, writer, ForgingHandshake(Identity.generate(), True))
                await reader.readexactly(1)  # the node must have hung up instead of talking
            await closed_within(reader, QUICK_CLOSE_S)
            writer.close()
            assert _faults(caplog) == ["IdentityMismatch"]
            assert node.connections == []
            await assert_serves_good_peer(node)

    run(scenario)


async def _accept_security(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The listener's side of the security negotiation, by hand: murmur's fast path only."""
    listener = multistream.Listener({FAST_SECURITY})
    writer.write(listener.start())
    while not listener.done:
        writer.write(listener.feed(await reader.read(1024)))


def test_forged_static_key_signature_outbound() -> None:
    """Dialling a responder that cannot bind its static key to its identity fails with IdentityMismatch."""

    async def scenario() -> None:
        mallory = Identity.generate()

        async def forging_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _accept_security(reader, writer)
                await noise_handshake(reader, writer, ForgingHandshake(mallory, False))
            except (asyncio.IncompleteReadError, ConnectionError, PeerFault):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(forging_responder, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with host() as client:
            with pytest.raises(IdentityMismatch):
                await client.dial(Multiaddr("127.0.0.1", port, mallory.peer_id))
            assert client.connections == []
        server.close()
        await server.wait_closed()
        node = EchoNode()
        async with node.host:
            await node.start()
            await assert_serves_good_peer(node)

    run(scenario)


@pytest.mark.parametrize("negotiated", [False, True], ids=["in-negotiation", "in-handshake"])
def test_slowloris_during_the_upgrade_cut_by_the_upgrade_timeout(negotiated: bool,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            if negotiated:
                await negotiate(reader, writer, FAST_SECURITY)
                dribbled = b"\x00\x20" + os.urandom(32)  # never completes message 1
            else:
                dribbled = multistream.Dialer([FAST_SECURITY]).start()  # never completes the proposal

            async def dribble() -> None:
                for byte in dribbled[:-1]:
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


def test_slowloris_after_the_upgrade_cut_by_idle_timeout() -> None:
    async def scenario() -> None:
        node = EchoNode()
        async with node.host:
            addr = await node.start()
            reader, writer, enc = await _authenticated_raw(addr)
            record = _record(enc, FrameType.OPEN, 1)  # bytes keep arriving, but never a whole record

            async def dribble() -> None:
                for i in range(0, len(record) - 1, 2):
                    writer.write(record[i : i + 2])
                    await asyncio.sleep(0.05)

            dribbler = asyncio.create_task(dribble())
            peer, ended = await node.next_fault(within_s=3 * FAST.idle_timeout_s)
            dribbler.cancel()
            assert isinstance(ended, TimeoutFault) and peer is not None
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
        caplog.set_level(logging.WARNING, logger="murmur.protocol.libp2p.host")
        async with node.host:
            addr = await node.start()

            async def raw_from(local_host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.open_connection(addr.host, addr.port, local_addr=(local_host, 0))

            held = [await raw_from("127.0.0.1")]
            await eventually(lambda: node.host.inbound == 1)
            held.append(await raw_from("127.0.0.2"))  # both in 127.0.0.0/24
            await eventually(lambda: node.host.inbound == 2)
            refused_reader, refused_writer = await raw_from("127.0.0.3")  # third in the /24
            await closed_within(refused_reader, QUICK_CLOSE_S)
            refused_writer.close()
            other_subnet = await raw_from("127.0.1.1")  # a different /24 is still welcome
            await eventually(lambda: node.host.inbound == 3)
            newcomer = await raw_from("127.0.2.1")  # over the overall cap of 3: somebody gives way
            await closed_within(held[0][0], QUICK_CLOSE_S)  # the oldest of the crowded /24
            assert node.host.inbound == 3 and node.host.evictions == {"admission": 1}
            refusals = [getattr(r, "limit", "") for r in caplog.records if getattr(r, "event", "") == "inbound_refused"]
            assert refusals == ["max_inbound_per_subnet"]
            assert not other_subnet[0].at_eof() and not held[1][0].at_eof() and not newcomer[0].at_eof()

            for _, writer in [*held, other_subnet, newcomer]:
                writer.close()
            await eventually(lambda: node.host.inbound == 0)
            await assert_serves_good_peer(node)

    run(scenario)


def test_a_fast_path_listener_that_refuses_the_muxer_is_dropped_after_the_lazy_dial() -> None:
    """The dialler takes ``/murmur/mux/2.0.0`` as agreed with handshake message 3
    (no round trip for the echo); a listener that answers ``na`` instead, or
    sends anything but the echo first, costs it the connection."""

    async def scenario() -> None:
        mallory = Identity.generate()
        refusals = [b"na", b"other"]

        async def refusing_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _accept_security(reader, writer)
                enc, dec = await noise_handshake(reader, writer, Libp2pNoiseHandshake(mallory, False))
                answer = refusals.pop(0)
                header = multistream.encode_message(multistream.PROTOCOL_ID)
                if answer == b"na":
                    writer.write(_record(enc, FrameType.DATA, 0, header + multistream.encode_message("na")))
                else:  # a stream opened before the muxer was agreed
                    writer.write(_record(enc, FrameType.OPEN, 2))
                await reader.read()  # until the dialler hangs up
            except (asyncio.IncompleteReadError, ConnectionError, PeerFault):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(refusing_listener, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        faults: list[PeerFault] = []
        async with host(on_fault=lambda peer, fault: faults.append(fault)) as client:
            for expected in (NoCommonProtocol, NegotiationError):
                conn = await client.dial(Multiaddr("127.0.0.1", port, mallory.peer_id))
                assert conn.muxer == "/murmur/mux/2.0.0"  # lazily: before the listener said anything
                await asyncio.wait_for(conn.wait_closed(), 2.0)
                assert type(conn.fault) is expected and faults[-1] is conn.fault
        server.close()
        await server.wait_closed()

    run(scenario)
