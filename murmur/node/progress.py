"""How far a node's learning is, in the words an operator uses.

``GET /status`` carries the learner's own snapshot (round, accuracy, ε);
what it could not say is *where that round stands*: how many rounds the node
will run, whether it is done, and its privacy budget next to the ε spent.
:func:`progress` adds exactly that from the node's config, so the learner
keeps one job; and that its rounds *stopped*: with
``node.keep_serving_after_crash`` a node whose rounds task crashed (its
trainer raised twice) serves on, and its status said ``training`` for ever
next to an UNHEALTHY health line. A restarted node has not evaluated its restored model yet:
:func:`resumed_eval` fills its last accuracy and loss in from the node's own
``metrics.jsonl`` until its first round back does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

from murmur.node.config import LearningMode, LearningSection, PrivacySection


class Progress(enum.StrEnum):
    TRAINING = "training"  # rounds that train (and, with privacy, spend ε)
    MIXING = "mixing"  # learning.mixing_rounds: only averaging public models
    DONE = "done"  # every round ran; the node serves on (relays, answers model requests)
    STOPPED = "stopped"  # the rounds task crashed (stopped_reason says why); kept serving, the node learns no more
    BUDGET_SPENT = "budget_spent"  # privacy budget spent before the training rounds ended: the rest only mix
    #                                (learning.rounds = 0: the node stopped sending)


ROUNDS_TASK = "rounds"
"""The supervised task that runs the learner's rounds (``murmur.node.tasks``)."""


def target_rounds(cfg: LearningSection) -> int | None:
    """The rounds this node runs in all; None when it trains until stopped."""
    if cfg.until_stopped:
        return None
    return cfg.rounds + (cfg.mixing_rounds if cfg.mode is LearningMode.DSGD else 0)


def progress(learning: Mapping[str, Any], cfg: LearningSection, privacy: PrivacySection,
             stopped: str | None = None) -> dict[str, Any]:
    """What to add to the learner's status: ``target_rounds``, ``state``
    (:class:`Progress`), ``done``, ``stopped_reason`` (``stopped``: why the
    rounds task ended early, None while it runs or ended normally),
    ``epsilon_spent`` and ``epsilon_budget`` (the ε at which the node stops
    contributing; None without privacy)."""
    round_ = learning.get("round")
    target = target_rounds(cfg)
    if stopped is not None:
        state = Progress.STOPPED  # whatever round it reached: no more will run
    elif target is not None and isinstance(round_, int) and round_ >= target and learning.get("finished", True):
        state = Progress.DONE  # the last round recorded too (its row on disk), not only aggregated; whatever ε is left
    elif isinstance(round_, int) and not cfg.trains_in(min(round_, target - 1) if target else round_):
        # (the last round, aggregated and not yet recorded, is still the phase it was)
        state = Progress.MIXING  # also when the budget is spent: noise calibrated for exactly the training rounds
    elif learning.get("budget_exhausted"):
        state = Progress.BUDGET_SPENT
    else:
        state = Progress.TRAINING
    spent = learning.get("epsilon")
    return {
        "target_rounds": target,
        "state": state.value,
        "done": state is Progress.DONE,
        "stopped_reason": stopped,
        "epsilon_spent": spent if isinstance(spent, (int, float)) and math.isfinite(spent) else None,
        "epsilon_budget": privacy.effective_budget if privacy.enabled else None,
        "delta": privacy.delta if privacy.enabled else None,
    }


def resumed_eval(learning: Mapping[str, Any], last_row: Mapping[str, Any] | None) -> dict[str, Any]:
    """``accuracy``/``loss`` (and ``perplexity``, a language model's) of the last recorded round while the learner has
    evaluated nothing since it (re)started, with ``evaluated_round`` saying
    which round they are from; nothing to add otherwise."""
    if last_row is None or learning.get("accuracy") is not None:
        return {}
    return {"accuracy": last_row.get("accuracy"), "loss": last_row.get("loss"),
            "perplexity": last_row.get("perplexity"), "evaluated_round": last_row.get("round")}
