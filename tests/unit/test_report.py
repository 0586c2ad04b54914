"""The run report: numbers written equal numbers given, plots are real PNGs."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from murmur.protocol.identity import Identity
from murmur.testnet.report import CSV_COLUMNS, PLOTS, weight_split, write_report
from murmur.testnet.scenario import parse_scenario

SCENARIO = """
name = "report-test"
nodes = 3
[topology]
degree = 2
[duration]
rounds = 12
[[attackers]]
kind = "backdoor"
sybils = 1
edges_per_sybil = 2
[[churn]]
at_round = 4
action = "crash"
nodes = [2]
[[churn]]
at_round = 7
action = "restart"
nodes = [2]
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUNDS = 12


def _metrics() -> tuple[dict[str, list[dict]], dict[str, dict | None]]:
    """Rows shaped exactly like a node's metrics.jsonl, weights keyed by real peer ids."""
    rng = random.Random(3)
    names = ["node0", "node1", "node2", "sybil0-0"]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    metrics: dict[str, list[dict]] = {}
    for n in names:
        rows, b_in, b_out = [], 0, 0
        for r in range(ROUNDS):
            if n == "node2" and 4 <= r < 7:
                continue  # crashed
            b_in += rng.randrange(10_000, 50_000)
            b_out += rng.randrange(10_000, 50_000)
            peers = [p for p in names if p != n]
            sybil_w = 0.0 if n.startswith("node") and r > 3 else 0.2
            weights = {ids[p]: (sybil_w if p == "sybil0-0" else 0.3) for p in peers}
            weights["self"] = 1.0 - sum(weights.values())
            rows.append({
                "ts": 1_700_000_000.0 + r * 2.5 + rng.random(), "round": r,
                "accuracy": min(1.0, 0.1 + 0.07 * r + rng.random() * 0.01), "loss": 2.0 / (r + 1),
                "attack_rate": None if r == 0 else 0.5 / (r + 1), "weights": weights,
                "neighbours": [ids[p] for p in peers], "bytes_in": b_in, "bytes_out": b_out, "epsilon": 0.1 * r,
            })
        metrics[n] = rows
    status = {n: {"peer_id": ids[n], "learning": {"role": "attacker" if n.startswith("sybil") else "honest"}}
              for n in names}
    status["node2"] = None  # dead at the end
    return metrics, status


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    metrics, status = _metrics()
    events = [{"round": 4, "action": "crash", "nodes": ["node2"]}, {"round": 7, "action": "restart", "nodes": ["node2"]}]
    out = write_report(tmp_path_factory.mktemp("run"), metrics, status, parse_scenario(SCENARIO), events)
    return out, metrics, status


def test_json_and_csv_equal_the_input_rows(written: tuple[Path, dict, dict]) -> None:
    out, metrics, _ = written
    for name, rows in metrics.items():
        assert json.loads((out / "metrics" / f"{name}.json").read_text()) == rows
        with (out / "metrics" / f"{name}.csv").open(newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(table) == len(rows) and list(table[0]) == list(CSV_COLUMNS)
        for got, want in zip(table, rows):
            assert float(got["ts"]) == want["ts"] and int(got["round"]) == want["round"]
            assert float(got["accuracy"]) == want["accuracy"] and float(got["loss"]) == want["loss"]
            assert (got["attack_rate"] == "") if want["attack_rate"] is None else float(got["attack_rate"]) == want["attack_rate"]
            assert int(got["bytes_in"]) == want["bytes_in"] and int(got["bytes_out"]) == want["bytes_out"]
            assert json.loads(got["weights"]) == want["weights"]
            assert json.loads(got["neighbours"]) == want["neighbours"]


def test_plots_are_png_and_index_references_them(written: tuple[Path, dict, dict]) -> None:
    out, _, _ = written
    index = (out / "index.html").read_text()
    for plot in PLOTS:
        data = (out / plot.file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f'src="{plot.file}"' in index
    assert "report-test" in index and "metrics/node1.csv" in index


def test_summary_numbers(written: tuple[Path, dict, dict]) -> None:
    out, metrics, status = written
    summary = json.loads((out / "summary.json").read_text())
    honest_final = [metrics[n][-1]["accuracy"] for n in ("node0", "node1", "node2")]
    assert summary["final_mean_accuracy"] == pytest.approx(sum(honest_final) / 3)
    assert summary["final_min_accuracy"] == min(honest_final)
    assert summary["final_attack_rate"] == pytest.approx(0.5 / ROUNDS)
    assert summary["rounds"] == ROUNDS
    assert summary["honest_nodes"] == 3 and summary["attacker_nodes"] == 1
    assert summary["final_weight_to_sybils"] == 0.0  # honest nodes down-weighted the Sybil to zero
    assert summary["final_weight_to_honest"] == pytest.approx(0.6)
    assert [e["action"] for e in summary["events"]] == ["crash", "restart"]
    assert summary["nodes"]["node2"]["alive"] is False and summary["nodes"]["node0"]["alive"] is True
    assert summary["nodes"]["sybil0-0"]["role"] == "attacker"
    assert summary["scenario_config"]["attackers"][0]["kind"] == "backdoor"


def test_weight_split_excludes_self() -> None:
    row = {"weights": {"A": 0.1, "B": 0.4, "self": 0.5}}
    assert weight_split(row, {"A"}) == (0.1, 0.4)
