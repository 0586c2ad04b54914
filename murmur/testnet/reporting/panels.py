"""The report's plots, one :class:`Panel` each.

A panel is the table behind a plot (written as ``<stem>.csv``), how that
table is drawn (``<stem>.png``) and when the panel applies at all (attack
panels need attackers, the ε panel privacy). The table comes first and the
drawing reads only it, so the CSV is exactly what the plot shows. Adding a
plot is one ``table`` function, one ``draw`` function and one entry in
:data:`PANELS`.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.testnet.reporting.figures import (
    MEAN_STYLE,
    NODE_ALPHA,
    Axis,
    figure,
    finish,
    node_colours,
    node_label,
    scale_bytes,
)
from murmur.testnet.reporting.run import (
    PHASE_LABELS,
    PHASES,
    RunData,
    by_round,
    cumulative_bytes,
    mean_by_round,
    network_mean,
    partitions,
    phase_times,
    place_events,
    weight_split,
    with_gaps,
)
from murmur.testnet.scenario import Role

MEAN_NODE = "mean (honest)"  # the node column of a network-mean row
ALL_NODES = "all nodes"  # the node column of a network-total row
RATE_BINS = 60  # the network's total rate is summed over about this many time bins
MIN_BIN_S = 1.0


@dataclass(frozen=True)
class Table:
    """The data behind one plot, as written to its CSV."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def where(self, name: str, value: Any) -> Table:
        i = self.columns.index(name)
        return Table(self.columns, [r for r in self.rows if r[i] == value])

    def write_csv(self, path: Path) -> None:
        """Header, then the rows; None is an empty cell, floats as ``str`` writes them (exactly)."""
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.columns)
            writer.writerows(["" if v is None else v for v in row] for row in self.rows)


@dataclass(frozen=True)
class Panel:
    stem: str
    title: str  # "{metric}" is replaced by the run's metric name
    caption: str  # how to read it, under the plot
    table: Callable[[RunData], Table]
    draw: Callable[[RunData, Table, Path], None]
    applies: Callable[[RunData], bool] = lambda run: True

    @property
    def file(self) -> str:
        return f"{self.stem}.png"

    @property
    def csv(self) -> str:
        return f"{self.stem}.csv"

    def title_for(self, run: RunData) -> str:
        title = self.title.format(metric=run.metric.name)
        return title[:1].upper() + title[1:]


def _events(run: RunData) -> list[Any]:
    return place_events(run.events, run.t0)


def _per_node_lines(ax: Any, run: RunData, table: Table, x: str, y: str, names: Sequence[str],
                    x_scale: float = 1.0, gaps: bool = True) -> None:
    colours = node_colours(run.names)
    for name in names:
        part = table.where("node", name)
        pts = [(a / x_scale, b) for a, b in zip(part.column(x), part.column(y)) if a is not None and b is not None]
        if gaps:
            pts = with_gaps(pts)
        if pts:
            attacker = run.roles.get(name) is Role.ATTACKER
            ax.plot(*zip(*pts), color=colours[name], linestyle="--" if attacker else "-", linewidth=1,
                    alpha=NODE_ALPHA, label=node_label(name, len(names)))


# ------------------------------------------------------------------- metric


def metric_table(run: RunData) -> Table:
    rows = [(name, r["round"], run.metric.value(r)) for name, node_rows in run.rows.items() for r in node_rows
            if run.metric.value(r) is not None]
    return Table(("node", "round", run.metric.name), rows)


def draw_metric(run: RunData, table: Table, path: Path) -> None:
    fig, ax = figure(f"{run.metric.name.capitalize()} per node", "round", run.metric.name)
    _per_node_lines(ax, run, table, "round", run.metric.name, run.names)
    xs, ys = mean_by_round(run.honest, run.metric.value)
    if xs:
        ax.plot(xs, ys, label=MEAN_NODE, **MEAN_STYLE)
    if run.metric.bounded:
        ax.set_ylim(0, 1)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


# --------------------------------------------------------------------- epsilon


