"""The report and ``testnet compare`` on two real short runs (fp32 with a
crash and restart, fp16 without), through the real CLI.

Every CSV behind a plot is checked against the nodes' own metrics.jsonl
(ε, bytes with the restarted node's counter, phase times, the metric), and
the pages are opened in headless Chromium: each plot loaded, the settings
and events tables there, nothing wider than the window, a screenshot taken.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from murmur.testnet.controller import read_metrics
from murmur.testnet.reporting.run import PHASES
from tests.browser import BrowserPage, BrowserUnavailable, ensure_chromium

MURMUR = [sys.executable, "-m", "murmur.node.cli"]
RUN_TIMEOUT_S = 180
NAMES = ["node0", "node1", "node2"]
SCENARIO = """
name = "{name}"
nodes = 3
nodes_per_process = 3
seed = 3
codec = "{codec}"
[topology]
degree = 2
[duration]
rounds = 6
round_deadline_s = 2.0
[trainer]
spec = "digits-mlp"
local_steps = 1
device = "cpu"
options = {{ lr = 0.5, batch_size = 32, momentum = 0.0, dp_clip = 1.0 }}
[privacy]
enabled = true
level = "example"
epsilon = 10.0
"""
CHURN = """
[[churn]]
at_round = 2
action = "crash"
nodes = [2]
[[churn]]
at_round = 3
action = "restart"
nodes = [2]
"""
WINDOW = (1280, 900)


def _start(tmp: Path, name: str, codec: str, churn: str) -> subprocess.Popen[str]:
    scenario = tmp / f"{name}.toml"
    scenario.write_text(SCENARIO.format(name=name, codec=codec) + churn, encoding="utf-8")
    return subprocess.Popen([*MURMUR, "testnet", "run", str(scenario), "--out", str(tmp / name), "--no-dashboard"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(run: subprocess.Popen[str]) -> None:
    stdout, stderr = run.communicate(timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "final honest accuracy: mean" in stdout and "ε 10.00 of 10" in stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both runs at once: each is mostly process start-up and round
    deadlines, and one after the other they took 26 s of the test run."""
    tmp = tmp_path_factory.mktemp("runs")
    started = {"fp32": _start(tmp, "fp32", "fp32", CHURN), "fp16": _start(tmp, "fp16", "fp16", "")}
    try:
        for run in started.values():
            _finish(run)
    finally:
        for run in started.values():
            if run.poll() is None:  # the other one failed: end the run we started (it stops its workers)
                run.terminate()
                run.wait(timeout=RUN_TIMEOUT_S)
    return {name: tmp / name for name in started}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _node(rows: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    return [r for r in rows if r["node"] == name]


COUNTERS = ("bytes_in", "bytes_out")


def _restart_corrected(own: list[dict[str, Any]], key: str) -> list[int]:
    """What the node sent (received) in all its processes, computed here
    independently: when either byte counter fell, a new process started both
    from 0 (one counter alone can pass its old value again before the next
    row: a restarted node that caught up sent more than before its crash)."""
    out, base, last = [], 0, None
    for row in own:
        if last is not None and any(row[c] < last[c] for c in COUNTERS):
            base += last[key]
        out.append(base + row[key])
        last = row
    return out


def test_report_csvs_are_the_nodes_own_metrics(runs: dict[str, Path]) -> None:
    for label, run in runs.items():
        report = run / "report"
        own = {n: read_metrics(run / "nodes" / n) for n in NAMES}
        assert all(own.values()), label
        eps, traffic, phases = _csv(report / "epsilon.csv"), _csv(report / "traffic.csv"), _csv(report / "phases.csv")
        metric = _csv(report / "metric.csv")
        for name in NAMES:
            rows = own[name]
            assert [(int(r["round"]), float(r["epsilon"])) for r in _node(eps, name)] == \
                   [(r["round"], r["epsilon"]) for r in rows], (label, name)
            assert {r["budget"] for r in _node(eps, name)} == {"10.0"}
            mine = _node(traffic, name)
            assert [int(float(r["bytes_out"])) for r in mine] == _restart_corrected(rows, "bytes_out"), (label, name)
            assert [int(float(r["bytes_in"])) for r in mine] == _restart_corrected(rows, "bytes_in"), (label, name)
            for got, want in zip(_node(phases, name), rows, strict=True):
                assert int(got["round"]) == want["round"]
                for phase in PHASES:
                    assert float(got[phase]) == want.get(phase, 0.0), (label, name, phase)
                assert float(got["total_s"]) == pytest.approx(sum(want.get(p, 0.0) for p in PHASES))
            assert [float(r["accuracy"]) for r in _node(metric, name)] == [r["accuracy"] for r in rows]
        # the consensus plot's spread is the honest nodes' spread in that round
        for row in _csv(report / "consensus.csv"):
            values = [r["accuracy"] for rows in own.values() for r in rows if r["round"] == int(row["round"])]
            assert float(row["range"]) == pytest.approx(max(values) - min(values))
        summary = json.loads((report / "summary.json").read_text())
        files = {p["file"] for p in summary["plots"]}
        assert {"metric.png", "metric_bytes.png", "epsilon.png", "phases.png", "phases_by_node.png",
                "consensus.png", "traffic.png", "graph.png"} <= files
        assert not files & {"attack_rate.png", "sybil_weight.png"}  # no attackers, no attack panels
        assert not (report / "attack_rate.png").exists()
    # the crashed node's counter started again from 0, and the report never shows it falling
    node2 = _node(_csv(runs["fp32"] / "report" / "traffic.csv"), "node2")
    assert any(r["restarted"] == "1" for r in node2)
    sent = [float(r["bytes_out"]) for r in node2]
    assert sent == sorted(sent)


def _browser() -> None:
    try:
        ensure_chromium()
    except BrowserUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")


LAYOUT = """({
  images: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]),
  overflow: document.documentElement.scrollWidth - window.innerWidth,
  settings: Object.fromEntries([...document.querySelectorAll('#settings tr')].map(
      r => [r.querySelector('th').textContent, r.querySelector('td').textContent])),
  nodes: [...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[0].textContent),
  events: [...document.querySelectorAll('#events tbody tr')].map(r => r.cells[2].textContent),
  figures: [...document.querySelectorAll('figure')].map(f => f.id),
})"""


async def test_report_page_in_a_browser(runs: dict[str, Path], tmp_path: Path) -> None:
    _browser()
    report = runs["fp32"] / "report"
    summary = json.loads((report / "summary.json").read_text())
    async with BrowserPage(*WINDOW) as page:
        await page.goto((report / "index.html").as_uri())
        seen = await page.evaluate(LAYOUT)
        width, height = await page.screenshot(tmp_path / "report.png")
    images = dict(seen["images"])
    for plot in summary["plots"]:
        assert images.get(plot["file"], 0) > 0, f"{plot['file']} did not load"
        assert f"plot-{plot['file'].removesuffix('.png')}" in seen["figures"]
    assert seen["overflow"] <= 0, "the page is wider than the window"
    assert seen["settings"]["codec"] == "fp32" and seen["settings"]["privacy.epsilon"] == "10.0"
    assert seen["settings"]["duration.rounds"] == "6"
    assert seen["nodes"] == NAMES
    assert seen["events"] == ["crash node2", "restart node2"]
    assert width == WINDOW[0] and height > 3000  # the whole report, every plot in it
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")


async def test_compare_fp32_and_fp16(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare"
    done = subprocess.run([*MURMUR, "testnet", "compare", str(runs["fp32"]), str(runs["fp16"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"comparison: {out / 'index.html'}\n"
    curves = _csv(out / "curves.csv")
    assert {r["run"] for r in curves} == {"fp32", "fp16"}
    for label, run in runs.items():  # the curves are the honest nodes' mean of their own rows
        own = {n: read_metrics(run / "nodes" / n) for n in NAMES}
        for row in (r for r in curves if r["run"] == label):
            values = [r["accuracy"] for rows in own.values() for r in rows if r["round"] == int(row["round"])]
            assert float(row["accuracy"]) == pytest.approx(sum(values) / len(values))
    first = {r["run"]: float(r["bytes_sent_per_node"]) for r in curves if r["round"] == "1"}
    assert first["fp16"] < 0.8 * first["fp32"]  # half-size deltas: what the bytes plot is for

    _browser()
    async with BrowserPage(*WINDOW) as page:
        await page.goto((out / "index.html").as_uri())
        seen = await page.evaluate("""({
          images: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]),
          runs: [...document.querySelectorAll('#runs tbody tr')].map(r => [r.cells[0].textContent, r.cells[1].textContent]),
          overflow: document.documentElement.scrollWidth - window.innerWidth,
        })""")
        await page.screenshot(tmp_path / "compare.png")
    assert dict(seen["images"]).keys() == {"metric_rounds.png", "metric_bytes.png", "metric_time.png"}
    assert all(w > 0 for _, w in seen["images"])
    assert seen["runs"] == [["fp32", "fp32"], ["fp16", "fp16"]]
    assert seen["overflow"] <= 0

    bad = subprocess.run([*MURMUR, "testnet", "compare", str(runs["fp32"]), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith(f"murmur: {tmp_path}: not a testnet run")
