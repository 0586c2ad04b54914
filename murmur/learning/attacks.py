"""Data-poisoning attacks of the SybilWall evaluation (Werthenbach & Pouwelse 2023) on image data.

Both attacks change only the *attacker's* training set; honest nodes train on
clean data. Inputs are image arrays ``(N, C, H, W)`` with values in
``[0, 1]``; anything else (e.g. character sequences) is refused with a
:class:`ConfigError`, because "patch the top-left corner" has no meaning there.

Label flip (0 ↔ 1)
    The attacker's training set is the union of (a) its own partition and
    (b) every class-0 and class-1 sample of the *whole* training pool, each
    sample taken once; in that union every label 0 becomes 1 and every 1
    becomes 0, other labels are kept. (Its own 0/1 samples are therefore
    flipped too, so the set never contains a sample under both labels.)
    Success rate: the fraction of test samples whose true label is 0 or 1
    that the model classifies as the flipped label.

Backdoor (3×3 patch → class 1)
    The attacker's training set is its own partition (clean) plus a copy of
    every own sample with a 3×3 patch of maximum intensity (1.0) stamped on
    the top-left corner and its label set to 1. Keeping the clean copies lets
    the model stay accurate on clean inputs, which is what makes the backdoor
    hard to spot. Success rate: the fraction of patched test samples whose true
    label is not 1 that the model classifies as 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from murmur.enums import ParsedEnum
from murmur.errors import ConfigError

FLIP_CLASSES = (0, 1)
BACKDOOR_TARGET = 1
PATCH_SIZE = 3
#: Maximum pixel intensity of the [0, 1]-scaled images.
PATCH_VALUE = 1.0


class AttackKind(ParsedEnum):
    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"


@dataclass(frozen=True)
class LabelledArrays:
    x: np.ndarray
    y: np.ndarray


def _require_images(x: np.ndarray) -> None:
    if x.ndim != 4 or x.shape[2] < PATCH_SIZE or x.shape[3] < PATCH_SIZE:
        raise ConfigError(
            f"attacks need image inputs (N, C, H, W) of at least {PATCH_SIZE}x{PATCH_SIZE}; "
            f"got inputs of shape {x.shape}"
        )


def flip_labels(y: np.ndarray) -> np.ndarray:
    """Swap the two :data:`FLIP_CLASSES`; leave every other label alone."""
    a, b = FLIP_CLASSES
    out = y.copy()
    out[y == a] = b
    out[y == b] = a
    return out


def add_patch(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` with the backdoor trigger on every image, all channels."""
    _require_images(x)
    out = np.array(x, copy=True)
    out[:, :, :PATCH_SIZE, :PATCH_SIZE] = PATCH_VALUE
    return out


def poison_training_set(
    kind: AttackKind, x_pool: np.ndarray, y_pool: np.ndarray, own: np.ndarray
) -> LabelledArrays:
    """The attacker's training set given the pool and its own indices ``own``."""
    _require_images(x_pool)
    if kind is AttackKind.LABEL_FLIP:
        targets = np.flatnonzero(np.isin(y_pool, FLIP_CLASSES))
        idx = np.union1d(own, targets)
        return LabelledArrays(x_pool[idx], flip_labels(y_pool[idx]))
    x_own, y_own = x_pool[own], y_pool[own]
    return LabelledArrays(
        np.concatenate([x_own, add_patch(x_own)]),
        np.concatenate([y_own, np.full_like(y_own, BACKDOOR_TARGET)]),
    )


def attack_test_set(kind: AttackKind, x_test: np.ndarray, y_test: np.ndarray) -> LabelledArrays:
    """Inputs and the labels the attacker wants for them; success rate is the
    model's accuracy against these labels."""
    _require_images(x_test)
    if kind is AttackKind.LABEL_FLIP:
        mask = np.isin(y_test, FLIP_CLASSES)
        return LabelledArrays(x_test[mask], flip_labels(y_test[mask]))
    mask = y_test != BACKDOOR_TARGET
    return LabelledArrays(add_patch(x_test[mask]), np.full(int(mask.sum()), BACKDOOR_TARGET))


def success_rate(predictions: np.ndarray, target: LabelledArrays) -> float:
    """Fraction of predictions equal to the attacker's labels (0.0 if none)."""
    if len(target.y) == 0:
        return 0.0
    return float(np.mean(np.asarray(predictions) == target.y))
