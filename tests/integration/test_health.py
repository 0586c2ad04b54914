"""A node whose learner crashes is not "healthy" (issue 13, item 4).

The learner here is a real plug-in trainer (``module:Class`` in a file of the
test's tmp dir) whose ``train()`` returns a dict instead of ``TrainStats``.
Before, the ``rounds`` task died with a log line while ``/healthz`` kept
answering ``{"ok": true}`` and status showed round 0 and no error. Now:
``/healthz`` answers 503, status carries the error under ``health``, and the
daemon exits (3: the trainer failed, see murmur/node/trainercalls.py) unless
``node.keep_serving_after_crash``.

Tested on an in-process :class:`Node` (the cluster.py way) and on real
``murmur node start`` processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from murmur.errors import TaskCrashed, TrainerCrashed
from murmur.node.cli import EXIT_TRAINER
from murmur.node.daemon import Node
from murmur.node.render import render_status
from murmur.node.state import StateDir
from tests.integration.cluster import node_config, wait_until

PLUGIN_MODULE = "h13_bad_trainer"
PLUGIN = '''
from murmur.learning.trainers.digits import DigitsMLPTrainer


class BadTrainer(DigitsMLPTrainer):
    """Trains, then returns a dict where murmur expects TrainStats."""

    def train(self, steps=None):
        stats = super().train(steps)
        return {"loss": stats.loss, "steps": stats.steps}


class GrowingTrainer(DigitsMLPTrainer):
    """Trains, then its parameters change size: get_flat() no longer fits num_params()."""

    def train(self, steps=None):
        stats = super().train(steps)
        import torch

        self._params = [*self._params, torch.nn.Parameter(torch.zeros(1))]
        return stats
'''
EXPECTED_ERROR = "TrainerError: BadTrainer.train() returned dict, expected TrainStats"
CRASH_S = 20.0  # in-process: start, the neighbour wait, one training step; generous for a loaded 2-core box
STOP_S = 5.0  # a crashed node's graceful stop: checkpoint, goodbyes, API closed
PROCESS_START_S = 45.0  # a daemon's torch import, on a box other tests share
PROCESS_EXIT_S = PROCESS_START_S + CRASH_S  # from launch to exit code 1
MURMUR = [sys.executable, "-m", "murmur.node.cli"]
LEARNING = {
    "learning.enabled": True,
    "learning.trainer": f"{PLUGIN_MODULE}:BadTrainer",
    "learning.device": "cpu",
    "learning.threads": 1,
    "learning.round_deadline_s": 1.0,
}


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plug-in module, importable in this process (and by PYTHONPATH in children)."""
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / f"{PLUGIN_MODULE}.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    return directory


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        body = await resp.text()
        return resp.status, json.loads(body) if resp.content_type == "application/json" else body


async def _unhealthy(http: aiohttp.ClientSession, api: str) -> bool:
    status, _ = await _get(http, f"{api}/healthz")
    return status == 503


def _assert_rounds_crashed(health: dict[str, Any]) -> None:
    assert health["ok"] is False
    [failed] = health["failed_tasks"]
    assert (failed["task"], failed["state"], failed["error"], failed["errors"]) == ("rounds", "crashed", EXPECTED_ERROR, 1)
    assert failed["since"] > 0 and health["task_errors"] >= 1


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exported")


# -- in-process ------------------------------------------------------------------------


