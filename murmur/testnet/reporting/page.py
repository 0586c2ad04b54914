"""The report's ``index.html``: summary, settings, nodes, events, plots.

Plain HTML and CSS, no script: the page is read from disk, mailed, archived.
Numbers carry units (MiB, ms); nodes are in natural order; the events are a
table of what happened when, the same events the plots mark.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from murmur.testnet.reporting.run import CONNECTION_TYPES, PlacedEvent
from murmur.units import fmt_bytes, fmt_number, fmt_seconds

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:75em;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #d0d4d9;padding:.2em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.2em 0} img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;max-width:60em} .muted{color:#777}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def table(element_id: str, header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i < len(numeric) and numeric[i] else ""}>{cell}</td>'
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table id="{element_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def key_value_table(element_id: str, rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table id="{element_id}">{body}</table></div>'


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A scenario (as plain JSON values) as ``key.path = value`` rows."""
    if isinstance(value, Mapping) and value and not prefix.endswith("options"):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{i}]")]
    if isinstance(value, (Mapping, list)):
        return [(prefix, json.dumps(value, sort_keys=True) if value else "–")]
    return [(prefix, "–" if value is None else str(value).lower() if isinstance(value, bool) else str(value))]


def settings_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The scenario's settings; churn is the events table's business (one row counts it)."""
    rows = flatten({k: v for k, v in config.items() if k != "churn"})
    rows.append(("churn", f"{len(config.get('churn') or [])} events (see Events)"))
    return rows


def event_rows(events: Sequence[PlacedEvent]) -> list[list[str]]:
    rows = []
    for e in events:
        rec = e.record
        detail = []
        if rec.get("round_of"):
            detail.append(f"at round {rec.get('round')} of {rec['round_of']}")
        if rec.get("front") is not None:
            detail.append(f"front {rec['front']}, slowest {rec.get('slowest')}")
        if rec.get("skipped"):
            detail.append(f"skipped: {rec['skipped']}")
        rows.append([_esc(fmt_seconds(e.t) if e.t is not None else "–"), _esc(fmt_number(e.round)), _esc(e.label),
                     _esc("; ".join(detail))])
    return rows


def mix_text(mix: Mapping[str, int] | None) -> str:
    """``3 direct, 0 punched, 2 relayed`` (the types of CONNECTION_TYPES in order, then any other)."""
    if mix is None:
        return "–"
    kinds = [*CONNECTION_TYPES, *sorted(k for k in mix if k not in CONNECTION_TYPES)]
    return ", ".join(f"{mix.get(k, 0)} {k}" for k in kinds)


def node_rows(nodes: Mapping[str, Mapping[str, Any]], metric: str, csv_dir: str) -> list[list[str]]:
    out = []
    for name, n in nodes.items():
        shown = f"{name} @ {n['host']}" if n.get("host") else name  # cluster runs: where it ran
        out.append([_esc(shown), _esc(n["role"]), "yes" if n["alive"] else "no", _esc(fmt_number(n["round"])),
                    _esc(fmt_number(n.get(metric))), _esc(fmt_number(n.get("epsilon"), 2)),
                    _esc(fmt_bytes(n.get("bytes_sent"))), _esc(fmt_bytes(n.get("bytes_received"))),
                    _esc(fmt_seconds(n.get("mean_round_s"))), _esc(fmt_number(n.get("restarts"))),
                    _esc(mix_text(n.get("connections"))),
                    f'<a href="{csv_dir}/{_esc(name)}.csv">csv</a> <a href="{csv_dir}/{_esc(name)}.json">json</a>'])
    return out


def figure_html(stem: str, file: str, title: str, caption: str, csv: str) -> str:
    return (f'<figure id="plot-{_esc(stem)}"><img src="{_esc(file)}" alt="{_esc(title)}">'
            f'<figcaption><b>{_esc(title)}.</b> {_esc(caption)} <a href="{_esc(csv)}">data (CSV)</a>'
            f"</figcaption></figure>")


def page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole page: ``sections`` are (id, heading, inner HTML)."""
    body = "".join(f'<section id="{sid}"><h2>{_esc(heading)}</h2>{inner}</section>' for sid, heading, inner in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{_esc(title)}</h1>{body}</body></html>\n")
