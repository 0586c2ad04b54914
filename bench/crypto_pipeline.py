"""How close to raw TCP can the crypto a signed delta needs get, at best?

``bench/transport.py`` compares murmur with raw TCP and prints a ceiling from
CPU arithmetic. This script checks that ceiling empirically with the least
code that does the same per-byte work: no msgpack, no signature, no rate
limiter, no asyncio, blocking sockets between two OS processes, sender and
receiver each in the plainest Python:

* ``raw``: ``sendall`` 256 KiB pieces / ``recv_into`` one reused buffer.
* ``inline``: the sender hashes (BLAKE3) and seals (AES-256-GCM, counter
  nonce) each piece into a reused frame buffer behind a 4-byte length, then
  sends it; the receiver reads the length and the frame into a reused
  buffer, opens it into the landing buffer and hashes it. Everything murmur
  must do to every byte, and nothing else.
* ``threaded``: the same work, with the hash and the AEAD in a worker
  thread on each side (both release the GIL), so the socket I/O of frame
  *n* overlaps the crypto of frame *n+1*. This is the design that would move
  murmur's crypto off the event loop.

If ``inline`` stays well below 0.7 of ``raw``, so does any implementation of
the protocol on this machine; if ``threaded`` beats ``inline``, off-loop
crypto pays here (it needs spare cores: on 2 cores sender and receiver
already keep both busy). Each figure is the median of ``repeats`` transfers,
the variants interleaved over ``rounds`` so machine noise hits all alike.
The last line printed is one JSON object.

    .venv/bin/python bench/crypto_pipeline.py [--sizes 10,50] [--repeats 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from murmur.protocol.delta import DEFAULT_CHUNK_BYTES

MODES = ("raw", "inline", "threaded")
TAG = 16
LENGTH = struct.Struct(">I")
NONCE = struct.Struct(">4xQ")  # the Noise nonce layout
KEY = bytes(range(32))  # the bench measures speed, not secrecy
QUEUE_DEPTH = 4  # frames in flight between the I/O thread and the crypto worker


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("peer closed mid-frame")
        got += n


def _pipelined(produce: Callable[[Callable[[object], None]], None], consume: Callable[[object], None]) -> None:
    """Run ``produce`` in a worker thread, handing each item to ``consume``
    on this thread through a bounded queue (the worker blocks when it is
    ``QUEUE_DEPTH`` ahead)."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
    done = object()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            produce(handoff.put)
        except BaseException as exc:  # surfaced on the calling thread
            failure.append(exc)
        finally:
            handoff.put(done)

    worker = threading.Thread(target=run, name="crypto-worker")
    worker.start()
    while (item := handoff.get()) is not done:
        consume(item)
    worker.join()
    if failure:
        raise failure[0]


def _frames(size: int) -> Iterator[tuple[int, int, int]]:
    """(nonce, offset, length) of each piece of a ``size``-byte transfer."""
    for n, offset in enumerate(range(0, size, DEFAULT_CHUNK_BYTES)):
        yield n, offset, min(DEFAULT_CHUNK_BYTES, size - offset)


# ------------------------------------------------------------------ receiver


def _receive(sock: socket.socket, mode: str, landing: memoryview, aead: AESGCM) -> bytes:
    if mode == "raw":
        _recv_exact(sock, landing)
        return b""
    pool = [bytearray(DEFAULT_CHUNK_BYTES + TAG) for _ in range(QUEUE_DEPTH + 2)]
    header = memoryview(bytearray(LENGTH.size))
    hasher = blake3.blake3()

    def open_frame(item: object) -> None:
        n, offset, frame = item  # type: ignore[misc]
        plain = landing[offset : offset + len(frame) - TAG]
        aead.decrypt_into(NONCE.pack(n), frame, None, plain)
        hasher.update(plain)

    def read_frames(emit: Callable[[object], None]) -> None:
        for n, offset, length in _frames(len(landing)):
            _recv_exact(sock, header)
            if LENGTH.unpack(header)[0] != length + TAG:
                raise ValueError("unexpected frame length")
            frame = memoryview(pool[n % len(pool)])[: length + TAG]
            _recv_exact(sock, frame)
            emit((n, offset, frame))

    if mode == "threaded":
        # the reader is the worker here so the crypto stays on this thread's
        # side of the queue; either way one thread reads while another opens
        _pipelined(read_frames, open_frame)
    else:
        read_frames(open_frame)
    return hasher.digest()


