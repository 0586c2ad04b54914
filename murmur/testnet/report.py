"""The report a testnet run leaves behind.

``write_report`` turns what the controller collected (each node's
``metrics.jsonl`` rows, its last ``/status``, the scenario and the applied
events) into a folder a person can open: ``index.html`` with the run's
summary, its settings, a table of nodes and a timeline of events; one PNG
per plot next to the CSV it was drawn from; per-node metrics as JSON and
CSV; ``summary.json``. The plots (``reporting/panels.py``) show the run's
metric per node and against bytes sent, ε against the budget, time per round
by phase, the spread of the nodes' metric (consensus), traffic rates with
restarts handled, the peer graph with partitions, and, when the scenario has
attackers, the attack's success and the weight given to Sybils.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from murmur.fsutil import atomic_write_bytes, atomic_write_json
from murmur.learning.privacy.outlook import outweighs
from murmur.testnet.reporting import page
from murmur.testnet.reporting.panels import PANELS, Panel, Table
from murmur.testnet.reporting.run import (
    CONNECTION_TYPES,
    PHASES,
    Row,
    RunData,
    cumulative_bytes,
    finite,
    make_run,
    phase_times,
    place_events,
    plain,
    roles,
    weight_split,
)
from murmur.testnet.scenario import Role, Scenario
from murmur.units import fmt_bytes, fmt_number, fmt_seconds

__all__ = ["write_report", "summarize", "CSV_COLUMNS", "PLOTS", "REPORT_DIR", "METRICS_DIR", "weight_split", "roles"]

REPORT_DIR = "report"
METRICS_DIR = "metrics"
SUMMARY_FILE = "summary.json"
#: Per-node CSV columns first in this order; any other scalar field of the
#: rows (a trainer's own metric, say) follows, sorted. List and map fields
#: are written as JSON text.
CSV_COLUMNS = ("ts", "round", "accuracy", "loss", "train_loss", "attack_rate", "bytes_in", "bytes_out", "epsilon",
               "neighbour_count", "received", "missed", "excused", "late_dropped", *PHASES, "neighbours", "weights")
JSON_COLUMNS = frozenset({"neighbours", "weights"})
PLOTS: tuple[Panel, ...] = PANELS  # every plot a report can have (a run gets those that apply)
def connection_mix(status: Mapping[str, Any] | None) -> dict[str, int] | None:
    """How many of the node's connections are of each type at its last status
    (None: no status, or one without ``connection_types``)."""
    types = (status or {}).get("connection_types")
    if not isinstance(types, Mapping):
        return None
    mix = dict.fromkeys(CONNECTION_TYPES, 0)
    for kind in types.values():
        mix[str(kind)] = mix.get(str(kind), 0) + 1
    return mix


def punch_counts(status: Mapping[str, Any] | None) -> tuple[int, int]:
    """(attempts, successes) of hole punching from the status's ``dcutr``
    object; (0, 0) where the node reports none (no DCUtR in this build)."""
    dcutr = (status or {}).get("dcutr")
    if not isinstance(dcutr, Mapping):
        return 0, 0
    return int(dcutr.get("attempts") or 0), int(dcutr.get("successes") or 0)


# ---------------------------------------------------------------- writers


def _csv_columns(rows: Sequence[Row]) -> list[str]:
    extra = sorted({k for r in rows for k, v in r.items() if k not in CSV_COLUMNS and not isinstance(v, (dict, list))})
    return [*CSV_COLUMNS, *extra]


def _cell(value: Any, as_json: bool = False) -> Any:
    # str(float) round-trips exactly; None (e.g. no attack rate) is an empty cell
    if as_json:
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def _write_node_metrics(out: Path, name: str, rows: Sequence[Row]) -> None:
    atomic_write_json(out / f"{name}.json", [dict(r) for r in rows])
    columns = _csv_columns(rows)
    with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(_cell(row.get(col), col in JSON_COLUMNS) for col in columns)


# ---------------------------------------------------------------- summary


def _node_summary(run: RunData, name: str, rows: Sequence[Row]) -> dict[str, Any]:
    status = run.status.get(name) or {}
    last = final_row(rows, status, run.metric.name) if rows else {}
    traffic = cumulative_bytes(rows, run.t0)
    totals = [sum(phase_times(r).values()) for r in rows]
    return {
        "role": run.roles.get(name, Role.HONEST).value, "peer_id": run.peer_ids.get(name) or status.get("peer_id"),
        "alive": bool(status), "rows": len(rows), "round": last.get("round"),
        run.metric.name: run.metric.value(last) if last else None,
        "accuracy": last.get("accuracy"), "attack_rate": last.get("attack_rate"),
        "bytes_in": last.get("bytes_in"), "bytes_out": last.get("bytes_out"), "epsilon": last.get("epsilon"),
        "bytes_received": traffic[-1].bytes_in if traffic else None,
        "bytes_sent": traffic[-1].bytes_out if traffic else None,
        "restarts": sum(t.restarted for t in traffic),
        "mean_round_s": statistics.fmean(totals) if totals else None,
        "connections": connection_mix(status or None),
        "punch_attempts": punch_counts(status)[0], "punch_successes": punch_counts(status)[1],
        "circuits_cut": ((status.get("relay_client") or {}).get("circuits_cut")),
    }


def final_row(rows: Sequence[Row], status: Mapping[str, Any] | None, metric: str) -> Row:
    """A node's last metrics row, or what its last status says of a model it
    adopted past that row: a node that caught up (took a neighbour's model far
    ahead) writes no row for the rounds it skipped, and its last row would
    stand for a model it no longer holds."""
    last = rows[-1]
    learning = (status or {}).get("learning") or {}
    done, value = learning.get("round"), learning.get(metric)
    row_round = last.get("round")
    if isinstance(done, int) and isinstance(row_round, int) and done > row_round + 1 and isinstance(value, (int, float)):
        return {**last, "round": done - 1, metric: value}
    return last


def summarize(run: RunData) -> dict[str, Any]:
    """summary.json: the run's outcome in numbers (the page's summary table)."""
    honest = run.honest
    sybils = run.sybil_peers
    # the network's end state: the honest nodes still up. A node crashed at
    # round 1 and never restarted counted with its round-1 accuracy: 'worst
    # 0.173' of a run whose three live nodes ended at 0.80-0.83
    gone = run.down_at_end
    up = {n: rows for n, rows in honest.items() if rows and n not in gone} or honest
    finals = {n: final_row(rows, run.status.get(n), run.metric.name) for n, rows in up.items() if rows}
    final_metric = finite([run.metric.value(r) for r in finals.values()])
    final_acc = finite([r.get("accuracy") for r in finals.values()])
    final_attack = finite([r.get("attack_rate") for r in finals.values()])
    final_eps = finite([r.get("epsilon") for r in finals.values()])
    splits = [weight_split(r, sybils) for r in finals.values() if r.get("weights")]
    # every honest aggregation of the run: an attacker whose Sybils stopped
    # before the honest nodes did weighs nothing at the end, whatever it got
    run_splits = [weight_split(r, sybils) for rows in honest.values() for r in rows if r.get("weights")]
    nodes = {name: _node_summary(run, name, rows) for name, rows in run.rows.items()}
    honest_rows = [r for rows in honest.values() for r in rows]
    phase_means = {p: statistics.fmean(phase_times(r)[p] for r in honest_rows) for p in PHASES} if honest_rows else {}
    sent = [nodes[n]["bytes_sent"] for n in honest if nodes[n]["bytes_sent"] is not None]
    all_rounds = [int(r["round"]) for rows in run.rows.values() for r in rows if isinstance(r.get("round"), int)]
    last_ts = max((float(r["ts"]) for rows in run.rows.values() for r in rows if isinstance(r.get("ts"), (int, float))),
                  default=run.t0)
    best = max if run.metric.higher_is_better else min
    mixes = [nodes[n]["connections"] for n in honest if nodes[n]["connections"] is not None]
    attempts = sum(nodes[n]["punch_attempts"] for n in run.rows)
    successes = sum(nodes[n]["punch_successes"] for n in run.rows)
    stages = [((run.status.get(n) or {}).get("learning") or {}).get("privacy") or {} for n in honest]
    rhos = finite([st.get("noise_to_signal") for st in stages])
    fell_back = [st["fallback_rounds"] for st in stages if isinstance(st.get("fallback_rounds"), int)]
    exposure = _exposure(stages)
    return {
        "scenario": run.scenario.name,
        "honest_nodes": len(honest),
        "attacker_nodes": len(run.attackers),
        "relay_nodes": sum(1 for n in run.rows if run.roles.get(n) is Role.RELAY),
        "rounds": max(all_rounds) + 1 if all_rounds else 0,
        "wall_s": last_ts - run.t0,
        "metric": {"name": run.metric.name, "higher_is_better": run.metric.higher_is_better},
        "final_mean_metric": statistics.fmean(final_metric) if final_metric else None,
        "final_worst_metric": (min if run.metric.higher_is_better else max)(final_metric) if final_metric else None,
        "final_best_metric": best(final_metric) if final_metric else None,
        "final_mean_accuracy": statistics.fmean(final_acc) if final_acc else None,
        "final_min_accuracy": min(final_acc) if final_acc else None,
        "final_metric_spread": max(final_metric) - min(final_metric) if len(final_metric) > 1 else None,
        "final_epsilon": max(final_eps) if final_eps else None,
        "epsilon_budget": run.epsilon_budget,
        # the privacy plan's noise against what the run could learn (murmur.learning.privacy.outlook), worst node
        "privacy_noise_to_signal": max(rhos) if rhos else None,
        # rounds an honest node sent with the stronger noise of too few active edges, all nodes together
        "privacy_fallback_rounds": sum(fell_back) if fell_back else None,
        # what the run's budget comes to against k nodes pooling their seeds (k -> worst honest node's ε)
        "privacy_epsilon_against": exposure or None,
        "privacy_colluders": max((st["colluders"] for st in stages if isinstance(st.get("colluders"), int)),
                                 default=None),
        "bytes_sent_total": sum(nodes[n]["bytes_sent"] or 0 for n in run.rows),
        "bytes_sent_mean": statistics.fmean(sent) if sent else None,
        "mean_round_s": sum(phase_means.values()) if phase_means else None,
        "phase_means_s": phase_means,
        "final_attack_rate": statistics.fmean(final_attack) if final_attack else None,
        # what each attacker's identities sent (its tactic and strengths), next to the rate it reached
        "attacker_tactics": [a.plan().describe() for a in run.scenario.attackers],
        "final_weight_to_sybils": statistics.fmean(s for s, _ in splits) if splits else None,
        "final_weight_to_honest": statistics.fmean(h for _, h in splits) if splits else None,
        "run_weight_to_sybils": statistics.fmean(s for s, _ in run_splits) if run_splits else None,
        "links": links_label(run.scenario),
        # the honest nodes' ends of their connections at the last status, by type (a pair of honest nodes counts twice)
        "connections": {k: sum(m.get(k, 0) for m in mixes) for k in {*CONNECTION_TYPES, *(k for m in mixes for k in m)}}
        if mixes else None,
        "punch_attempts": attempts, "punch_successes": successes,
        "punch_success_rate": successes / attempts if attempts else None,
        "events": [plain(e) for e in run.events],
        "nodes": nodes,
        "scenario_config": plain(run.scenario),
    }


def links_label(scenario: Scenario) -> str | None:
    """How the run's link rates were made, in words (None: not limited). They
    are paced by each node's token buckets, not shaped by a network emulator,
    and the report must not let a reader take them for real links."""
    links = scenario.links
    if not links.limited:
        return None
    rates = f"upload {links.upload_mbit:g} Mbit/s, download {links.download_mbit:g} Mbit/s per node"
    if links.overrides:
        rates += f"; {len(links.overrides)} override(s) for some nodes (see the settings)"
    return f"emulated by each node's token buckets (not a network emulator): {rates}"


def _exposure(stages: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The worst honest node's ε against each coalition size its status reports."""
    out: dict[str, float] = {}
    for stage in stages:
        against = stage.get("epsilon_against")
        for k, eps in (against.items() if isinstance(against, Mapping) else ()):
            if isinstance(eps, (int, float)) and math.isfinite(eps):
                out[str(k)] = max(out.get(str(k), eps), float(eps))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))


