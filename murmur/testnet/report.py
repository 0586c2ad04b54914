"""The report a testnet run leaves behind.

``write_report`` turns what the controller collected (each node's
``metrics.jsonl`` rows, its last ``/status``, the scenario and the applied
events) into a folder a person can open: per-node metrics as JSON and CSV,
PNG plots, ``summary.json`` and an ``index.html`` tying them together.

Plots use matplotlib's object API with the Agg canvas directly (no pyplot), so
writing a report never touches global backend state of the calling process.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import html
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from murmur.fsutil import atomic_write_bytes, atomic_write_json
from murmur.testnet.scenario import Role, Scenario

REPORT_DIR = "report"
METRICS_DIR = "metrics"
#: CSV columns in order; list/map fields are written as JSON text.
CSV_COLUMNS = ("ts", "round", "accuracy", "perplexity", "loss", "attack_rate", "bytes_in", "bytes_out", "epsilon",
               "neighbours", "weights")
JSON_COLUMNS = frozenset({"neighbours", "weights"})
FIG_SIZE = (8.0, 4.5)
FIG_DPI = 100
SELF_WEIGHT_KEY = "self"

Row = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plot:
    file: str
    title: str


PLOTS = (
    Plot("accuracy.png", "Test accuracy per node"),
    Plot("attack_rate.png", "Attack success rate (honest nodes)"),
    Plot("sybil_weight.png", "Aggregation weight honest nodes give to Sybils vs honest peers"),
    Plot("bytes.png", "Bytes in / out per node"),
    Plot("metric_bytes.png", "Test metric against bytes sent (honest nodes)"),
)
DEFAULT_METRIC = "accuracy"  # rows of nodes that predate the metric field measured accuracy


# ------------------------------------------------------------------ helpers


def _plain(obj: Any) -> Any:
    """Dataclasses, enums and mappings -> JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def roles(scenario: Scenario, node_status: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Role]:
    """Node name -> role. The scenario is authoritative; a node's own
    ``learning.role`` fills in names the scenario does not know."""
    from_status = {
        name: Role((status.get("learning") or {}).get("role", Role.HONEST.value))
        for name, status in node_status.items() if status
    }
    return from_status | {s.name: s.role for s in scenario.node_specs()}


def sybil_peer_ids(node_status: Mapping[str, Mapping[str, Any] | None], role_of: Mapping[str, Role]) -> set[str]:
    return {
        str(status["peer_id"])
        for name, status in node_status.items()
        if status and status.get("peer_id") and role_of.get(name) is Role.ATTACKER
    }


def weight_split(row: Row, sybils: set[str]) -> tuple[float, float]:
    """(weight on Sybil peers, weight on honest peers) in one aggregation; own weight excluded."""
    weights = row.get("weights") or {}
    to_sybil = sum(float(w) for p, w in weights.items() if p in sybils)
    to_honest = sum(float(w) for p, w in weights.items() if p not in sybils and p != SELF_WEIGHT_KEY)
    return to_sybil, to_honest


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _by_round(rows_by_node: Mapping[str, Sequence[Row]], value: Callable[[Row], float | None]) -> tuple[list[int], list[float]]:
    """Mean of ``value(row)`` over nodes, per round."""
    buckets: dict[int, list[float]] = {}
    for rows in rows_by_node.values():
        for row in rows:
            v = value(row)
            if v is not None and math.isfinite(v):
                buckets.setdefault(int(row["round"]), []).append(v)
    xs = sorted(buckets)
    return xs, [statistics.fmean(buckets[x]) for x in xs]


# ---------------------------------------------------------------- writers


def _write_node_metrics(out: Path, name: str, rows: Sequence[Row]) -> None:
    atomic_write_json(out / f"{name}.json", [dict(r) for r in rows])
    path = out / f"{name}.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            # str(float) round-trips exactly; None (e.g. no attack rate) is an empty cell
            writer.writerow(
                json.dumps(row.get(col), sort_keys=True) if col in JSON_COLUMNS
                else ("" if row.get(col) is None else row[col])
                for col in CSV_COLUMNS
            )


