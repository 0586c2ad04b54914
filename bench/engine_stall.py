"""Benchmark: how long closing a round stalls the event loop, inline against in a worker thread.

Three RoundEngines of ``--params`` float32 parameters (VectorTrainer, the
default SybilWall aggregator, a complete graph) run ``--rounds`` rounds in
this process. Each round, node 0's ``finish_round`` runs once the old way,
on the event loop, and once through :class:`~murmur.node.engineguard.EngineGuard`
(a worker thread) the way the daemon runs it now; the two alternate which
goes first and start from the same state (the engine is deep-copied), while
a ticker task measures the loop's longest lag. Prints, per path, the
longest stall and the close's wall time (median over rounds) and the
ratios: stall inline / stall off the loop, and the off-loop close's time
against the inline one's (what a thread costs the round, if anything).

    .venv/bin/python bench/engine_stall.py [--params 10000000] [--rounds 4]

Run it under ``nice`` on a shared machine; the numbers vary with the load,
the ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.trainers

from murmur.learning.aggregators.base import get_aggregator  # noqa: E402
from murmur.learning.rounds import RoundConfig, RoundEngine  # noqa: E402
from murmur.learning.trainers.base import TrainerContext  # noqa: E402
from murmur.node.engineguard import EngineGuard  # noqa: E402
from bench.decode_stall import longest_lag  # noqa: E402  (the same ticker, one definition)
from tests.trainers import VectorTrainer  # noqa: E402

NODES = 3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the bench daemons run (learning.threads = 1)

    def context(i: int) -> TrainerContext:
        return TrainerContext(node_index=i, num_nodes=NODES, seed=0, device="cpu", options={"size": args.params})

    engines = [RoundEngine(VectorTrainer(context(i)), get_aggregator("sybilwall", self_id=f"n{i}"), RoundConfig())
               for i in range(NODES)]
    rows: dict[str, list[tuple[float, float]]] = {"inline": [], "off_loop": []}
    for round_ in range(args.rounds):
        sent = []
        for i, engine in enumerate(engines):
            neighbours = {f"n{j}": NODES - 1 for j in range(NODES) if j != i}
            sent.append(engine.open_round(neighbours, engine.local_update()))
        for i, engine in enumerate(engines):
            for j, message in enumerate(sent):
                if j != i:
                    engine.offer(f"n{j}", round_, message.increment.clone())
        order = ("inline", "off_loop") if round_ % 2 == 0 else ("off_loop", "inline")
        twin = copy.deepcopy(engines[0])  # the second path closes the same round from the same state
        for path, engine in zip(order, (engines[0], twin), strict=True):
            if path == "inline":
                async def close(engine: RoundEngine = engine) -> None:
                    engine.finish_round()  # the old way: on the loop
            else:
                async def close(engine: RoundEngine = engine) -> None:
                    await EngineGuard().off_loop(engine.finish_round)
            rows[path].append(await longest_lag(close))
        assert torch.equal(twin.trainer.get_flat(), engines[0].trainer.get_flat())  # the same math either way
        del twin
        for engine in engines[1:]:
            engine.finish_round()
    summary: dict[str, Any] = {"params": args.params, "rounds": args.rounds}
    for path, values in rows.items():
        lag = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        summary[path] = {"lag_s": round(lag, 4), "close_s": round(wall, 4), "max_lag_s": round(max(v[0] for v in values), 4)}
        print(f"{path}: longest loop stall {lag * 1000:.0f} ms (median over rounds; worst {max(v[0] for v in values) * 1000:.0f} ms), "
              f"close {wall:.2f} s")
    summary["stall_ratio"] = round(summary["inline"]["lag_s"] / max(summary["off_loop"]["lag_s"], 1e-9), 1)
    summary["close_time_ratio"] = round(summary["off_loop"]["close_s"] / summary["inline"]["close_s"], 2)
    print(f"stall {summary['stall_ratio']}x shorter off the loop; the close takes {summary['close_time_ratio']}x "
          "the inline time")
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