def privacy_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The privacy plan's outlook, where the nodes reported one (privacy on)."""
    rho = summary.get("privacy_noise_to_signal")
    if rho is None:
        return []
    rows = [("Privacy noise-to-signal (worst honest node)", f"{rho:.2g}"
             + (" (the noise outweighs what the run could learn)" if outweighs(rho) else ""))]
    if summary.get("privacy_fallback_rounds"):
        rows.append(("Rounds sent with fallback noise (too few edges; all honest nodes)",
                     fmt_number(summary["privacy_fallback_rounds"])))
    against = summary.get("privacy_epsilon_against")
    if against:
        holds = summary.get("privacy_colluders") or 0
        rows.append((f"ε budget against colluding nodes (holds against {holds}; worst honest node, whole run)",
                     ", ".join(f"{fmt_number(eps, 1)} against {k}" for k, eps in against.items())))
    return rows


def summary_rows(summary: Mapping[str, Any], attackers: bool) -> list[tuple[str, str]]:
    """The summary as the page shows it: labelled, with units."""
    metric = summary["metric"]["name"]
    phases = summary.get("phase_means_s") or {}
    slowest = max(phases.items(), key=lambda kv: kv[1], default=None)
    rows = [
        ("Scenario", str(summary["scenario"])),
        ("Nodes", f"{summary['honest_nodes']} honest" + (f", {summary['attacker_nodes']} attacker identities"
                                                         if summary["attacker_nodes"] else "")
         + (f", {summary['relay_nodes']} relays" if summary.get("relay_nodes") else "")),
        ("Rounds", fmt_number(summary["rounds"])),
        ("Duration", fmt_seconds(summary["wall_s"])),
        (f"Final {metric} (honest mean)", fmt_number(summary["final_mean_metric"])),
        (f"Final {metric} (worst honest node)", fmt_number(summary["final_worst_metric"])),
        (f"Final spread of {metric} (max − min)", fmt_number(summary["final_metric_spread"])),
        ("ε spent (most of any honest node)", fmt_number(summary["final_epsilon"], 2)
         + (f" of budget {summary['epsilon_budget']:g}" if summary["epsilon_budget"] is not None else " (privacy off)")),
        *privacy_rows(summary),
        ("Bytes sent (all nodes)", fmt_bytes(summary["bytes_sent_total"])),
        ("Bytes sent per honest node (mean)", fmt_bytes(summary["bytes_sent_mean"])),
        ("Time per round (honest mean)", fmt_seconds(summary["mean_round_s"])
         + (f"; longest phase: {slowest[0].removesuffix('_s')} {fmt_seconds(slowest[1])}" if slowest else "")),
    ]
    if summary.get("links"):
        rows.append(("Links", str(summary["links"])))
    if summary.get("connections"):
        mix = summary["connections"]
        rows.append(("Connections at the end (honest nodes' ends)", page.mix_text(mix)))
        attempts, successes = summary["punch_attempts"], summary["punch_successes"]
        rows.append(("Hole punches (DCUtR)", f"{successes} of {attempts} succeeded "
                     f"({fmt_number(100 * summary['punch_success_rate'], 0)} %)" if attempts else "none attempted"))
    if attackers:
        tactics = summary.get("attacker_tactics") or []
        rows += [("Final attack success rate (honest mean)", fmt_number(summary["final_attack_rate"])
                  + (f" against {'; '.join(tactics)} Sybils" if tactics else "")),
                 ("Final weight to Sybils", fmt_number(summary["final_weight_to_sybils"])),
                 ("Weight to Sybils over the run", fmt_number(summary["run_weight_to_sybils"])),
                 ("Final weight to honest peers", fmt_number(summary["final_weight_to_honest"]))]
    return rows