def _with_gaps(pts: Sequence[tuple[Any, Any]]) -> list[tuple[float, float]]:
    """Break a per-round line where rounds are missing (a node was down)."""
    out: list[tuple[float, float]] = []
    for rnd, value in pts:
        if out and rnd - out[-1][0] > 1:
            out.append((out[-1][0] + 1, math.nan))
        out.append((rnd, value))
    return out


def _event_rounds(events: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    return [(int(e["round"]), str(e.get("action", ""))) for e in events if isinstance(e.get("round"), int)]


def _figure(title: str, xlabel: str, ylabel: str):  # noqa: ANN202 - matplotlib types
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _finish(fig: Any, ax: Any, path: Path, events: Sequence[Mapping[str, Any]]) -> None:
    for rnd, action in _event_rounds(events):
        ax.axvline(rnd, color="grey", linestyle=":", linewidth=1)
        ax.annotate(action, (rnd, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_accuracy(path: Path, rows_by_node: Mapping[str, Sequence[Row]], role_of: Mapping[str, Role],
                   events: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(PLOTS[0].title, "round", "accuracy")
    for name, rows in sorted(rows_by_node.items()):
        pts = _with_gaps([(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None])
        if pts:
            attacker = role_of.get(name) is Role.ATTACKER
            ax.plot(*zip(*pts), label=name, linestyle="--" if attacker else "-", linewidth=1)
    ax.set_ylim(0, 1)
    _finish(fig, ax, path, events)


def _plot_attack_rate(path: Path, honest: Mapping[str, Sequence[Row]], events: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(PLOTS[1].title, "round", "attack success rate")
    for name, rows in sorted(honest.items()):
        pts = _with_gaps([(r["round"], r["attack_rate"]) for r in rows if r.get("attack_rate") is not None])
        if pts:
            ax.plot(*zip(*pts), linewidth=0.8, alpha=0.5, label=name)
    xs, ys = _by_round(honest, lambda r: r.get("attack_rate"))
    if xs:
        ax.plot(xs, ys, color="black", linewidth=2, label="honest mean")
    ax.set_ylim(0, 1)
    _finish(fig, ax, path, events)


def _plot_weights(path: Path, honest: Mapping[str, Sequence[Row]], sybils: set[str],
                  events: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(PLOTS[2].title, "round", "mean weight per aggregation")
    for index, label, color in ((0, "to Sybils", "tab:red"), (1, "to honest peers", "tab:green")):
        xs, ys = _by_round(honest, lambda r, i=index: weight_split(r, sybils)[i] if r.get("weights") else None)
        if xs:
            ax.plot(xs, ys, color=color, linewidth=2, label=label)
    ax.set_ylim(0, 1)
    _finish(fig, ax, path, events)


def _plot_bytes(path: Path, rows_by_node: Mapping[str, Sequence[Row]], events: Sequence[Mapping[str, Any]]) -> None:
    fig, ax = _figure(PLOTS[3].title, "seconds since start", "MiB (cumulative)")
    starts = _finite([rows[0].get("ts") for rows in rows_by_node.values() if rows])
    t0 = min(starts) if starts else 0.0
    for name, rows in sorted(rows_by_node.items()):
        for key, style in (("bytes_in", "-"), ("bytes_out", "--")):
            pts = [(r["ts"] - t0, r[key] / 2**20) for r in rows if r.get(key) is not None and r.get("ts") is not None]
            if pts:
                ax.plot(*zip(*pts), linestyle=style, linewidth=1, label=f"{name} {key[6:]}")
    _finish(fig, ax, path, ())  # events are placed by round; this axis is time


def run_metric(rows_by_node: Mapping[str, Sequence[Row]]) -> str:
    """The metric the run's trainer reports (``accuracy`` or ``perplexity``, each row's ``metric``)."""
    for rows in rows_by_node.values():
        for row in rows:
            if isinstance(row.get("metric"), str):
                return str(row["metric"])
    return DEFAULT_METRIC


def _plot_metric_bytes(path: Path, honest: Mapping[str, Sequence[Row]], metric: str) -> None:
    """Each honest node's test metric against the bytes it had sent by then:
    what compressing the gossip buys, on one axis."""
    fig, ax = _figure(PLOTS[4].title, "MiB sent (cumulative, messages with their envelopes)", metric)
    for name, rows in sorted(honest.items()):
        pts = [(r["bytes_out"] / 2**20, r[metric]) for r in rows
               if isinstance(r.get("bytes_out"), (int, float)) and isinstance(r.get(metric), (int, float))
               and math.isfinite(r[metric])]
        if pts:
            ax.plot(*zip(*pts), linewidth=1, label=name)
    if metric == "perplexity":
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    _finish(fig, ax, path, ())  # events are placed by round; this axis is bytes


# ---------------------------------------------------------------- summary


def summarize(node_metrics: Mapping[str, Sequence[Row]], node_status: Mapping[str, Mapping[str, Any] | None],
              scenario: Scenario, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    role_of = roles(scenario, node_status)
    sybils = sybil_peer_ids(node_status, role_of)
    honest = {n: rows for n, rows in node_metrics.items() if role_of.get(n, Role.HONEST) is Role.HONEST}
    finals = {n: rows[-1] for n, rows in honest.items() if rows}
    final_acc = _finite([r.get("accuracy") for r in finals.values()])
    metric = run_metric(node_metrics)
    final_metric = _finite([r.get(metric) for r in finals.values()])
    final_attack = _finite([r.get("attack_rate") for r in finals.values()])
    splits = [weight_split(r, sybils) for r in finals.values() if r.get("weights")]
    per_node = {}
    for name, rows in sorted(node_metrics.items()):
        last = rows[-1] if rows else {}
        status = node_status.get(name) or {}
        per_node[name] = {
            "role": role_of.get(name, Role.HONEST).value, "peer_id": status.get("peer_id"),
            "alive": bool(status), "rows": len(rows), "round": last.get("round"),
            "accuracy": last.get("accuracy"), "perplexity": last.get("perplexity"),
            "attack_rate": last.get("attack_rate"),
            "bytes_in": last.get("bytes_in"), "bytes_out": last.get("bytes_out"), "epsilon": last.get("epsilon"),
        }
    all_rounds = [int(r["round"]) for rows in node_metrics.values() for r in rows if "round" in r]
    return {
        "scenario": scenario.name,
        "honest_nodes": len(honest),
        "attacker_nodes": len(node_metrics) - len(honest),
        "rounds": max(all_rounds) + 1 if all_rounds else 0,
        "final_mean_accuracy": statistics.fmean(final_acc) if final_acc else None,
        "final_min_accuracy": min(final_acc) if final_acc else None,
        "metric": metric,
        "final_mean_metric": statistics.fmean(final_metric) if final_metric else None,
        "final_worst_metric": (min(final_metric) if metric == DEFAULT_METRIC else max(final_metric)) if final_metric else None,
        "final_mean_bytes_out": statistics.fmean(b) if (b := _finite([r.get("bytes_out") for r in finals.values()])) else None,
        "links": _links(scenario),
        "final_attack_rate": statistics.fmean(final_attack) if final_attack else None,
        "final_weight_to_sybils": statistics.fmean(s for s, _ in splits) if splits else None,
        "final_weight_to_honest": statistics.fmean(h for _, h in splits) if splits else None,
        "events": [_plain(e) for e in events],
        "nodes": per_node,
        "scenario_config": _plain(scenario),
    }


def _links(scenario: Scenario) -> str | None:
    """How the run's link rates were made, in words (None: not limited)."""
    links = getattr(scenario, "links", None)
    if links is None or not links.limited:
        return None
    return (f"emulated by each node's token buckets (not a network emulator): upload {links.upload_mbit:g} Mbit/s, "
            f"download {links.download_mbit:g} Mbit/s per node")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


SUMMARY_ROWS = (
    ("Scenario", "scenario"), ("Honest nodes", "honest_nodes"), ("Attacker identities", "attacker_nodes"),
    ("Rounds", "rounds"), ("Metric", "metric"), ("Final mean metric (honest)", "final_mean_metric"),
    ("Final worst metric (honest)", "final_worst_metric"), ("Final mean bytes sent (honest)", "final_mean_bytes_out"),
    ("Links", "links"), ("Final mean accuracy (honest)", "final_mean_accuracy"),
    ("Final min accuracy (honest)", "final_min_accuracy"), ("Final attack rate (honest mean)", "final_attack_rate"),
    ("Final weight to Sybils", "final_weight_to_sybils"), ("Final weight to honest peers", "final_weight_to_honest"),
)
NODE_COLUMNS = ("role", "alive", "round", "accuracy", "perplexity", "attack_rate", "bytes_in", "bytes_out", "epsilon")


def _index_html(summary: Mapping[str, Any], node_names: Sequence[str]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(label)}</th><td>{esc(_fmt(summary[key]))}</td></tr>" for label, key in SUMMARY_ROWS)
    head = "".join(f"<th>{esc(c)}</th>" for c in ("node", *NODE_COLUMNS, "metrics"))
    nodes = "".join(
        f"<tr><td>{esc(n)}</td>"
        + "".join(f"<td>{esc(_fmt(summary['nodes'][n][c]))}</td>" for c in NODE_COLUMNS)
        + f'<td><a href="{METRICS_DIR}/{esc(n)}.csv">csv</a> <a href="{METRICS_DIR}/{esc(n)}.json">json</a></td></tr>'
        for n in node_names
    )
    events = "".join(f"<li><code>{esc(json.dumps(e, sort_keys=True))}</code></li>" for e in summary["events"])
    plots = "".join(f'<figure><img src="{p.file}" alt="{esc(p.title)}"><figcaption>{esc(p.title)}</figcaption></figure>'
                    for p in PLOTS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>murmur testnet report: {esc(str(summary['scenario']))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>murmur testnet report: {esc(str(summary['scenario']))}</h1>
<h2>Summary</h2><table id="summary">{rows}</table>
<h2>Nodes</h2><table id="nodes"><tr>{head}</tr>{nodes}</table>
<h2>Events</h2><ul id="events">{events}</ul>
<h2>Plots</h2>{plots}
<p><a href="summary.json">summary.json</a></p></body></html>
"""


def write_report(
    run_dir: str | Path,
    node_metrics: Mapping[str, Sequence[Row]],
    node_status: Mapping[str, Mapping[str, Any] | None],
    scenario: Scenario,
    events: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``<run_dir>/report/`` and return its path.

    ``node_metrics``: node name -> its metrics.jsonl rows (ARCHITECTURE.md);
    ``node_status``: node name -> last ``GET /status`` JSON (None: dead/unknown);
    ``events``: applied churn events, each a JSON-ready dict (``round`` places it on plots).
    """
    out = Path(run_dir) / REPORT_DIR
    (out / METRICS_DIR).mkdir(parents=True, exist_ok=True)
    role_of = roles(scenario, node_status)
    sybils = sybil_peer_ids(node_status, role_of)
    honest = {n: r for n, r in node_metrics.items() if role_of.get(n, Role.HONEST) is Role.HONEST}
    for name, rows in node_metrics.items():
        _write_node_metrics(out / METRICS_DIR, name, rows)
    _plot_accuracy(out / PLOTS[0].file, node_metrics, role_of, events)
    _plot_attack_rate(out / PLOTS[1].file, honest, events)
    _plot_weights(out / PLOTS[2].file, honest, sybils, events)
    _plot_bytes(out / PLOTS[3].file, node_metrics, events)
    _plot_metric_bytes(out / PLOTS[4].file, honest, run_metric(node_metrics))
    summary = summarize(node_metrics, node_status, scenario, events)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "index.html", _index_html(summary, sorted(node_metrics)).encode())
    return out
