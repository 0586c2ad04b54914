"""How many murmur nodes this machine holds, and what a round costs besides learning.

Two measurements on real testnets (worker processes, loopback sockets, torch):

1. Capacity: step the honest node count up (16, 32, 64, 100, 128, ...) with
   ``--nodes-per-process`` packing and a short round budget; a step passes
   when at least ``--min-done`` of the nodes finish every round before the
   controller's stall timeout. Stepping stops at the first failing step.

2. Overhead at 16 nodes: the share of node CPU time that is *not* local
   training and evaluation, i.e. communication (serialisation, Noise
   encryption, signatures, hashing), aggregation, membership and the status
   API. Worker CPU time comes from ``/proc/<pid>/stat`` (sampled until the
   workers stop); the learning cost of one node-round is measured in this
   process on the same trainer with one torch thread. On a box with fewer
   cores than nodes, wall time per round is dominated by nodes queueing for
   CPU, so the CPU-time share is the meaningful figure; the wall-time split is
   printed too. From the nodes' own per-phase timings (metrics rows:
   ``train_s commit_s send_s wait_s aggregate_s eval_s``) the wall-time
   share of communication + aggregation (``send_s + aggregate_s + commit_s``)
   in a round is reported, target <= 10 %; ``wait_s`` (idle until quorum or
   the deadline: waiting for slower peers, not work) is reported separately.

With ``--cluster ray[=ADDRESS]`` every capacity step also runs on that Ray
cluster (a local Ray instance without an address; ``pip install
'murmur[ray]'``), and the step's record gets a ``ray`` entry next to the
single-machine figures of the same run: nodes per host, round wall time,
finished nodes. The overhead measurement stays on this machine (it reads the
workers' CPU time from this machine's ``/proc``).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.testnet.cli import with_cluster  # noqa: E402
from murmur.testnet.controller import RunEnd, RunOptions, Testnet, read_metrics  # noqa: E402
from murmur.testnet.options import cluster_choice  # noqa: E402
from murmur.testnet.scenario import Scenario, dump_toml, node_configs, parse_scenario  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_SAMPLE_S = 0.5
COMPUTE_REPS = 5

BASE = """
name = "scale"
nodes = 16
nodes_per_process = 8
seed = 11

[topology]
degree = 3

[duration]
rounds = {rounds}
round_deadline_s = {deadline}
quorum = 0.67

[trainer]
spec = "digits-mlp"
local_steps = {steps}
options = {{ lr = 0.05, batch_size = 32 }}

[aggregator]
name = "mean"
"""


def scenario(nodes: int, per_process: int, rounds: int, deadline: float, steps: int) -> Scenario:
    sc = parse_scenario(BASE.format(rounds=rounds, deadline=deadline, steps=steps), "scale.toml")
    return dataclasses.replace(sc, nodes=nodes, nodes_per_process=per_process)


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime (fields 14, 15)


async def run_sampling(testnet: Testnet) -> tuple[Any, dict[int, float]]:
    """Run the testnet; meanwhile keep the latest CPU time of every worker pid."""
    cpu: dict[int, float] = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for pid in testnet.worker_pids().values():
                value = proc_cpu_s(pid)
                if value is not None:
                    cpu[pid] = value
            try:
                await asyncio.wait_for(done.wait(), CPU_SAMPLE_S)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    try:
        result = await testnet.run()
    finally:
        done.set()
        await sampler
    return result, cpu


def run_step(sc: Scenario, out: Path, stall_s: float) -> tuple[Testnet, Any, dict[int, float]]:
    testnet = Testnet(sc, RunOptions(out=out, dashboard=False, progress=None, stall_s=stall_s, write_report=False))
    result, cpu = asyncio.run(run_sampling(testnet))
    return testnet, result, cpu


def compute_cost(sc: Scenario, workdir: Path) -> dict[str, float]:
    """CPU seconds of one node-round of pure learning (train + evaluate), one torch thread."""
    import torch

    from murmur.learning.trainers.registry import load_trainer
    from murmur.node.config import load_config

    torch.set_num_threads(1)
    path = workdir / "node0.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(node_configs(sc, workdir, 40000)[0]), encoding="utf-8")
    section = load_config(path).learning  # exactly what node0 of the testnet runs
    trainer = load_trainer(section.trainer)(section.trainer_context())
    trainer.train(sc.trainer.local_steps)  # warm-up
    t_cpu, t_wall = time.thread_time(), time.perf_counter()
    for _ in range(COMPUTE_REPS):
        trainer.train(sc.trainer.local_steps)
    train_cpu, train_wall = (time.thread_time() - t_cpu) / COMPUTE_REPS, (time.perf_counter() - t_wall) / COMPUTE_REPS
    t_cpu = time.thread_time()
    for _ in range(COMPUTE_REPS):
        trainer.evaluate()
    eval_cpu = (time.thread_time() - t_cpu) / COMPUTE_REPS
    return {"train_cpu_s": train_cpu, "train_wall_s": train_wall, "eval_cpu_s": eval_cpu}


def round_wall_s(testnet: Testnet) -> float | None:
    gaps = []
    for handle in testnet.nodes.values():
        ts = [row["ts"] for row in read_metrics(handle.data_dir)]
        gaps += [b - a for a, b in zip(ts, ts[1:])]
    return statistics.median(gaps) if gaps else None


PHASES = ("train_s", "commit_s", "send_s", "wait_s", "aggregate_s", "eval_s")
COMM_AGG = ("send_s", "aggregate_s", "commit_s")


def phase_shares(testnet: Testnet) -> dict[str, float] | None:
    """Wall-time shares of a round's phases, summed over every node-round that has them."""
    totals = dict.fromkeys(PHASES, 0.0)
    for handle in testnet.nodes.values():
        for row in read_metrics(handle.data_dir):
            for k in PHASES:
                totals[k] += float(row.get(k) or 0.0)
    round_s = sum(totals.values())
    if round_s <= 0:
        return None
    out = {f"{k[:-2]}_share": round(v / round_s, 4) for k, v in totals.items()}
    out["comm_agg_share"] = round(sum(totals[k] for k in COMM_AGG) / round_s, 4)
    out["comm_agg_share_excl_wait"] = round(sum(totals[k] for k in COMM_AGG) / (round_s - totals["wait_s"]), 4)
    return out


