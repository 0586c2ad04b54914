"""``murmur testnet run [SCENARIO.toml] [--nodes-per-process K] [--out DIR] [--no-dashboard]``.

Called lazily by ``murmur.node.cli`` with the namespace its ``testnet run``
subparser parsed (options declared once, in :mod:`murmur.testnet.options`);
also runnable as ``python -m murmur.testnet.cli ...``. Exit codes: 0 the run
completed (or ran its time), 1 training stalled or no node could start, 2 bad
scenario or usage (also when every worker refused its config), 130
interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP). Errors
are one ``murmur: ...`` line on stderr.

Ctrl-C, SIGTERM and SIGHUP stop a run the same way (:func:`run_until_signalled`):
once its rounds began, the first ends it as if it were done (every node
stopped gracefully, the report of the rounds so far written, the emulated
internet removed); during start-up it cancels the run, which stops what it
started. A further signal while that goes on only says so. Without this a
SIGTERM (``kill``, ``timeout``, a CI job cancelled) killed the controller
outright, its nodes with it by SIGKILL and its network namespaces left
behind, and a second Ctrl-C broke off the cleanup half-way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from murmur.errors import ConfigError
from murmur.testnet.controller import RunEnd, RunOptions, RunResult, Testnet
from murmur.testnet.internet import InternetError
from murmur.testnet.options import DEFAULT_OUT_ROOT, add_run_arguments
from murmur.testnet.reporting import page
from murmur.testnet.scenario import Backend, Scenario, load_runnable_scenario
from murmur.units import fmt_bytes, fmt_number

EXIT_OK = 0
EXIT_STALLED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1
#: Ctrl-C, kill/timeout/CI cancel, the terminal closed: each ends the run as Ctrl-C does (a
#: SIGHUP killed it outright, leaving its 6 namespaces; nohup's ignored one stays ignored).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RAY_INSTALL = "pip install 'murmur[ray]'"
EXIT_CODES = {RunEnd.COMPLETED: EXIT_OK, RunEnd.TIME_UP: EXIT_OK, RunEnd.STALLED: EXIT_STALLED,
              RunEnd.INTERRUPTED: EXIT_INTERRUPTED, RunEnd.FAILED: EXIT_FAILED}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="murmur testnet run", description="run a local testnet scenario")
    add_run_arguments(p)
    return p


def print_result(result: RunResult) -> None:
    s = result.summary or {}
    print(f"run {result.end.value} in {result.wall_s:.1f} s; network round {result.network_round}")
    if s:
        metric = (s.get("metric") or {}).get("name", "accuracy")
        line = (f"final honest {metric}: mean {fmt_number(s.get('final_mean_metric'))}, "
                f"worst {fmt_number(s.get('final_worst_metric'))}; sent {fmt_bytes(s.get('bytes_sent_total'))}")
        if s.get("epsilon_budget") is not None:
            line += f"; ε {fmt_number(s.get('final_epsilon'), 2)} of {s['epsilon_budget']:g}"
        if s.get("attacker_nodes"):
            tactics = s.get("attacker_tactics") or []
            line += (f"; attack rate {fmt_number(s.get('final_attack_rate'))}"
                     + (f" ({'; '.join(tactics)})" if tactics else "")
                     + f"; weight to Sybils {fmt_number(s.get('run_weight_to_sybils'))} over the run, "
                     + f"{fmt_number(s.get('final_weight_to_sybils'))} at the end")
        print(line)
        if s.get("connections") and (s.get("scenario_config") or {}).get("network"):  # how they reached one another
            print(f"connections at the end: {page.mix_text(s['connections'])}; hole punches: "
                  f"{s.get('punch_successes', 0)} of {s.get('punch_attempts', 0)}")
    if result.report_dir is not None:
        print(f"report: {result.report_dir / 'index.html'}")


def with_cluster(scenario: Scenario, choice: tuple[str, str | None] | None) -> Scenario:
    """The scenario with ``--cluster BACKEND[=ADDRESS]`` (if given) in place of its ``[cluster]``
    backend and address; its placement and resources stay the scenario's."""
    if choice is None:
        return scenario
    backend, address = choice
    return dataclasses.replace(scenario, cluster=dataclasses.replace(
        scenario.cluster, backend=Backend(backend), address=address or scenario.cluster.address))


MAX_SAME_SECOND_RUNS = 100  # runs of one scenario started within one second that each get a run dir of their own


def new_run_dir(root: Path, name: str, stamp: str) -> Path | str:
    """A new, empty run directory ``root/<name>-<stamp>`` (``-2``, ``-3``...
    when taken), created here so that no other run can have it; or why none
    could be made. Two runs of one scenario started within the same second
    (two shells, a script) were given the same directory: the later one was
    refused as 'not empty' (exit 2), or, when both checked it before either
    wrote, both ran in it, each resuming the other's nodes."""
    base = root / f"{name}-{stamp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, MAX_SAME_SECOND_RUNS + 1):
            out = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                out.mkdir()
            except FileExistsError:
                continue
            return out
    except OSError as exc:
        return f"cannot create run directory {base}: {exc.strerror or exc}"
    return f"{MAX_SAME_SECOND_RUNS} run directories {base}* exist already; pick one with --out"


