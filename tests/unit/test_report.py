"""The run report: numbers written equal numbers given, plots are real PNGs,
panels appear when they apply, any metric a trainer reports is the run's."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from murmur.protocol.identity import Identity
from murmur.testnet.report import CSV_COLUMNS, PLOTS, write_report
from murmur.testnet.reporting.run import PHASES, Metric, cumulative_bytes, network_mean, partitions, weight_split
from murmur.testnet.scenario import parse_scenario
from murmur.units import fmt_bytes, fmt_seconds, natural_sorted

SCENARIO = """
name = "report-test"
nodes = 3
[topology]
degree = 2
[duration]
rounds = 12
[privacy]
enabled = true
epsilon = 5.0
[[attackers]]
kind = "backdoor"
sybils = 1
edges_per_sybil = 2
tactic = "sleeper"
sleep_rounds = 3
boost = 1.0
diversify = 1.0
fresh = 0.0
[[churn]]
at_round = 4
action = "crash"
nodes = [2]
[[churn]]
at_round = 7
action = "restart"
nodes = [2]
"""
NO_ATTACKERS = """
name = "plain"
nodes = 11
[topology]
degree = 2
[duration]
rounds = 3
[[churn]]
at_round = 1
action = "partition"
nodes = [0, 1, 2]
[[churn]]
at_round = 2
action = "heal"
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUNDS = 12
T0 = 1_700_000_000.0


def _metrics() -> tuple[dict[str, list[dict]], dict[str, dict | None], dict[str, str]]:
    """Rows shaped exactly like a node's metrics.jsonl, weights keyed by real
    peer ids; node2 crashes after round 3 and its byte counters restart from 0."""
    rng = random.Random(3)
    names = ["node0", "node1", "node2", "sybil0-0"]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    metrics: dict[str, list[dict]] = {}
    for n in names:
        rows, b_in, b_out = [], 0, 0
        for r in range(ROUNDS):
            if n == "node2" and 4 <= r < 7:
                continue  # crashed
            if n == "node2" and r == 7:
                b_in = b_out = 0  # a new process counts from 0
            b_in += rng.randrange(10_000, 50_000)
            b_out += rng.randrange(10_000, 50_000)
            peers = [p for p in names if p != n]
            sybil_w = 0.0 if n.startswith("node") and r > 3 else 0.2
            weights = {ids[p]: (sybil_w if p == "sybil0-0" else 0.3) for p in peers}
            weights["self"] = 1.0 - sum(weights.values())
            rows.append({
                "ts": T0 + r * 2.5 + rng.random(), "round": r,
                "accuracy": min(1.0, 0.1 + 0.07 * r + rng.random() * 0.01), "loss": 2.0 / (r + 1),
                "attack_rate": None if r == 0 else 0.5 / (r + 1), "weights": weights,
                "neighbours": [ids[p] for p in peers], "bytes_in": b_in, "bytes_out": b_out, "epsilon": 0.4 * r,
                "neighbour_count": 2, "received": 2, "missed": 0, "excused": 0,
                **{p: round(rng.random() / 10, 5) for p in PHASES if p != "aggregate_s"},
            })
        metrics[n] = rows
    status = {n: {"peer_id": ids[n], "learning": {"role": "attacker" if n.startswith("sybil") else "honest"}}
              for n in names}
    status["node2"] = None  # dead at the end
    return metrics, status, ids


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    metrics, status, ids = _metrics()
    events = [{"round": 4, "action": "crash", "nodes": ["node2"], "ts": T0 + 10.2},
              {"round": 7, "action": "restart", "nodes": ["node2"], "ts": T0 + 17.7}]
    out = write_report(tmp_path_factory.mktemp("run"), metrics, status, parse_scenario(SCENARIO), events,
                       peer_ids=ids)
    return out, metrics, status


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_json_and_csv_equal_the_input_rows(written: tuple[Path, dict, dict]) -> None:
    out, metrics, _ = written
    for name, rows in metrics.items():
        assert json.loads((out / "metrics" / f"{name}.json").read_text()) == rows
        table = _csv(out / "metrics" / f"{name}.csv")
        assert len(table) == len(rows) and list(table[0]) == list(CSV_COLUMNS)
        for got, want in zip(table, rows):
            assert float(got["ts"]) == want["ts"] and int(got["round"]) == want["round"]
            assert float(got["accuracy"]) == want["accuracy"] and float(got["loss"]) == want["loss"]
            assert (got["attack_rate"] == "") if want["attack_rate"] is None else float(got["attack_rate"]) == want["attack_rate"]
            assert int(got["bytes_in"]) == want["bytes_in"] and int(got["bytes_out"]) == want["bytes_out"]
            assert float(got["train_s"]) == want["train_s"] and got["aggregate_s"] == ""
            assert json.loads(got["weights"]) == want["weights"]
            assert json.loads(got["neighbours"]) == want["neighbours"]


