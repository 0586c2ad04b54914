"""``murmur testnet run`` end to end: real worker processes, real sockets, real torch.

The run goes through the real CLI entry (``python -m murmur.node.cli testnet
run``), on a shortened copy of the embedded default scenario (8 honest nodes,
SybilWall, privacy section, one attacker with 2 Sybils, a crash and a restart).
The report's numbers are checked against each node's own metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from murmur.testnet.controller import read_metrics
from murmur.testnet.report import CSV_COLUMNS, PLOTS
from murmur.testnet.scenario import default_scenario_text, load_scenario
from tests.signals import default_sigint

MURMUR = [sys.executable, "-m", "murmur.node.cli"]
RUN_TIMEOUT_S = 240
LIVE_ROUNDS_AFTER_RESTART = 5
PRIVATE_ACCURACY = 0.3  # three times chance, under example-level DP (see the assert)
INTERRUPT_EXIT_S = 15.0


DURATION = load_scenario(None).duration  # the default's: node3, back from its crash, must find enough rounds left
LAST_ROUND = DURATION.last_round  # training rounds, then mixing-only ones


def shortened_default(tmp_path: Path) -> Path:
    """The default scenario with its churn early: a crash at round 6 and the
    restart at 9 leave 36 rounds, some 18 s at this scenario's ~0.5 s rounds,
    for the restarted process to come up and train (it must run
    LIVE_ROUNDS_AFTER_RESTART itself, not just adopt a neighbour's model)."""
    text = (default_scenario_text()
            .replace("at_round = 10", "at_round = 6")
            .replace("at_round = 14", "at_round = 9"))
    path = tmp_path / "short.toml"
    path.write_text(text, encoding="utf-8")
    load_scenario(path)  # still a valid scenario
    return path


def processes_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (no psutil: /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline and int(entry) != os.getpid():
            out.append(int(entry))
    return out


def test_default_scenario_end_to_end(tmp_path: Path) -> None:
    scenario = shortened_default(tmp_path)
    out = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run([*MURMUR, "testnet", "run", str(scenario), "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dashboard: http://127.0.0.1:" in proc.stdout
    assert "round " in proc.stdout and "alive " in proc.stdout  # live progress lines
    assert "(fork server)" in proc.stdout and "fork server unavailable" not in proc.stdout
    report = out / "report"
    assert f"report: {report / 'index.html'}" in proc.stdout
    assert not processes_mentioning(str(out)), "a node process outlived the run"

    for name in ("index.html", "summary.json", *(p.file for p in PLOTS)):
        assert (report / name).stat().st_size > 0, name
    summary = json.loads((report / "summary.json").read_text())
    names = [f"node{i}" for i in range(8)] + ["sybil0-0", "sybil0-1"]
    assert sorted(summary["nodes"]) == sorted(names)

    # the report is the nodes' own metrics, unchanged
    own = {n: read_metrics(out / "nodes" / n) for n in names}
    for name in names:
        assert json.loads((report / "metrics" / f"{name}.json").read_text()) == own[name], name
        with (report / "metrics" / f"{name}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert tuple(rows[0].keys())[:len(CSV_COLUMNS)] == CSV_COLUMNS if rows else True
        assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in own[name]]
    honest = [n for n in names if n.startswith("node")]
    assert max(own[n][-1]["round"] for n in honest) == LAST_ROUND - 1
    crash, restart = summary["events"]
    for name in honest:  # a lagging node may skip rounds by adopting a neighbour's model, never go back
        rounds = [r["round"] for r in own[name]]
        assert rounds == sorted(set(rounds)), (name, rounds)
        # node3 is down between crash and restart; everyone trains most rounds themselves
        live = [r for r in own[name] if r["ts"] > restart["ts"]] if name == "node3" else own[name]
        assert len(live) >= (LIVE_ROUNDS_AFTER_RESTART if name == "node3" else 10), (name, rounds)
        node, last = summary["nodes"][name], own[name][-1]
        # its last row, or what its status says of a model it adopted after that
        # row (a node that catches up writes no row for the rounds it skipped)
        assert node["round"] >= last["round"], (name, node, last)
        if node["round"] == last["round"]:
            assert node["accuracy"] == last["accuracy"], (name, node, last)
        assert own[name][-1]["attack_rate"] is not None  # honest nodes measure the attack
    finals = [own[n][-1]["accuracy"] for n in honest]
    assert math.isclose(summary["final_mean_accuracy"], statistics.fmean(finals))
    assert summary["final_min_accuracy"] == min(finals)
    # digits learns through a crash and 2 Sybils under DP-SGD at ε = 10 per example
    # over 40 one-step rounds: far from the 0.96 the same run reaches without
    # privacy, well above chance (0.1). Measured on 2 cores, it varies from run to
    # run with which deltas make each round: 0.39-0.66 in 10 runs of the default,
    # 0.44-0.51 in 4 runs of this shortened one.
    assert summary["final_mean_accuracy"] > PRIVATE_ACCURACY
    assert summary["rounds"] == LAST_ROUND

    # churn happened as scheduled, on the right node, and node3 resumed (no round 0 after the restart)
    actions = [(e["action"], e["nodes"]) for e in summary["events"]]
    assert actions == [("crash", ["node3"]), ("restart", ["node3"])]
    assert 6 <= crash["round"] <= restart["round"]
    rounds3 = [r["round"] for r in own["node3"]]
    assert rounds3 == sorted(set(rounds3)), rounds3
    # the privacy section reached every node's config
    cfg = (out / "configs" / "node0.toml").read_text()
    assert "[privacy]" in cfg and "enabled = true" in cfg
    print(f"default-scenario ({LAST_ROUND} rounds) wall time {wall:.1f} s, accuracy {summary['final_mean_accuracy']:.3f}")


def test_cli_declares_testnet_options_without_a_scenario() -> None:
    """`murmur testnet run --no-dashboard` (no scenario path) parses: the
    options are declared on the subparser, not swallowed as a remainder."""
    from murmur.node.cli import build_parser

    args = build_parser().parse_args(["testnet", "run", "--no-dashboard", "--nodes-per-process", "3"])
    assert args.scenario is None and args.no_dashboard and args.nodes_per_process == 3 and not args.no_fork_server
    assert build_parser().parse_args(["testnet", "run", "--no-fork-server"]).no_fork_server
    args = build_parser().parse_args(["testnet", "run", "s.toml", "--out", "o"])
    assert args.scenario == Path("s.toml") and args.out == Path("o") and not args.no_dashboard
    with pytest.raises(SystemExit):
        build_parser().parse_args(["testnet", "run", "--nodes-per-process", "0"])


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # far more rounds than the interrupt leaves time for: a run must never end on
    # its own before the Ctrl-C (the default's ~0.5 s rounds finish 45 in ~25 s)
    scenario = shortened_default(tmp_path)
    scenario.write_text(scenario.read_text(encoding="utf-8").replace(f"\nrounds = {DURATION.rounds}", "\nrounds = 1000"),
                        encoding="utf-8")
    assert load_scenario(scenario).duration.rounds == 1000
    proc = subprocess.Popen([*MURMUR, "testnet", "run", str(scenario), "--out", str(out), "--no-dashboard"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until every node answers /status
            if "alive 10/10" in line:
                break
        else:
            pytest.fail(f"testnet never came up (exit {proc.wait()})")
        workers = processes_mentioning(str(out))
        assert len(workers) >= 4  # the controller and its worker processes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(INTERRUPT_EXIT_S) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not processes_mentioning(str(out)), "Ctrl-C left a node process behind"
