"""Whether a :class:`~murmur.learning.trainers.base.TorchTrainer`'s model fits
its data, checked once when the trainer is built (:func:`check_fit`).

Why: a user's own model and data that do not fit each other used to fail only
in the first training step, after the daemon had connected to its peers and
waited ``learning.start_wait_s`` for them, as a traceback out of a worker
thread ending in torch's words, which name neither the trainer nor the fix:
``IndexError: Target 9 is out of bounds.`` (a last layer of 7 logits for 10
classes), ``mat1 and mat2 must have the same dtype, but got Double and Float``
(inputs read from a CSV as float64), ``expected target dtype to be Long or
Byte, but got Int`` (int32 labels). On CUDA a label out of range is a
device-side assert that leaves the process unusable. One forward pass and
loss on :data:`FIT_SAMPLES` training examples, the shape of the logits, and
the range of every label turn each of these into one
:class:`~murmur.errors.ConfigError` naming the trainer, what it gave and what
was expected; the daemon reports it as one line and exits 2, like any
configuration it cannot run with. It costs one forward pass of two examples
and a min/max over the labels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from murmur.errors import ConfigError
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.globalrng import forked_global_rng

FIT_SAMPLES = 2
"""Training examples the model is run on at construction (two, not one: a
BatchNorm layer in training mode refuses a batch of one; the check runs in
eval mode anyway)."""


def check_per_example(label: str, model: nn.Module) -> None:
    """A model DP-SGD (``dp_clip`` > 0) can train: no BatchNorm. Its batch
    statistics mix the examples of a batch, so clipping each example's
    gradient no longer bounds what one example does to the step (the privacy
    accounting's premise), and torch.func refuses its in-place updates of the
    running statistics: a 3.6 M-parameter MLP with BatchNorm crashed its
    first DP-SGD step with "During a grad (vjp, jvp, grad, etc) transform, the
    function provided attempted to call in-place operation (aten::add_.Tensor)
    that would mutate a captured Tensor"."""
    batchnorm = [name or type(module).__name__ for name, module in model.named_modules()
                 if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if batchnorm:
        raise ConfigError(f"{label}: example-level privacy (dp_clip > 0) cannot train a model with BatchNorm "
                          f"(layers {', '.join(batchnorm)}): its batch statistics mix examples, so per-example "
                          f"clipping does not bound one example's influence; use GroupNorm or LayerNorm")


def check_labels(label: str, dataset: ArrayDataset) -> None:
    """Every label of the training pool and test set is an integer class
    ``0 .. num_classes-1``."""
    for name, labels in (("y_train", dataset.y_train), ("y_test", dataset.y_test)):
        if labels.size == 0:
            continue
        if not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"{label}: ArrayDataset.{name} holds {labels.dtype} values; expected integer class "
                              f"labels 0 .. {dataset.num_classes - 1} (e.g. y.astype(np.int64))")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= dataset.num_classes:
            raise ConfigError(f"{label}: ArrayDataset.{name} has labels {low} .. {high}; expected "
                              f"0 .. {dataset.num_classes - 1} (num_classes = {dataset.num_classes})")


def check_fit(
    label: str,
    model: nn.Module,
    dataset: ArrayDataset,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Run ``model`` on the first :data:`FIT_SAMPLES` of ``x`` and score it
    with ``loss_of(logits, x, y)``: the model must take the inputs, give one
    logit per class for each of them, and the loss must accept the labels.
    ``label`` names the trainer in the error. The model's mode and the
    global RNG are left as they were."""
    check_labels(label, dataset)
    x, y = x[:FIT_SAMPLES], y[:FIT_SAMPLES]
    if len(x) == 0:
        return
    shown = f"{len(x)} training inputs of shape {tuple(x.shape[1:])} ({str(x.dtype).removeprefix('torch.')})"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forked_global_rng():
            try:
                logits = model(x)
            except Exception as exc:  # the user's model: any error is theirs to read
                raise ConfigError(f"{label}: the model built by build_model() fails on {shown}: "
                                  f"{type(exc).__name__}: {exc}") from None
            if not isinstance(logits, torch.Tensor):
                raise ConfigError(f"{label}: the model returned {type(logits).__name__} for {shown}; expected a "
                                  f"tensor of logits")
            if logits.dim() < 2 or logits.shape[0] != len(x) or logits.shape[-1] != dataset.num_classes:
                raise ConfigError(f"{label}: the model's output for {shown} has shape {tuple(logits.shape)}; "
                                  f"expected ({len(x)}, {dataset.num_classes}): one logit per class "
                                  f"(num_classes = {dataset.num_classes}) for each input")
            try:
                loss_of(logits.float(), x, y)
            except Exception as exc:
                raise ConfigError(f"{label}: the loss fails on the model's output for {shown} and their labels "
                                  f"({str(y.dtype).removeprefix('torch.')}): {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