def epsilon_table(run: RunData) -> Table:
    budget = run.epsilon_budget
    rows = [(name, r["round"], float(r["epsilon"]), budget) for name, node_rows in run.rows.items()
            for r in node_rows if isinstance(r.get("epsilon"), (int, float)) and math.isfinite(r["epsilon"])]
    return Table(("node", "round", "epsilon", "budget"), rows)


def draw_epsilon(run: RunData, table: Table, path: Path) -> None:
    fig, ax = figure("Privacy: ε spent per node", "round", "ε spent")
    _per_node_lines(ax, run, table, "round", "epsilon", run.names)
    budget = run.epsilon_budget
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1.5, label=f"budget ε = {budget:g}")
        ax.set_ylim(0, budget * 1.1)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


def has_privacy(run: RunData) -> bool:
    return run.epsilon_budget is not None or any(
        (r.get("epsilon") or 0) > 0 for rows in run.rows.values() for r in rows)


# ---------------------------------------------------------------- metric/bytes


def metric_bytes_table(run: RunData) -> Table:
    """Per node and round: the bytes it sent so far (all its processes) and its metric;
    then the honest mean of both per round."""
    rows = []
    for name, node_rows in run.rows.items():
        traffic = cumulative_bytes(node_rows, run.t0)
        by_rnd = {t.round: t for t in traffic}
        for r in node_rows:
            value = run.metric.value(r)
            if value is not None and r.get("round") in by_rnd:
                rows.append((name, r["round"], by_rnd[r["round"]].bytes_out, value))
    rows += [(MEAN_NODE, p.round, p.bytes_sent, p.value) for p in network_mean(run.honest, run.metric, run.t0)]
    return Table(("node", "round", "bytes_sent", run.metric.name), rows)


def draw_metric_bytes(run: RunData, table: Table, path: Path) -> None:
    scale, unit = scale_bytes(table.column("bytes_sent"))
    fig, ax = figure(f"{run.metric.name.capitalize()} against bytes sent", f"{unit} sent by the node (cumulative)",
                     run.metric.name)
    _per_node_lines(ax, run, table, "bytes_sent", run.metric.name, run.names, x_scale=scale, gaps=False)
    mean = table.where("node", MEAN_NODE)
    if mean.rows:
        ax.plot([b / scale for b in mean.column("bytes_sent")], mean.column(run.metric.name), label=MEAN_NODE,
                **MEAN_STYLE)
    if run.metric.bounded:
        ax.set_ylim(0, 1)
    finish(fig, ax, path)


# ---------------------------------------------------------------------- phases


def phases_table(run: RunData) -> Table:
    rows = []
    for name, node_rows in run.rows.items():
        for r in node_rows:
            times = phase_times(r)
            rows.append((name, r["round"], *times.values(), sum(times.values())))
    return Table(("node", "round", *PHASES, "total_s"), rows)


def phases_by_node_table(run: RunData) -> Table:
    """Mean seconds per round in each phase, per node and over all honest rows."""
    def means(rows: Sequence[Any]) -> tuple[float, ...]:
        cols = [statistics.fmean(phase_times(r)[p] for r in rows) for p in PHASES]
        return (*cols, sum(cols))

    out = [(name, len(rows), *means(rows)) for name, rows in run.rows.items() if rows]
    honest_rows = [r for rows in run.honest.values() for r in rows]
    if honest_rows:
        out.append((MEAN_NODE, len(honest_rows), *means(honest_rows)))
    return Table(("node", "rounds", *PHASES, "total_s"), out)


PHASE_COLOURS = {"train_s": "tab:blue", "commit_s": "tab:purple", "send_s": "tab:orange", "wait_s": "tab:grey",
                 "aggregate_s": "tab:green", "eval_s": "tab:olive"}


