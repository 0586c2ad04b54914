"""A user's trainer whose own code raises while the node runs (murmur/node/trainercalls.py).

Real ``murmur node start`` processes and a real trainer file in the test's
tmp dir. Before: an exception in the user's train step (here a ValueError
after the step had already made the weights NaN) crashed the rounds, the
daemon exited 1 (which the documented systemd unit restarts every 5 s for
ever) and the checkpoint written at stop held the broken model: all 99
parameters NaN. Now a failure that recurs stops the node with exit 3 (not
restarted by the unit) in one line naming the user's file and line, the
checkpoint holds the last good model, and a single failure is tried once
more and the node learns on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from murmur.node.state import StateDir
from tests.integration.cluster import wait_until
from tests.integration.daemons import DaemonPool

EXIT_TRAINER = 3
RUN_S = 90.0  # a torch import and a few rounds of 0.3 s on a shared 2-core box
MODULE = "failing_trainer"
TRAINER = '''
import os

import numpy as np
import torch
from torch import nn

from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchTrainer

FAIL_FROM = int(os.environ["FAIL_FROM"])  # the train step (counted from 1) that fails first
FAIL_TIMES = int(os.environ["FAIL_TIMES"])  # how many steps fail from there


class Failing(TorchTrainer):
    steps_run = 0

    def load_dataset(self):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, size=240)
        x = (rng.normal(size=(240, 2)) + 3.0 * np.eye(3, 2)[y]).astype(np.float32)
        return ArrayDataset(x[:200], y[:200], x[200:], y[200:], num_classes=3)

    def build_model(self, dataset):
        return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))

    def compute_gradients(self, batch):
        Failing.steps_run += 1
        loss = super().compute_gradients(batch)
        if FAIL_FROM <= Failing.steps_run < FAIL_FROM + FAIL_TIMES:
            torch.nn.utils.vector_to_parameters(torch.full((99,), float("nan")), self.model.parameters())
            raise ValueError(f"shape bug on batch {Failing.steps_run}")
        return loss
'''
FAILING_LINE = 1 + [line.strip() for line in TRAINER.splitlines()].index(
    'raise ValueError(f"shape bug on batch {Failing.steps_run}")')  # the user's line the error must name


def _daemon(pool: DaemonPool, tmp_path: Path, fail_from: int, fail_times: int):
    module = tmp_path / f"{MODULE}.py"
    module.write_text(TRAINER, encoding="utf-8")
    daemon = pool.add({
        "node": {"listen": ["/ip4/127.0.0.1/tcp/0"], "log_level": "info"},
        "api": {"port": 0},
        "learning": {"trainer": f"{MODULE}:Failing", "device": "cpu", "threads": 1, "start_wait_s": 0.1,
                     "round_deadline_s": 0.3, "local_steps": 5, "checkpoint_every_rounds": 1},
    })
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "FAIL_FROM": str(fail_from), "FAIL_TIMES": str(fail_times)}
    pool.spawn(daemon, env=env)
    return daemon, module


def _rounds(daemon) -> int:
    return len(daemon.state.metrics_path.read_text().splitlines()) if daemon.state.metrics_path.exists() else 0


async def test_a_trainer_that_keeps_raising_stops_the_node_with_exit_3_and_its_last_good_model(
        pool: DaemonPool, tmp_path: Path) -> None:
    daemon, module = _daemon(pool, tmp_path, fail_from=16, fail_times=1000)  # round 3 on: every step
    started = time.monotonic()
    await wait_until(lambda: daemon.proc.poll() is not None, RUN_S, "the daemon's exit")
    output = daemon.log[-1].read_text()
    assert daemon.proc.returncode == EXIT_TRAINER, output[-3000:]
    last = output.splitlines()[-1]
    assert last == (f"murmur: trainer '{MODULE}:Failing' raised in train() at round 3: ValueError: shape bug on "
                    f"batch 17 (at {module}:{FAILING_LINE} in compute_gradients); node stopped "
                    "(node.keep_serving_after_crash = true keeps it serving)"), last
    assert output.count("trying once more") == 1, output[-3000:]
    checkpoint = StateDir(daemon.data_dir).load_checkpoint()
    assert checkpoint.meta["round"] == 3
    for name, values in checkpoint.arrays.items():
        assert np.isfinite(values).all(), f"checkpoint {name}: {int(np.isnan(values).sum())} NaN"
    print(f"exit {daemon.proc.returncode} after {time.monotonic() - started:.1f}s; checkpoint finite")


async def test_a_single_failure_is_tried_once_more_and_the_node_learns_on(pool: DaemonPool, tmp_path: Path) -> None:
    daemon, module = _daemon(pool, tmp_path, fail_from=16, fail_times=1)
    await wait_until(lambda: _rounds(daemon) >= 6 or daemon.proc.poll() is not None, RUN_S, "six rounds")
    output = daemon.log[-1].read_text()
    assert daemon.proc.poll() is None, output[-3000:]
    [line] = [line for line in output.splitlines() if "trying once more" in line]
    assert (f"trainer '{MODULE}:Failing' raised in train() at round 3: ValueError: shape bug on batch 16 "
            f"(at {module}:{FAILING_LINE} in compute_gradients); trying once more") in line, line
    daemon.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: daemon.proc.poll() is not None, RUN_S, "the daemon's exit")
    assert daemon.proc.returncode == 0, daemon.log[-1].read_text()[-3000:]
    for name, values in StateDir(daemon.data_dir).load_checkpoint().arrays.items():
        assert np.isfinite(values).all(), name
