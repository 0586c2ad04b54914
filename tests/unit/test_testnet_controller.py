"""The testnet controller's run, stopped while it builds the emulated internet."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from murmur.testnet import internet
from murmur.testnet import controller
from murmur.testnet.scenario import parse_scenario

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

    def __init__(self, plan: internet.Plan) -> None:
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
