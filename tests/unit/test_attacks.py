"""Attack data transforms with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from murmur.errors import ConfigError
from murmur.learning.attacks import (
    BACKDOOR_TARGET,
    AttackKind,
    LabelledArrays,
    add_patch,
    attack_test_set,
    flip_labels,
    poison_training_set,
    success_rate,
)


def _images(labels: list[int], size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    y = np.array(labels, dtype=np.int64)
    # Each image is filled with its own index so the tests can tell samples apart.
    x = np.stack([np.full((1, size, size), i / 100, dtype=np.float32) for i in range(len(y))])
    return x, y


def test_parse() -> None:
    assert AttackKind.parse("label_flip") is AttackKind.LABEL_FLIP
    assert AttackKind.parse(AttackKind.BACKDOOR) is AttackKind.BACKDOOR
    with pytest.raises(ConfigError, match="unknown attack 'gradient_ascent'"):
        AttackKind.parse("gradient_ascent")


def test_flip_labels_swaps_only_zero_and_one() -> None:
    assert flip_labels(np.array([0, 1, 2, 1, 9, 0])).tolist() == [1, 0, 2, 0, 9, 1]


def test_label_flip_training_set_is_own_data_plus_all_zero_one_samples_flipped() -> None:
    #          idx: 0  1  2  3  4  5  6  7
    x, y = _images([0, 1, 2, 3, 0, 1, 5, 2])
    own = np.array([2, 4, 6])  # labels 2, 0, 5
    poisoned = poison_training_set(AttackKind.LABEL_FLIP, x, y, own)
    # Union of own {2, 4, 6} and all 0/1 samples {0, 1, 4, 5}, each once.
    indices = np.round(poisoned.x[:, 0, 0, 0] * 100).astype(int)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6]
    assert poisoned.y.tolist() == [1, 0, 2, 1, 0, 5]
    # The pool is untouched.
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 5, 2]


def test_backdoor_training_set_is_clean_own_data_plus_patched_copies_labelled_one() -> None:
    x, y = _images([3, 7, 1, 0])
    poisoned = poison_training_set(AttackKind.BACKDOOR, x, y, np.array([0, 3]))
    assert poisoned.y.tolist() == [3, 0, BACKDOOR_TARGET, BACKDOOR_TARGET]
    assert np.array_equal(poisoned.x[:2], x[[0, 3]])
    patched = poisoned.x[2:]
    assert np.all(patched[:, :, :3, :3] == 1.0)
    # Outside the 3x3 corner the copies equal the originals.
    mask = np.ones((8, 8), dtype=bool)
    mask[:3, :3] = False
    assert np.array_equal(patched[:, :, mask], x[[0, 3]][:, :, mask])


def test_patch_is_top_left_3x3_on_28x28_and_does_not_modify_input() -> None:
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    out = add_patch(x)
    assert out[:, 0].sum() == 2 * 9
    assert np.all(out[:, 0, :3, :3] == 1.0)
    assert np.all(out[:, 0, 3, :] == 0.0) and np.all(out[:, 0, :, 3] == 0.0)
    assert x.sum() == 0


def test_attack_test_sets_and_success_rate_known_answers() -> None:
    x, y = _images([0, 1, 2, 1, 0, 3])
    flip = attack_test_set(AttackKind.LABEL_FLIP, x, y)
    assert flip.y.tolist() == [1, 0, 0, 1]  # true labels 0, 1, 1, 0 flipped
    # A model that predicts the true labels has 0 success, a fully fooled one 1,
    # and one fooled on exactly one of the four 0/1 samples 0.25.
    assert success_rate(np.array([0, 1, 1, 0]), flip) == 0.0
    assert success_rate(flip.y, flip) == 1.0
    assert success_rate(np.array([1, 1, 1, 0]), flip) == 0.25

    door = attack_test_set(AttackKind.BACKDOOR, x, y)
    assert len(door.y) == 4 and set(door.y.tolist()) == {BACKDOOR_TARGET}  # true-1 samples excluded
    assert np.all(door.x[:, :, :3, :3] == 1.0)
    assert success_rate(np.array([1, 2, 1, 3]), door) == 0.5
    assert success_rate(np.array([], dtype=np.int64), LabelledArrays(x[:0], y[:0])) == 0.0


def test_non_image_inputs_are_refused() -> None:
    seqs = np.zeros((4, 40), dtype=np.uint8)
    for kind in AttackKind:
        with pytest.raises(ConfigError, match="image inputs"):
            poison_training_set(kind, seqs, np.zeros(4, dtype=np.int64), np.arange(2))
        with pytest.raises(ConfigError, match="image inputs"):
            attack_test_set(kind, seqs, np.zeros(4, dtype=np.int64))