async def test_crashed_learner_fails_healthz_and_status_while_kept_serving(plugin_dir, tmp_path, http):
    config = node_config(tmp_path / "node", overrides={**LEARNING, "node.keep_serving_after_crash": True})
    stop = asyncio.Event()
    async with Node(config) as node:
        api = StateDir(config.node.data_dir).read_api_info().url
        serving = asyncio.create_task(node.serve_until(stop))
        await wait_until(lambda: _unhealthy(http, api), CRASH_S, "/healthz 503 after the rounds task crashed")

        status, health = await _get(http, f"{api}/healthz")
        assert status == 503
        _assert_rounds_crashed(health)
        status, body = await _get(http, f"{api}/status")
        assert status == 200
        _assert_rounds_crashed(body["health"])
        assert body["learning"]["round"] == 0  # what status showed before, now with the reason next to it
        # the rounds stopped, and say why: before, "state" stayed "training" for as long as the node served on
        assert (body["learning"]["state"], body["learning"]["done"]) == ("stopped", False)
        assert body["learning"]["stopped_reason"] == EXPECTED_ERROR.removeprefix("TrainerError: ")
        [rounds] = [line for line in render_status(body).splitlines() if line.startswith("rounds")]
        assert rounds.split(None, 1)[1] == f"0 of 100, STOPPED: {EXPECTED_ERROR.removeprefix('TrainerError: ')}"
        _, metrics = await _get(http, f"{api}/metrics")
        assert (_metric(metrics, "murmur_healthy"), _metric(metrics, "murmur_failed_tasks")) == (0.0, 1.0)

        # kept serving: the API answers and serve_until still runs, until asked to stop
        assert not serving.done()
        assert (await _get(http, f"{api}/peers"))[0] == 200
        stop.set()
        await asyncio.wait_for(serving, STOP_S)  # a requested stop is a normal return


async def test_crashed_learner_stops_the_node_with_task_crashed(plugin_dir, tmp_path):
    config = node_config(tmp_path / "node", overrides=LEARNING)
    assert config.node.keep_serving_after_crash is False  # the default
    stop = asyncio.Event()
    node = Node(config)
    with pytest.raises(TrainerCrashed) as crashed:  # a TaskCrashed the CLI exits 3 for
        async with node:
            await asyncio.wait_for(node.serve_until(stop), CRASH_S)
    assert str(crashed.value) == (
        f"{EXPECTED_ERROR.removeprefix('TrainerError: ')}; node stopped "
        "(node.keep_serving_after_crash = true keeps it serving)"
    )
    _assert_rounds_crashed(dict(node.health()))
    crash_at = node.tasks.crashes()[0].since
    assert time.time() - crash_at < STOP_S, "the node took too long to stop after the crash"
    # stopped for good: the state-dir lock is released, a node can start on it at once
    healthy = node_config(tmp_path / "node", overrides={"learning.enabled": False})
    async with Node(healthy) as again:
        assert again.health() == {"ok": True, "failed_tasks": [], "task_errors": 0}


async def test_a_periodic_task_failing_in_a_row_is_unhealthy_until_it_recovers(tmp_path, http):
    """Periodic tasks are not crashes (the next call runs on schedule), but one
    that keeps failing makes the node unhealthy, without stopping it."""
    config = node_config(tmp_path / "node", overrides={"learning.enabled": False})
    calls = 0
    broken = True

    async def probe() -> None:
        nonlocal calls
        calls += 1
        if broken:
            raise OSError("No space left on device")

    stop = asyncio.Event()
    async with Node(config) as node:
        api = StateDir(config.node.data_dir).read_api_info().url
        serving = asyncio.create_task(node.serve_until(stop))
        assert (await _get(http, f"{api}/healthz"))[0] == 200
        node.tasks.periodic("probe", 0.01, probe)
        await wait_until(lambda: _unhealthy(http, api), CRASH_S, "/healthz 503 while the probe keeps failing")
        _, health = await _get(http, f"{api}/healthz")
        [failed] = health["failed_tasks"]
        assert (failed["task"], failed["state"], failed["error"]) == ("probe", "failing", "OSError: No space left on device")
        assert failed["errors"] >= 3 and health["task_errors"] >= 3
        broken = False
        await wait_until(lambda: node.healthy(), CRASH_S, "healthy again after a good call")
        _, health = await _get(http, f"{api}/healthz")
        assert health["ok"] is True and health["failed_tasks"] == [] and health["task_errors"] >= 3
        assert not serving.done()  # a failing periodic task never stops the node
        stop.set()
        await asyncio.wait_for(serving, STOP_S)


# -- real processes --------------------------------------------------------------------


