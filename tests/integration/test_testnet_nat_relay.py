"""Issue 3's learning (8 nodes, digits, Dirichlet 0.5) with every honest node
behind NAT, half endpoint-independent and half symmetric, and one public relay
node (``scenarios/nat_relay.toml``): ``murmur testnet run`` on the emulated
internet. No node can dial another: rounds run over relayed connections in the
relay's learning class, or over holes punched between endpoint-independent NATs,
and the report shows the connection mix.
Root only (skipped otherwise, with the reason). About 30 s on a 2-core VM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.emulation import require_internet, run_testnet

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "murmur" / "testnet" / "scenarios" / "nat_relay.toml"
MURMUR = [sys.executable, "-m", "murmur.node.cli"]
RUN_TIMEOUT_S = 240
# Issue 3's bar on loopback is 0.85. Here every delta crossed the relay or a
# punched hole, and nodes that lost a circuit catch up past rounds instead of
# learning them: 14 runs on the 2-core VM gave a mean of 0.836-0.961 (one
# under 0.85, in a CI rehearsal; the code before the split frames gave
# 0.908-0.961 in 5 of them).
ACCURACY = 0.8


# Slow (50 s on 2 cores): the default suite keeps nat.toml's run, relays and NATs
# included (test_testnet_network.py), and relayed learning (test_internet_nodes.py).
@pytest.mark.slow
def test_every_honest_node_behind_nat_learns_through_one_public_relay(tmp_path: Path) -> None:
    require_internet()
    out = tmp_path / "run"
    proc = run_testnet([*MURMUR, "testnet", "run", str(SCENARIO), "--out", str(out), "--no-dashboard"],
                       {**os.environ, "PYTHONPATH": str(ROOT)}, RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not proc.left
    assert "emulated internet: 9 hosts, 1 public; router0 eim, router1 symmetric" in proc.stdout

    layout = json.loads((out / "network.json").read_text())["nodes"]
    assert layout["relay0"]["router"] is None
    assert {layout[f"node{i}"]["nat"] for i in range(8)} == {"eim", "symmetric"}
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["honest_nodes"] == 8 and summary["relay_nodes"] == 1
    assert summary["final_mean_accuracy"] >= ACCURACY, summary["final_mean_accuracy"]

    # the connection mix: each honest node reaches the relay directly and its peers through it
    # (no node can dial another: none is public), or, between two endpoint-independent NATs,
    # over a punched hole (DCUtR; a punch whose SYN met the other side's listener first may
    # count as direct there); behind a symmetric NAT nothing is ever punched
    nodes = summary["nodes"]
    for i in range(8):
        mix = nodes[f"node{i}"]["connections"]
        assert mix is not None and mix["direct"] >= 1 and sum(mix.values()) >= 2, (i, mix)
        if layout[f"node{i}"]["nat"] == "symmetric":
            assert mix["direct"] == 1 and mix["punched"] == 0 and mix["relayed"] >= 1, (i, mix)
    assert summary["connections"]["relayed"] >= 4, summary["connections"]  # at least the symmetric nodes' peers
    assert summary["punch_attempts"] >= summary["punch_successes"] >= 0
    assert nodes["relay0"]["role"] == "relay" and nodes["relay0"]["connections"]["direct"] >= 8
    index = (out / "report" / "index.html").read_text()
    assert "Connections at the end (honest nodes&#x27; ends)" in index and "relayed</td>" in index
    assert f"connections at the end: {summary['connections']['direct']} direct" in proc.stdout

    # every circuit between honest nodes ran in the relay's learning class (1 h, 1 GiB), none was cut
    circuits = [json.loads(line) for line in (out / "logs" / "relay0.log").read_text().splitlines()
                if '"event": "relay_circuit"' in line]
    assert circuits and all(c["learning"] for c in circuits), circuits[:3]
    print(f"\naccuracy {summary['final_mean_accuracy']:.3f} (worst {summary['final_min_accuracy']:.3f}); "
          f"connections {summary['connections']}; {len(circuits)} circuits; run {summary['wall_s']:.1f} s")
