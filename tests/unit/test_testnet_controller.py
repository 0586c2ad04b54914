"""The testnet controller's run, stopped while it builds the emulated internet."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from murmur.testnet import internet
from murmur.testnet import controller
from murmur.testnet.scenario import Action, ChurnEvent, parse_scenario

NAT_SCENARIO = """
nodes = 3
[topology]
degree = 2
[duration]
rounds = 3
[network]
[[network.routers]]
nodes = [1, 2]
"""
STILL_BUILDING_S = 0.5  # how long the cancelled run is given to (wrongly) tear down a half-built internet
BUILD_BOUND_S = 10.0  # the fake build's own bound, should nobody release it


class _SlowInternet:
    """Stands in for internet.Internet: ``start`` blocks until released (as
    ~40 ip/nft commands take a while); records what happens in which order."""

    log: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def __init__(self, plan: internet.Plan, log_dir: Path | None = None) -> None:
        self.plan = plan

    def start(self) -> None:
        self.entered.set()
        self.release.wait(BUILD_BOUND_S)
        self.log.append("built")

    def close(self, *, quiet: bool = False) -> None:
        self.log.append("closed")
        self.release.set()  # unfixed: the build goes on after the teardown


def test_a_run_cancelled_while_building_its_internet_tears_it_down_after_the_build(tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C while the namespaces were being made had the cleanup remove
    those made so far while the build's thread went on: the 6 namespaces of
    a 4-node NAT run stayed behind."""
    monkeypatch.setattr(internet, "Internet", _SlowInternet)
    _SlowInternet.log, _SlowInternet.entered, _SlowInternet.release = [], threading.Event(), threading.Event()
    testnet = controller.Testnet(parse_scenario(NAT_SCENARIO), controller.RunOptions(out=tmp_path / "run", dashboard=False, progress=None))

    async def cancel_mid_build() -> None:
        run = asyncio.create_task(testnet.run())
        await asyncio.to_thread(_SlowInternet.entered.wait, BUILD_BOUND_S)
        run.cancel()
        done, _ = await asyncio.wait([run], timeout=STILL_BUILDING_S)
        assert not done, "the cancelled run ended while its internet was still being built"
        _SlowInternet.release.set()
        await asyncio.gather(run, return_exceptions=True)
        assert run.cancelled()

    asyncio.run(cancel_mid_build())
    assert _SlowInternet.log == ["built", "closed"]


class _BrokenInternet(_SlowInternet):
    def start(self) -> None:
        raise internet.InternetError("ip netns add: exit 1: Operation not permitted")


def test_the_control_sockets_folder_made_for_a_long_run_dir_is_removed_at_the_end(
        tmp_path: Path, monkeypatch) -> None:
    """A run dir whose path leaves no room for a socket name puts the control
    sockets in a folder of /tmp: every such run left its folder there (101
    murmur-ctl-* in /tmp after a day of test runs, pytest's paths being long)."""
    monkeypatch.setattr(internet, "Internet", _BrokenInternet)
    out = tmp_path / ("long-" * 12) / "run"
    testnet = controller.Testnet(parse_scenario(NAT_SCENARIO), controller.RunOptions(out=out, dashboard=False,
                                                                                      progress=None))
    testnet.prepare()
    (ctl_dir,) = {proc.ctl_dir for proc in testnet.procs.values()}
    assert ctl_dir.is_dir() and not ctl_dir.is_relative_to(out)
    with pytest.raises(internet.InternetError):
        asyncio.run(testnet.run())
    assert not ctl_dir.exists()


class _RecordingInternet:
    """Stands in for a running internet.Internet: records each impairment;
    node0's host has no delay line."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def set_loss(self, host: str, percent: float) -> None:
        self.calls.append(("loss", host, percent))

    def set_latency(self, host: str, ms: float) -> None:
        if host == "node0":
            raise internet.InternetError("host node0 has no delay line")
        self.calls.append(("latency", host, ms))


def test_latency_and_loss_steps_go_to_each_named_host_and_a_failure_is_recorded_as_skipped(tmp_path: Path) -> None:
    testnet = controller.Testnet(parse_scenario(NAT_SCENARIO),
                                 controller.RunOptions(out=tmp_path / "run", dashboard=False, progress=None))
    testnet.prepare()
    net = _RecordingInternet()
    testnet._internet = net  # type: ignore[assignment]

    def impair(action: Action, nodes: tuple[int, ...], **value: float) -> str | None:
        return asyncio.run(testnet._impair(ChurnEvent(action, at_round=1, nodes=nodes, **value)))

    assert impair(Action.LATENCY, (1, 2), ms=40.0) is None
    assert impair(Action.LOSS, (), percent=5.0) is None  # no nodes: every host
    assert impair(Action.LATENCY, (0,), ms=40.0) == "host node0 has no delay line"
    assert net.calls == [("latency", "node1", 40.0), ("latency", "node2", 40.0),
                         ("loss", "node0", 5.0), ("loss", "node1", 5.0), ("loss", "node2", 5.0)]
    testnet._internet = None  # loopback: nothing to apply it on
    assert impair(Action.LATENCY, (1,), ms=40.0) == "nodes share the loopback interface (no per-node netns)"
