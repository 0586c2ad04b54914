"""A node restarted with another model than its checkpoint's keeps that
checkpoint aside instead of writing over it (murmur/node/checkpoints.py).

A user iterating on their model (here digits-mlp's ``hidden`` 64 -> 16, as a
user changes their own trainer) restarts the node on the same state dir. It
used to log "checkpoint does not match this trainer; starting fresh" and
write the new model over ``checkpoint.bin`` and then ``checkpoint.bin.prev``:
by the stop, the trained model was gone from the disk. Real daemons.
"""

from __future__ import annotations

import signal

import numpy as np

from murmur.node.state import read_array_file
from tests.integration.cluster import wait_until
from tests.integration.daemons import DaemonPool

RUN_S = 60.0  # a torch import and a few short rounds on a shared 2-core box
ROUNDS = 3
DIGITS_PARAMS = {64: 64 * 64 + 64 + 64 * 10 + 10, 16: 64 * 16 + 16 + 16 * 10 + 10}


def _rows(daemon) -> int:
    path = daemon.state.metrics_path
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _run_and_stop(pool: DaemonPool, daemon, rows: int, *args: str) -> str:
    pool.spawn(daemon, *args)
    await wait_until(lambda: _rows(daemon) >= rows or daemon.proc.poll() is not None, RUN_S, f"{rows} rounds")
    assert daemon.proc.poll() is None, daemon.log[-1].read_text()[-3000:]
    daemon.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: daemon.proc.poll() is not None, RUN_S, "the daemon's exit")
    assert daemon.proc.returncode == 0, daemon.log[-1].read_text()[-3000:]
    return daemon.log[-1].read_text()


async def test_a_checkpoint_of_another_model_is_set_aside_not_overwritten(pool: DaemonPool) -> None:
    daemon = pool.add({
        "node": {"listen": ["/ip4/127.0.0.1/tcp/0"], "log_level": "info"},
        "api": {"port": 0},
        "learning": {"trainer": "digits-mlp", "device": "cpu", "threads": 1, "start_wait_s": 0.1,
                     "round_deadline_s": 0.2, "rounds": 0, "checkpoint_every_rounds": 1},
    })
    await _run_and_stop(pool, daemon, ROUNDS)
    trained = read_array_file(daemon.state.checkpoint_path)
    assert trained is not None and trained.arrays["model"].size == DIGITS_PARAMS[64]

    # the same node, its model changed: two checkpoints or more of the new one
    output = await _run_and_stop(pool, daemon, 2 * ROUNDS + 3, "--set", "learning.trainer_options.hidden=16")
    label = f"{DIGITS_PARAMS[64]}-params-round-{trained.meta['round']}"
    aside = daemon.state.path / f"checkpoint-{label}.bin"
    assert f"moved it to {aside.name} and starting fresh" in output, output[-3000:]
    kept = read_array_file(aside)
    assert kept is not None, sorted(p.name for p in daemon.state.path.iterdir())
    assert np.array_equal(kept.arrays["model"], trained.arrays["model"])  # the trained model, as it was
    fresh = read_array_file(daemon.state.checkpoint_path)
    assert fresh is not None and fresh.arrays["model"].size == DIGITS_PARAMS[16]
