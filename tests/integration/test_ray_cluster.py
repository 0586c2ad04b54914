"""The testnet on a real Ray cluster (a local Ray instance the run starts):
worker processes placed as Ray actors, nodes on their host's address, a
crash (kill -9 on the host), a restart from the node's own state dir, a late
join, a graceful stop, a partition and its heal relayed over the control protocol, and the report
written from the nodes' own metrics brought back from the hosts.

Skipped when Ray is not installed (``pip install 'murmur[ray]'``): the
newcomer commands (scripts/test) do not install it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.node.config import load_config
from murmur.testnet.controller import RunEnd, RunOptions, read_metrics
from murmur.testnet.controller import Testnet as Run  # not a pytest class
from murmur.testnet.scenario import parse_scenario
from tests.integration.test_churn import began_ts
from tests.integration.test_testnet import processes_mentioning

pytest.importorskip("ray", reason="Ray is not installed (pip install 'murmur[ray]'); the Ray cluster run is not tested")

from murmur.testnet.raycluster import ROOT_PREFIX  # noqa: E402 - needs ray

# 6 nodes in worker processes of 2 (node1 alone: a crash kills a whole
# process); 100 local steps make rounds ~0.3 s, so the events keep their
# places although the controller sees rounds through Ray's relays seconds
# late on a loaded box (a schedule seen late keeps its spacing up to the
# last round, churn.py), and the rounds after the join and the restart
# leave node5 and node1 (~2-5 s to start on a loaded box) rounds of their own.
# The partition holds ten rounds: node0 may have only node2 on its side (node1
# restarted at 7 may still be starting) and wait out round deadlines there, and
# CI once saw it complete no round in a six-round partition.
SCENARIO = """
name = "ray"
nodes = 6
nodes_per_process = 2
seed = 5

[topology]
degree = 3

[duration]
rounds = 40
round_deadline_s = 1.5

[trainer]
spec = "digits-mlp"
local_steps = 100
options = { lr = 0.05, batch_size = 32 }

[cluster]
backend = "ray"
placement = "spread"
cpus_per_node = 0.25

[[churn]]
at_round = 4
action = "crash"
nodes = [1]

[[churn]]
at_round = 7
action = "restart"
nodes = [1]

[[churn]]
at_round = 10
action = "join"
nodes = [5]

[[churn]]
at_round = 14
action = "partition"
nodes = [0, 1, 2]

[[churn]]
at_round = 24
action = "heal"

