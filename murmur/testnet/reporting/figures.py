"""Matplotlib helpers shared by the report's plots and ``testnet compare``.

Figures use matplotlib's object API with the Agg canvas directly (no
pyplot), so writing a report never touches the global backend state of the
calling process. Every round axis and every time axis gets the run's events
as labelled vertical lines (events at the same place share one line); a
legend lists nodes only while that stays readable, the network's mean always.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from murmur.testnet.reporting.run import PlacedEvent
from murmur.units import byte_unit

FIG_SIZE = (9.0, 4.8)
FIG_DPI = 100
MAX_LEGEND_NODES = 12  # more nodes than this: the lines stay, their legend entries go
EVENT_COLOUR = "#666666"
MAX_MARK = 40  # characters of an event's label on a plot
MEAN_STYLE: Mapping[str, Any] = {"color": "black", "linewidth": 2.2}
NODE_ALPHA = 0.75


class Axis(enum.Enum):
    """What a plot's x axis counts: events are drawn on rounds and seconds."""

    ROUNDS = "round"
    SECONDS = "seconds since the first round"
    OTHER = "other"


def figure(title: str, xlabel: str, ylabel: str, ncols: int = 1, width: float | None = None) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or FIG_SIZE[0] * (1 if ncols == 1 else 0.6 * ncols), FIG_SIZE[1]), dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return fig, (axes[0] if ncols == 1 else list(axes))


def node_colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def node_label(name: str, count: int) -> str:
    """A node's legend entry, or none when there are too many nodes to list."""
    return name if count <= MAX_LEGEND_NODES else "_nolegend_"


def mark_events(ax: Any, events: Sequence[PlacedEvent], axis: Axis) -> None:
    if axis is Axis.OTHER:
        return
    at: dict[float, list[str]] = {}
    for event in events:
        x = event.round if axis is Axis.ROUNDS else event.t
        if x is not None:
            at.setdefault(float(x), []).append(event.label)
    for x, labels in sorted(at.items()):
        ax.axvline(x, color=EVENT_COLOUR, linestyle=":", linewidth=1.2)
        text = "; ".join(labels)
        text = text if len(text) <= MAX_MARK else text[:MAX_MARK - 1] + "…"  # the events table has all of it
        ax.annotate(text, (x, 0.98), xycoords=("data", "axes fraction"), fontsize=8, rotation=90,
                    va="top", ha="right", color=EVENT_COLOUR)


def scale_bytes(values: Sequence[float], per_s: bool = False) -> tuple[float, str]:
    """The divisor and unit label (``MiB``, ``KiB/s``) that suit ``values``."""
    unit, size = byte_unit(max((abs(v) for v in values), default=0.0))
    return size, unit + ("/s" if per_s else "")


def finish(fig: Any, axes: Any, path: Path, events: Sequence[PlacedEvent] = (), axis: Axis = Axis.OTHER) -> None:
    for ax in axes if isinstance(axes, list) else [axes]:
        mark_events(ax, events, axis)
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
