"""Eight testnet nodes sharing one GPU through Ray, against the same on CPU.

For a machine with a CUDA GPU (the device check of the Ray cluster backend):
a local Ray instance runs the same scenario twice through
``murmur testnet run``'s controller: once with ``[cluster] gpus_per_node =
1/8`` (Ray gives each node's worker process an eighth of the GPU and its
``CUDA_VISIBLE_DEVICES``; the node trains on ``cuda`` with AMP, the trainers'
default there), once on CPU. Per run it reports the device each node's config
got, and per node the median wall time of a round and of its training phase,
from the nodes' own metrics.

    python bench/ray_gpu.py [--trainer mnist-cnn] [--nodes 8] [--rounds 20]

Needs Ray (``pip install 'murmur[ray]'``) and, for the GPU half, a CUDA
build of torch. Without CUDA it says so and exits 2, unless ``--cpu-only``.
The last line printed is one JSON object. Not run on a GPU yet: no device
machine was lent when it was written (the CPU half was run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.node.config import load_config  # noqa: E402
from murmur.testnet.controller import RunOptions, Testnet, read_metrics  # noqa: E402
from murmur.testnet.scenario import parse_scenario  # noqa: E402

SCENARIO = """
name = "ray-{device}"
nodes = {nodes}
nodes_per_process = 1
seed = 7

[topology]
degree = 3

[duration]
rounds = {rounds}
round_deadline_s = 10.0

[trainer]
spec = "{trainer}"
local_steps = {steps}

[cluster]
backend = "ray"
placement = "pack"
cpus_per_node = 1.0
gpus_per_node = {gpus}
"""


def run(device: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    gpus = 1.0 / args.nodes if device == "cuda" else 0.0
    sc = parse_scenario(SCENARIO.format(device=device, nodes=args.nodes, rounds=args.rounds, trainer=args.trainer,
                                        steps=args.local_steps, gpus=gpus))
    testnet = Testnet(sc, RunOptions(out=out, dashboard=False, progress=sys.stderr))
    result = asyncio.run(testnet.run())
    per_node = {}
    for handle in testnet.nodes.values():
        every = read_metrics(handle.data_dir)
        rows = every[1:]  # round 0 includes CUDA/cuDNN warm-up
        ts = [r["ts"] for r in rows]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        cfg = load_config(out / "configs" / f"{handle.spec.name}.toml")
        per_node[handle.spec.name] = {
            "device": cfg.learning.device, "rows": len(every),
            "round_s": round(statistics.median(gaps), 4) if gaps else None,
            "train_s": round(statistics.median(r["train_s"] for r in rows), 4) if rows else None,
        }
    rounds = [n["round_s"] for n in per_node.values() if n["round_s"] is not None]
    trains = [n["train_s"] for n in per_node.values() if n["train_s"] is not None]
    return {"end": result.end.value, "wall_s": round(result.wall_s, 1),
            "final_mean_accuracy": (result.summary or {}).get("final_mean_accuracy"),
            "median_round_s": round(statistics.median(rounds), 4) if rounds else None,
            "median_train_s": round(statistics.median(trains), 4) if trains else None,
            "hosts": sorted(set(testnet.hosts.values())), "nodes": per_node}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", default="mnist-cnn")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--cpu-only", action="store_true", help="no GPU here: run the CPU half only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if not args.cpu_only and not torch.cuda.is_available():
        print("ray_gpu: no CUDA device here (torch.cuda.is_available() is false); --cpu-only runs the CPU half",
              file=sys.stderr)
        return 2
    root = args.out or Path(tempfile.mkdtemp(prefix="murmur-ray-gpu-"))
    out: dict[str, Any] = {"trainer": args.trainer, "nodes": args.nodes, "rounds": args.rounds,
                           "local_steps": args.local_steps}
    if not args.cpu_only:
        out["gpu_name"] = torch.cuda.get_device_name(0)
        out["cuda"] = run("cuda", args, root / "cuda")
        print(f"cuda: {json.dumps(out['cuda'])}", flush=True)
    out["cpu"] = run("cpu", args, root / "cpu")
    print(f"cpu: {json.dumps(out['cpu'])}", flush=True)
    if "cuda" in out and out["cuda"]["median_round_s"] and out["cpu"]["median_round_s"]:
        out["round_speedup"] = round(out["cpu"]["median_round_s"] / out["cuda"]["median_round_s"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
