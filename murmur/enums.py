"""Enums that parse user input (config values, scenario fields) with one clear error."""

from __future__ import annotations

import enum
from typing import TypeVar

from murmur.errors import ConfigError

E = TypeVar("E", bound="ParsedEnum")


class ParsedEnum(enum.Enum):
    """An Enum with ``parse(value)``: the member itself, or its value as given
    in a config; anything else is a :class:`ConfigError` listing the valid values.
    The error names the setting after the class (``PartitionKind`` → "partition")."""

    @classmethod
    def parse(cls: type[E], value: str | E) -> E:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(str(k.value) for k in cls)
            what = cls.__name__.removesuffix("Kind").lower()
            raise ConfigError(f"unknown {what} {value!r} (valid: {valid})") from None
