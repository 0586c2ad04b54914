"""``murmur testnet run`` on a user's own small scenarios: it runs, or it says why at once.

Through the real CLI entry, with real worker processes: networks of 3, 4 and
7 nodes (under 8 the nodes used to refuse their own configs and the run
stalled for a minute), a scenario with a typo (refused before any process
starts), one whose every worker fails to start (the run stops at once
with the worker's error instead of waiting out the stall bound), and a run
stopped by SIGTERM (every node stops gracefully).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from murmur.testnet.controller import MIN_STALL_S, read_metrics
from tests.integration.test_testnet import processes_mentioning

MURMUR = [sys.executable, "-m", "murmur.node.cli"]
RUN_TIMEOUT_S = 120
REFUSE_TIMEOUT_S = 30  # a refusal is a config parse and a torch import: seconds
FAIL_FAST_S = MIN_STALL_S / 2  # a failed start must not wait for the stall bound
ROUNDS = 10  # a node of 7 in one process that starts last must still run rounds of its own
STOP_EXIT_S = 20.0  # the supervisor's grace (5 s) and then SIGKILL, with room on a loaded box
SPEC_LINE = 13  # of `spec = ...` in scenario()'s text


def scenario(tmp_path: Path, nodes: int, trainer: str = 'spec = "digits-mlp"\nlocal_steps = 5',
             rounds: int = ROUNDS) -> Path:
    path = tmp_path / f"n{nodes}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "small{nodes}"
        nodes = {nodes}
        nodes_per_process = {nodes}

        [topology]
        degree = 2

        [duration]
        rounds = {rounds}
        round_deadline_s = 1.0

        [trainer]
        """) + trainer + "\n", encoding="utf-8")
    return path


def run_testnet(path: Path, out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MURMUR, "testnet", "run", str(path), "--out", str(out), "--no-dashboard"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("nodes", [3, 4, 7])
def test_small_testnets_run(tmp_path: Path, nodes: int) -> None:
    out = tmp_path / "run"
    proc = run_testnet(scenario(tmp_path, nodes), out, RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    names = [f"node{i}" for i in range(nodes)]
    assert sorted(summary["nodes"]) == names
    for name in names:
        rows = read_metrics(out / "nodes" / name)
        # every node ran to the end: its last row is the last round, or, for a node that fell
        # behind on a loaded box and caught up (adopted a neighbour's model: no rows for the
        # rounds it skipped), the report's final round from its last status
        assert rows and summary["nodes"][name]["round"] == ROUNDS - 1, (name, rows[-1:], summary["nodes"][name])


def test_scenario_typo_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    path = scenario(tmp_path, 4, 'spec = "digits-mpl"')
    out = tmp_path / "run"
    proc = run_testnet(path, out, REFUSE_TIMEOUT_S)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"murmur: config error: {path}:{SPEC_LINE}: trainer.spec: unknown trainer 'digits-mpl'"), line
    assert not out.exists()  # no process, no run dir


def test_testnet_whose_nodes_cannot_start_stops_at_once(tmp_path: Path) -> None:
    """Every worker fails building its trainer (a data set that is not
    there): the run ends with that error, not a stall and a report of None."""
    missing = tmp_path / "no-mnist"
    path = scenario(tmp_path, 3, f'spec = "mnist-cnn"\noptions = {{ data_dir = "{missing}" }}')
    out = tmp_path / "run"
    started = time.monotonic()
    proc = run_testnet(path, out, RUN_TIMEOUT_S)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"murmur: config error: {missing}: missing train-images-idx3-ubyte"), line
    assert "(worker nodes-0-1-2, log " in line
    assert took < FAIL_FAST_S, f"took {took:.1f} s"
    assert not (out / "report").exists()


def test_sigterm_stops_every_node_gracefully(tmp_path: Path) -> None:
    """SIGTERM (``kill``, ``timeout``, a cancelled CI job) killed the
    controller outright: exit -15, no word, its nodes SIGKILLed by their
    parent-death signal before any could stop (no last checkpoint), and on
    an emulated internet its namespaces left behind. It now stops the run as
    Ctrl-C does, and the rounds that ran are reported."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*MURMUR, "testnet", "run", str(scenario(tmp_path, 3, rounds=1000)), "--out", str(out),
                             "--no-dashboard"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # every node answers /status: all three are running rounds
            if "alive 3/3" in line:
                break
        else:
            pytest.fail(f"testnet never came up (exit {proc.wait()})")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_EXIT_S) == 128 + signal.SIGTERM
        assert proc.stderr is not None
        assert f"terminated; every node stopped. Run dir: {out}" in proc.stderr.read()
        assert proc.stdout.read().startswith("run interrupted in ")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not processes_mentioning(str(out)), "SIGTERM left a node process behind"
    stops = [json.loads(line) for line in (out / "logs" / "nodes-0-1-2.log").read_text().splitlines()
             if '"event": "stopped"' in line]
    assert len(stops) == 3, "a node was killed instead of stopped"
    # the rounds it ran are reported
    summary = json.loads((out / "report" / "summary.json").read_text())
    last = max(read_metrics(out / "nodes" / f"node{i}")[-1]["round"] for i in range(3))
    assert summary["rounds"] == last + 1 > 1
