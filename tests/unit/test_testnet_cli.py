"""`murmur testnet run`'s checks of its own arguments, before anything starts."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from murmur.testnet import cli as testnet_cli
from murmur.testnet.controller import RunEnd, RunResult
from murmur.testnet.options import port
from murmur.testnet.scenario import load_scenario


@pytest.fixture(autouse=True)
def _python_sigint():
    """Python's own Ctrl-C handler, whatever pytest inherited: a suite run in
    the background (``scripts/test &``) starts with SIGINT ignored, and the
    signal tests below then failed (their Ctrl-C never arrived, and the
    handler restored after a run was SIG_IGN)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_used_run_dir_is_refused_and_an_empty_or_new_one_taken(tmp_path):
    """A run into an earlier run's directory resumed its nodes from their
    checkpoints and reported the old run's results as new."""
    used = tmp_path / "used"
    (used / "nodes").mkdir(parents=True)
    assert "is not empty" in testnet_cli.unusable_run_dir(used)
    (tmp_path / "empty").mkdir()
    assert testnet_cli.unusable_run_dir(tmp_path / "empty") is None
    assert testnet_cli.unusable_run_dir(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
    (tmp_path / "afile").write_text("x")
    assert "is not empty" in testnet_cli.unusable_run_dir(tmp_path / "afile")
    assert testnet_cli.unusable_run_dir(tmp_path / "afile" / "run") == (
        f"cannot create run directory {tmp_path / 'afile' / 'run'}: Not a directory")


def test_a_used_run_dir_stops_the_command_with_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    parser = argparse.ArgumentParser()
    testnet_cli.add_run_arguments(parser)
    assert testnet_cli.run_testnet(parser.parse_args(["--out", str(tmp_path), "--no-dashboard"])) == 2
    assert capsys.readouterr().err == (f"murmur: run directory {tmp_path} is not empty (a run there would resume "
                                       "its nodes); pick another --out\n")


@pytest.mark.parametrize("text", ["-1", "70000"])
def test_the_dashboard_port_is_a_port(text):
    """70000 was taken modulo 65536; -1 raised deep in asyncio."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \[0, 65535\]"):
        port(text)
    assert port("0") == 0 and port("65535") == 65535


class _StopsSlowly:
    """A Testnet whose run lasts until cancelled, then cleans up (as the real
    one stops its nodes and removes its namespaces) while a second signal
    arrives; records how far the cleanup got."""

    RUN_S = 10.0  # far beyond the signal's delivery: a run that ends on its own was never cancelled
    CLEANUP_STEPS = 20  # loop iterations the cleanup spans; the second signal lands in the first

    def __init__(self, first: int, second: int, log: list[str]) -> None:
        self.first, self.second, self.log = first, second, log

    def __call__(self, scenario, options):  # stands in for the Testnet class
        self.run_dir = options.out
        return self

    def stop(self) -> bool:
        return False  # still starting: nothing to report, the run is cancelled

    async def run(self):
        try:
            os.kill(os.getpid(), self.first)
            await asyncio.sleep(self.RUN_S)
            self.log.append("ran to the end")
        finally:
            os.kill(os.getpid(), self.second)
            for _ in range(self.CLEANUP_STEPS):
                await asyncio.sleep(0.01)  # the cleanup's own work, not a synchronisation
            self.log.append("cleaned up")
        raise AssertionError("a run that was never stopped")


@pytest.mark.parametrize(("first", "second", "code", "word"), [
    (signal.SIGTERM, signal.SIGTERM, 143, "terminated"),
    (signal.SIGINT, signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, signal.SIGINT, 143, "terminated"),
])
def test_a_stop_signal_stops_the_run_and_a_second_does_not_cut_its_cleanup_short(
        tmp_path, monkeypatch, capsys, first, second, code, word):
    """SIGTERM killed the controller outright (exit -15, its nodes SIGKILLed,
    its network namespaces left behind); a second Ctrl-C raised
    KeyboardInterrupt in the middle of the cleanup, before the emulated
    internet was removed (6 namespaces left of a 4-node NAT run)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('nodes = 3\n[topology]\ndegree = 2\n[duration]\nrounds = 3\n', encoding="utf-8")
    log: list[str] = []
    monkeypatch.setattr(testnet_cli, "Testnet", _StopsSlowly(first, second, log))
    monkeypatch.setattr(testnet_cli, "load_runnable_scenario", load_scenario)
    caught: list[int] = []
    # unfixed, a SIGTERM would end pytest; SIGINT keeps Python's KeyboardInterrupt
    before = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        parser = argparse.ArgumentParser()
        testnet_cli.add_run_arguments(parser)
        ns = parser.parse_args([str(scenario), "--out", str(tmp_path / "run"), "--no-dashboard"])
        assert testnet_cli.run_testnet(ns) == code
        # the handlers from before the run are back
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert log == ["cleaned up"] and not caught
    err = capsys.readouterr().err
    assert f"{word}; every node stopped. Run dir: {tmp_path / 'run'}" in err
    assert "still stopping every node" in err


class _EndsWithAReport:
    """Stands in for a Testnet whose rounds began: the first signal asks it
    to stop (its loop then ends the run, stops the nodes and writes the
    report); a second one arrives while it does so."""

    def __init__(self, first: int, second: int) -> None:
        self.first, self.second = first, second
        self.asked = asyncio.Event()

    def __call__(self, scenario, options):
        self.run_dir = options.out
        return self

    def stop(self) -> bool:
        self.asked.set()
        return True

    async def run(self) -> RunResult:
        os.kill(os.getpid(), self.first)
        await asyncio.wait_for(self.asked.wait(), _StopsSlowly.RUN_S)
        os.kill(os.getpid(), self.second)
        for _ in range(_StopsSlowly.CLEANUP_STEPS):
            await asyncio.sleep(0.01)  # the nodes' stop and the report: work, not a synchronisation
        report = self.run_dir / "report"
        report.mkdir()
        return RunResult(self.run_dir, report, RunEnd.INTERRUPTED, 1.0, 5, [], None, None)


@pytest.mark.parametrize(("first", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGHUP, 129, "hung up")])
def test_a_signal_after_the_rounds_began_ends_the_run_with_its_report(tmp_path, monkeypatch, capsys, first, code, word):
    """A Ctrl-C after many rounds left no report of them, only the run dir."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('nodes = 3\n[topology]\ndegree = 2\n[duration]\nrounds = 3\n', encoding="utf-8")
    monkeypatch.setattr(testnet_cli, "Testnet", _EndsWithAReport(first, signal.SIGINT))
    monkeypatch.setattr(testnet_cli, "load_runnable_scenario", load_scenario)
    caught: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
              for sig in (signal.SIGTERM, signal.SIGHUP)}  # unfixed, either would end pytest
    try:
        parser = argparse.ArgumentParser()
        testnet_cli.add_run_arguments(parser)
        ns = parser.parse_args([str(scenario), "--out", str(tmp_path / "run"), "--no-dashboard"])
        assert testnet_cli.run_testnet(ns) == code
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert not caught
    out, err = capsys.readouterr()
    assert "run interrupted in 1.0 s; network round 5" in out
    assert f"report: {tmp_path / 'run' / 'report' / 'index.html'}" in out
    assert "stopping every node, then the report of the rounds so far" in err
    assert "still stopping every node" in err
    assert f"{word}; every node stopped. Run dir: {tmp_path / 'run'}" in err


class _WritesItsRunDir:
    """Stands in for Testnet: writes into its run dir as a real run does first (its configs)."""

    def __init__(self, outs: list[Path]) -> None:
        self.outs = outs

    def __call__(self, scenario, options):
        self.run_dir = options.out
        return self

    def stop(self) -> bool:
        return False

    async def run(self) -> RunResult:
        assert not any(self.run_dir.iterdir()), "a run dir with another run's files in it"
        (self.run_dir / "configs").mkdir()
        self.outs.append(self.run_dir)
        return RunResult(self.run_dir, None, RunEnd.COMPLETED, 0.0, 3, [], None, None)


def test_runs_of_one_scenario_started_in_the_same_second_get_run_dirs_of_their_own(tmp_path, monkeypatch):
    """Without --out, two runs of a scenario started within one second (two
    shells) were given the same reports/testnet/<name>-<time>: the second
    was refused as 'not empty' (exit 2), or both ran in it."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "twice"\nnodes = 3\n[topology]\ndegree = 2\n[duration]\nrounds = 3\n', encoding="utf-8")
    outs: list[Path] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(testnet_cli, "Testnet", _WritesItsRunDir(outs))
    monkeypatch.setattr(testnet_cli, "load_runnable_scenario", load_scenario)
    monkeypatch.setattr(testnet_cli.time, "strftime", lambda fmt: "20260102-030405")  # one second for all
    parser = argparse.ArgumentParser()
    testnet_cli.add_run_arguments(parser)
    for _ in range(3):
        assert testnet_cli.run_testnet(parser.parse_args([str(scenario), "--no-dashboard"])) == 0
    root = Path("reports") / "testnet"
    assert outs == [root / "twice-20260102-030405", root / "twice-20260102-030405-2", root / "twice-20260102-030405-3"]


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "reports").write_text("a file where the runs' folder goes")
    assert testnet_cli.new_run_dir(tmp_path / "reports" / "testnet", "x", "1") == (
        f"cannot create run directory {tmp_path / 'reports' / 'testnet' / 'x-1'}: Not a directory")


def test_a_taken_dashboard_port_is_one_line_and_leaves_the_run_dir_empty(tmp_path, monkeypatch, capsys):
    """It wrote the run's configs and identities first, then failed with
    asyncio's '[Errno 98] error while attempting to bind on address ...'
    (exit 1); the same command with another port was refused: 'run
    directory ... is not empty'."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('nodes = 3\n[topology]\ndegree = 2\n[duration]\nrounds = 3\n', encoding="utf-8")
    monkeypatch.setattr(testnet_cli, "load_runnable_scenario", load_scenario)
    out = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        parser = argparse.ArgumentParser()
        testnet_cli.add_run_arguments(parser)
        assert testnet_cli.run_testnet(parser.parse_args([str(scenario), "--out", str(out),
                                                          "--dashboard-port", str(port)])) == 2
    assert capsys.readouterr().err == (f"murmur: dashboard port {port} on 127.0.0.1: Address already in use; pick "
                                       "another with --dashboard-port (0: any free one)\n")
    assert not any(out.iterdir())  # the same command with a free port may run there
