"""A py-libp2p peer for the interop tests, driven by JSON lines on stdin.

Runs in its own virtualenv (py-libp2p is trio-based and pins its own
dependencies), never imports murmur. Listens on 127.0.0.1 only, speaks
/noise + /yamux/1.0.0 with an Ed25519 identity (murmur verifies Ed25519
identities only), serves an echo protocol, and answers each command with one
JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

ECHO = TProtocol("/murmur-interop/echo/1.0.0")
IDENTIFY = TProtocol("/ipfs/id/1.0.0")
CHUNK = 64 * 1024


async def read_all(stream) -> bytes:  # type: ignore[no-untyped-def]
    parts = []
    while True:
        try:
            data = await stream.read(CHUNK)
        except StreamEOF:
            break
        if not data:
            break
        parts.append(data)
    return b"".join(parts)


async def echo_handler(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while True:
            try:
                data = await stream.read(CHUNK)
            except StreamEOF:
                break
            if not data:
                break
            await stream.write(data)
        await stream.close_write()
    except StreamReset:
        pass
    except Exception:
        try:
            await stream.reset()
        except Exception:
            pass


class Peer:
    nursery: trio.Nursery  # the peer's background services (a relay)

    def __init__(self) -> None:
        key_pair = create_new_key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519().private_key)
        self.host = new_host(key_pair=key_pair, sec_opt={NOISE_ID: noise})
        self.host.set_stream_handler(ECHO, echo_handler)
        self.ping_service = PingService(self.host)

    async def echo(self, peer: ID, size: int) -> float:
        data = os.urandom(size)
        stream = await self.host.new_stream(peer, [ECHO])
        start = time.perf_counter()
        got = b""

        async def writer() -> None:
            for i in range(0, len(data), CHUNK):
                await stream.write(data[i : i + CHUNK])
            await stream.close_write()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            got = await read_all(stream)
        if got != data:
            raise AssertionError(f"echo mismatch: sent {len(data)} got {len(got)}")
        return time.perf_counter() - start

    async def circuit(self, allow_hop: bool, limits: object) -> None:
        """Run py-libp2p's circuit relay v2 service (/stop always, /hop with
        ``allow_hop``) in the background until the peer exits."""
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.tools.anyio_service import background_trio_service

        service = CircuitV2Protocol(self.host, limits=limits, allow_hop=allow_hop)  # type: ignore[arg-type]
        started = trio.Event()

        async def serve() -> None:
            async with background_trio_service(service):
                await service.event_started.wait()
                started.set()
                await trio.sleep_forever()

        self.nursery.start_soon(serve)
        await started.wait()

    async def run_command(self, cmd: dict) -> dict:
        name = cmd["cmd"]
        peer = ID.from_base58(cmd["peer"]) if "peer" in cmd else None
        if name == "dial":
            info = info_from_p2p_addr(multiaddr.Multiaddr(cmd["addr"]))
            await self.host.connect(info)
            return {}
        if name == "identify":
            stream = await self.host.new_stream(peer, [IDENTIFY])
            msg = parse_identify_response(await read_all(stream))
            return {
                "protocols": list(msg.protocols),
                "agent": msg.agent_version,
                "protocol_version": msg.protocol_version,
                "listen": [str(multiaddr.Multiaddr(a)) for a in msg.listen_addrs],
                "observed": str(multiaddr.Multiaddr(msg.observed_addr)) if msg.observed_addr else None,
                "public_key": msg.public_key.hex(),
            }
        if name == "ping":
            rtts = await self.ping_service.ping(peer, cmd.get("count", 3))
            return {"rtts_ms": rtts}
        if name == "echo":
            return {"seconds": await self.echo(peer, cmd["size"])}
        if name == "streams":
            async with trio.open_nursery() as nursery:
                for _ in range(cmd["n"]):
                    nursery.start_soon(self.echo, peer, cmd["size"])
            return {}
        if name == "reset":
            victim = await self.host.new_stream(peer, [ECHO])
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(self.echo, peer, 100_000)
                await victim.write(os.urandom(200_000))
                await victim.reset()
            await self.echo(peer, 1000)
            return {"connected": bool(self.host.get_network().get_connections(peer))}
        if name == "connected":
            return {"connected": bool(self.host.get_network().get_connections(peer))}
        if name == "relay":  # serve circuit relay v2 (/hop) with the given limits, until the peer exits
            from libp2p.relay.circuit_v2.resources import RelayLimits

            limits = RelayLimits(duration=cmd.get("duration", 120), data=cmd.get("data", 1 << 20),
                                 max_circuit_conns=8, max_reservations=8)
            await self.circuit(allow_hop=True, limits=limits)
            return {}
        if name == "reserve":  # reserve on the relay at addr (accepting its STOPs); the relay's answer
            from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
            from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
            from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

            await self.circuit(allow_hop=False, limits=None)
            info = info_from_p2p_addr(multiaddr.Multiaddr(cmd["addr"]))
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [PROTOCOL_ID])
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
            await stream.close()
            return {"status": answer.status, "expire": answer.reservation.expire,
                    "addrs": [str(multiaddr.Multiaddr(a)) for a in answer.reservation.addrs]}
        if name == "close":
            await self.host.disconnect(peer)
            return {}
        raise ValueError(f"unknown command {name}")

    async def main(self) -> None:
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with self.host.run(listen_addrs=listen), trio.open_nursery() as self.nursery:
            addrs = [str(a) for a in self.host.get_addrs()]
            print(json.dumps({"ok": True, "peer_id": self.host.get_id().to_base58(), "addrs": addrs}), flush=True)
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line or line.strip() == '{"cmd": "quit"}':
                    self.nursery.cancel_scope.cancel()
                    return
                cmd = json.loads(line)
                try:
                    with trio.fail_after(cmd.get("timeout", 60)):
                        reply = {"ok": True, **await self.run_command(cmd)}
                except BaseException as exc:  # noqa: BLE001 - every failure is the test's to see
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    trio.run(Peer().main)