def test_plot_csvs_are_the_rows(written: tuple[Path, dict, dict]) -> None:
    out, metrics, _ = written
    eps = _csv(out / "epsilon.csv")
    assert [(r["node"], int(r["round"]), float(r["epsilon"])) for r in eps] == [
        (n, r["round"], r["epsilon"]) for n, rows in metrics.items() for r in rows]
    assert {r["budget"] for r in eps} == {"5.0"}
    phases = _csv(out / "phases.csv")
    for got, want in zip(phases, [r for rows in metrics.values() for r in rows], strict=True):
        assert [float(got[p]) for p in PHASES] == [want.get(p, 0.0) for p in PHASES]
    traffic = [r for r in _csv(out / "traffic.csv") if r["node"] == "node2"]
    before = [r for r in metrics["node2"] if r["round"] < 4]
    after = [r for r in metrics["node2"] if r["round"] >= 7]
    sent = [float(r["bytes_out"]) for r in traffic]
    assert sent == [r["bytes_out"] for r in before] + [before[-1]["bytes_out"] + r["bytes_out"] for r in after]
    assert sent == sorted(sent)  # never drawn falling
    assert [r["restarted"] for r in traffic] == ["0"] * len(before) + ["1"] + ["0"] * (len(after) - 1)
    assert traffic[len(before)]["out_rate_bps"] == ""  # the new process's start is not known: no rate


