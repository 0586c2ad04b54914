"""Benchmark: how long a daemon's event loop stalls while it receives compressed rounds.

First, in this process: ``--neighbours`` signed random-k round messages of
a ``--params`` model (real Ed25519, BLAKE3, DeltaAssembler) are received
and decoded as the learner's handler does, once decoding inline on the
event loop (the old handler) and once through OffLoopDecoder, while a
ticker task measures the loop's lag; prints both longest stalls and their
ratio (same run, same payloads).

Then, with ``--daemons``: three real ``murmur node start`` processes (a complete graph, a VectorTrainer
of ``--params`` float32 parameters) run ``--rounds`` rounds twice: first with
dense fp32 messages (the baseline: their decode is free, so the stalls are
everything else a round does on the loop), then with ``--sparsifier`` at
``--ratio`` (random-k 0.5 by default: a 10M-parameter payload took ~1 s to
decode). Meanwhile a poller asks each daemon's ``/healthz`` every
``--poll-ms``; a request's latency is how long that daemon's event loop
kept it waiting. Prints, per phase, the longest and the 99th-percentile
latency and the seconds each daemon's loop was stalled (waits above
STALL_S, summed; also as a share of the run, which is what compares
between phases of different lengths), and the compressed phase's against
the baseline's.

Received payloads decode off the loop (murmur/node/decoding.py), and so
do a round's close (finish_round's aggregation, ~1.3 s at 10M) and the
statement of the public model (murmur/node/engineguard.py): the dense
baseline went from 64-81% of the run stalled (longest wait 4-9 s) to 7-12%
(0.4-1.6 s); what remains is smaller loop work (open_round, offers, the
message's encoding and hash) and the machine's load. bench/engine_stall.py
times the close alone, inline against off the loop, in one process.

    .venv/bin/python bench/decode_stall.py [--params 10000000] [--ratio 0.5] [--daemons [--rounds 3]]

Prints a human line per measurement and, last, one JSON object. Tens of
seconds in process; the daemons take a few minutes on 2 cores, and their
stalls are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.trainers and the daemon pool of the integration tests

import blake3  # noqa: E402
import numpy as np  # noqa: E402

from murmur.node.decoding import OffLoopDecoder  # noqa: E402
from murmur.protocol.codecs import DeltaCodec  # noqa: E402
from murmur.protocol.delta import DeltaAssembler, VerifiedDelta, signing_input  # noqa: E402
from murmur.protocol.identity import Identity  # noqa: E402
from murmur.protocol.layout import TransferKind, TransferLayout  # noqa: E402
from murmur.protocol.messages import DeltaChunk, DeltaEnd, DeltaStart  # noqa: E402
from murmur.protocol.sparse import RoundFormat, Sparsifier  # noqa: E402
from tests.integration.cluster import wait_until  # noqa: E402
from tests.integration.daemons import DaemonPool, free_port  # noqa: E402

NODES = 3
RUN_S = 900.0
STALL_S = 0.1  # an API wait longer than this counts as the loop stalled
TICK_S = 0.005  # the in-process ticker's period
CHUNK = 1 << 20


def received_messages(args: argparse.Namespace, me: Identity) -> tuple[DeltaAssembler, list[VerifiedDelta]]:
    """``--neighbours`` random-k messages of round 0, signed by their
    senders, received by ``me``'s assembler up to the decode."""
    fmt = RoundFormat(Sparsifier(args.sparsifier), args.ratio, seed=1)
    codec = DeltaCodec[args.codec.upper()]
    layout = TransferLayout.for_model(args.params, 1, fmt)
    assembler = DeltaAssembler(me.peer_id, layout=layout)
    rng = np.random.default_rng(0)
    out = []
    for tid in range(args.neighbours):
        sender = Identity.generate()
        k = fmt.count(args.params)
        indices = fmt.mask(args.params, 0, sender.peer_id.raw) if fmt.sparsifier is Sparsifier.RANDK else (
            np.sort(rng.choice(args.params, k, replace=False)) if fmt.sparse else None)
        payload = bytes(fmt.encode(indices, rng.standard_normal(k, dtype=np.float32), codec, args.params)[0])
        digest = blake3.blake3(payload).digest()
        msgs: list[object] = [DeltaStart(tid, 0, sender.peer_id, me.peer_id, codec, "float32", (1, args.params),
                                         len(payload), layout.meta(TransferKind.ROUND))]
        msgs += [DeltaChunk(tid, i, payload[at : at + CHUNK]) for i, at in enumerate(range(0, len(payload), CHUNK))]
        msgs.append(DeltaEnd(tid, digest, sender.sign(signing_input(digest, 0, sender.peer_id, me.peer_id))))
        verified = None
        for msg in msgs:
            verified = assembler.feed_verified(sender.peer_id, msg)  # type: ignore[arg-type]
        assert verified is not None
        out.append(verified)
    return assembler, out