def unusable_run_dir(out: Path) -> str | None:
    """Why ``out`` cannot hold a new run, or None (it is then created). A
    run dir already used made the nodes resume from its checkpoints, and
    the old run's results were reported as the new one's."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"run directory {out} is not empty (a run there would resume its nodes); pick another --out"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create run directory {out}: {exc.strerror or exc}"
    return None


class RunStopped(Exception):
    """A stop signal ended the run (after it stopped every node): which one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


def stopped_line(signum: int, run_dir: Path) -> str:
    how = {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up"}.get(signal.Signals(signum), "terminated")
    return f"{how}; every node stopped. Run dir: {run_dir}"


async def run_until_signalled(run: Coroutine[Any, Any, RunResult],
                              stop: Callable[[], bool]) -> tuple[RunResult, int | None]:
    """Await ``run``, and the first stop signal (:data:`STOP_SIGNALS`) it
    gets, if any. That signal calls ``stop`` (the run then ends early, with its
    report); where ``stop`` declines (False: still starting) it cancels the
    run (which cleans up in its ``finally``) and turns into :class:`RunStopped`.
    Later signals leave the ending alone: it is bounded (the supervisor's
    grace, then SIGKILL), and cutting it short leaves namespaces behind. A
    signal this process was started ignoring (a shell's background job
    ignores SIGINT) stays ignored."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:
            if stop():
                print("\nstopping every node, then the report of the rounds so far", file=sys.stderr)
            else:
                task.cancel()
        elif len(received) == 1:
            print("\nstill stopping every node; a moment", file=sys.stderr)
        received.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    handled = [sig for sig, handler in previous.items() if handler is not signal.SIG_IGN]
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await run, (received[0] if received else None)
    except asyncio.CancelledError:
        if received:
            raise RunStopped(received[0]) from None
        raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
            if previous[sig] is not None:  # None: set outside Python; the loop left the default
                signal.signal(sig, previous[sig])


def ray_missing() -> bool:
    """Whether Ray cannot be imported (murmur[ray] not installed)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return True
    return False


def run_testnet(ns: argparse.Namespace) -> int:
    """Entry point for ``murmur testnet run``."""
    args = ns
    try:
        scenario = with_cluster(load_runnable_scenario(args.scenario), getattr(args, "cluster", None))
    except ConfigError as exc:
        print(f"murmur: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if scenario.cluster.backend is Backend.LOCAL and scenario.cluster.gpus_per_node:
        print('murmur: config error: [cluster] gpus_per_node needs backend = "ray" (or --cluster ray); '
              'on this machine alone, trainer.device = "cuda" puts every node on the GPU', file=sys.stderr)
        return EXIT_USAGE
    if scenario.cluster.backend is Backend.RAY and scenario.network is not None:
        print('murmur: config error: [network] (the emulated internet on this machine) and a Ray cluster run '
              'do not combine: run one or the other', file=sys.stderr)
        return EXIT_USAGE
    if scenario.cluster.backend is Backend.RAY and ray_missing():
        print(f"murmur: a Ray cluster run needs Ray: {RAY_INSTALL}", file=sys.stderr)
        return EXIT_USAGE
    if args.out is not None:
        out, problem = args.out, unusable_run_dir(args.out)
    else:
        made = new_run_dir(DEFAULT_OUT_ROOT, scenario.name, time.strftime("%Y%m%d-%H%M%S"))
        out, problem = (made, None) if isinstance(made, Path) else (DEFAULT_OUT_ROOT, made)
    if problem is not None:
        print(f"murmur: {problem}", file=sys.stderr)
        return EXIT_USAGE
    options = RunOptions(out=out, nodes_per_process=args.nodes_per_process, dashboard=not args.no_dashboard,
                         dashboard_port=args.dashboard_port, fork_server=not args.no_fork_server)
    testnet = Testnet(scenario, options)
    import uvloop

    try:
        result, signum = uvloop.run(run_until_signalled(testnet.run(), testnet.stop))
    except InternetError as exc:  # building the emulated internet failed (everything it made is gone)
        print(f"murmur: emulated internet: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:  # a cluster that cannot be joined or cannot hold the run, the dashboard's port taken
        print(f"murmur: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the run dir's disk full: every node is stopped
        print(f"murmur: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RunStopped as stopped:  # the run stopped every process on the way out; say what is left behind
        print(f"\n{stopped_line(stopped.signum, testnet.run_dir)}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # a Ctrl-C before the run began
        print(f"\ninterrupted; every node stopped. Run dir: {testnet.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_result(result)
    failure = result.failure
    if failure is not None:
        print(f"murmur: {failure.message} (worker {failure.proc}, log {failure.log})", file=sys.stderr)
        return EXIT_USAGE if failure.code == EXIT_USAGE else EXIT_FAILED
    if signum is not None:  # stopped early (or as it ended): every node stopped, the report written
        print(stopped_line(signum, testnet.run_dir), file=sys.stderr)
        return RunStopped(signum).exit_code
    return EXIT_CODES[result.end]


def main(argv: Sequence[str] | None = None) -> int:
    return run_testnet(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
