"""Structured logging: JSON lines for machines, key=value text for people.

Code logs with ``log.info("delta accepted", extra={"peer": ..., "round": t})``;
the ``extra`` fields are the structure. The JSON form emits them as top-level
keys next to ``ts``, ``level``, ``logger`` and ``msg`` so a testnet harness or
log shipper can filter on them; the text form appends them as ``key=value``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from murmur.node.config import LogFormat, LogLevel

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_murmur_handler"
LOG_FILE_BYTES = 10 * 1024 * 1024  # murmur.log rotates to murmur.log.1 at this size
ABSL_LOGGER = "absl"  # the logger dp_accounting warns on
LOG_FILE_BACKUPS = 3  # murmur.log.1 .. .3 kept: at most 40 MiB of log per node


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values that JSON cannot hold are str()ed."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            doc.setdefault(key, value)  # an extra can never overwrite the core fields
        if record.exc_info:
            doc["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO  murmur.node: msg key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={_text_value(v)}" for k, v in record_extras(record).items())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


_FORMATTERS: dict[LogFormat, type[logging.Formatter]] = {LogFormat.JSON: JsonFormatter, LogFormat.TEXT: TextFormatter}


def configure_logging(
    level: LogLevel | str = LogLevel.INFO,
    fmt: LogFormat | str = LogFormat.TEXT,
    stream: TextIO | None = None,
    log_file: Path | None = None,
) -> logging.Handler:
    """Send all logging to ``stream`` (default stderr) in format ``fmt``, and
    to ``log_file`` too when given (rotated at LOG_FILE_BYTES, LOG_FILE_BACKUPS
    kept: ``murmur logs`` reads it; a daemon under systemd or in a container
    still has its stderr, and an operator who started it by hand has the file).

    Replaces handlers installed by an earlier call instead of stacking more,
    so calling it twice never duplicates lines. Returns the stream handler
    (tests remove it with ``logging.getLogger().removeHandler``).
    """
    level = LogLevel(level)
    fmt = LogFormat(fmt)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        handlers.append(logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
    for h in handlers:
        setattr(h, _HANDLER_MARK, True)
        h.setFormatter(_FORMATTERS[fmt]())
        root.addHandler(h)
    root.setLevel(level.value.upper())
    # dp_accounting (through absl) WARNs when a Renyi order fails to converge
    # and it leaves that order out: epsilon is then the least over the other
    # orders, still a valid bound. It told users at every example-level start
    # of nothing they could act on.
    logging.getLogger(ABSL_LOGGER).setLevel(logging.ERROR)
    return handler