async def longest_lag(receive: Any) -> tuple[float, float]:
    """(the loop's longest lag, seconds taken) while ``receive()`` runs."""
    lag = 0.0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal lag
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lag = max(lag, time.perf_counter() - started - TICK_S)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await receive()
    took = time.perf_counter() - started
    stop.set()
    await ticker
    return lag, took


async def in_process(args: argparse.Namespace) -> dict[str, float]:
    """The handler's receive of ``--neighbours`` messages, inline against off the loop."""
    me = Identity.generate()
    row: dict[str, float] = {}
    for name in ("inline", "off_loop"):
        assembler, messages = received_messages(args, me)
        decoder = OffLoopDecoder()

        async def one(verified: VerifiedDelta) -> None:
            if name == "inline":
                verified.decode()  # what the handler did before: on the loop
            else:
                await decoder.decode(verified)
            assembler.accept(verified)

        async def receive() -> None:
            await asyncio.gather(*(one(v) for v in messages))  # each peer's stream is its own task

        row[f"{name}_lag_s"], row[f"{name}_s"] = await longest_lag(receive)
    return row


def node_config(port: int, bootstrap: str | None, args: argparse.Namespace, compressed: bool) -> dict[str, Any]:
    learning: dict[str, Any] = {
        "trainer": "tests.trainers:VectorTrainer", "codec": args.codec if compressed else "fp32",
        "num_nodes": NODES, "rounds": args.rounds, "round_deadline_s": 300.0, "threads": 1, "device": "cpu",
        "trainer_options": {"size": args.params}, "checkpoint_every_rounds": 0, "checkpoint_every_s": 0.0,
    }
    sections: dict[str, Any] = {
        "node": {"listen": [f"/ip4/127.0.0.1/tcp/{port}"], "log_format": "json"},
        "network": {"bootstrap": [bootstrap] if bootstrap else [], "neighbours": NODES - 1,
                    "shuffle_interval_s": 1.0, "allow_loopback": True},
        "api": {"port": 0},
        "learning": learning,
    }
    if compressed:
        sections["compression"] = {"sparsifier": args.sparsifier, "ratio": args.ratio, "consensus_step": 0.5}
    return sections


async def poll(http: aiohttp.ClientSession, url: str, every_s: float, until: asyncio.Event, out: list[float]) -> None:
    while not until.is_set():
        started = time.monotonic()
        try:
            async with http.get(f"{url}/healthz") as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
        out.append(time.monotonic() - started)
        await asyncio.sleep(every_s)


