"""Transport throughput and handshake latency, sender and receiver in separate OS processes.

(a) raw uvloop TCP, no framing, no crypto: the ceiling on this machine,
    received into directly (``BufferedProtocol``). The baseline of
    ``ratio_*`` lands the bytes where the delta assembler does (a
    :class:`~murmur.protocol.delta.LandingPool`: a buffer of the announced
    size, reused once the previous transfer's is dropped, which in this loop
    is always), so both sides get the same allocation policy. Two more raw
    figures: ``raw_fresh_*`` lands every transfer in a fresh ``bytearray``
    (page faults on every transfer; ``ratio_vs_fresh_*``) and
    ``raw_discard_*`` only counts bytes through one small reused buffer,
    which is not delivery (nothing of the payload is left in the receiving
    process). The raw receivers run in their own process with glibc as it
    comes; murmur's receiver runs in another, which calls
    ``tune_allocator`` first as a daemon does.
(b) murmur: the fast path two murmur nodes agree on (multistream-select offers
    ``/murmur/noise-fast/2.0.0`` and ``/murmur/mux/2.0.0`` first: Noise
    handshake, large AEAD records, one per stream message, a chunk's as a split
    frame whose payload is sealed from the array and opened in its landing
    place), carrying a
    real signed FP32 delta (DeltaSender -> messages on a ``/murmur/delta/1.0.0``
    stream -> DeltaAssembler, which checks hash, signature and replay before
    the receiver acknowledges), chunked as the node chunks it
    (``DEFAULT_CHUNK_BYTES``), with the cipher the node's default limits
    negotiate (``--cipher`` restricts both ends to one).
(b*) "standard": the same delta between the same two processes over the
    standard libp2p path any libp2p peer gets (``/noise``: ChaCha20-Poly1305
    in 64 KiB Noise messages, ``/yamux/1.0.0`` windows, a uvarint length per
    message): the dialler runs with ``fast_path`` off
    (``standard_vs_murmur_*``).

(b') the same with the delta prepared (encoded and hashed) beforehand, as a
    node does once per round for all its neighbours: what each neighbour
    after the first costs (``ratio_fanout_*``; the sender then hashes
    nothing, the receiver still checks everything).
(b'') "sealed": the protocol's per-byte crypto and nothing else over the
    same raw uvloop TCP: the sender hashes (BLAKE3) and seals each piece
    into a length-prefixed frame, the receiver opens it into the pooled
    landing buffer and hashes it. No messages, no signature, no limits:
    the least code that does what (b) must do to every byte, measured, so
    ``ratio_sealed_*`` is what a single-threaded asyncio implementation can
    reach at best in this run, and ``murmur_vs_sealed_*`` how much of that
    murmur's own framing, messages and checks leave.
(c) the ceiling: what any implementation of (b) could reach on this
    machine. Its per-byte work is the raw transfer's (the pooled variant's
    sender + receiver CPU) plus the crypto the protocol requires on every
    byte: BLAKE3 and the AEAD seal on the sender, the AEAD open and BLAKE3
    on the receiver, timed here with the negotiated cipher on the same
    256 KiB pieces. Even spread perfectly over every core, that work takes
    ``(raw CPU + crypto CPU) / cores`` per MiB, so ``ratio_ceiling_*`` =
    raw wall / that bound (capped at 1) is an upper bound on ``ratio_*``.

Set-up (``connect_handshake_ms_*`` for the fast path,
``standard_connect_handshake_ms_*`` for the standard one) is TCP connect,
multistream-select of the security protocol, the Noise XX handshake (both
identities proven) and multistream-select of the muxer, until ``dial``
returns a connection streams can be opened on.

Every transfer is timed at the sender from the first byte until the
receiver's acknowledgement, i.e. until the other process holds all
of it. The variants run interleaved (fresh, pooled, discard, murmur, fresh, ...) over
``REPEATS`` rounds so load from other processes on a shared box hits all
variants alike; each figure is the median. The last output line is one JSON
object with every figure.

    .venv/bin/python bench/transport.py [--sizes 1,10,50] [--repeats 7] [--cipher AESGCM|CHACHAPOLY]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import blake3
import numpy as np
import uvloop

from murmur.protocol.delta import (
    DEFAULT_CHUNK_BYTES,
    AssemblerLimits,
    DeltaAssembler,
    DeltaSender,
    LandingPool,
    PreparedDelta,
)
from murmur.errors import PeerFault
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import FastConnection, HostConfig, Libp2pConnection, Libp2pHost, Stream
from murmur.protocol.messages import MurmurProtocol, decode
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.framing import FRAME_LENGTH
from murmur.protocol.noise import TAG_LEN, CipherState, NoiseCipher
from murmur.protocol.transport import TransportLimits, tune_allocator

SIZES_MIB = (1, 10, 50)
CRYPTO_PASSES = 3
CORES = len(os.sched_getaffinity(0))
REPEATS = 7
HANDSHAKES = 50
ACK = struct.Struct(">d")  # the receiver's CPU seconds spent on the transfer it acknowledges
REJECTED = ACK.pack(-1.0)
MIB = 1024 * 1024
SIZE_HEADER = struct.Struct(">Q")
DISCARD_BUFFER = 256 * 1024
RECEIVER_SEED = bytes(range(32))
SEALED_KEY = bytes(32)  # variant (b''): both ends' AEAD key (speed, not secrecy)
SEALED_CIPHER = NoiseCipher.AESGCM  # what two default nodes negotiate (printed as "cipher")
LIMITS = TransportLimits()  # the node's defaults, on both ends (``--cipher`` narrows ``ciphers``)
DELTA = MurmurProtocol.DELTA  # the stream the node's deltas travel on


class Landing(enum.Enum):
    """Where a raw receiver puts the bytes."""

    BYTEARRAY = "bytearray"  # the baseline: one fresh bytearray of the announced size
    POOLED = "pooled"  # the delta assembler's LandingPool
    DISCARD = "discard"  # one small reused buffer, nothing kept


@dataclass(frozen=True)
class Options:
    sizes_mib: tuple[int, ...] = SIZES_MIB
    repeats: int = REPEATS
    limits: TransportLimits = LIMITS


class CpuMeter:
    """Process CPU (user + sys) since the previous acknowledgement. Transfers
    run one at a time, so that is the receiver's cost of the one acknowledged:
    a figure load from other processes does not inflate, unlike wall time."""

    def __init__(self) -> None:
        self._last = time.process_time()

    def ack(self) -> bytes:
        now = time.process_time()
        spent, self._last = now - self._last, now
        return ACK.pack(spent)


@dataclass(frozen=True)
class Endpoints:
    raw_ports: dict[Landing, int]
    sealed_port: int
    murmur_addr: str


class _RawSink(asyncio.BufferedProtocol):
    """Receives one announced-size transfer at a time and acknowledges it,
    landing it as ``landing`` says (fresh per transfer unless discarded)."""

    def __init__(self, landing: Landing, meter: CpuMeter) -> None:
        self.keep = landing is not Landing.DISCARD
        pool = LandingPool(AssemblerLimits().landing_pool_bytes)
        self.allocate = (lambda n: memoryview(bytearray(n))) if landing is Landing.BYTEARRAY else pool.take
        self.meter = meter
        self.scratch = memoryview(bytearray(DISCARD_BUFFER))
        self.header = bytearray(SIZE_HEADER.size)
        self.size = -1  # -1: reading the header
        self.filled = 0
        self.body = self.scratch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.size < 0:
            return memoryview(self.header)[self.filled :]
        if self.keep:
            return self.body[self.filled :]
        return self.scratch[: self.size - self.filled]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.size < 0:
            if self.filled == SIZE_HEADER.size:
                (self.size,) = SIZE_HEADER.unpack(self.header)
                self.body = self.allocate(self.size) if self.keep else self.scratch
                self.filled = 0
        elif self.filled == self.size:
            self.tr.write(self.meter.ack())  # type: ignore[attr-defined]
            self.size, self.filled = -1, 0


class _SealedSink(asyncio.BufferedProtocol):
    """Variant (b'')'s receiver: a size header, then frames (4-byte length,
    AEAD ciphertext of one piece) each read into one reused frame buffer,
    opened into the pooled landing buffer and hashed."""

    def __init__(self, meter: CpuMeter) -> None:
        self.meter = meter
        self.pool = LandingPool(AssemblerLimits().landing_pool_bytes)
        self.cipher = CipherState(SEALED_KEY, SEALED_CIPHER)
        self.frame = memoryview(bytearray(DEFAULT_CHUNK_BYTES + TAG_LEN))
        self.size_header = memoryview(bytearray(SIZE_HEADER.size))
        self.frame_header = memoryview(bytearray(FRAME_LENGTH.size))
        self.target = self.size_header  # what is being filled now
        self.filled = 0
        self.landing = memoryview(b"")
        self.landed = 0
        self.hasher = blake3.blake3()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < len(self.target):
            return
        self.filled = 0
        if self.target is self.size_header:
            (size,) = SIZE_HEADER.unpack(self.size_header)
            self.landing, self.landed, self.hasher = self.pool.take(size), 0, blake3.blake3()
            self.target = self.frame_header
        elif self.target is self.frame_header:
            (length,) = FRAME_LENGTH.unpack(self.frame_header)
            self.target = self.frame[:length]
        else:
            plain = self.landing[self.landed : self.landed + len(self.target) - TAG_LEN]
            self.cipher.open_into(self.target, plain)
            self.hasher.update(plain)
            self.landed += len(plain)
            if self.landed < len(self.landing):
                self.target = self.frame_header
            else:
                self.hasher.digest()
                self.tr.write(self.meter.ack())  # type: ignore[attr-defined]
                self.target = self.size_header


async def _raw_receiver_main(conn_end: mp.connection.Connection) -> None:
    meter = CpuMeter()
    loop = asyncio.get_running_loop()
    servers = {
        landing: await loop.create_server(lambda landing=landing: _RawSink(landing, meter), "127.0.0.1", 0)
        for landing in Landing
    }
    sealed = await loop.create_server(lambda: _SealedSink(meter), "127.0.0.1", 0)
    conn_end.send(({landing: server.sockets[0].getsockname()[1] for landing, server in servers.items()},
                   sealed.sockets[0].getsockname()[1]))
    await loop.run_in_executor(None, conn_end.recv)  # until the sender says stop
    for server in (*servers.values(), sealed):
        server.close()


def raw_receiver(conn_end: mp.connection.Connection) -> None:
    """The baseline's receiving process: a plain uvloop program, glibc as it comes."""
    uvloop.run(_raw_receiver_main(conn_end))