def receiver_main(port_out: mp.Queue, size: int, plan: list[str]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.put(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    landing = memoryview(bytearray(size))
    aead = AESGCM(KEY)
    for mode in plan:
        _receive(sock, mode, landing, aead)
        sock.sendall(b"k")
    sock.close()


# ------------------------------------------------------------------ sender


def _send(sock: socket.socket, mode: str, payload: memoryview, aead: AESGCM) -> bytes:
    if mode == "raw":
        for _, offset, length in _frames(len(payload)):
            sock.sendall(payload[offset : offset + length])
        return b""
    pool = [bytearray(LENGTH.size + DEFAULT_CHUNK_BYTES + TAG) for _ in range(QUEUE_DEPTH + 2)]
    hasher = blake3.blake3()

    def seal_frames(emit: Callable[[object], None]) -> None:
        for n, offset, length in _frames(len(payload)):
            piece = payload[offset : offset + length]
            hasher.update(piece)
            out = memoryview(pool[n % len(pool)])[: LENGTH.size + length + TAG]
            LENGTH.pack_into(out, 0, length + TAG)
            aead.encrypt_into(NONCE.pack(n), piece, None, out[LENGTH.size :])
            emit(out)

    if mode == "threaded":
        _pipelined(seal_frames, sock.sendall)
    else:
        seal_frames(sock.sendall)
    return hasher.digest()


def run_size(size: int, repeats: int, rounds: int) -> dict[str, float]:
    plan = [mode for _ in range(rounds) for mode in MODES for _ in range(repeats)]
    ctx = mp.get_context("spawn")
    port: mp.Queue = ctx.Queue()
    peer = ctx.Process(target=receiver_main, args=(port, size, plan), name="receiver")
    peer.start()
    try:
        sock = socket.create_connection(("127.0.0.1", port.get(timeout=30)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = memoryview(os.urandom(size))
        aead = AESGCM(KEY)
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for mode in plan:
            t0 = time.perf_counter()
            _send(sock, mode, payload, aead)
            if sock.recv(1) != b"k":
                raise EOFError("receiver died")
            seconds[mode].append(time.perf_counter() - t0)
        sock.close()
    finally:
        peer.join(timeout=30)
        if peer.is_alive():
            peer.kill()
    mib = size / 2**20
    return {mode: mib / statistics.median(times) for mode, times in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50", help="MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    out: dict[str, object] = {"bench": "crypto_pipeline", "cpus": os.cpu_count(), "chunk_bytes": DEFAULT_CHUNK_BYTES}
    for size_mib in (int(s) for s in args.sizes.split(",")):
        rates = run_size(size_mib << 20, args.repeats, args.rounds)
        inline, threaded = rates["inline"] / rates["raw"], rates["threaded"] / rates["raw"]
        print(
            f"{size_mib:3d} MiB: raw {rates['raw']:7.1f} MiB/s | inline crypto {rates['inline']:6.1f} ({inline:.2f} of raw)"
            f" | threaded crypto {rates['threaded']:6.1f} ({threaded:.2f} of raw)",
            flush=True,
        )
        for mode, rate in rates.items():
            out[f"{mode}_mib_s_{size_mib}"] = round(rate, 1)
        out[f"ratio_inline_{size_mib}"] = round(inline, 3)
        out[f"ratio_threaded_{size_mib}"] = round(threaded, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
