"""Wire-format throughput for one 10M-float32 delta (40 MB).

Measures, in one process and one run so the numbers are comparable:
  (a) memcpy of the same bytes (``np.copyto`` into a pre-touched buffer, and a
      ``bytes`` copy for a Python-level reference),
  (b) ``DeltaSender``: codec + every message encoded (Start, Chunk…, End),
      including the incremental BLAKE3-256 and the Ed25519 signature, and
      each message's parts (envelope, payload view) gathered into one reused
      frame-sized buffer, the copy the transport's frame encoder makes,
  (b') the same split as a node does it: ``PreparedDelta.prepare`` (codec
      and BLAKE3, once a round) and, for each neighbour, ``DeltaSender`` over
      the prepared delta (envelopes, signature, gather copy: no hashing),
      whose ``per_neighbour_vs_copyto`` is the encoder's own speed against a
      memory copy,
  (c) receive side: ``messages.decode`` + ``DeltaAssembler.feed`` for every
      message: assembly, hash, signature and replay check, codec decode,
  plus BLAKE3-256 alone, since it bounds (b) and (c) from above.
Each figure is the best of ``repeats`` runs (the machine is shared). The last
line printed is one JSON object; :func:`run` returns the same dict.

Usage: python bench/wire.py [--elements N] [--repeats R] [--all-codecs]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np

from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.delta import DeltaAssembler, DeltaSender, PreparedDelta
from murmur.protocol.identity import Identity
from murmur.protocol.messages import MAX_MESSAGE_BYTES, DeltaEnd, decode

MIB = 1024 * 1024
DEFAULT_ELEMENTS = 10_000_000


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _mib_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / MIB / seconds, 1)


def _assemble(receiver: Identity, sender: Identity, messages: list[bytes]) -> tuple[np.ndarray, bool]:
    """Feed every message; return the decoded array and whether it aliases the
    assembly buffer (checked just before DeltaEnd, while the buffer is live)."""
    assembler = DeltaAssembler(receiver.peer_id)
    buffer = None
    result = None
    for raw in messages:
        msg = decode(raw)
        if isinstance(msg, DeltaEnd):
            buffer = np.frombuffer(assembler.buffer_view(sender.peer_id, msg.transfer_id), dtype=np.uint8)
        result = assembler.feed(sender.peer_id, msg)
    assert result is not None and buffer is not None
    return result.array, bool(np.shares_memory(result.array, buffer))


def _encode_all(messages: DeltaSender, frame: bytearray) -> int:
    """Encode every message and gather it into ``frame``; the wire bytes."""
    total = 0
    for parts in messages:
        offset = 0
        for part in parts:
            view = memoryview(part).cast("B")
            frame[offset : offset + view.nbytes] = view
            offset += view.nbytes
        total += offset
    return total


def run(elements: int = DEFAULT_ELEMENTS, repeats: int = 5, codecs: tuple[DeltaCodec, ...] = (DeltaCodec.FP32,)) -> dict:
    rng = np.random.default_rng(0)
    delta = rng.standard_normal(elements, dtype=np.float32)
    nbytes = delta.nbytes
    sender, receiver = Identity.from_seed(b"s" * 32), Identity.from_seed(b"r" * 32)

    dst = np.empty_like(delta)
    np.copyto(dst, delta)  # touch the pages once so (a) is a pure copy
    t_copyto, _ = _best(lambda: np.copyto(dst, delta), repeats)
    raw = memoryview(delta).cast("B")
    t_bytes, _ = _best(lambda: bytes(raw), repeats)
    t_hash, _ = _best(lambda: blake3.blake3(raw).digest(), repeats)

    out: dict[str, Any] = {
        "elements": elements,
        "payload_mib": round(nbytes / MIB, 2),
        "memcpy_copyto_mib_s": _mib_s(nbytes, t_copyto),
        "memcpy_bytes_mib_s": _mib_s(nbytes, t_bytes),
        "blake3_mib_s": _mib_s(nbytes, t_hash),
    }
    for codec in codecs:
        frame = bytearray(MAX_MESSAGE_BYTES)
        t_send, wire_bytes = _best(
            lambda: _encode_all(DeltaSender(sender, receiver.peer_id, 1, delta, codec), frame), repeats
        )
        # a node's round: the codec and the hash once (prepare), then per
        # neighbour only the envelopes, the signature and the gather copy
        t_prepare, prepared = _best(lambda: PreparedDelta.prepare(delta, codec), repeats)
        t_each, _ = _best(lambda: _encode_all(DeltaSender(sender, receiver.peer_id, 1, prepared), frame), repeats)
        messages = [b"".join(parts) for parts in DeltaSender(sender, receiver.peer_id, 1, delta, codec)]
        t_recv, (array, zero_copy) = _best(lambda: _assemble(receiver, sender, messages), repeats)
        max_err = float(np.max(np.abs(array.reshape(-1) - delta))) if elements else 0.0
        prefix = codec.name.lower()
        out.update(
            {
                # throughputs are per float32 input byte, so codecs compare directly
                f"{prefix}_wire_mib": round(wire_bytes / MIB, 2),
                f"{prefix}_send_mib_s": _mib_s(nbytes, t_send),
                f"{prefix}_recv_mib_s": _mib_s(nbytes, t_recv),
                f"{prefix}_send_vs_copyto": round(t_copyto / t_send, 3),
                f"{prefix}_send_vs_bytes_copy": round(t_bytes / t_send, 3),
                f"{prefix}_send_vs_blake3": round(t_hash / t_send, 3),
                f"{prefix}_prepare_mib_s": _mib_s(nbytes, t_prepare),
                f"{prefix}_per_neighbour_mib_s": _mib_s(nbytes, t_each),
                f"{prefix}_per_neighbour_vs_copyto": round(t_copyto / t_each, 3),
                f"{prefix}_recv_zero_copy": zero_copy,
                f"{prefix}_max_abs_error": max_err,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=DEFAULT_ELEMENTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-codecs", action="store_true")
    args = parser.parse_args()
    codecs = tuple(DeltaCodec) if args.all_codecs else (DeltaCodec.FP32,)
    result = run(args.elements, args.repeats, codecs)
    print(f"payload {result['payload_mib']} MiB ({args.elements} float32)")
    print(f"(a) memcpy   np.copyto {result['memcpy_copyto_mib_s']:>9} MiB/s   bytes() {result['memcpy_bytes_mib_s']} MiB/s")
    print(f"    blake3-256 alone  {result['blake3_mib_s']:>9} MiB/s  (upper bound for send and receive)")
    for codec in codecs:
        p = codec.name.lower()
        print(
            f"(b) send {codec.name:<4} {result[f'{p}_send_mib_s']:>9} MiB/s  b/a = {result[f'{p}_send_vs_copyto']}"
            f" (vs bytes copy {result[f'{p}_send_vs_bytes_copy']}, vs blake3 {result[f'{p}_send_vs_blake3']})"
        )
        print(
            f"(b') prepare {result[f'{p}_prepare_mib_s']} MiB/s once a round, then per neighbour "
            f"{result[f'{p}_per_neighbour_mib_s']} MiB/s = {result[f'{p}_per_neighbour_vs_copyto']} of np.copyto"
        )
        print(
            f"(c) recv {codec.name:<4} {result[f'{p}_recv_mib_s']:>9} MiB/s  zero-copy decode: "
            f"{result[f'{p}_recv_zero_copy']}  max |err| {result[f'{p}_max_abs_error']:.3g}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
