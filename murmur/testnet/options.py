"""The options of ``murmur testnet run``, declared once.

Both ``murmur.node.cli`` (the ``murmur`` command) and ``murmur.testnet.cli``
(``python -m murmur.testnet.cli``) build their ``testnet run`` parser from
:func:`add_run_arguments`, so a flag given without a scenario path
(``murmur testnet run --no-dashboard``) parses the same in both. This module
imports nothing heavy: ``murmur id`` must not pay for the testnet's imports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT_ROOT = Path("reports") / "testnet"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 for any: 70000 was taken modulo 65536, -1 raised deep in asyncio."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


CLUSTER_BACKENDS = ("local", "ray")  # murmur.testnet.scenario.Backend's values (not imported: it is heavy)


def cluster_choice(text: str) -> tuple[str, str | None]:
    """``--cluster BACKEND[=ADDRESS]``: ``ray``, ``ray=10.0.0.1:6379``, ``local``."""
    backend, sep, address = text.partition("=")
    if backend not in CLUSTER_BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown cluster backend {backend!r} (expected one of {', '.join(CLUSTER_BACKENDS)})")
    if sep and (backend == "local" or not address):
        raise argparse.ArgumentTypeError(f"{text!r}: only ray takes an address (ray=HOST:PORT)")
    return backend, address or None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", type=Path, help="scenario file (TOML); default: the embedded default scenario")
    p.add_argument("--nodes-per-process", type=positive_int, metavar="K",
                   help="pack K nodes into one process (default: the scenario's)")
    p.add_argument("--out", type=Path, metavar="DIR", help=f"run directory (default: {DEFAULT_OUT_ROOT}/<scenario>-<time>)")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the live dashboard")
    p.add_argument("--dashboard-port", type=port, default=0, metavar="PORT", help="dashboard port on 127.0.0.1 (0: any)")
    p.add_argument("--no-fork-server", action="store_true",
                   help="start every worker as a fresh interpreter instead of forking it from one that imported once")
    p.add_argument("--cluster", type=cluster_choice, metavar="BACKEND[=ADDRESS]",
                   help="where the nodes run: local (this machine), or ray: the Ray cluster at ADDRESS "
                        "(a local one when no address is given); overrides the scenario's [cluster]")
