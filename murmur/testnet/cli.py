"""``murmur testnet run [SCENARIO.toml] [--nodes-per-process K] [--out DIR] [--no-dashboard]``.

Called lazily by ``murmur.node.cli`` with ``args.scenario`` (the optional
scenario path) and ``args.args`` (the remaining words); also runnable as
``python -m murmur.testnet.cli ...``. Exit codes: 0 the run completed (or ran
its time), 1 training stalled, 2 bad scenario or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError
from murmur.testnet.controller import RunEnd, RunOptions, RunResult, Testnet
from murmur.testnet.scenario import load_scenario

EXIT_OK = 0
EXIT_STALLED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUT_ROOT = Path("reports") / "testnet"
EXIT_CODES = {RunEnd.COMPLETED: EXIT_OK, RunEnd.TIME_UP: EXIT_OK, RunEnd.STALLED: EXIT_STALLED,
              RunEnd.INTERRUPTED: EXIT_INTERRUPTED}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="murmur testnet run", description="run a local testnet scenario")
    p.add_argument("scenario", nargs="?", type=Path, help="scenario file (TOML); default: the embedded default scenario")
    p.add_argument("--nodes-per-process", type=int, metavar="K", help="pack K nodes into one process (default: the scenario's)")
    p.add_argument("--out", type=Path, metavar="DIR", help=f"run directory (default: {DEFAULT_OUT_ROOT}/<scenario>-<time>)")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the live dashboard")
    p.add_argument("--dashboard-port", type=int, default=0, metavar="PORT", help="dashboard port on 127.0.0.1 (0: any)")
    return p


def parse_args(scenario: str | Path | None, rest: Sequence[str]) -> argparse.Namespace:
    """``murmur.node.cli`` hands over an optional first word and the rest."""
    words = ([str(scenario)] if scenario is not None else []) + list(rest)
    args = build_parser().parse_args(words)
    if args.nodes_per_process is not None and args.nodes_per_process < 1:
        raise ConfigError("--nodes-per-process must be >= 1")
    return args


def print_result(result: RunResult) -> None:
    s = result.summary or {}
    print(f"run {result.end.value} in {result.wall_s:.1f} s; network round {result.network_round}")
    if s:
        def fmt(v: Any) -> str:
            return f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"final honest accuracy: mean {fmt(s.get('final_mean_accuracy'))}, min {fmt(s.get('final_min_accuracy'))}; "
              f"attack rate {fmt(s.get('final_attack_rate'))}; weight to Sybils {fmt(s.get('final_weight_to_sybils'))}")
    if result.report_dir is not None:
        print(f"report: {result.report_dir / 'index.html'}")


def run_testnet(ns: argparse.Namespace) -> int:
    """Entry point for ``murmur testnet run``."""
    try:
        args = parse_args(getattr(ns, "scenario", None), getattr(ns, "args", None) or [])
        scenario = load_scenario(args.scenario)
    except ConfigError as exc:
        print(f"murmur: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or DEFAULT_OUT_ROOT / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = RunOptions(out=out, nodes_per_process=args.nodes_per_process, dashboard=not args.no_dashboard,
                         dashboard_port=args.dashboard_port)
    testnet = Testnet(scenario, options)
    import uvloop

    try:
        result = uvloop.run(testnet.run())
    except KeyboardInterrupt:
        # the supervisor stopped every process on the way out; say what is left behind
        print(f"\ninterrupted; every node stopped. Run dir: {testnet.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_result(result)
    return EXIT_CODES[result.end]


def main(argv: Sequence[str] | None = None) -> int:
    ns = argparse.Namespace(scenario=None, args=list(sys.argv[1:] if argv is None else argv))
    return run_testnet(ns)


if __name__ == "__main__":
    sys.exit(main())