async def _murmur_receiver_main(conn_end: mp.connection.Connection, limits: TransportLimits) -> None:
    identity = Identity.from_seed(RECEIVER_SEED)
    assembler = DeltaAssembler(identity.peer_id)
    meter = CpuMeter()

    async def on_delta(stream: Stream) -> None:
        while (parts := await stream.recv_parts()) is not None:  # as PeerSession.serve reads
            try:
                done = assembler.feed(stream.peer_id, decode(*parts))  # type: ignore[arg-type]
            except PeerFault:  # a bench bug (say, a replayed round): fail the run, do not hang it
                await stream.send_message(REJECTED)
                raise
            if done is not None:
                await stream.send_message(meter.ack())

    async with Libp2pHost(identity, HostConfig(limits=limits)) as host:  # accepts both paths, as a node does
        host.set_handler(DELTA, on_delta)
        (addr,) = await host.listen("127.0.0.1", 0)
        conn_end.send(str(addr))
        await asyncio.get_running_loop().run_in_executor(None, conn_end.recv)  # until the sender says stop


def murmur_receiver(conn_end: mp.connection.Connection, limits: TransportLimits) -> None:
    """murmur's receiving process, started as a daemon starts (allocator tuned)."""
    tune_allocator()
    uvloop.run(_murmur_receiver_main(conn_end, limits))