def draw_phases_by_node(run: RunData, table: Table, path: Path) -> None:
    names = table.column("node")[::-1]  # first node at the top
    fig, ax = figure("Time per round by phase, per node (mean)", "seconds per round", "")
    left = [0.0] * len(names)
    for phase in PHASES:
        widths = table.column(phase)[::-1]
        ax.barh(names, widths, left=left, color=PHASE_COLOURS[phase], label=PHASE_LABELS[phase])
        left = [a + b for a, b in zip(left, widths)]
    ax.tick_params(axis="y", labelsize=8)
    fig.set_figheight(max(3.0, 0.28 * len(names) + 1.5))
    finish(fig, ax, path)


def draw_phases(run: RunData, table: Table, path: Path) -> None:
    honest = set(run.honest)
    rows = [r for r in table.rows if r[0] in honest]
    rounds = sorted({r[1] for r in rows})
    fig, ax = figure("Time per round by phase (honest mean)", "round", "seconds")
    if rounds:
        stacks = [[statistics.fmean(r[2 + i] for r in rows if r[1] == rnd) for rnd in rounds]
                  for i in range(len(PHASES))]
        ax.stackplot(rounds, stacks, labels=[PHASE_LABELS[p] for p in PHASES],
                     colors=[PHASE_COLOURS[p] for p in PHASES], alpha=0.85)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


# ------------------------------------------------------------------ consensus


def consensus_table(run: RunData) -> Table:
    """How far apart the honest nodes' metric is, per round (2+ nodes)."""
    rows = []
    for rnd, values in by_round(run.honest, run.metric.value).items():
        if len(values) >= 2:
            rows.append((rnd, len(values), statistics.fmean(values), statistics.pstdev(values), min(values),
                         max(values), max(values) - min(values)))
    return Table(("round", "nodes", "mean", "std", "min", "max", "range"), rows)


def draw_consensus(run: RunData, table: Table, path: Path) -> None:
    fig, ax = figure(f"Consensus: spread of the honest nodes' {run.metric.name}", "round",
                     f"spread of {run.metric.name}")
    if table.rows:
        ax.plot(table.column("round"), table.column("range"), color="tab:red", label="max − min")
        ax.plot(table.column("round"), table.column("std"), color="tab:blue", label="standard deviation")
        ax.set_ylim(bottom=0)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


# ------------------------------------------------------------------- traffic


def traffic_table(run: RunData) -> Table:
    """Per node and row: bytes so far over all its processes and the rate
    since its row before; then the network's total rate in time bins."""
    rows: list[tuple[Any, ...]] = []
    for name, node_rows in run.rows.items():
        for t in cumulative_bytes(node_rows, run.t0):
            rows.append((name, t.round, round(t.t, 3), t.bytes_in, t.bytes_out, t.in_rate, t.out_rate,
                         int(t.restarted)))
    ends = [r[2] for r in rows]
    if ends:
        width = max(MIN_BIN_S, max(ends) / RATE_BINS)
        totals: dict[int, list[float]] = {}
        for name, node_rows in run.rows.items():
            previous = None
            for t in cumulative_bytes(node_rows, run.t0):
                if previous is not None:
                    b = totals.setdefault(int(t.t // width), [0.0, 0.0])
                    b[0] += t.bytes_in - previous.bytes_in
                    b[1] += t.bytes_out - previous.bytes_out
                previous = t
        for b, (b_in, b_out) in sorted(totals.items()):
            rows.append((ALL_NODES, None, round((b + 0.5) * width, 3), None, None, b_in / width, b_out / width, 0))
    return Table(("node", "round", "t_s", "bytes_in", "bytes_out", "in_rate_bps", "out_rate_bps", "restarted"),
                 rows)


def draw_traffic(run: RunData, table: Table, path: Path) -> None:
    total = table.where("node", ALL_NODES)
    scale, unit = scale_bytes([v for v in table.column("out_rate_bps") + table.column("in_rate_bps") if v], per_s=True)
    fig, ax = figure("Traffic: bytes per second (restarts handled)", "seconds since the first round", unit)
    colours = node_colours(run.names)
    for name in run.names:
        part = table.where("node", name)
        pts = [(t, r / scale if r is not None else math.nan) for t, r in zip(part.column("t_s"), part.column("out_rate_bps"))]
        if pts:
            ax.plot(*zip(*pts), color=colours[name], linewidth=0.8, alpha=0.5,
                    label=node_label(f"{name} sent", len(run.names)))
    if total.rows:
        ax.plot(total.column("t_s"), [v / scale for v in total.column("out_rate_bps")], label="network total sent",
                **MEAN_STYLE)
    ax.set_ylim(bottom=0)
    finish(fig, ax, path, _events(run), Axis.SECONDS)


# --------------------------------------------------------------------- graph


def _edges_in(run: RunData, first: int | None = None, last: int | None = None) -> dict[tuple[str, str], int]:
    """Undirected learning edges in rounds ``first`` .. ``last - 1``: in how
    many rows either end aggregated the other."""
    by_peer = run.names_by_peer
    order = {name: i for i, name in enumerate(run.names)}
    counts: dict[tuple[str, str], int] = {}
    for name, rows in run.rows.items():
        for r in rows:
            rnd = r.get("round")
            if not isinstance(rnd, int) or (first is not None and rnd < first) or (last is not None and rnd >= last):
                continue
            for peer in r.get("neighbours") or ():
                other = by_peer.get(str(peer))
                if other is not None and other != name:
                    a, b = sorted((name, other), key=order.__getitem__)
                    counts[(a, b)] = counts.get((a, b), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])))