def test_plots_are_png_and_index_references_them(written: tuple[Path, dict, dict]) -> None:
    out, _, _ = written
    index = (out / "index.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [p["file"] for p in summary["plots"]] == [p.file for p in PLOTS]  # attackers and privacy: every plot
    for plot in PLOTS:
        data = (out / plot.file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f'src="{plot.file}"' in index and f'href="{plot.csv}"' in index
    assert "report-test" in index and "metrics/node1.csv" in index
    assert '<table id="settings">' in index and "<th>privacy.epsilon</th><td>5.0</td>" in index
    assert "<td>crash node2</td>" in index and "<td>restart node2</td>" in index


def test_summary_numbers(written: tuple[Path, dict, dict]) -> None:
    out, metrics, status = written
    summary = json.loads((out / "summary.json").read_text())
    honest_final = [metrics[n][-1]["accuracy"] for n in ("node0", "node1", "node2")]
    assert summary["final_mean_accuracy"] == pytest.approx(sum(honest_final) / 3)
    assert summary["final_mean_metric"] == summary["final_mean_accuracy"]
    assert summary["metric"] == {"name": "accuracy", "higher_is_better": True}
    assert summary["final_min_accuracy"] == min(honest_final) == summary["final_worst_metric"]
    assert summary["final_attack_rate"] == pytest.approx(0.5 / ROUNDS)
    # the attacker's tactic next to the rate it reached
    assert summary["attacker_tactics"] == ["sleeper (boost 1, diversify 1, fresh 0, sleeps 3 rounds)"]
    index = (out / "index.html").read_text()
    assert (f"<td>{summary['final_attack_rate']:.3f} against sleeper (boost 1, diversify 1, fresh 0, "
            "sleeps 3 rounds) Sybils</td>") in index
    assert summary["rounds"] == ROUNDS
    assert summary["honest_nodes"] == 3 and summary["attacker_nodes"] == 1
    assert summary["final_weight_to_sybils"] == 0.0  # honest nodes down-weighted the Sybil to zero
    # over the run: its 0.2 in each honest node's first 4 rounds (node2 missed 3 rounds while down)
    assert summary["run_weight_to_sybils"] == pytest.approx(0.2 * 4 * 3 / (3 * ROUNDS - 3))
    assert f"<td>{summary['run_weight_to_sybils']:.3f}</td>" in index
    assert summary["final_weight_to_honest"] == pytest.approx(0.6)
    assert summary["final_epsilon"] == pytest.approx(0.4 * (ROUNDS - 1)) and summary["epsilon_budget"] == 5.0
    node2 = metrics["node2"]
    assert summary["nodes"]["node2"]["bytes_sent"] == node2[3]["bytes_out"] + node2[-1]["bytes_out"]
    assert summary["nodes"]["node2"]["restarts"] == 1
    assert [e["action"] for e in summary["events"]] == ["crash", "restart"]
    assert summary["nodes"]["node2"]["alive"] is False and summary["nodes"]["node0"]["alive"] is True
    assert summary["nodes"]["sybil0-0"]["role"] == "attacker"
    assert summary["scenario_config"]["attackers"][0]["kind"] == "backdoor"


def test_no_attackers_no_attack_panels_natural_order_and_partitions(tmp_path: Path) -> None:
    names = [f"node{i}" for i in range(11)]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    metrics = {n: [{"ts": T0 + r, "round": r, "accuracy": 0.5, "bytes_in": 10 * r, "bytes_out": 10 * r, "epsilon": 0.0,
                    "neighbours": [ids[names[(i + 1) % 11]]]} for r in range(3)] for i, n in enumerate(names)}
    random.Random(1).shuffle(order := list(metrics))
    out = write_report(tmp_path, {n: metrics[n] for n in order}, {n: {"peer_id": ids[n]} for n in names},
                       parse_scenario(NO_ATTACKERS), [{"round": 1, "action": "partition", "nodes": names[:3]},
                                                      {"round": 2, "action": "heal", "nodes": []}])
    summary = json.loads((out / "summary.json").read_text())
    files = [p["file"] for p in summary["plots"]]
    assert "attack_rate.png" not in files and "sybil_weight.png" not in files and "epsilon.png" not in files
    assert not (out / "attack_rate.png").exists()
    assert list(dict.fromkeys(r["node"] for r in _csv(out / "metric.csv"))) == names  # node2 before node10
    index = (out / "index.html").read_text()
    assert index.index("<td>node2</td>") < index.index("<td>node10</td>")
    assert "Final attack" not in index and "(privacy off)" in index
    assert [r["node_a"] for r in _csv(out / "graph.csv")][:2] == ["node0", "node0"]  # node0-node1, node0-node10


def test_a_trainers_own_metric_is_the_runs_metric(tmp_path: Path) -> None:
    """A row that names its metric (perplexity, lower is better) gets it
    plotted, summarised and tabulated in place of accuracy."""
    rows = {f"node{i}": [{"ts": T0 + r, "round": r, "metric": "perplexity", "perplexity": 50.0 / (r + 1) + i,
                          "bytes_in": 100 * r, "bytes_out": 100 * r} for r in range(4)] for i in range(3)}
    out = write_report(tmp_path, rows, {}, parse_scenario(NO_ATTACKERS.replace("nodes = [0, 1, 2]", "nodes = [0]")
                                                          .replace("nodes = 11", "nodes = 3")), [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == {"name": "perplexity", "higher_is_better": False}
    assert summary["final_worst_metric"] == pytest.approx(50.0 / 4 + 2)  # the highest perplexity
    assert summary["final_mean_accuracy"] is None
    assert list(_csv(out / "metric.csv")[0]) == ["node", "round", "perplexity"]
    assert "perplexity" in _csv(out / "metrics" / "node0.csv")[0]
    assert "Final perplexity (honest mean)" in (out / "index.html").read_text()


def test_emulated_links_are_labelled_as_emulated(tmp_path: Path) -> None:
    """Link rates paced by the nodes' own token buckets must not read as real
    links: the summary and the page say how they were made; unlimited runs say nothing."""
    rows = {f"node{i}": [{"ts": T0 + r, "round": r, "accuracy": 0.5, "bytes_in": 0, "bytes_out": 0} for r in range(2)]
            for i in range(3)}
    plain = NO_ATTACKERS.replace("nodes = [0, 1, 2]", "nodes = [0]").replace("nodes = 11", "nodes = 3")
    limited = plain.replace("[duration]", "[links]\nupload_mbit = 20.0\ndownload_mbit = 5.0\n[duration]")
    out = write_report(tmp_path / "limited", rows, {}, parse_scenario(limited), [])
    links = json.loads((out / "summary.json").read_text())["links"]
    assert links.startswith("emulated") and "upload 20 Mbit/s" in links and "download 5 Mbit/s" in links
    assert "<th>Links</th><td>emulated" in (out / "index.html").read_text()
    out = write_report(tmp_path / "plain", rows, {}, parse_scenario(plain), [])
    assert json.loads((out / "summary.json").read_text())["links"] is None
    assert "<th>Links</th>" not in (out / "index.html").read_text()


def test_the_connection_mix_and_punch_rate_from_the_nodes_last_status(tmp_path: Path) -> None:
    """Each node's connections by type (direct, punched, relayed) and the hole
    punches from its last status, summed over the honest nodes; a status with
    no ``dcutr`` (no hole punching in the build) counts none, and a relay
    node's own connections stay out of the honest sum."""
    scenario = parse_scenario(NO_ATTACKERS.replace("nodes = 11", "nodes = 3").replace("nodes = [0, 1, 2]", "nodes = [0]")
                              + "[network]\nrelays = 1\n[[network.routers]]\nnodes = [0]\n"
                                "[[network.routers]]\nnodes = [1]\n[[network.routers]]\nnodes = [2]\n")
    names = ["node0", "node1", "node2", "relay0"]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    rows = {n: [{"ts": T0 + r, "round": r, "accuracy": 0.9, "bytes_in": 1, "bytes_out": 1} for r in range(3)]
            for n in names[:3]}
    rows["relay0"] = []
    status = {
        "node0": {"peer_id": ids["node0"], "connection_types": {ids["relay0"]: "direct", ids["node1"]: "relayed",
                                                                 ids["node2"]: "punched"},
                  "dcutr": {"attempts": 3, "successes": 2}, "relay_client": {"circuits_cut": 1}},
        "node1": {"peer_id": ids["node1"], "connection_types": {ids["relay0"]: "direct", ids["node0"]: "relayed"},
                  "dcutr": {"attempts": 1, "successes": 0}},
        "node2": {"peer_id": ids["node2"], "connection_types": {ids["relay0"]: "direct", ids["node0"]: "punched"}},
        "relay0": {"peer_id": ids["relay0"], "connection_types": {ids[n]: "direct" for n in names[:3]}},
    }
    out = write_report(tmp_path, rows, status, scenario, [], peer_ids=ids)
    summary = json.loads((out / "summary.json").read_text())
    nodes = summary["nodes"]
    assert nodes["node0"]["connections"] == {"direct": 1, "punched": 1, "relayed": 1}
    assert nodes["node2"]["connections"] == {"direct": 1, "punched": 1, "relayed": 0}
    assert (nodes["node0"]["punch_attempts"], nodes["node0"]["punch_successes"], nodes["node0"]["circuits_cut"]) == (3, 2, 1)
    assert (nodes["node2"]["punch_attempts"], nodes["node2"]["circuits_cut"]) == (0, None)
    assert nodes["relay0"]["role"] == "relay" and nodes["relay0"]["connections"]["direct"] == 3
    assert (summary["honest_nodes"], summary["attacker_nodes"], summary["relay_nodes"]) == (3, 0, 1)
    assert summary["connections"] == {"direct": 3, "punched": 2, "relayed": 2}  # honest ends only
    assert (summary["punch_attempts"], summary["punch_successes"]) == (4, 2)
    assert summary["punch_success_rate"] == pytest.approx(0.5)
    index = (out / "index.html").read_text()
    assert "<td>3 direct, 2 punched, 2 relayed</td>" in index and "2 of 4 succeeded (50 %)" in index
    assert "<td>1 direct, 1 punched, 1 relayed</td>" in index  # node0's row

    for name in names:  # no connection types at all (an older node): the summary says nothing of them
        status[name] = {"peer_id": ids[name]}
    out = write_report(tmp_path / "old", rows, status, scenario, [], peer_ids=ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["connections"] is None and summary["punch_success_rate"] is None
    assert "Hole punches" not in (out / "index.html").read_text()


def test_a_node_that_caught_up_counts_with_the_model_its_status_holds(tmp_path: Path) -> None:
    """A node that adopted a neighbour's model far ahead wrote no row for the
    rounds it skipped: its final accuracy is its last status's, not that of
    the row before the catch-up (a status no further than its rows changes nothing)."""
    names = ["node0", "node1", "node2"]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    rows = {n: [{"ts": T0 + r, "round": r, "accuracy": 0.9, "bytes_in": 1, "bytes_out": 1} for r in range(12)]
            for n in names[:2]}
    rows["node2"] = [{"ts": T0 + r, "round": r, "accuracy": 0.3, "bytes_in": 1, "bytes_out": 1} for r in range(3)]
    status = {"node0": {"peer_id": ids["node0"], "learning": {"round": 12, "accuracy": 0.5}},  # no further: rows win
              "node1": {"peer_id": ids["node1"]},
              "node2": {"peer_id": ids["node2"], "learning": {"round": 12, "accuracy": 0.87}}}
    scenario = parse_scenario(NO_ATTACKERS.replace("nodes = 11", "nodes = 3").replace("nodes = [0, 1, 2]", "nodes = [0]"))
    summary = json.loads((write_report(tmp_path, rows, status, scenario, [], peer_ids=ids) / "summary.json").read_text())
    assert (summary["nodes"]["node2"]["accuracy"], summary["nodes"]["node2"]["round"]) == (0.87, 11)
    assert summary["nodes"]["node0"]["accuracy"] == 0.9
    assert summary["final_mean_accuracy"] == pytest.approx((0.9 + 0.9 + 0.87) / 3)
    assert summary["final_min_accuracy"] == pytest.approx(0.87)


def test_a_node_the_churn_took_down_for_good_leaves_the_final_numbers(tmp_path: Path) -> None:
    """Its last row is from the round it died in: node3, crashed at round 1
    of 25, made the run's 'worst' 0.173 while the three nodes up ended at
    0.80-0.83. A node taken down and brought back counts (node1); the node
    table still lists the dead one."""
    names = ["node0", "node1", "node2", "node3"]
    ids = {n: str(Identity.generate().peer_id) for n in names}
    last = {"node0": 12, "node1": 12, "node2": 12, "node3": 2}
    acc = {"node0": 0.8, "node1": 0.84, "node2": 0.82, "node3": 0.17}
    rows = {n: [{"ts": T0 + r, "round": r, "accuracy": acc[n], "attack_rate": 0.5 if n == "node3" else 0.0,
                 "bytes_in": 1, "bytes_out": 1} for r in range(last[n])] for n in names}
    status = {n: {"peer_id": ids[n]} for n in names} | {"node3": None}
    events = [{"round": 2, "action": "crash", "nodes": ["node3"], "ts": T0 + 2},
              {"round": 3, "action": "stop", "nodes": ["node1"], "ts": T0 + 3},
              {"round": 4, "action": "latency", "nodes": ["node0"], "ts": T0 + 4, "skipped": "no netem"},
              {"round": 5, "action": "restart", "nodes": ["node1"], "ts": T0 + 5}]
    scenario = parse_scenario(NO_ATTACKERS.replace("nodes = 11", "nodes = 4").replace("nodes = [0, 1, 2]", "nodes = [0]"))
    summary = json.loads((write_report(tmp_path, rows, status, scenario, events, peer_ids=ids) / "summary.json")
                         .read_text())
    assert summary["final_mean_accuracy"] == pytest.approx((0.8 + 0.84 + 0.82) / 3)
    assert summary["final_worst_metric"] == pytest.approx(0.8)
    assert summary["final_metric_spread"] == pytest.approx(0.04)
    assert summary["final_attack_rate"] == 0.0
    assert summary["nodes"]["node3"]["accuracy"] == 0.17 and summary["nodes"]["node3"]["alive"] is False


def test_cumulative_bytes_and_network_mean() -> None:
    rows = [{"ts": T0, "round": 0, "bytes_in": 100, "bytes_out": 200},
            {"ts": T0 + 2, "round": 1, "bytes_in": 300, "bytes_out": 600},
            {"ts": T0 + 9, "round": 4, "bytes_in": 50, "bytes_out": 70},  # restarted
            {"ts": T0 + 10, "round": 5, "bytes_in": 150, "bytes_out": 170}]
    got = cumulative_bytes(rows, T0)
    assert [t.bytes_out for t in got] == [200, 600, 670, 770]
    assert [t.out_rate for t in got] == [None, 200.0, None, 100.0]
    other = [{"ts": T0 + r, "round": r, "bytes_in": 0, "bytes_out": 1000 * (r + 1), "accuracy": 0.5} for r in range(6)]
    mean = network_mean({"a": [dict(r, accuracy=0.1) for r in rows], "b": other}, Metric(), T0)
    assert [p.round for p in mean] == [0, 1, 2, 3, 4, 5]
    # node a has no row in rounds 2-3: its bytes carry forward, the curve never runs back
    assert [p.bytes_sent for p in mean] == [600, 1300, 1800, 2300, 2835, 3385]
    assert mean[2].value == 0.5 and mean[4].value == pytest.approx(0.3)


def test_partitions_and_units() -> None:
    events = [{"action": "crash", "nodes": ["n1"], "round": 1}, {"action": "partition", "nodes": ["n1"], "round": 2},
              {"action": "partition", "nodes": ["n2"], "round": 4}, {"action": "heal", "nodes": [], "round": 6},
              {"action": "partition", "nodes": ["n0"], "round": 8}]
    splits = partitions(events, ["n0", "n1", "n2"])
    assert [(p.sides, p.from_round, p.to_round) for p in splits] == [
        ((("n1",), ("n0", "n2")), 2, 4), ((("n2",), ("n0", "n1")), 4, 6), ((("n0",), ("n1", "n2")), 8, None)]
    assert natural_sorted(["node10", "node2", "sybil0-1", "node1", "sybil0-0"]) == [
        "node1", "node2", "node10", "sybil0-0", "sybil0-1"]
    assert (fmt_bytes(512), fmt_bytes(1536), fmt_bytes(5 * 2**20)) == ("512 B", "1.5 KiB", "5.0 MiB")
    assert (fmt_seconds(0.0123), fmt_seconds(2.5), fmt_seconds(75)) == ("12.3 ms", "2.50 s", "1 min 15 s")


def test_weight_split_excludes_self() -> None:
    row = {"weights": {"A": 0.1, "B": 0.4, "self": 0.5}}
    assert weight_split(row, {"A"}) == (0.1, 0.4)


def test_the_privacy_outlook_from_the_nodes_last_status(tmp_path: Path) -> None:
    """The worst honest node's noise-to-signal and the fallback rounds of all
    honest nodes, from their last status; an attacker's and a dead node's
    status count for nothing, and a run without privacy has no such rows."""
    metrics, status, ids = _metrics()
    for name, rho, fell_back in (("node0", 0.4, 2), ("node1", 1.7, 5), ("sybil0-0", 9.0, 40)):
        status[name]["learning"]["privacy"] = {"noise_to_signal": rho, "fallback_rounds": fell_back, "colluders": 0,
                                               "epsilon_against": {"1": 10 + rho, "2": 50 + rho}}
    out = write_report(tmp_path / "private", metrics, status, parse_scenario(SCENARIO), [], peer_ids=ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_noise_to_signal"] == pytest.approx(1.7)
    assert summary["privacy_fallback_rounds"] == 7
    # the budget against colluders: the worst honest node's, the attacker's status left out
    assert summary["privacy_epsilon_against"] == {"1": pytest.approx(11.7), "2": pytest.approx(51.7)}
    assert summary["privacy_colluders"] == 0
    index = (out / "index.html").read_text()
    assert "1.7 (the noise outweighs what the run could learn)" in index
    assert "Rounds sent with fallback noise" in index
    assert "11.7 against 1, 51.7 against 2" in index

    metrics, status, ids = _metrics()
    out = write_report(tmp_path / "plain", metrics, status, parse_scenario(NO_ATTACKERS), [], peer_ids=ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_noise_to_signal"] is None and summary["privacy_fallback_rounds"] is None
    assert summary["privacy_epsilon_against"] is None
    assert "noise-to-signal" not in (out / "index.html").read_text()
