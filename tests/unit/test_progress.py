"""A restarted node's status and gauges before its first round back: the
last recorded metrics row stands in, perplexity included (a language model
has no accuracy to show). And "done" means the last round is recorded, not
only aggregated: a testnet stops its nodes on it, and stopping one while it
evaluates its last round lost that round's row from the report."""

from __future__ import annotations

from murmur.node.metrics import NodeMetrics, Split
from murmur.node.config import LearningSection, PrivacySection
from murmur.node.progress import Progress, progress, resumed_eval

ROW = {"round": 7, "accuracy": float("nan"), "loss": 4.0, "metric": "perplexity", "perplexity": 54.6}


def test_resumed_status_carries_the_last_perplexity() -> None:
    filled = resumed_eval({"accuracy": None}, ROW)
    assert filled["perplexity"] == 54.6 and filled["loss"] == 4.0 and filled["evaluated_round"] == 7
    assert resumed_eval({"accuracy": 0.5}, ROW) == {}  # evaluated since the restart: its own numbers stand


def test_resumed_gauges_export_perplexity_and_no_nan() -> None:
    metrics = NodeMetrics()
    metrics.resume(ROW)
    test = Split.TEST.value
    assert metrics.value("murmur_perplexity", split=test) == 54.6
    assert metrics.value("murmur_loss", split=test) == 4.0
    assert metrics.value("murmur_accuracy", split=test) is None  # NaN measured nothing: not exported
    assert metrics.value("murmur_round") == 8


def test_done_waits_for_the_last_round_to_be_recorded() -> None:
    cfg, privacy = LearningSection(rounds=10, mixing_rounds=2), PrivacySection()
    aggregated = progress({"round": 12, "finished": False}, cfg, privacy)
    assert not aggregated["done"] and aggregated["state"] == Progress.MIXING  # its last round was a mixing one
    recorded = progress({"round": 12, "finished": True}, cfg, privacy)
    assert recorded["done"] and recorded["state"] == Progress.DONE
    no_mixing = progress({"round": 10, "finished": False}, LearningSection(rounds=10), privacy)
    assert not no_mixing["done"] and no_mixing["state"] == Progress.TRAINING
    assert progress({"round": 5, "finished": False}, cfg, privacy)["state"] == Progress.TRAINING
    # a node that ran every round and spent its whole ε on them is done, not stopped short
    assert progress({"round": 12, "finished": True, "budget_exhausted": True}, cfg, privacy)["done"]
    assert progress({"round": 5, "finished": True, "budget_exhausted": True}, cfg, privacy)["state"] == Progress.BUDGET_SPENT
    # the noise is calibrated for exactly the training rounds: in the mixing rounds after them the
    # budget is spent as planned, and the node is mixing (it said budget_spent there)
    assert progress({"round": 11, "finished": False, "budget_exhausted": True}, cfg, privacy)["state"] == Progress.MIXING
