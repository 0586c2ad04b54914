"""The testnet across a Ray cluster of three hosts on one machine: a head and
two worker raylets, each in its own network namespace with its own
198.18.0.0/15 address, joined by a bridge (tests/integration/raynet.py). The
controller runs on the head's host, as ``murmur testnet run --cluster
ray=ADDRESS``; 12 nodes spread over the hosts go through a crash, a restart
and a partition/heal. Checked from the outside: the nodes listened on their
hosts' addresses and nodes on different hosts talked over the namespace
network; the report's numbers are the nodes' own metrics; no murmur process
is left on any host.

Skipped without root (namespaces) or without Ray (``pip install 'murmur[ray]'``).
Runs in CI (not marked slow: a skip there would prove nothing); on a shared
2-core box the module took 129-155 s (the three raylets
13-35 s to start, the 12-node run 34-60 s, the other three runs 17-41 s each).
"""

from __future__ import annotations

import json
import os
import statistics
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from murmur.node.config import load_config
from murmur.testnet.controller import read_metrics
from tests.integration import raynet

pytest.importorskip("ray", reason="Ray is not installed (pip install 'murmur[ray]'); the Ray cluster run is not tested")
_WHY_NOT = raynet.can_make_namespaces()
# Skipped only without root; as root (CI) a namespace that cannot be made fails the tests instead.
# Slow (two minutes together on 2 cores): CI runs them; test_ray_cluster.py keeps
# a Ray run in the default suite.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason=f"three Ray hosts: {_WHY_NOT}"), pytest.mark.slow]

ROOT = str(Path(__file__).resolve().parents[2])
RUN_TIMEOUT_S = 240

SCENARIO = """
name = "ray-hosts"
nodes = 12
nodes_per_process = 3
seed = 11

[topology]
degree = 3

[duration]
rounds = 40
round_deadline_s = 2.0

[trainer]
spec = "digits-mlp"
local_steps = 40
options = { lr = 0.05, batch_size = 32 }

[cluster]
backend = "ray"
placement = "spread"
cpus_per_node = 0.25

[[churn]]
at_round = 5
action = "crash"
nodes = [1, 6]

[[churn]]
at_round = 8
action = "restart"
nodes = [1, 6]

[[churn]]
at_round = 14
action = "partition"
nodes = [0, 1, 2, 3, 4, 5]

[[churn]]
at_round = 20
action = "heal"
"""


def _rows(log: Path, event: str) -> list[dict]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("event") == event:
            out.append(row)
    return out


def _murmur_processes(namespaces: list[str]) -> list[str]:
    """Command lines of murmur worker processes in ``namespaces``."""
    found = []
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "murmur.testnet" in cmd:
                found.append(f"{ns}: {cmd}")
    return found


ENV = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
       "RAY_AUTH_MODE": "token"}  # Ray 2.5x clusters require their token; the hosts share ~/.ray here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[raynet.RayHosts]:
    with raynet.RayHosts(hosts=3, cpus_per_host=2, env=ENV, log_dir=tmp_path_factory.mktemp("raylets")) as hosts:
        yield hosts
    assert not [ns for ns in hosts.namespaces if (raynet.NETNS_DIR / ns).exists()]


def _controller(cluster: raynet.RayHosts, scenario: Path, run_dir: Path) -> list[str]:
    return [*cluster.exec_prefix(0), sys.executable, "-m", "murmur.testnet.cli", str(scenario),
            "--cluster", f"ray={cluster.head_address}", "--out", str(run_dir), "--no-dashboard"]


