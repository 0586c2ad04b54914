"""A restarted node's status and gauges before its first round back: the
last recorded metrics row stands in, perplexity included (a language model
has no accuracy to show)."""

from __future__ import annotations

from murmur.node.metrics import NodeMetrics, Split
from murmur.node.progress import resumed_eval

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
