"""Contract checks on what a trainer returns (:class:`CheckedTrainer`).

Why: a plug-in trainer whose ``train()`` returns a dict used to fail far from
its cause — ``float(stats.loss)`` raising ``AttributeError`` in a worker
thread, or a CPU tensor from a CUDA trainer failing in the aggregation, with
nothing naming the trainer or the method. Every driver (the daemon's learner,
:class:`~murmur.learning.rounds.RoundEngine`, the simulator) sees its trainer
through this wrapper, so the first wrong value raises a
:class:`~murmur.errors.TrainerError` such as
``MyTrainer.train() returned dict, expected TrainStats``.

The checks run on every call and are all O(1) — ``isinstance``, a dtype, a
shape, a device — a few microseconds against a training step; the
parameter count is asked of the trainer once and then remembered.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from murmur.errors import TrainerError
from murmur.learning.probe import ProbeResult
from murmur.learning.trainers.base import EvalStats, Trainer, TrainStats


def checked(trainer: Trainer) -> Trainer:
    """``trainer`` behind a :class:`CheckedTrainer` (once: wrapping twice is a no-op)."""
    return trainer if isinstance(trainer, CheckedTrainer) else CheckedTrainer(trainer)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


class CheckedTrainer(Trainer):
    """A :class:`Trainer` that forwards to ``inner`` and checks what comes back.

    Attributes other than the :class:`Trainer` methods (``device``,
    ``options``, ``train_size``, a subclass's own) are read from ``inner``.
    """

    def __init__(self, inner: Trainer) -> None:  # no Trainer.__init__: ``ctx`` is the inner trainer's
        self._inner = inner
        self._label = type(inner).__name__
        self._num_params: int | None = None

    @property
    def inner(self) -> Trainer:
        return self._inner

    @property
    def name(self) -> str:  # Trainer.name is a class attribute: report the wrapped trainer's
        return self._inner.name

    @property
    def metric(self) -> Any:  # a class attribute too: the wrapped trainer's, not Trainer's default
        return self._inner.metric

    def __getattr__(self, attr: str) -> Any:
        if attr == "_inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    def __repr__(self) -> str:
        return f"checked({self._inner!r})"

    def _fail(self, method: str, problem: str) -> TrainerError:
        return TrainerError(f"{self._label}.{method}() {problem}")

    # -- Trainer -------------------------------------------------------------------

    def num_params(self) -> int:
        if self._num_params is not None:
            return self._num_params
        n = self._inner.num_params()
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):
            raise self._fail("num_params", f"returned {type(n).__name__}, expected int")
        if n <= 0:
            raise self._fail("num_params", f"returned {n}, expected a positive int")
        self._num_params = int(n)
        return self._num_params

    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The inner trainer's shapes: the model fingerprint peers compare is
        built from them (without this the wrapper answered Trainer's default,
        one flat vector, and two models of equal size but different layers
        learned together)."""
        shapes = self._inner.param_shapes()
        if not isinstance(shapes, tuple) or not all(
            isinstance(shape, tuple) and all(_is_count(dim) for dim in shape) for shape in shapes
        ):
            raise self._fail("param_shapes", f"returned {shapes!r}, expected a tuple of shapes (tuples of ints)")
        total = sum(math.prod(shape) for shape in shapes)
        if total != self.num_params():
            raise self._fail("param_shapes", f"returned shapes of {total} values, expected num_params() = "
                                             f"{self.num_params()}")
        return shapes

    def get_flat(self) -> torch.Tensor:
        flat = self._inner.get_flat()
        expected = f"a float32 1-D torch.Tensor of num_params() = {self.num_params()} values"
        if not isinstance(flat, torch.Tensor):
            raise self._fail("get_flat", f"returned {type(flat).__name__}, expected {expected}")
        if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != self.num_params():
            raise self._fail(
                "get_flat", f"returned a {flat.dtype} tensor of shape {tuple(flat.shape)}, expected {expected}"
            )
        device = getattr(self._inner, "device", None)
        if isinstance(device, torch.device) and flat.device.type != device.type:
            raise self._fail("get_flat", f"returned a tensor on {flat.device}, expected one on the trainer's device {device}")
        return flat

    def set_flat(self, flat: torch.Tensor) -> None:
        self._inner.set_flat(flat)

    def train(self, steps: int | None = None) -> TrainStats:
        stats = self._inner.train(steps)
        if not isinstance(stats, TrainStats):
            raise self._fail("train", f"returned {type(stats).__name__}, expected TrainStats")
        if not _is_real(stats.loss):
            raise self._fail("train", f"returned TrainStats.loss of type {type(stats.loss).__name__}, expected float")
        for field in ("examples", "steps"):
            value = getattr(stats, field)
            if not _is_count(value):
                raise self._fail("train", f"returned TrainStats.{field} = {value!r}, expected an int >= 0")
        return stats

    def evaluate(self) -> EvalStats:
        stats = self._inner.evaluate()
        if not isinstance(stats, EvalStats):
            raise self._fail("evaluate", f"returned {type(stats).__name__}, expected EvalStats")
        if not _is_real(stats.loss):
            raise self._fail("evaluate", f"returned EvalStats.loss of type {type(stats.loss).__name__}, expected float")
        if not (_is_real(stats.accuracy) and 0.0 <= stats.accuracy <= 1.0):
            raise self._fail("evaluate", f"returned EvalStats.accuracy = {stats.accuracy!r}, expected a float in [0, 1]")
        if not _is_count(stats.n):
            raise self._fail("evaluate", f"returned EvalStats.n = {stats.n!r}, expected an int >= 0")
        return stats

    def attack_success_rate(self, attack: str) -> float:
        rate = self._inner.attack_success_rate(attack)
        if not _is_real(rate):
            raise self._fail("attack_success_rate", f"returned {type(rate).__name__}, expected float")
        if not 0.0 <= rate <= 1.0:  # NaN fails it too
            raise self._fail("attack_success_rate", f"returned {rate!r}, expected a float in [0, 1]")
        return float(rate)

    def probe_models(self, models: Sequence[torch.Tensor]) -> ProbeResult | None:
        result = self._inner.probe_models(models)
        if result is None:
            return None
        if not isinstance(result, ProbeResult):
            raise self._fail("probe_models", f"returned {type(result).__name__}, expected None or ProbeResult")
        if len(result.losses) != len(models) or not all(_is_real(x) for x in result.losses):
            raise self._fail("probe_models", f"returned losses {result.losses!r:.60}, expected {len(models)} floats")
        tensors = all(isinstance(o, torch.Tensor) and o.dim() == 2 for o in result.outputs)
        if not tensors or len({o.shape for o in result.outputs}) > 1:
            raise self._fail("probe_models", "returned outputs that are not one 2-D tensor of one shape per model")
        return ProbeResult([float(x) for x in result.losses], list(result.outputs))
