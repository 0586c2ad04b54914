"""A node that caught up has the adopted round on disk before it runs another.

A catch-up jumps many rounds at once, but the checkpoint came only after the
next round ran. Killed before that (real daemons, fashion-resnet, rounds of
~5 s, ``checkpoint_every_rounds = 1``), a node restarted 7-9 rounds behind
the round it had reached, ran them again (spending ε again with privacy on)
and caught up again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.node.state import StateDir
from tests.integration.cluster import node_config, wait_until

LEAD_ROUNDS = 6  # how far the first node runs alone: more than CATCH_UP_GAP
RUN_S = 60.0  # a few short rounds alone, then the catch-up, on a loaded 2-core box
LEARNING = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.device": "cpu",
    "learning.threads": 1,
    "learning.num_nodes": 2,
    "learning.start_wait_s": 0.0,
    "learning.checkpoint_every_rounds": 1,
    "learning.checkpoint_every_s": 0.0,
}


class _CheckpointAtCatchUp(logging.Handler):
    """Reads the checkpoint's round when the node logs that it caught up."""

    def __init__(self, state: StateDir) -> None:
        super().__init__()
        self.state = state
        self.seen: list[tuple[int, int | None]] = []  # (round caught up to, checkpoint round then)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "catch_up":
            bundle = self.state.load_checkpoint()
            self.seen.append((record.round, None if bundle is None else bundle.meta["round"]))  # type: ignore[attr-defined]


async def test_a_catch_up_is_checkpointed_before_the_next_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="murmur.node.learner")  # the "caught up" line is INFO
    ahead_cfg = node_config(tmp_path / "ahead", overrides={**LEARNING, "learning.round_deadline_s": 0.2})
    async with Node(ahead_cfg) as ahead:
        await wait_until(lambda: ahead.learner.round >= LEAD_ROUNDS, RUN_S, "the first node's rounds alone")
        late_cfg = node_config(tmp_path / "late", bootstrap=(ahead.addrs[0],),
                               overrides={**LEARNING, "learning.round_deadline_s": 2.0})
        watch = _CheckpointAtCatchUp(StateDir(late_cfg.node.data_dir))
        logger = logging.getLogger("murmur.node.learner")
        logger.addHandler(watch)
        try:
            async with Node(late_cfg) as late:
                await wait_until(lambda: bool(watch.seen), RUN_S, "the late node's catch-up")
        finally:
            logger.removeHandler(watch)
    caught_up_to, on_disk = watch.seen[0]
    assert caught_up_to > LEAD_ROUNDS // 2
    assert on_disk == caught_up_to, watch.seen
    assert late.learner.catch_ups >= 1
