"""A node stopped while a round trains in its worker thread.

Cancelling the round task does not stop a thread: the training went on after
SIGTERM for as long as the round's local steps took (52 s for 60,000 digits
steps, measured on `murmur node start`), the process could not exit before,
and the final checkpoint was taken from a model the thread was still
changing. Now stop() interrupts the training at its next step and waits for
it, and the checkpoint holds the model of the round's start.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import torch

from murmur.node.daemon import Node
from murmur.node.state import StateDir
from tests.integration.cluster import node_config

LONG_ROUND_STEPS = 30_000  # tens of seconds of training on a loaded 2-core box
ENTER_S = 60.0  # start-up to the first training step, generous for a loaded box
STOP_S = 10.0  # checkpoint and stop, the interrupted step included


async def test_stop_interrupts_the_training_thread_and_checkpoints_the_rounds_start(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", overrides={
        "learning.enabled": True,
        "learning.trainer": "digits-mlp",
        "learning.device": "cpu",
        "learning.threads": 1,
        "learning.start_wait_s": 0.0,
        "learning.local_steps": LONG_ROUND_STEPS,
    })
    node = Node(config)
    await node.start()
    try:
        inner = node.learner.trainer.inner
        start_model = inner.get_flat().clone()  # the rounds task has not run yet: no await since it was spawned
        entered, returned = threading.Event(), threading.Event()
        train = inner.train

        def observed_train(steps: int | None = None):
            entered.set()
            try:
                return train(steps)
            finally:
                returned.set()

        inner.train = observed_train
        assert await asyncio.to_thread(entered.wait, ENTER_S), "the first round never began training"
    finally:
        began = time.monotonic()
        await node.stop()
        stop_s = time.monotonic() - began
    assert returned.is_set(), "stop() returned while the round was still training in its thread"
    assert stop_s < STOP_S
    bundle = StateDir(config.node.data_dir).load_checkpoint()
    assert bundle is not None and bundle.meta["round"] == 0
    np.testing.assert_array_equal(bundle.arrays["model"], start_model.numpy())
    assert torch.equal(inner.get_flat(), start_model)  # the interrupted round's steps were rewound
