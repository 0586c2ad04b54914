"""Numbers as people read them: bytes in KiB/MiB, durations in ms/s/min,
node names in natural order.

Shared by what prints for an operator (``murmur status`` in human form) and
what a researcher opens (the testnet report), so both say "12.4 MiB" and
"node2" comes before "node10" in both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``node2`` before ``node10`` (digits compare as numbers)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part)


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


def byte_unit(largest: float) -> tuple[str, float]:
    """The unit to show values up to ``largest`` bytes in, and its size."""
    exponent = 0
    while exponent < len(BYTE_UNITS) - 1 and abs(largest) >= 1024 ** (exponent + 1):
        exponent += 1
    return BYTE_UNITS[exponent], float(1024**exponent)


def fmt_bytes(value: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``–``."""
    if value is None or not math.isfinite(value):
        return "–"
    unit, size = byte_unit(value)
    return f"{int(value)} B" if unit == "B" else f"{value / size:.1f} {unit}"


def fmt_rate(bytes_per_s: float | None) -> str:
    return "–" if bytes_per_s is None else f"{fmt_bytes(bytes_per_s)}/s"


def fmt_seconds(value: float | None) -> str:
    """``0.0123`` -> ``12.3 ms``, ``75`` -> ``1 min 15 s``, ``7300`` -> ``2 h 1 min``."""
    if value is None or not math.isfinite(value):
        return "–"
    if value < 1.0:
        return f"{value * 1000:.1f} ms"
    if value < 60.0:
        return f"{value:.2f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def fmt_number(value: object, digits: int = 3) -> str:
    """Floats to ``digits`` significant places after the point, None as ``–``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)
