"""A testnet bounded by seconds, whose nodes' privacy budget runs out long
before the time is up, ends when they are done, not at the time.

Its nodes run ``learning.rounds`` of a million (the controller stops them at
T); with ``privacy.rounds`` far below, a spent node used to mix until T,
rounds in which nothing honest trains back what Sybils push (a testnet's
attack rate rose from 0.02-0.18 to 0.85-0.90 over them). A spent node now
stops after SPENT_MIXING_ROUNDS, and the run ends once every honest node did.
Real worker processes, real sockets, real torch.
"""

from __future__ import annotations

from pathlib import Path

from murmur.node.learner import SPENT_MIXING_ROUNDS
from murmur.testnet.controller import RunEnd, RunOptions, read_metrics
from murmur.testnet.controller import Testnet as Run  # not a pytest class
from murmur.testnet.scenario import parse_scenario

SECONDS = 240.0  # far more than 3 + 10 rounds take, even on a loaded 2-core box
BUDGET_ROUNDS = 3

SCENARIO = f"""
name = "spent"
nodes = 3
nodes_per_process = 3
seed = 5

[topology]
degree = 2

[duration]
seconds = {SECONDS}
round_deadline_s = 2.0

[trainer]
spec = "digits-mlp"
local_steps = 1
options = {{ lr = 0.5, batch_size = 32, momentum = 0.0, dp_clip = 1.0 }}

[aggregator]
name = "sybilwall"

[privacy]
enabled = true
scheme = "decor"
level = "example"
epsilon = 10.0
rounds = {BUDGET_ROUNDS}
"""


async def test_a_run_bounded_by_seconds_ends_when_every_spent_node_stopped(tmp_path: Path) -> None:
    testnet = Run(parse_scenario(SCENARIO, "spent.toml"), RunOptions(out=tmp_path / "run", dashboard=False,
                                                                       progress=None))
    result = await testnet.run()
    assert result.end is RunEnd.COMPLETED, (result.end, result.wall_s)
    assert result.wall_s < SECONDS
    for i in range(3):
        rows = read_metrics(tmp_path / "run" / "nodes" / f"node{i}")
        assert [r["round"] for r in rows] == list(range(BUDGET_ROUNDS + SPENT_MIXING_ROUNDS)), rows