NODE_HEADER = ("node", "role", "alive", "last round", "{metric}", "ε", "sent", "received", "time per round",
               "restarts", "connections", "metrics")


def _index_html(run: RunData, summary: Mapping[str, Any], written: Sequence[Panel]) -> str:
    metric = run.metric.name
    events = place_events(run.events, run.t0)
    plots = "".join(page.figure_html(p.stem, p.file, p.title_for(run), p.caption.format(metric=metric), p.csv)
                    for p in written)
    sections = [
        ("summary-section", "Summary", page.key_value_table("summary", summary_rows(summary, bool(run.attackers)))),
        ("settings-section", "Settings", page.key_value_table("settings", page.settings_rows(summary["scenario_config"]))),
        ("nodes-section", "Nodes", page.table("nodes", [h.format(metric=metric) for h in NODE_HEADER],
                                               page.node_rows(summary["nodes"], metric, METRICS_DIR),
                                               (False, False, False, True, True, True, True, True, True, True,
                                                False))),
        ("events-section", "Events", page.table("events", ("time", "round", "event", "detail"), page.event_rows(events))
         if events else '<p class="muted" id="events">No events.</p>'),
        ("plots", "Plots", plots),
        ("files", "Files", '<p><a href="summary.json">summary.json</a> · per-node metrics in '
                           f'<a href="{METRICS_DIR}/">{METRICS_DIR}/</a></p>'),
    ]
    return page.page(f"murmur testnet report: {run.scenario.name}", sections)