async def phase(root: Path, args: argparse.Namespace, compressed: bool) -> dict[str, float]:
    root.mkdir(parents=True)
    pool = DaemonPool(root)
    try:
        boot_port = free_port()
        boot = pool.add(node_config(boot_port, None, args, compressed))
        for _ in range(NODES - 1):
            pool.add(node_config(0, boot.addr(boot_port), args, compressed))
        for daemon in pool.daemons:
            pool.spawn(daemon)
        await asyncio.gather(*(pool.wait_api(d) for d in pool.daemons))
        latencies: list[list[float]] = [[] for _ in pool.daemons]
        done = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=120.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            pollers = [asyncio.create_task(poll(http, d.api, args.poll_ms / 1000, done, latencies[d.index]))
                       for d in pool.daemons]
            started = time.monotonic()
            await wait_until(lambda: all(len(d.state.read_metrics()) >= args.rounds for d in pool.daemons), RUN_S,
                             f"{args.rounds} rounds")
            elapsed = time.monotonic() - started
            done.set()
            await asyncio.gather(*pollers)
        received = [row["received"] for d in pool.daemons for row in d.state.read_metrics()]
    finally:
        pool.teardown()
    every = sorted(x for per in latencies for x in per)
    # Polls are sequential per daemon: the waits above STALL_S add up to the
    # time its loop was unavailable (averaged over the daemons).
    stalled = sum(x for x in every if x > STALL_S) / len(pool.daemons)
    return {"max_s": every[-1], "p99_s": every[int(0.99 * (len(every) - 1))], "stalled_s": stalled,
            "stalled_share": stalled / elapsed, "polls": len(every), "run_s": elapsed, "received": sum(received)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsifier", default="randk", choices=["randk", "topk", "none"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--neighbours", type=int, default=2, help="messages received at once, in process")
    parser.add_argument("--daemons", action="store_true", help="also time three real daemons' API")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep the daemons' logs")
    parser.add_argument("--only", choices=["fp32", "compressed"], help="run one daemon phase (no ratio)")
    args = parser.parse_args()
    local = await in_process(args)
    lag_ratio = local["inline_lag_s"] / max(local["off_loop_lag_s"], 1e-9)
    print(f"in process, {args.neighbours} {args.sparsifier} {args.ratio} {args.codec} messages of {args.params} "
          f"parameters: longest loop stall {local['inline_lag_s'] * 1000:.0f} ms decoding inline "
          f"({local['inline_s']:.2f} s), {local['off_loop_lag_s'] * 1000:.0f} ms off the loop "
          f"({local['off_loop_s']:.2f} s): {lag_ratio:.1f}x shorter")
    summary: dict[str, Any] = {"params": args.params, "sparsifier": args.sparsifier, "ratio": args.ratio,
                               "codec": args.codec, "in_process": {k: round(v, 4) for k, v in local.items()},
                               "lag_ratio": round(lag_ratio, 2)}
    if not args.daemons:
        print(json.dumps(summary))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="murmur-decode-stall-") as tmp:
        for name, compressed in (("fp32", False), ("compressed", True)):
            if args.only not in (None, name):
                continue
            row = await phase((args.keep or Path(tmp)) / name, args, compressed)
            results[name] = row
            print(f"{name}: longest API wait {row['max_s'] * 1000:.0f} ms, p99 {row['p99_s'] * 1000:.0f} ms, "
                  f"loop stalled {row['stalled_s']:.1f} s per daemon ({row['stalled_share']:.0%} of the run) "
                  f"({row['polls']} polls over {row['run_s']:.0f} s, {row['received']} messages used)")
    if args.only:
        print(json.dumps(summary))
        return
    ratio = results["compressed"]["max_s"] / results["fp32"]["max_s"]
    stalled = results["compressed"]["stalled_share"] / max(results["fp32"]["stalled_share"], 1e-9)
    print(f"{args.sparsifier} {args.ratio} {args.codec}: longest stall {ratio:.1f}x, share of the run stalled "
          f"{stalled:.1f}x the dense fp32 baseline's")
    print(json.dumps({**summary, "stall_ratio": round(ratio, 2), "stalled_ratio": round(stalled, 2),
                      **{name: {k: round(v, 4) for k, v in row.items()} for name, row in results.items()}}))


if __name__ == "__main__":
    asyncio.run(main())