def cluster_step(sc: Scenario, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One capacity step on a Ray cluster: where its nodes ran and how fast."""
    started = time.monotonic()
    testnet, result, _ = run_step(sc, out, args.stall_s)
    finished = sum(1 for h in testnet.nodes.values()
                   if (rows := read_metrics(h.data_dir)) and rows[-1]["round"] >= args.rounds - 1)
    wall = round_wall_s(testnet)
    per_host = collections.Counter(testnet.hosts.values())
    return {"end": result.end.value, "hosts": len(per_host), "nodes_per_host": dict(sorted(per_host.items())),
            "finished_nodes": finished, "wall_s": round(time.monotonic() - started, 1),
            "round_wall_s": round(wall, 2) if wall else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="16,32,64,100,128,160,200", help="node counts to try, in order")
    ap.add_argument("--nodes-per-process", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=3.0, help="round deadline (s)")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--stall-s", type=float, default=60.0)
    ap.add_argument("--min-done", type=float, default=0.9, help="fraction of nodes that must finish every round")
    ap.add_argument("--overhead-nodes", type=int, default=16)
    ap.add_argument("--overhead-rounds", type=int, default=15)
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cluster", type=cluster_choice, default=None, metavar="ray[=ADDRESS]",
                    help="also run each capacity step on this Ray cluster, figures side by side")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="murmur-scale-"))
    out: dict[str, Any] = {"cpus": os.cpu_count(), "nodes_per_process": args.nodes_per_process}

    # -- 2: overhead at 16 nodes
    sc = scenario(args.overhead_nodes, min(args.nodes_per_process, 8), args.overhead_rounds, args.deadline, args.local_steps)
    cost = compute_cost(sc, root / "compute")
    testnet, result, cpu = run_step(sc, root / f"overhead-{args.overhead_nodes}", args.stall_s)
    node_rounds = sum(len(read_metrics(h.data_dir)) for h in testnet.nodes.values())
    total_cpu = sum(cpu.values())
    per_node_round = total_cpu / node_rounds if node_rounds else float("nan")
    learn = cost["train_cpu_s"] + cost["eval_cpu_s"]
    wall = round_wall_s(testnet)
    out["overhead"] = {
        "nodes": args.overhead_nodes, "end": result.end.value, "node_rounds": node_rounds,
        "worker_cpu_s": round(total_cpu, 2), "cpu_per_node_round_s": round(per_node_round, 4),
        "learn_cpu_per_node_round_s": round(learn, 4), **{k: round(v, 4) for k, v in cost.items()},
        "non_learning_cpu_fraction": round(1 - learn / per_node_round, 3) if node_rounds else None,
        "round_wall_s": round(wall, 3) if wall else None,
        "round_wall_if_cpu_bound_s": round(args.overhead_nodes * per_node_round / (os.cpu_count() or 1), 3),
        "phases": phase_shares(testnet),
    }
    print(f"overhead at {args.overhead_nodes} nodes: {json.dumps(out['overhead'])}", flush=True)

    # -- 1: capacity
    capacity = []
    if not args.skip_capacity:
        for n in (int(x) for x in args.steps.split(",")):
            sc = scenario(n, args.nodes_per_process, args.rounds, args.deadline, args.local_steps)
            started = time.monotonic()
            testnet, result, cpu = run_step(sc, root / f"capacity-{n}", args.stall_s)
            finished = sum(1 for h in testnet.nodes.values()
                           if (rows := read_metrics(h.data_dir)) and rows[-1]["round"] >= args.rounds - 1)
            wall = round_wall_s(testnet)
            step = {"nodes": n, "processes": len(testnet.procs), "end": result.end.value,
                    "finished_nodes": finished, "wall_s": round(time.monotonic() - started, 1),
                    "round_wall_s": round(wall, 2) if wall else None}
            step["ok"] = result.end is RunEnd.COMPLETED or finished >= args.min_done * n
            if args.cluster is not None:
                step["ray"] = cluster_step(with_cluster(sc, args.cluster), root / f"capacity-{n}-ray", args)
            capacity.append(step)
            print(f"capacity step: {json.dumps(step)}", flush=True)
            if not step["ok"]:
                break
        passed = [s["nodes"] for s in capacity if s["ok"]]
        out["capacity"] = capacity
        out["max_nodes"] = max(passed) if passed else 0
    out["run_dir"] = str(root)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