def graph_table(run: RunData) -> Table:
    return Table(("node_a", "node_b", "rounds"), [(a, b, n) for (a, b), n in _edges_in(run).items()])


def draw_graph(run: RunData, table: Table, path: Path) -> None:
    splits = partitions(run.events, run.names)
    views: list[tuple[str, dict[tuple[str, str], int], dict[str, int]]] = [
        ("whole run", {(a, b): n for a, b, n in table.rows}, {})]
    for p in splits:
        side = {n: 0 for n in p.sides[0]} | {n: 1 for n in p.sides[1]}
        when = (f"rounds {p.from_round}–{p.to_round - 1}" if p.to_round is not None and p.from_round is not None
                else f"from round {p.from_round}, never healed")
        views.append((f"partition, {when}", _edges_in(run, p.from_round, p.to_round), side))
    fig, axes = figure("Peer graph (learning edges)" + (" and partitions" if splits else ""), "", "",
                       ncols=len(views), width=6.0 * len(views))
    axes = axes if isinstance(axes, list) else [axes]
    n = len(run.names)
    angle = {name: math.pi / 2 - 2 * math.pi * i / max(1, n) for i, name in enumerate(run.names)}  # clockwise from the top
    pos = {name: (math.cos(a), math.sin(a)) for name, a in angle.items()}
    for ax, (title, edges, side) in zip(axes, views):
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.axis("off")
        top = max(edges.values(), default=1)
        for (a, b), count in edges.items():
            crossing = bool(side) and side.get(a) != side.get(b)
            ax.plot([pos[a][0], pos[b][0]], [pos[a][1], pos[b][1]], color="tab:red" if crossing else "#8899aa",
                    linestyle="--" if crossing else "-", linewidth=0.5 + 2.5 * count / top, zorder=1)
        for name, (x, y) in pos.items():
            attacker = run.roles.get(name) is Role.ATTACKER
            face = ("tab:blue", "tab:cyan")[side[name]] if side else ("tab:orange" if attacker else "tab:green")
            ax.scatter([x], [y], s=260, color=face, edgecolors="black", linewidths=1.2 if attacker else 0.5, zorder=2)
            ax.annotate(name, (x * 1.18, y * 1.18), ha="center", va="center", fontsize=8)
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
    finish(fig, axes, path)


# ------------------------------------------------------------------- attacks


def has_attackers(run: RunData) -> bool:
    return bool(run.attackers) or bool(run.scenario.attackers)


