"""Transport throughput and handshake latency, sender and receiver in separate OS processes.

(a) raw uvloop TCP, no framing, no crypto: the ceiling on this machine;
(b) murmur: Noise-authenticated, AEAD-framed SecureConnection carrying a real
    signed FP32 delta (DeltaSender -> messages -> DeltaAssembler, which checks
    hash, signature and replay before the receiver acknowledges).

Each figure is the median of ``REPEATS`` transfers, timed at the sender from
the first byte until the receiver's acknowledgement. The last output line is
one JSON object with every figure.

    .venv/bin/python bench/transport.py
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
import uvloop

from murmur.protocol.delta import DeltaAssembler, DeltaSender
from murmur.protocol.identity import Identity
from murmur.protocol.messages import MAX_CHUNK_BYTES, decode
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.transport import SecureConnection, Transport

SIZES_MIB = (1, 10, 50)
REPEATS = 3
HANDSHAKES = 50
RAW_CHUNK = 1024 * 1024
ACK = b"k"
MIB = 1024 * 1024
SIZE_HEADER = struct.Struct(">Q")
RECEIVER_SEED = bytes(range(32))


@dataclass(frozen=True)
class Endpoints:
    raw_port: int
    murmur_addr: str


class _RawSink(asyncio.Protocol):
    """Counts bytes of one announced-size transfer and acknowledges it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport
        self.header = b""
        self.remaining = -1

    def data_received(self, data: bytes) -> None:
        if self.remaining < 0:
            self.header += data
            if len(self.header) < SIZE_HEADER.size:
                return
            (self.remaining,) = SIZE_HEADER.unpack_from(self.header)
            data = self.header[SIZE_HEADER.size :]
        self.remaining -= len(data)
        if self.remaining == 0:
            self.tr.write(ACK)  # type: ignore[attr-defined]
            self.remaining = -1
            self.header = b""


async def _receiver_main(conn_end: mp.connection.Connection) -> None:
    identity = Identity.from_seed(RECEIVER_SEED)
    assembler = DeltaAssembler(identity.peer_id)

    async def on_connection(conn: SecureConnection) -> None:
        while True:
            try:
                message = await conn.recv()
            except Exception:
                return
            if assembler.feed(conn.peer_id, decode(message)) is not None:  # type: ignore[arg-type]
                await conn.send(ACK)

    loop = asyncio.get_running_loop()
    raw_server = await loop.create_server(_RawSink, "127.0.0.1", 0)
    async with Transport(identity, on_connection) as transport:
        (addr,) = await transport.listen("127.0.0.1", 0)
        conn_end.send(Endpoints(raw_server.sockets[0].getsockname()[1], str(addr)))
        await loop.run_in_executor(None, conn_end.recv)  # until the sender says stop
    raw_server.close()


def receiver(conn_end: mp.connection.Connection) -> None:
    uvloop.run(_receiver_main(conn_end))


class _RawSource(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.acked: asyncio.Queue[None] = asyncio.Queue()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        for _ in data:
            self.acked.put_nowait(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


async def bench_raw(port: int, payload: memoryview) -> float:
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_connection(_RawSource, "127.0.0.1", port)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        tr.write(SIZE_HEADER.pack(len(payload)))
        for offset in range(0, len(payload), RAW_CHUNK):
            await proto.can_write.wait()
            tr.write(payload[offset : offset + RAW_CHUNK])
        await proto.acked.get()
        times.append(time.perf_counter() - start)
    tr.close()
    return len(payload) / MIB / statistics.median(times)


async def bench_murmur(conn: SecureConnection, identity: Identity, array: np.ndarray, round_base: int) -> float:
    assert conn.peer_id is not None
    times = []
    for rep in range(REPEATS):
        start = time.perf_counter()
        sender = DeltaSender(identity, conn.peer_id, round_base + rep, array, chunk_bytes=MAX_CHUNK_BYTES)
        for message in sender:
            await conn.send(message)
        if await conn.recv() != ACK:
            raise RuntimeError("receiver did not acknowledge the delta")
        times.append(time.perf_counter() - start)
    return array.nbytes / MIB / statistics.median(times)


async def _ignore(conn: SecureConnection) -> None:
    return None


async def sender_main(endpoints: Endpoints) -> dict[str, object]:
    identity = Identity.generate()
    addr = Multiaddr.parse(endpoints.murmur_addr)
    results: dict[str, object] = {"delta_stream": True, "repeats": REPEATS, "sizes_mib": list(SIZES_MIB)}
    async with Transport(identity, _ignore) as transport:
        handshake_ms = []
        for _ in range(HANDSHAKES):
            start = time.perf_counter()
            conn = await transport.dial(addr)
            handshake_ms.append((time.perf_counter() - start) * 1000)
            await conn.close()
        results["connect_handshake_ms_median"] = round(statistics.median(handshake_ms), 3)
        results["connect_handshake_ms_p90"] = round(sorted(handshake_ms)[int(0.9 * HANDSHAKES)], 3)
        print(f"connect+handshake: median {results['connect_handshake_ms_median']} ms over {HANDSHAKES}")

        conn = await transport.dial(addr)
        rng = np.random.default_rng(0)
        for i, size in enumerate(SIZES_MIB):
            array = rng.standard_normal(size * MIB // 4, dtype=np.float32)
            raw = await bench_raw(endpoints.raw_port, memoryview(array).cast("B"))
            enc = await bench_murmur(conn, identity, array, round_base=i * REPEATS)
            ratio = enc / raw
            results[f"raw_mib_s_{size}"] = round(raw, 1)
            results[f"murmur_mib_s_{size}"] = round(enc, 1)
            results[f"ratio_{size}"] = round(ratio, 3)
            print(f"{size:>3} MiB: raw TCP {raw:7.1f} MiB/s | murmur (signed delta) {enc:7.1f} MiB/s | ratio {ratio:.2f}")
        await conn.close()
    return results


def main() -> None:
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child_end,), name="bench-receiver")
    proc.start()
    try:
        endpoints: Endpoints = parent_end.recv()
        results = uvloop.run(sender_main(endpoints))
    finally:
        parent_end.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    results["cpus"] = os.cpu_count()
    results["python"] = sys.version.split()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