def test_twelve_nodes_across_three_ray_hosts(cluster: raynet.RayHosts, tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    run_dir = tmp_path / "run"
    controller = subprocess.run(_controller(cluster, scenario, run_dir), capture_output=True, text=True,
                                env=dict(os.environ) | ENV, timeout=RUN_TIMEOUT_S)
    assert controller.returncode == 0, controller.stdout[-3000:] + controller.stderr[-3000:]
    assert _murmur_processes(cluster.namespaces) == []  # none on any host once the controller returned
    assert "run completed" in controller.stdout

    summary = json.loads((run_dir / "report" / "summary.json").read_text(encoding="utf-8"))
    host_addresses = {cluster.address(k) for k in range(3)}
    hosts = {name: node["host"] for name, node in summary["nodes"].items()}
    assert set(hosts) == {f"node{i}" for i in range(12)}
    assert set(hosts.values()) == host_addresses  # spread over all three hosts

    # each node listened on its host's own address; nodes talked across hosts
    crossed = set()
    for name, host in hosts.items():
        cfg = load_config(run_dir / "configs" / f"{name}.toml")
        assert cfg.node.listen[0].host == host
        procs = [p for p in (run_dir / "logs").glob("*.log") if p.stem in (name, ) or
                 (p.stem.startswith("nodes-") and name[4:] in p.stem[6:].split("-"))]
        assert len(procs) == 1, (name, procs)
        remotes = {c["remote"].rsplit(":", 1)[0] for c in _rows(procs[0], "connected")}
        if remotes & (host_addresses - {host}):
            crossed.add(host)
    assert crossed == host_addresses  # from every host, some node reached a peer on another host

    # the report's numbers are the nodes' own metrics, brought back from their hosts
    finals = []
    for name, node in summary["nodes"].items():
        rows = read_metrics(run_dir / "nodes" / name)
        assert rows and node["rows"] == len(rows) and node["round"] == rows[-1]["round"], name
        assert node["alive"] is True
        finals.append(rows[-1]["accuracy"])
    assert summary["final_mean_accuracy"] == pytest.approx(statistics.fmean(finals))
    assert summary["rounds"] == 40

    # the crashed nodes were killed -9 on their hosts and restarted from their own state dirs
    for name in ("node1", "node6"):
        log = run_dir / "logs" / f"{name}.log"
        assert len(_rows(log, "started")) == 2 and len(_rows(log, "stopped")) == 1, name
        assert len(_rows(log, "restored")) == 1, name
        assert summary["nodes"][name]["restarts"] == 1
    actions = [e["action"] for e in summary["events"]]
    assert actions == ["crash", "restart", "partition", "heal"]

    # while the partition held, a node of the first side aggregated only its side's models
    split, heal = summary["events"][2], summary["events"][3]
    side = {summary["nodes"][f"node{i}"]["peer_id"] for i in range(6)}
    held = [r for r in read_metrics(run_dir / "nodes" / "node0")
            if split["ts"] < r["ts"] < heal["ts"] and r["round"] >= split["round"] + 2]
    assert held
    for row in held:
        assert set(row["weights"]) - {"self"} <= side, row["round"]


LOST_HOST = """
name = "ray-lost-host"
nodes = 6
nodes_per_process = 2
seed = 12

[topology]
degree = 3

[duration]
rounds = 400
round_deadline_s = 1.0
quorum = 0.5

[trainer]
spec = "digits-mlp"
local_steps = 10

[cluster]
backend = "ray"
placement = "strict_spread"
cpus_per_node = 0.25
"""


def test_a_lost_ray_host_takes_its_nodes_with_it(cluster: raynet.RayHosts, tmp_path: Path) -> None:
    """The raylet of the last host dies mid-run (SIGKILL): its agents die,
    their worker processes with them (PR_SET_PDEATHSIG), the controller says
    so and the others run on. Three processes of two nodes, one per host
    (strict spread)."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(LOST_HOST, encoding="utf-8")
    run_dir = tmp_path / "run"
    victim = cluster.address(2)
    proc = subprocess.Popen(_controller(cluster, scenario, run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ) | ENV)
    try:
        # until the victim host's nodes have trained a few rounds (their state is on that host)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        victims: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            configs = list((run_dir / "configs").glob("*.toml"))
            victims = [c.stem for c in configs if load_config(c).node.listen[0].host == victim]
            rows = [read_metrics(Path(load_config(run_dir / "configs" / f"{v}.toml").node.data_dir)) for v in victims]
            if victims and all(len(r) >= 5 for r in rows):
                break
            time.sleep(0.5)  # polling the nodes' own metrics files
        assert victims and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        raylet = [pid for pid in subprocess.run(["ip", "netns", "pids", cluster.ns(2)], capture_output=True,
                                                text=True).stdout.split()
                  if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert raylet
        for pid in raylet:
            os.kill(int(pid), signal.SIGKILL)
        # the victims' worker processes die with their agents, on their host
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _murmur_processes([cluster.ns(2)]):
            time.sleep(0.5)  # polling /proc
        assert _murmur_processes([cluster.ns(2)]) == []
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert f"is gone with its Ray host {victim}" in out
    summary = json.loads((run_dir / "report" / "summary.json").read_text(encoding="utf-8"))
    lost = [e for e in summary["events"] if e["action"] == "exited"]
    assert lost and all(e.get("host_lost") and e["host"] == victim for e in lost)
    for name in victims:
        assert summary["nodes"][name]["host"] == victim
        assert summary["nodes"][name]["alive"] is False
    others = [n for n, node in summary["nodes"].items() if node["host"] != victim]
    assert others and all(summary["nodes"][n]["round"] == 399 for n in others)
    assert _murmur_processes(cluster.namespaces) == []


def test_killing_the_controller_leaves_no_murmur_process_on_any_host(cluster: raynet.RayHosts,
                                                                      tmp_path: Path) -> None:
    """SIGKILL of the controller (no cleanup of its own): Ray kills the
    actors its driver owned, and their worker processes die with them."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(LOST_HOST.replace('"strict_spread"', '"spread"'), encoding="utf-8")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_controller(cluster, scenario, run_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ) | ENV)
    root: Path | None = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_murmur_processes(cluster.namespaces)) >= 3:
                cfg = load_config(run_dir / "configs" / "node0.toml")
                root = Path(cfg.node.data_dir).parents[1]
                if len(read_metrics(Path(cfg.node.data_dir))) >= 3:
                    break
            time.sleep(0.5)  # polling /proc and the node's metrics
        assert proc.poll() is None and root is not None
        proc.kill()  # `ip netns exec` exec'd the controller: this is its pid
        proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _murmur_processes(cluster.namespaces):
            time.sleep(0.5)  # polling /proc
        assert _murmur_processes(cluster.namespaces) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if root is not None:  # files only: a killed controller cannot remove the hosts' run roots
            shutil.rmtree(root, ignore_errors=True)


def test_labels_keep_a_run_on_the_hosts_that_carry_them(cluster: raynet.RayHosts, tmp_path: Path) -> None:
    """``[cluster] labels``: every worker process on the one host labelled so."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(LOST_HOST.replace("rounds = 400", "rounds = 5").replace(
        'placement = "strict_spread"', f'placement = "spread"\nlabels = {{ {raynet.HOST_LABEL} = "h1" }}'),
        encoding="utf-8")
    run_dir = tmp_path / "run"
    done = subprocess.run(_controller(cluster, scenario, run_dir), capture_output=True, text=True,
                          env=dict(os.environ) | ENV, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "report" / "summary.json").read_text(encoding="utf-8"))
    assert {node["host"] for node in summary["nodes"].values()} == {cluster.address(1)}
    assert summary["rounds"] == 5, summary["nodes"]