class _RawSource(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.acked: asyncio.Queue[float] = asyncio.Queue()
        self.pending = b""
        self.can_write = asyncio.Event()
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while len(self.pending) >= ACK.size:
            self.acked.put_nowait(ACK.unpack_from(self.pending)[0])
            self.pending = self.pending[ACK.size :]

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


class RawLink:
    """One plain TCP connection; ``transfer`` sends the payload in the same
    pieces the delta is chunked into and waits for the acknowledgement."""

    def __init__(self, tr: asyncio.Transport, proto: _RawSource) -> None:
        self.tr, self.proto = tr, proto

    @classmethod
    async def open(cls, port: int) -> Self:
        tr, proto = await asyncio.get_running_loop().create_connection(_RawSource, "127.0.0.1", port)
        return cls(tr, proto)  # type: ignore[arg-type]

    async def transfer(self, payload: memoryview) -> Sample:
        start, cpu = time.perf_counter(), time.process_time()
        self.tr.write(SIZE_HEADER.pack(len(payload)))
        for offset in range(0, len(payload), DEFAULT_CHUNK_BYTES):
            await self.proto.can_write.wait()
            self.tr.write(payload[offset : offset + DEFAULT_CHUNK_BYTES])
        receiver_cpu = await self.proto.acked.get()
        return Sample(time.perf_counter() - start, time.process_time() - cpu, receiver_cpu)


class SealedLink(RawLink):
    """Variant (b'')'s sender: hash and seal each piece into its own frame
    (a fresh buffer: the transport may hold it until the socket drains)."""

    def __init__(self, tr: asyncio.Transport, proto: _RawSource) -> None:
        super().__init__(tr, proto)
        self.cipher = CipherState(SEALED_KEY, SEALED_CIPHER)

    async def transfer(self, payload: memoryview) -> Sample:
        start, cpu = time.perf_counter(), time.process_time()
        self.tr.write(SIZE_HEADER.pack(len(payload)))
        hasher = blake3.blake3()
        for offset in range(0, len(payload), DEFAULT_CHUNK_BYTES):
            await self.proto.can_write.wait()
            piece = payload[offset : offset + DEFAULT_CHUNK_BYTES]
            hasher.update(piece)
            frame = bytearray(FRAME_LENGTH.size + len(piece) + TAG_LEN)
            FRAME_LENGTH.pack_into(frame, 0, len(piece) + TAG_LEN)
            self.cipher.seal_into(piece, memoryview(frame)[FRAME_LENGTH.size :])
            self.tr.write(frame)
        hasher.digest()
        receiver_cpu = await self.proto.acked.get()
        return Sample(time.perf_counter() - start, time.process_time() - cpu, receiver_cpu)


@dataclass(frozen=True)
class Sample:
    wall_s: float
    sender_cpu_s: float
    receiver_cpu_s: float


async def murmur_transfer(
    stream: Stream, identity: Identity, array: np.ndarray | PreparedDelta, round_: int
) -> Sample:
    start, cpu = time.perf_counter(), time.process_time()
    for message in DeltaSender(identity, stream.peer_id, round_, array):
        await stream.send_message(*message)  # as PeerSession.send_encoded does
    ack = await stream.recv_message()
    if ack is None or len(ack) != ACK.size:
        raise RuntimeError("receiver did not acknowledge the delta")
    if ack == REJECTED:
        raise RuntimeError("the receiver rejected the delta (see its traceback)")
    (receiver_cpu,) = ACK.unpack(ack)
    return Sample(time.perf_counter() - start, time.process_time() - cpu, receiver_cpu)


def crypto_cpu_ms_per_mib(payload: memoryview, cipher: NoiseCipher) -> float:
    """CPU per MiB of the crypto both ends must do on every byte (hash and
    seal, open and hash), single-threaded on ``DEFAULT_CHUNK_BYTES`` pieces
    as the stream does it; the best of a few passes."""
    seal, open_ = CipherState(bytes(32), cipher), CipherState(bytes(32), cipher)
    sealed = bytearray(DEFAULT_CHUNK_BYTES + TAG_LEN)
    opened = bytearray(DEFAULT_CHUNK_BYTES)
    best = float("inf")
    for _ in range(CRYPTO_PASSES):
        start = time.process_time()
        send_hash, recv_hash = blake3.blake3(), blake3.blake3()
        for offset in range(0, len(payload), DEFAULT_CHUNK_BYTES):
            piece = payload[offset : offset + DEFAULT_CHUNK_BYTES]
            n = len(piece)
            send_hash.update(piece)
            seal.seal_into(piece, memoryview(sealed)[: n + TAG_LEN])
            open_.open_into(memoryview(sealed)[: n + TAG_LEN], memoryview(opened)[:n])
            recv_hash.update(memoryview(opened)[:n])
        if send_hash.digest() != recv_hash.digest():
            raise RuntimeError("crypto round trip changed the payload")
        best = min(best, time.process_time() - start)
    return 1000 * best * MIB / len(payload)


async def handshake_figures(host: Libp2pHost, addr: Multiaddr, prefix: str = "") -> dict[str, float]:
    """TCP connect, both negotiations and the Noise XX handshake (both identities
    proven), as ``dial`` returns a connection streams can be opened on."""
    handshake_ms = []
    for _ in range(HANDSHAKES):
        start = time.perf_counter()
        conn = await host.dial(addr)
        handshake_ms.append((time.perf_counter() - start) * 1000)
        await conn.close()
    ordered = sorted(handshake_ms)
    return {
        f"{prefix}connect_handshake_ms_median": round(statistics.median(ordered), 3),
        f"{prefix}connect_handshake_ms_p90": round(ordered[int(0.9 * HANDSHAKES)], 3),
    }


async def sender_main(endpoints: Endpoints, options: Options) -> dict[str, object]:
    identity = Identity.generate()
    addr = Multiaddr.parse(endpoints.murmur_addr)
    limits = options.limits
    results: dict[str, object] = {
        "delta_stream": True,
        "repeats": options.repeats,
        "sizes_mib": list(options.sizes_mib),
        "chunk_bytes": DEFAULT_CHUNK_BYTES,
        "limits": {k: v for k, v in dataclasses.asdict(limits).items() if "bytes" in k or k == "max_frame"},
    }
    standard_limits = dataclasses.replace(limits, fast_path=False)
    async with Libp2pHost(identity, HostConfig(limits=limits)) as host, \
            Libp2pHost(identity, HostConfig(limits=standard_limits)) as standard_host:
        for name, prefix, dialler in (("fast path", "", host), ("standard path", "standard_", standard_host)):
            figures = await handshake_figures(dialler, addr, prefix)
            results.update(figures)
            print(f"connect+negotiation+handshake, {name}: median {figures[f'{prefix}connect_handshake_ms_median']} "
                  f"ms, p90 {figures[f'{prefix}connect_handshake_ms_p90']} ms over {HANDSHAKES}")

        conn = await host.dial(addr)
        assert isinstance(conn, FastConnection), conn
        results["cipher"] = conn.cipher.protocol_name.decode()  # type: ignore[attr-defined]
        results["fast_path"] = [conn.security, conn.muxer]
        stream = await conn.open_stream(DELTA)
        standard: Libp2pConnection = await standard_host.dial(addr)
        results["standard_path"] = [standard.security, standard.muxer]
        standard_stream = await standard.open_stream(DELTA)
        raw = await RawLink.open(endpoints.raw_ports[Landing.BYTEARRAY])
        pooled = await RawLink.open(endpoints.raw_ports[Landing.POOLED])
        discard = await RawLink.open(endpoints.raw_ports[Landing.DISCARD])
        sealed = await SealedLink.open(endpoints.sealed_port)
        rng = np.random.default_rng(0)
        round_ = 0
        for size in options.sizes_mib:
            array = rng.standard_normal(size * MIB // 4, dtype=np.float32)
            payload = memoryview(array).cast("B")
            prepared = PreparedDelta.prepare(array)
            samples: dict[str, list[Sample]] = {
                n: [] for n in ("fresh", "pooled", "discard", "sealed", "murmur", "fanout", "standard")}
            variants: dict[str, Callable[[], Awaitable[Sample]]] = {
                "fresh": lambda: raw.transfer(payload),
                "pooled": lambda: pooled.transfer(payload),
                "discard": lambda: discard.transfer(payload),
                "sealed": lambda: sealed.transfer(payload),
                # distinct rounds: the receiver's replay guard refuses one (round, content) twice
                "murmur": lambda: murmur_transfer(stream, identity, array, 3 * round_),
                "fanout": lambda: murmur_transfer(stream, identity, prepared, 3 * round_ + 1),
                "standard": lambda: murmur_transfer(standard_stream, identity, array, 3 * round_ + 2),
            }
            for _ in range(options.repeats):
                for name, run in variants.items():
                    samples[name].append(await run())
                round_ += 1
            rate = {name: size / statistics.median(x.wall_s for x in xs) for name, xs in samples.items()}
            for name, xs in samples.items():
                for side in ("sender", "receiver"):
                    ms = 1000 * statistics.median(getattr(x, f"{side}_cpu_s") for x in xs) / size
                    results[f"{name}_{side}_cpu_ms_per_mib_{size}"] = round(ms, 3)
            results[f"raw_mib_s_{size}"] = round(rate["pooled"], 1)
            results[f"raw_fresh_mib_s_{size}"] = round(rate["fresh"], 1)
            results[f"raw_discard_mib_s_{size}"] = round(rate["discard"], 1)
            results[f"murmur_mib_s_{size}"] = round(rate["murmur"], 1)
            results[f"ratio_{size}"] = round(rate["murmur"] / rate["pooled"], 3)
            results[f"ratio_vs_fresh_{size}"] = round(rate["murmur"] / rate["fresh"], 3)
            results[f"ratio_vs_discard_{size}"] = round(rate["murmur"] / rate["discard"], 3)
            results[f"sealed_mib_s_{size}"] = round(rate["sealed"], 1)
            results[f"ratio_sealed_{size}"] = round(rate["sealed"] / rate["pooled"], 3)
            results[f"murmur_vs_sealed_{size}"] = round(rate["murmur"] / rate["sealed"], 3)
            results[f"murmur_fanout_mib_s_{size}"] = round(rate["fanout"], 1)
            results[f"ratio_fanout_{size}"] = round(rate["fanout"] / rate["pooled"], 3)
            results[f"standard_mib_s_{size}"] = round(rate["standard"], 1)
            results[f"standard_vs_murmur_{size}"] = round(rate["standard"] / rate["murmur"], 3)
            crypto_ms = crypto_cpu_ms_per_mib(payload, conn.cipher)  # type: ignore[attr-defined]
            raw_cpu_ms = results[f"pooled_sender_cpu_ms_per_mib_{size}"] + results[f"pooled_receiver_cpu_ms_per_mib_{size}"]
            floor_ms = (raw_cpu_ms + crypto_ms) / CORES
            ceiling = min(1.0, (1000 / rate["pooled"]) / floor_ms)
            results[f"crypto_cpu_ms_per_mib_{size}"] = round(crypto_ms, 3)
            results[f"ratio_ceiling_{size}"] = round(ceiling, 3)
            print(f"{size:>3} MiB: raw TCP {rate['pooled']:7.1f} MiB/s (fresh buffer {rate['fresh']:7.1f}, "
                  f"discarding {rate['discard']:7.1f}) | murmur (signed delta) {rate['murmur']:7.1f} MiB/s | "
                  f"ratio {rate['murmur'] / rate['pooled']:.2f} (vs fresh {rate['murmur'] / rate['fresh']:.2f}) | "
                  f"crypto alone {rate['sealed']:7.1f} MiB/s, ratio {rate['sealed'] / rate['pooled']:.2f} | "
                  f"ceiling {ceiling:.2f} (crypto {crypto_ms:.2f} + raw {raw_cpu_ms:.2f} CPU ms/MiB on {CORES} cores) | "
                  f"each further neighbour {rate['fanout']:7.1f} MiB/s, ratio {rate['fanout'] / rate['pooled']:.2f} | "
                  f"murmur vs crypto alone {rate['murmur'] / rate['sealed']:.2f} | standard libp2p path "
                  f"{rate['standard']:7.1f} MiB/s, {rate['standard'] / rate['murmur']:.2f} of the fast path")
        for link in (raw, pooled, discard, sealed):
            link.tr.close()
        await conn.close()
        await standard.close()
    return results


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), help="MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--cipher", choices=[c.name for c in NoiseCipher], help="only this cipher, both ends")
    args = parser.parse_args(argv)
    limits = LIMITS if args.cipher is None else dataclasses.replace(LIMITS, ciphers=(NoiseCipher[args.cipher],))
    return Options(tuple(int(x) for x in args.sizes.split(",")), args.repeats, limits)


def main() -> None:
    options = parse_options()
    tuned = tune_allocator()  # the sender process: murmur's sender allocates per frame, raw's does not
    ctx = mp.get_context("spawn")
    raw_end, raw_child = ctx.Pipe()
    murmur_end, murmur_child = ctx.Pipe()
    procs = [
        ctx.Process(target=raw_receiver, args=(raw_child,), name="bench-raw-receiver"),
        ctx.Process(target=murmur_receiver, args=(murmur_child, options.limits), name="bench-murmur-receiver"),
    ]
    for proc in procs:
        proc.start()
    try:
        endpoints = Endpoints(*raw_end.recv(), murmur_end.recv())
        results = uvloop.run(sender_main(endpoints, options))
    finally:
        for end in (raw_end, murmur_end):
            end.send("stop")
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    results["allocator_tuned"] = tuned
    results["cpus"] = CORES
    results["loadavg_1m"] = round(os.getloadavg()[0], 2)
    results["python"] = sys.version.split()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
