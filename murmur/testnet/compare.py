"""``murmur testnet compare RUN_DIR RUN_DIR ... [--out DIR] [--label NAME ...]``.

How a researcher judges a codec, an aggregator or a privacy setting: the
runs' network-mean metric over rounds, over bytes sent per node and over
time, overlaid on one page, and their summaries side by side. Each run is
read from what ``murmur testnet run`` left in its run directory
(``report/summary.json`` and ``report/metrics/<node>.json``, the nodes' own
rows), so runs can be compared long after they ran. Exit codes: 0 written,
2 a directory that is no run, or runs that measure different metrics.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError
from murmur.fsutil import atomic_write_bytes, atomic_write_json
from murmur.testnet.options import DEFAULT_OUT_ROOT
from murmur.testnet.report import METRICS_DIR, REPORT_DIR, SUMMARY_FILE, summary_rows
from murmur.testnet.reporting import page
from murmur.testnet.reporting.figures import Axis, figure, finish, node_colours, scale_bytes
from murmur.testnet.reporting.panels import Table
from murmur.testnet.reporting.run import MeanPoint, Metric, Row, network_mean, run_metric
from murmur.testnet.scenario import Role
from murmur.units import fmt_bytes, fmt_number, fmt_seconds

EXIT_OK = 0
EXIT_USAGE = 2
CURVES_CSV = "curves.csv"


@dataclass(frozen=True)
class ComparedRun:
    label: str
    path: Path
    summary: Mapping[str, Any]
    metric: Metric
    curve: list[MeanPoint]  # the honest nodes' mean per round


def _report_dir(path: Path) -> Path:
    for candidate in (path / REPORT_DIR, path):
        if (candidate / SUMMARY_FILE).is_file():
            return candidate
    raise ConfigError(f"{path}: not a testnet run (no {REPORT_DIR}/{SUMMARY_FILE}; `murmur testnet run` writes one)")


def load_run(path: Path, label: str) -> ComparedRun:
    report = _report_dir(path)
    try:
        summary = json.loads((report / SUMMARY_FILE).read_text(encoding="utf-8"))
        honest = [n for n, node in summary["nodes"].items() if node.get("role", Role.HONEST.value) == Role.HONEST.value]
        rows: dict[str, list[Row]] = {n: json.loads((report / METRICS_DIR / f"{n}.json").read_text(encoding="utf-8"))
                                      for n in honest}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{report}: unreadable report ({exc})") from None
    starts = [float(r[0]["ts"]) for r in rows.values() if r and isinstance(r[0].get("ts"), (int, float))]
    metric = run_metric(rows)
    return ComparedRun(label, path, summary, metric, network_mean(rows, metric, min(starts, default=0.0)))


def _labels(paths: Sequence[Path], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise ConfigError(f"--label given {len(given)} times for {len(paths)} runs")
        return list(given)
    names = [p.resolve().name for p in paths]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def curves_table(runs: Sequence[ComparedRun]) -> Table:
    return Table(("run", "round", "t_s", "bytes_sent_per_node", runs[0].metric.name),
                 [(r.label, p.round, round(p.t, 3), p.bytes_sent, p.value) for r in runs for p in r.curve])


PLOTS = (  # (file, title, x column, x label, axis)
    ("metric_rounds.png", "{metric} over rounds", "round", "round", Axis.OTHER),
    ("metric_bytes.png", "{metric} over bytes sent per node", "bytes_sent_per_node", "sent per node", Axis.OTHER),
    ("metric_time.png", "{metric} over time", "t_s", "seconds since the first round", Axis.OTHER),
)


def draw(runs: Sequence[ComparedRun], table: Table, out: Path) -> list[tuple[str, str]]:
    metric = runs[0].metric
    colours = node_colours([r.label for r in runs])
    drawn = []
    for file, title, x, xlabel, axis in PLOTS:
        scale, unit = scale_bytes(table.column(x)) if x == "bytes_sent_per_node" else (1.0, "")
        heading = title.format(metric=metric.name.capitalize())
        fig, ax = figure(f"{heading} (honest mean)", f"{unit} {xlabel}".strip(), metric.name)
        for run in runs:
            part = table.where("run", run.label)
            ax.plot([v / scale for v in part.column(x)], part.column(metric.name), color=colours[run.label],
                    linewidth=2, label=run.label)
        if metric.bounded:
            ax.set_ylim(0, 1)
        finish(fig, ax, out / file, (), axis)
        drawn.append((file, heading))
    return drawn


def _setting(summary: Mapping[str, Any], *path: str) -> Any:
    value: Any = summary.get("scenario_config") or {}
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def summary_table(runs: Sequence[ComparedRun]) -> tuple[list[str], list[list[str]]]:
    """One row per run: its settings that differ most often, then its outcome."""
    metric = runs[0].metric.name
    header = ["run", "codec", "aggregator", "privacy", "nodes", "rounds", f"final {metric} (mean)",
              f"final {metric} (worst)", "sent per node", "time per round", "duration", "ε spent"]
    attacked = any(r.summary.get("attacker_nodes") for r in runs)
    if attacked:
        header += ["attacker", "attack rate", "weight to Sybils"]
    rows = []
    for r in runs:
        s = r.summary
        privacy = _setting(s, "privacy")
        cells = [r.label, _setting(s, "codec"), _setting(s, "aggregator", "name"),
                 f"ε = {privacy['epsilon']:g} ({privacy.get('level')})" if privacy and privacy.get("enabled") else "off",
                 s.get("honest_nodes"), s.get("rounds"), fmt_number(s.get("final_mean_metric")),
                 fmt_number(s.get("final_worst_metric")), fmt_bytes(s.get("bytes_sent_mean")),
                 fmt_seconds(s.get("mean_round_s")), fmt_seconds(s.get("wall_s")), fmt_number(s.get("final_epsilon"), 2)]
        if attacked:
            cells += ["; ".join(s.get("attacker_tactics") or []) or "-", fmt_number(s.get("final_attack_rate")),
                      fmt_number(s.get("final_weight_to_sybils"))]
        rows.append([html.escape(fmt_number(c)) for c in cells])
    return header, rows


def compare(paths: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """Write the comparison of the runs in ``paths`` to ``out``; returns its index.html."""
    if len(paths) < 2:
        raise ConfigError("compare needs at least two runs")
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths, labels), strict=True)]
    metrics = {r.metric.name for r in runs}
    if len(metrics) > 1:
        raise ConfigError(f"the runs measure different metrics ({', '.join(sorted(metrics))}); compare runs of one kind")
    out.mkdir(parents=True, exist_ok=True)
    table = curves_table(runs)
    table.write_csv(out / CURVES_CSV)
    drawn = draw(runs, table, out)
    header, rows = summary_table(runs)
    runs_html = "".join(
        f"<h3>{html.escape(r.label)}</h3>"
        + page.key_value_table(f"summary-{i}", summary_rows(r.summary, bool(r.summary.get("attacker_nodes"))))
        for i, r in enumerate(runs))
    sections = [
        ("runs-section", "Runs", page.table("runs", header, rows)
         + "<p>" + " · ".join(f'<a href="{html.escape(str(r.path.resolve() / REPORT_DIR / "index.html"))}">'
                               f"{html.escape(r.label)} report</a>" for r in runs) + "</p>"),
        ("plots", "Plots", "".join(page.figure_html(f.removesuffix(".png"), f, t, "The honest nodes' mean per round.",
                                                    CURVES_CSV) for f, t in drawn)),
        ("summaries", "Summaries", runs_html),
    ]
    atomic_write_json(out / "compare.json", {"runs": [{"label": r.label, "path": str(r.path), "summary": {
        k: v for k, v in r.summary.items() if k not in ("nodes", "events")}} for r in runs]})
    index = out / "index.html"
    atomic_write_bytes(index, page.page("murmur testnet comparison: " + " vs ".join(r.label for r in runs),
                                        sections).encode())
    return index


def run_compare(ns: argparse.Namespace) -> int:
    """Entry point for ``murmur testnet compare``."""
    out = ns.out or DEFAULT_OUT_ROOT.parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        index = compare(list(ns.runs), Path(out), ns.label)
    except ConfigError as exc:
        print(f"murmur: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"comparison: {index}")
    return EXIT_OK
