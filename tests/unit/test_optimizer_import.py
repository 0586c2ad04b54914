"""A ``TorchTrainer`` builds its optimizer on first use.

Why: any ``torch.optim`` optimizer imports ``torch._dynamo`` when it is built
(1.9-2.3 s of CPU on a 2-core box), and ``murmur config check``, which
builds the trainer only to check that it fits its data, paid that for an
optimizer it never used: 3.4-4.8 s for the default digits-mlp, 2.5-3.5 s without.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from murmur.learning.trainers.base import TrainerContext
from murmur.learning.trainers.digits import DigitsMLPTrainer

TIMEOUT_S = 120.0
DYNAMO = "torch._dynamo"  # what torch.optim imports (trainers.base.OPTIMIZER_SUPPORT)


PROBE = """
import json, sys
from murmur.node.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def test_config_check_builds_the_default_trainer_without_importing_dynamo(tmp_path: Path) -> None:
    """``murmur config check`` as the CLI runs it, in a fresh interpreter (this
    one imported torch._dynamo long ago), asked which modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "config", "check",
         "--data-dir", str(tmp_path / "state"), "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path,
    )
    report = json.loads(proc.stderr.splitlines()[-1])
    assert report["rc"] == 0, proc.stderr[-2000:]
    assert "murmur.learning.trainers.digits" in report["modules"]  # it did build the default trainer
    assert DYNAMO not in report["modules"]


NODE_PROBE = """
import os, signal, sys, threading, time

class Watch:  # a meta path finder that finds nothing: it only notes the first import of one module
    seen = threading.Event()
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            Watch.seen.set()
        return None

sys.meta_path.insert(0, Watch())
from murmur.node.cli import main

def stop_when_seen():
    print("imported" if Watch.seen.wait(float(sys.argv[2])) else "not imported", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop_when_seen, daemon=True).start()
sys.exit(main(sys.argv[3:]))
"""
START_WAIT_S = 120.0  # no train step before this: the node waits for neighbours that never come
SEEN_WITHIN_S = 60.0  # start-up and the import on a loaded 2-core box take 4-8 s


def test_node_start_imports_dynamo_while_it_waits_for_its_first_neighbours(tmp_path: Path) -> None:
    """Built on first use, the optimizer would import it in round 0's first
    step (1.4-2.3 s more train_s); the node imports it ahead, in a thread,
    during its wait for neighbours (learning.start_wait_s): here a long
    wait, so it must be seen before any step could run."""
    proc = subprocess.run(
        [sys.executable, "-c", NODE_PROBE, DYNAMO, str(SEEN_WITHIN_S), "node", "start",
         "--data-dir", str(tmp_path / "state"), "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0",
         "--set", "learning.node_index=0", "--set", f"learning.start_wait_s={START_WAIT_S}"],
        capture_output=True, text=True, timeout=SEEN_WITHIN_S + 30.0, cwd=tmp_path,
    )
    assert "node started" in proc.stderr, proc.stderr[-2000:]
    assert "round done" not in proc.stderr
    assert "\nimported\n" in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]


def _ctx(momentum: float) -> TrainerContext:
    return TrainerContext(node_index=1, num_nodes=4, seed=3, options={"momentum": momentum, "lr": 0.1})


def test_optimizer_built_at_the_first_step_trains_as_one_built_with_the_trainer() -> None:
    eager, lazy = DigitsMLPTrainer(_ctx(0.9)), DigitsMLPTrainer(_ctx(0.9))
    assert isinstance(eager.optimizer, torch.optim.SGD)  # built now, before any step
    lazy.train(3)
    eager.train(3)
    assert torch.equal(lazy.get_flat(), eager.get_flat())


def test_an_optimizer_the_subclass_assigns_is_the_one_that_steps() -> None:
    trainer = DigitsMLPTrainer(_ctx(0.0))
    before = trainer.get_flat()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    trainer.train(2)
    assert torch.equal(trainer.get_flat(), before)  # lr 0: its step moved nothing