def attack_rate_table(run: RunData) -> Table:
    rows = [(name, r["round"], float(r["attack_rate"])) for name, node_rows in run.honest.items() for r in node_rows
            if isinstance(r.get("attack_rate"), (int, float))]
    return Table(("node", "round", "attack_rate"), rows)


def draw_attack_rate(run: RunData, table: Table, path: Path) -> None:
    fig, ax = figure("Attack success rate (honest nodes)", "round", "attack success rate")
    _per_node_lines(ax, run, table, "round", "attack_rate", list(run.honest))
    xs, ys = mean_by_round(run.honest, lambda r: r.get("attack_rate"))
    if xs:
        ax.plot(xs, ys, label=MEAN_NODE, **MEAN_STYLE)
    ax.set_ylim(0, 1)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


def sybil_weight_table(run: RunData) -> Table:
    sybils = run.sybil_peers
    splits: dict[int, list[tuple[float, float]]] = {}
    for rows in run.honest.values():
        for r in rows:
            if r.get("weights") and isinstance(r.get("round"), int):
                splits.setdefault(r["round"], []).append(weight_split(r, sybils))
    return Table(("round", "to_sybils", "to_honest"), [
        (rnd, statistics.fmean(s for s, _ in v), statistics.fmean(h for _, h in v)) for rnd, v in sorted(splits.items())])


def draw_sybil_weight(run: RunData, table: Table, path: Path) -> None:
    fig, ax = figure("Aggregation weight honest nodes give Sybils and honest peers", "round",
                     "mean weight per aggregation")
    if table.rows:
        ax.plot(table.column("round"), table.column("to_sybils"), color="tab:red", linewidth=2, label="to Sybils")
        ax.plot(table.column("round"), table.column("to_honest"), color="tab:green", linewidth=2,
                label="to honest peers")
    ax.set_ylim(0, 1)
    finish(fig, ax, path, _events(run), Axis.ROUNDS)


PANELS: tuple[Panel, ...] = (
    Panel("metric", "{metric} per node", "Each node's {metric} after every round; the black line is the honest "
          "nodes' mean, dashed lines are attackers. Dotted verticals are events.", metric_table, draw_metric),
    Panel("metric_bytes", "{metric} against bytes sent", "The same {metric} against what the node had sent by then "
          "(all of its processes): runs with different codecs compare at a glance.", metric_bytes_table,
          draw_metric_bytes),
    Panel("epsilon", "Privacy: ε spent per node", "ε each node has spent after every round, against the budget "
          "(red) at which it stops contributing.", epsilon_table, draw_epsilon, has_privacy),
    Panel("phases_by_node", "Time per round by phase, per node", "Mean seconds per round each node spent "
          "training, in the privacy commit, sending, waiting for neighbours, aggregating and evaluating.",
          phases_by_node_table, draw_phases_by_node),
    Panel("phases", "Time per round by phase, over rounds", "The honest nodes' mean time per phase in each round.",
          phases_table, draw_phases),
    Panel("consensus", "Consensus: spread of the honest nodes' {metric}", "How far apart the honest nodes are: "
          "the range and standard deviation of their {metric} in each round (models are not in the metrics "
          "rows, so their metric stands in for them).", consensus_table, draw_consensus),
    Panel("traffic", "Traffic: bytes per second", "Bytes each node sent per second between its rows (a restarted "
          "node's counter starts again from 0 and is added to what it had sent), and the network's total.",
          traffic_table, draw_traffic),
    Panel("graph", "Peer graph and partitions", "Learning edges (thicker: more rounds together); with "
          "partitions, one graph per partition, coloured by side, with any edge across in red.",
          graph_table, draw_graph),
    Panel("attack_rate", "Attack success rate (honest nodes)", "How often the attack succeeds on each honest "
          "node's model.", attack_rate_table, draw_attack_rate, has_attackers),
    Panel("sybil_weight", "Weight given to Sybils", "The mean weight honest nodes' aggregations gave the Sybil "
          "identities and honest peers.", sybil_weight_table, draw_sybil_weight, has_attackers),
)
