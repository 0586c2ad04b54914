"""What a restarted node exports as ε spent, before its first round back.

The privacy ledger is written before a round's message leaves, the metrics
row after the round: a node killed (or stopped) in between, which is most of
a round (the wait for the neighbours), has one round more in its ledger than
in its last row. At start /metrics took ε from that row: less than the
ledger's, until a round back replaced it, and for good where none came (the
rounds done, the budget spent). The ledger is what was spent.
"""

from __future__ import annotations

import json
from pathlib import Path

from murmur.learning.privacy.accountant import Spent, ledger_epsilon
from murmur.node.daemon import Node
from murmur.node.state import StateDir
from tests.integration.cluster import node_config

PRIOR = Spent(rdp_coef=0.6, sampling_rate=None, steps=300)  # what the earlier runs spent
ROW_EPSILON = 1.0  # what the last metrics row, a round behind, said


async def test_the_exported_epsilon_after_a_restart_is_the_ledgers(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", overrides={
        "learning.enabled": True,
        "learning.trainer": "digits-mlp",
        "learning.device": "cpu",
        "learning.threads": 1,
        "privacy.enabled": True,
        "privacy.scheme": "ldp",
        "privacy.epsilon": 1000.0,
        "privacy.rounds": 1000,
    })
    state = StateDir(config.node.data_dir).create()
    state.save_privacy_ledger([PRIOR.to_json()])
    state.append_metrics({"round": 299, "epsilon": ROW_EPSILON, "accuracy": 0.5, "loss": 1.0})
    spent = ledger_epsilon([PRIOR], config.privacy.delta)
    assert spent > ROW_EPSILON
    async with Node(config) as node:
        # no round has run yet: the rounds task was spawned, not scheduled
        assert node.learner.status()["epsilon"] == spent
        assert node.metrics.value("murmur_privacy_epsilon_spent") == spent
    assert json.loads(state.privacy_path.read_text())["ledger"][0][2] >= PRIOR.steps