[[churn]]
at_round = 30
action = "stop"
nodes = [4]
"""

RAY_DAEMONS = ("raylet", "gcs_server")
ROOT = str(Path(__file__).resolve().parents[2])


def _ray_daemons() -> set[int]:
    return {pid for name in RAY_DAEMONS for pid in processes_mentioning(name)}


def _events(log: Path, event: str) -> list[dict]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("event") == event:
            out.append(row)
    return out


@pytest.mark.timeout(300)
def test_a_scenario_runs_on_a_ray_cluster(tmp_path: Path) -> None:
    import uvloop

    before = _ray_daemons()
    run_dir = tmp_path / "run"
    testnet = Run(parse_scenario(SCENARIO), RunOptions(out=run_dir, dashboard=False, progress=None))
    result = uvloop.run(testnet.run())
    assert result.end is RunEnd.COMPLETED, result
    summary = result.summary
    assert summary is not None

    # every node ran on a Ray host, listening on that host's own address, not loopback
    hosts = {name: node["host"] for name, node in summary["nodes"].items()}
    assert set(hosts) == {f"node{i}" for i in range(6)}
    for name, host in hosts.items():
        assert not ipaddress.ip_address(host).is_loopback
        cfg = load_config(run_dir / "configs" / f"{name}.toml")
        assert [str(a) for a in cfg.node.listen] == [f"/ip4/{host}/tcp/{cfg.node.listen[0].port}"]
        assert ROOT_PREFIX in str(cfg.node.data_dir)  # its state dir on its host, not in the run dir
        # and its connections went to other nodes' host addresses
        log = run_dir / "logs" / f"{testnet.nodes[int(name[4:])].proc}.log"
        remotes = {c["remote"].rsplit(":", 1)[0] for c in _events(log, "connected")}
        assert remotes & set(hosts.values()), remotes

    # the report's numbers are the nodes' own metrics, brought back from their hosts
    finals = []
    for name, node in summary["nodes"].items():
        rows = read_metrics(run_dir / "nodes" / name)
        assert rows, name
        assert node["rows"] == len(rows)
        if node["round"] == rows[-1]["round"]:
            assert node["accuracy"] == rows[-1]["accuracy"]
        else:  # it caught up past its last row (adopted a model after the heal): the report reads its status
            assert node["round"] > rows[-1]["round"], (name, node, rows[-1])
        assert node["alive"] is (name != "node4")  # its last /status, read on its host; node4 was stopped
        if name != "node4":  # the final numbers are the nodes up at the end's
            finals.append(node["accuracy"])
        reported = json.loads((run_dir / "report" / "metrics" / f"{name}.json").read_text(encoding="utf-8"))
        assert [r["round"] for r in reported] == [r["round"] for r in rows]
    assert summary["final_mean_accuracy"] == pytest.approx(statistics.fmean(finals))
    assert summary["rounds"] == 40

    # node1 was killed -9 on its host (its first process never stopped gracefully),
    # restarted from its own state dir, and trained again
    log1 = run_dir / "logs" / "node1.log"
    assert len(_events(log1, "started")) == 2
    assert len(_events(log1, "stopped")) == 1  # only the last process's, at the end
    assert len(_events(log1, "restored")) == 1
    assert summary["nodes"]["node1"]["restarts"] == 1
    # (every round left to it once back, up to three: under a full suite's load the
    # restart can fire late, or the node catch up to its neighbours near the end)
    restart = result.events[1]
    rows1 = read_metrics(run_dir / "nodes" / "node1")
    after = [r for r in rows1 if r["ts"] > began_ts(restart)]
    assert after, [(r["round"], r["ts"]) for r in rows1]
    assert len(after) >= min(3, summary["rounds"] - after[0]["round"]), [r["round"] for r in rows1]

    # node5 joined late (its first row after the others' round 10); node4 stopped
    # gracefully (its process's one "stopped") and trained no more
    first5 = read_metrics(run_dir / "nodes" / "node5")[0]
    join = result.events[2]
    assert first5["ts"] > join["ts"] and len(_events(run_dir / "logs" / "node5.log", "started")) == 1
    log4 = run_dir / "logs" / "node4.log"
    assert len(_events(log4, "started")) == 1 and len(_events(log4, "stopped")) == 1
    # trained no more: at most the round in flight when the stop came (under load
    # the stop can fire near the end, so no fixed round bound)
    stop = result.events[5]
    assert len([r for r in read_metrics(run_dir / "nodes" / "node4") if r["ts"] > stop["ts"]]) <= 1

    # the partition reached the workers through the relayed control sockets:
    # while it held, node0 aggregated only models of its own side
    actions = [e["action"] for e in result.events]
    assert actions == ["crash", "restart", "join", "partition", "heal", "stop"]
    assert not any(e.get("skipped") for e in result.events)
    split, heal = result.events[3], result.events[4]
    side = {testnet.nodes[i].peer_id for i in (0, 1, 2)}
    # (rounds node0 began once every worker had the partition, up to when the heal
    # began to reach the workers: it reaches them one by one)
    held = [r for r in read_metrics(run_dir / "nodes" / "node0")
            if split["ts"] < r["ts"] < began_ts(heal) and r["round"] > split["applied_rounds"]["node0"]]
    assert held, (split, heal, [(r["round"], r["ts"]) for r in read_metrics(run_dir / "nodes" / "node0")])  # it held rounds
    for row in held:
        assert set(row["weights"]) - {"self"} <= side, row["round"]

    # nothing is left: no worker process, no host run root, no Ray daemon this run started
    root = Path(load_config(run_dir / "configs" / "node0.toml").node.data_dir).parents[1]
    assert processes_mentioning(str(root)) == []
    assert processes_mentioning(str(run_dir)) == []
    assert not root.exists()
    assert _ray_daemons() <= before


def test_a_run_the_cluster_cannot_hold_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """GPUs asked of a cluster without any: refused at once, nothing left behind."""
    before = _ray_daemons()
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.replace("cpus_per_node = 0.25", "cpus_per_node = 0.25\ngpus_per_node = 0.5"),
                        encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "murmur.testnet.cli", str(scenario), "--out", str(tmp_path / "run"),
                           "--no-dashboard"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ) | {"PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("murmur:")]
    assert errors == ["murmur: the Ray cluster cannot place 5 worker processes (1.5 CPUs, 3 GPUs, spread): "
                      "it has 2 CPUs, 0 GPUs (lower [cluster] cpus_per_node / gpus_per_node)"], done.stderr
    assert _ray_daemons() <= before
    assert processes_mentioning(str(tmp_path)) == []
