"""A node's calls into its trainer's code (``train``, ``evaluate``) and what
an exception raised there does.

Why: a user's trainer that raised in its train step (a shape bug that shows
only on a later batch, their own NaN assertion, CUDA out of memory) crashed
the rounds task; the daemon exited 1, which the documented systemd unit
(``Restart=on-failure``) restarts every 5 s for ever, each run re-training
the rounds since the last checkpoint and failing again. Worse, the model was
left where the failed step had put it, and the checkpoint written at stop
overwrote the last good one with it (all 99 parameters NaN in the trainer
of ``tests/integration/test_trainer_failure.py``).

Now the engine rewinds the model when ``train`` raises
(:meth:`~murmur.learning.rounds.RoundEngine.local_update`), the node tries
the call once more (:data:`TRAINER_ATTEMPTS`: a single out-of-memory or a
transient I/O error passes; freed accelerator memory first), and a second
failure in a row is a :class:`~murmur.errors.TrainerFailed` naming the
trainer, the method, the round and the user's file and line. So is a
method that raised in :data:`FAILING_ROUNDS_MAX` rounds in a row, passing
each time only on its second try. Either ends the rounds; the daemon stops with exit code 3 (``EXIT_TRAINER``), which the unit
does not restart (``RestartPreventExitStatus=2 3``), or serves on, unhealthy,
with ``node.keep_serving_after_crash``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from murmur.errors import MurmurError, TrainerFailed
from murmur.learning.trainers.registry import where

log = logging.getLogger(__name__)

T = TypeVar("T")

TRAINER_ATTEMPTS = 2
"""Calls of one ``train`` or ``evaluate`` before its exception ends the
rounds: a failure that recurs at once is a bug in the trainer, and a node
that goes on without training would only look alive."""

FAILING_ROUNDS_MAX = 3
"""Rounds in a row in which a method raised (each passing on its second
try) before the node stops all the same: a bug that hits one batch of every
round passes every retry, and would otherwise log an error a round for ever."""


def trainer_failed(spec: str, method: str, round_: int, exc: BaseException,
                   trainer: type | None = None) -> TrainerFailed:
    """One line: the trainer, the method and round, the error, the user's
    line (in ``trainer``'s own code first, see :func:`where`)."""
    text = " ".join(str(exc).split())
    error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return TrainerFailed(f"trainer {spec!r} raised in {method}() at round {round_}: {error}{where(exc, trainer)}")


def _free_accelerator_memory() -> None:
    """What a failed step held on a GPU (its activations, an out-of-memory's
    partial allocations) back to the device before the second attempt."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrainerCalls:
    """One node's calls into its trainer ``spec`` (of class ``trainer``),
    with the policy above."""

    def __init__(self, spec: str, trainer: type | None = None) -> None:
        self.spec = spec
        self.trainer = trainer
        self._failing: dict[str, int] = {}  # method -> calls in a row that raised once

    async def call(self, method: str, round_: int, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` up to :data:`TRAINER_ATTEMPTS` times while it
        raises something other than a :class:`MurmurError` (the trainer's own
        code failed; a broken contract is murmur's word already, and is raised
        as it is). ``call`` must leave the model as it found it when it raises."""
        failed: TrainerFailed | None = None
        cause: Exception | None = None
        for attempt in range(1, TRAINER_ATTEMPTS + 1):
            try:
                result = await call()
            except MurmurError:
                raise
            except Exception as exc:
                failed, cause = trainer_failed(self.spec, method, round_, exc, self.trainer), exc
                if attempt == TRAINER_ATTEMPTS:
                    raise failed from exc
                log.error(f"{failed}; trying once more", extra={"event": "trainer_error", "method": method,
                                                                "round": round_, "attempt": attempt})
                _free_accelerator_memory()
                continue
            self._passed(method, failed, cause)
            return result
        raise AssertionError("unreachable")  # the loop returns or raises

    def _passed(self, method: str, failed: TrainerFailed | None, cause: Exception | None) -> None:
        """Count a call that passed; :data:`FAILING_ROUNDS_MAX` in a row that
        passed only on their second try end the rounds like a second failure."""
        if failed is None:
            self._failing.pop(method, None)
            return
        count = self._failing[method] = self._failing.get(method, 0) + 1
        if count >= FAILING_ROUNDS_MAX:
            why = f"raised in {count} rounds in a row, passing only when tried again"
            raise TrainerFailed(f"{failed} ({why})") from cause
