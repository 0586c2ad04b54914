"""Typed options of trainers and aggregators, built from a config table.

Trainers (``TorchOptions``) and aggregators (``Aggregator.Options``) declare
their options as frozen dataclasses with simple annotations and a
``validate()`` method for ranges. :func:`parse_options` is the one place that
turns a config table into such an instance: unknown names, wrong types and
out-of-range values are one :class:`~murmur.errors.ConfigError` line naming the
option. It imports no torch, so a node can check a config before it loads a
model or binds a port.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from murmur.errors import ConfigError

O = TypeVar("O")

_SIMPLE = {bool: "bool", int: "int", float: "float", str: "str"}


def coerce(what: str, name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against a simple annotation (int, float, bool, str,
    ``X | None``); an int is accepted as a float. Annotations a config file
    cannot express (tensors, callables) are left to the option class."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return coerce(what, name, value, arg)
    if tp not in _SIMPLE:
        return value
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{what} option {name} must be {_SIMPLE[tp]}, got {type(value).__name__} {value!r}")
    return value


def parse_options(cls: type[O], raw: Mapping[str, Any], what: str) -> O:
    """Build the options dataclass ``cls`` from ``raw`` and run its
    ``validate()``. ``what`` names the owner in messages (``trainer``,
    ``aggregator 'krum'``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known)) or 'none'}")
    values = {key: coerce(what, key, value, hints[key]) for key, value in raw.items()}
    try:
        options = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} options: {exc}") from None
    validate = getattr(options, "validate", None)
    if callable(validate):
        validate()
    return options


MAX_SEED = 2**32 - 1
"""Seeds are 32-bit: numpy refused a negative one, torch one of 2**64, and
derived seeds (the sketch's, the compressor's) add to them."""

DEVICE_TYPES = ("cpu", "cuda", "mps")
"""What a trainer runs on: ``auto`` (the first available of cuda, mps, cpu),
or one of these, cuda with an optional index (``cuda:1``). torch knows more
(``meta``, ``xpu``...), and ``meta`` passed every check, then crashed the
first round."""
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: str) -> None:
    """ConfigError unless ``name`` is a device trainers run on (see DEVICE_TYPES)."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"device {name!r} is not one of auto, {', '.join(DEVICE_TYPES)} (or cuda:N)")