def write_report(
    run_dir: str | Path,
    node_metrics: Mapping[str, Sequence[Row]],
    node_status: Mapping[str, Mapping[str, Any] | None],
    scenario: Scenario,
    events: Sequence[Mapping[str, Any]],
    peer_ids: Mapping[str, str] | None = None,
    hosts: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<run_dir>/report/`` and return its path.

    ``node_metrics``: node name -> its metrics.jsonl rows (ARCHITECTURE.md);
    ``node_status``: node name -> last ``GET /status`` JSON (None: dead/unknown);
    ``events``: applied churn events, each a JSON-ready dict (``round`` and
    ``ts`` place it on the plots); ``peer_ids``: node name -> peer id, for
    nodes that were down at the end (their status says nothing); ``hosts``:
    node name -> the address of the host it ran on (cluster runs), shown
    next to its name and kept as its ``host`` in summary.json.
    """
    out = Path(run_dir) / REPORT_DIR
    (out / METRICS_DIR).mkdir(parents=True, exist_ok=True)
    run = make_run(scenario, node_metrics, node_status, events, peer_ids)
    for name, rows in run.rows.items():
        _write_node_metrics(out / METRICS_DIR, name, rows)
    written = []
    for panel in PANELS:
        if not panel.applies(run):
            continue
        data: Table = panel.table(run)
        data.write_csv(out / panel.csv)
        panel.draw(run, data, out / panel.file)
        written.append(panel)
    Table(("t_s", "round", "event"), [(e.t, e.round, e.label) for e in place_events(run.events, run.t0)]
          ).write_csv(out / "events.csv")
    Table(("setting", "value"), page.settings_rows(plain(run.scenario))).write_csv(out / "settings.csv")
    summary = summarize(run) | {"plots": [{"file": p.file, "csv": p.csv, "title": p.title_for(run)} for p in written]}
    for name, host in (hosts or {}).items():
        if name in summary["nodes"]:
            summary["nodes"][name]["host"] = host
    atomic_write_json(out / SUMMARY_FILE, summary)
    atomic_write_bytes(out / "index.html", _index_html(run, summary, written).encode())
    return out
