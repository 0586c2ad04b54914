"""``murmur testnet run`` with a ``[network]`` section: the nodes on an
emulated internet, public and behind EIM and symmetric NATs, with link rates;
and its refusal, in one line, where that cannot run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.testnet.controller import read_metrics
from murmur.testnet.scenario import find_line, load_scenario
from tests.integration.emulation import require_internet, run_testnet

ROOT = Path(__file__).resolve().parents[2]
NAT_SCENARIO = ROOT / "murmur" / "testnet" / "scenarios" / "nat.toml"
MURMUR = [sys.executable, "-m", "murmur.node.cli"]
RUN_TIMEOUT_S = 240
# node5 (behind the symmetric NAT, on a 2 Mbit/s uplink) learns only once it
# has a learning neighbour. When the public nodes' link slots went to the
# others first, it gets one through a relay, ~1.5-2 s after the start (a
# direct dial to a NATed address times out first). Rounds of this scenario
# take ~50 ms on an idle machine: with 8, then 14 rounds the others had
# finished by then, node5 caught up to the last round and wrote no row of its
# own (reproduced with 14 in 1 of 6 runs). 80 rounds last ~4 s idle, more
# under load, where the relay path is slower too.
ROUNDS = 80
ACCURACY = 0.8  # digits-mlp, iid, plain averaging: ~0.9 after 8 rounds of 10 steps
NOBODY = 65534


def _short(tmp_path: Path) -> Path:
    path = tmp_path / "nat.toml"
    path.write_text(NAT_SCENARIO.read_text().replace("rounds = 20", f"rounds = {ROUNDS}"), encoding="utf-8")
    assert load_scenario(path).duration.rounds == ROUNDS
    return path


def test_nodes_behind_nats_learn_on_the_emulated_internet(tmp_path: Path) -> None:
    require_internet()
    out = tmp_path / "run"
    proc = run_testnet([*MURMUR, "testnet", "run", str(_short(tmp_path)), "--out", str(out), "--no-dashboard"],
                       {**os.environ, "PYTHONPATH": str(ROOT)}, RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not proc.left
    assert "emulated internet: 6 hosts, 2 public; router0 eim, router1 eim, router2 symmetric" in proc.stdout

    layout = json.loads((out / "network.json").read_text())
    nodes = layout["nodes"]
    assert {n: (v["router"], v["nat"]) for n, v in nodes.items()} == {
        "node0": (None, None), "node1": (None, None), "node2": ("router0", "eim"), "node3": ("router0", "eim"),
        "node4": ("router1", "eim"), "node5": ("router2", "symmetric")}
    assert nodes["node2"]["address"].startswith("10.1.0.") and nodes["node2"]["public_address"] == \
        layout["routers"]["router0"]["address"]
    assert (nodes["node5"]["up_mbit"], nodes["node5"]["down_mbit"], nodes["node0"]["up_mbit"]) == (2.0, 10.0, 20.0)
    by_peer = {v["peer_id"]: name for name, v in nodes.items()}
    learned_with: dict[str, set[str]] = {n: set() for n in nodes}
    for name, node in nodes.items():
        rows = read_metrics(out / "nodes" / name)
        assert rows and rows[-1]["round"] == ROUNDS - 1, name
        assert rows[-1]["accuracy"] >= ACCURACY, (name, rows[-1]["accuracy"])
        for peer in {by_peer[p] for r in rows for p in r.get("neighbours", [])}:
            learned_with[name].add(peer)
            learned_with[peer].add(name)
        log = (out / "logs" / f"{name}.log").read_text()
        assert f'"/ip4/{node["address"]}/tcp/4731/p2p/{node["peer_id"]}"' in log  # it listened on its host
    edges = {frozenset((a, b)) for a, peers in learned_with.items() for b in peers}
    router = {name: node["router"] for name, node in nodes.items()}
    # nodes behind NAT learned with public ones, across their routers
    assert any((router[a] is None) != (router[b] is None) for a, b in edges), learned_with
    # with a node behind another router only through a relay (the public nodes relay): nothing can dial it
    summary = json.loads((out / "report" / "summary.json").read_text())
    if [(a, b) for a, b in edges if None not in (router[a], router[b]) and router[a] != router[b]]:
        assert summary["connections"]["relayed"] > 0 or any(
            '"event": "relay_circuit"' in (out / "logs" / f"{n}.log").read_text() for n in ("node0", "node1"))
    for name in ("node0", "node1"):
        assert summary["nodes"][name]["connections"]["relayed"] == 0  # public: everyone dials them
    # node4's line lost 10 % of its packets from round 5 to 15, applied (not skipped), and it still learnt
    losses = [e for e in summary["events"] if e["action"] == "loss"]
    assert [(e["at_round"], e["percent"], e["nodes"], "skipped" in e) for e in losses] == [
        (5, 10, ["node4"], False), (15, 0, ["node4"], False)], losses
    # node3's line was 40 ms longer each way from round 5 to 15: applied by the delay line in its cable
    delays = [e for e in summary["events"] if e["action"] == "latency"]
    assert [(e["at_round"], e["ms"], e["nodes"], "skipped" in e) for e in delays] == [
        (5, 40, ["node3"], False), (15, 0, ["node3"], False)], delays
    line_log = [json.loads(x) for x in (out / "logs" / "delayline-r-router0.log").read_text().splitlines()]
    assert [(r["link"], r["up_ms"], r["down_ms"]) for r in line_log if r["msg"] == "delay set"] == [
        ("node3", 40.0, 40.0), ("node3", 0.0, 0.0)]
    (counts,) = [r["counts"] for r in line_log if r["msg"] == "delay line exiting"]
    assert counts["node3 up"]["forwarded"] > 0 and counts["node3 down"]["forwarded"] > 0, counts
    assert not (out / "logs" / "delayline-inet.log").exists()  # no public host was named: no line there
    alone = sorted(n for n, peers in learned_with.items() if not peers)
    print(f"\nlearned with: { {n: sorted(p) for n, p in learned_with.items()} }; alone: {alone}")


def test_network_is_refused_in_one_line_where_it_cannot_run(tmp_path: Path) -> None:
    """Not root: exit 2 and one line naming the [network] line and why; no
    run on loopback instead. As root the same CLI runs as nobody."""
    argv = [*MURMUR, "testnet", "run", str(NAT_SCENARIO), "--out", str(tmp_path / "never"), "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root for this test")
        drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        if subprocess.run([*drop, *MURMUR, "--help"], capture_output=True, cwd="/", env=env).returncode != 0:
            pytest.skip(f"an unprivileged user cannot run {sys.executable} with {ROOT} here")
        argv = [*drop, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", env=env)
    line = find_line(NAT_SCENARIO.read_text(), ("network",))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"murmur: config error: {NAT_SCENARIO}:{line}: network: the emulated internet cannot run here: needs root "
        "(network namespaces, nftables, tc); not running as root (run as root, or remove [network] to run every "
        "node on loopback)"]
    assert proc.stdout == "" and not (tmp_path / "never").exists()