def _write_config(path: Path, data_dir: Path, keep_serving: bool) -> None:
    path.write_text(
        "\n".join([
            "[node]",
            f'data_dir = "{data_dir}"',
            'listen = ["/ip4/127.0.0.1/tcp/0"]',
            f"keep_serving_after_crash = {str(keep_serving).lower()}",
            "[api]",
            "port = 0",
            "[learning]",
            "enabled = true",
            f'trainer = "{PLUGIN_MODULE}:BadTrainer"',
            'device = "cpu"',
            "threads = 1",
            "round_deadline_s = 1.0",
        ]) + "\n",
        encoding="utf-8",
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


async def test_daemon_process_exits_3_or_keeps_serving_unhealthy(plugin_dir, tmp_path, http, procs):
    """Two ``murmur node start`` daemons with the same broken trainer, side by
    side: the default one exits 3 (a trainer's failure) with the reason; the one told to keep
    serving stays up with /healthz 503 and the error in ``murmur status``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    daemons = {}
    for name, keep in (("exits", False), ("serves", True)):
        config, data_dir, log = tmp_path / f"{name}.toml", tmp_path / name, tmp_path / f"{name}.log"
        _write_config(config, data_dir, keep)
        with open(log, "wb") as out:
            proc = subprocess.Popen([*MURMUR, "node", "start", "--config", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        daemons[name] = (proc, data_dir, log)
    started = time.monotonic()

    exits, _, exits_log = daemons["exits"]
    await wait_until(lambda: exits.poll() is not None, PROCESS_EXIT_S, "the crashed daemon's exit")
    output = exits_log.read_text()
    # a broken contract recurs every round: exit 3, which the systemd unit does not restart
    assert exits.returncode == EXIT_TRAINER, output[-3000:]
    assert f"murmur: {EXPECTED_ERROR.removeprefix('TrainerError: ')}; node stopped" in output, output[-3000:]
    print(f"crashed daemon exited {exits.returncode} after {time.monotonic() - started:.1f}s (bound {PROCESS_EXIT_S:.0f}s)")

    serves, serves_dir, serves_log = daemons["serves"]
    state = StateDir(serves_dir)

    def api_ready() -> bool:
        assert serves.poll() is None, serves_log.read_text()[-3000:]
        return state.api_path.exists()

    await wait_until(api_ready, PROCESS_START_S, "the keep-serving daemon's api.json")
    api = state.read_api_info().url
    await wait_until(lambda: _unhealthy(http, api), CRASH_S, "keep-serving daemon's /healthz 503")
    _assert_rounds_crashed((await _get(http, f"{api}/healthz"))[1])
    cli = subprocess.run([*MURMUR, "status", "--data-dir", str(serves_dir)], capture_output=True, timeout=30, check=False)
    assert cli.returncode == 0, cli.stderr.decode()[-2000:]
    _assert_rounds_crashed(json.loads(cli.stdout)["health"])
    human = subprocess.run([*MURMUR, "status", "--data-dir", str(serves_dir), "-o", "human"], capture_output=True,
                           timeout=30, check=False, text=True)
    [rounds] = [line for line in human.stdout.splitlines() if line.startswith("rounds")]
    assert "STOPPED: BadTrainer.train() returned dict" in rounds and "training" not in rounds, human.stdout
    assert serves.poll() is None, "the keep-serving daemon exited"

    serves.send_signal(signal.SIGTERM)  # an asked-for stop is still a clean exit
    await wait_until(lambda: serves.poll() is not None, STOP_S + 5, "SIGTERM exit")
    assert serves.returncode == 0, serves_log.read_text()[-3000:]


async def test_a_trainer_broken_for_good_is_reported_once_and_not_checkpointed_at_stop(plugin_dir, tmp_path, caplog):
    """A model whose parameters changed size crashes the rounds (one traceback,
    the user's to read). The stop that follows used to try the checkpoint with
    that trainer and log a second traceback ("learner did not stop cleanly")
    of the same error; now it keeps the last checkpoint and says so in one line."""
    caplog.set_level(logging.INFO, logger="murmur")
    config = node_config(tmp_path / "node", overrides={**LEARNING, "learning.trainer": f"{PLUGIN_MODULE}:GrowingTrainer"})
    node = Node(config)
    with pytest.raises(TaskCrashed, match=r"GrowingTrainer.get_flat\(\) returned"):
        async with node:
            await asyncio.wait_for(node.serve_until(asyncio.Event()), CRASH_S)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in tracebacks] == ["task crashed"], [r.getMessage() for r in tracebacks]
    [skipped] = [r for r in caplog.records if getattr(r, "event", None) == "checkpoint_skipped"]
    assert skipped.levelno == logging.WARNING and "GrowingTrainer.get_flat() returned" in skipped.error
