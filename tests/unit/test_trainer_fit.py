"""A user's model that does not fit their data is refused when the trainer is
built, in one line naming the trainer and the mismatch (``trainers/fit.py``),
not by torch in the first training step of a running daemon."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from murmur.errors import ConfigError
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchTrainer, TrainerContext

CLASSES = 3


class _UserTrainer(TorchTrainer):
    """Four features, three classes; subclasses break one thing each."""

    x_dtype: type = np.float32
    y_dtype: type = np.int64
    outputs = CLASSES
    inputs = 4
    label_shift = 0

    def load_dataset(self) -> ArrayDataset:
        rng = np.random.default_rng(0)
        y = rng.integers(0, CLASSES, size=60) + self.label_shift
        x = rng.normal(size=(60, 4)) + y[:, None]
        x, y = x.astype(self.x_dtype), y.astype(self.y_dtype)
        return ArrayDataset(x[:40], y[:40], x[40:], y[40:], num_classes=CLASSES)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        return nn.Sequential(nn.Linear(self.inputs, 8), nn.BatchNorm1d(8), nn.Linear(8, self.outputs))


def _build(**broken: object) -> TorchTrainer:
    cls = type("MyTrainer", (_UserTrainer,), broken)
    return cls(TrainerContext(0, 1, 0, device="cpu"))


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"outputs": 2}, "trainer MyTrainer: the model's output for 2 training inputs of shape (4,) (float32) has "
                         "shape (2, 2); expected (2, 3): one logit per class (num_classes = 3) for each input"),
        ({"x_dtype": np.float64}, "trainer MyTrainer: the model built by build_model() fails on 2 training inputs "
                                  "of shape (4,) (float64): RuntimeError: mat1 and mat2 must have the same dtype"),
        ({"inputs": 5}, "trainer MyTrainer: the model built by build_model() fails on 2 training inputs of shape "
                        "(4,) (float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        ({"y_dtype": np.int32}, "trainer MyTrainer: the loss fails on the model's output for 2 training inputs of "
                                "shape (4,) (float32) and their labels (int32): RuntimeError: expected target dtype"),
        ({"y_dtype": np.float32}, "trainer MyTrainer: ArrayDataset.y_train holds float32 values; expected integer "
                                  "class labels 0 .. 2"),
        ({"label_shift": 1}, "trainer MyTrainer: ArrayDataset.y_train has labels 1 .. 3; expected 0 .. 2 "
                             "(num_classes = 3)"),
    ],
)
def test_a_model_that_does_not_fit_its_data_is_one_config_error(broken: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _build(**broken)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_that_fits_trains_and_keeps_its_mode() -> None:
    """uint8 labels (what cross-entropy takes besides int64) pass; the check
    leaves the model in training mode and its BatchNorm statistics alone."""
    trainer = _build(y_dtype=np.uint8)
    assert trainer.model.training
    batchnorm = trainer.model[1]
    assert int(batchnorm.num_batches_tracked) == 0
    assert trainer.train(5).steps == 5


MISSING_DATA = '''
import numpy as np
from torch import nn

from murmur.learning.trainers.base import TorchTrainer


class MyTrainer(TorchTrainer):
    def load_dataset(self):
        return np.load("{path}")  # the user's data file, not there

    def build_model(self, dataset):
        return nn.Linear(4, 3)
'''


def test_a_trainer_that_cannot_be_built_is_one_config_error_naming_the_users_line(tmp_path, monkeypatch):
    """A missing data file in a user's load_dataset() escaped the daemon as a
    57-line traceback and exit code 1 (restarted in a loop by systemd); it is
    one line naming the trainer, the error and the user's line, exit 2."""
    from murmur.learning.trainers.registry import create_trainer

    missing = tmp_path / "missing.npz"
    module = tmp_path / "mytrainer_missing.py"
    module.write_text(MISSING_DATA.format(path=missing), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        create_trainer("mytrainer_missing:MyTrainer", TrainerContext(0, 1, 0, device="cpu"))
    assert str(err.value) == (
        f"trainer 'mytrainer_missing:MyTrainer' could not be built: FileNotFoundError: [Errno 2] No such file or "
        f"directory: '{missing}' (at {module}:10 in load_dataset)")
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_a_config_error_of_the_trainer_itself_is_not_wrapped(monkeypatch):
    """What murmur already words (the fit check, a built-in's missing data
    set) reaches the user as it is."""
    from murmur.learning.trainers import registry

    monkeypatch.setattr(registry, "load_trainer", lambda spec: type("MyTrainer", (_UserTrainer,), {"outputs": 2}))
    with pytest.raises(ConfigError, match=r"^trainer MyTrainer: the model's output for 2 training inputs"):
        registry.create_trainer("mine:MyTrainer", TrainerContext(0, 1, 0, device="cpu"))


def test_example_level_privacy_refuses_a_model_with_batchnorm():
    """DP-SGD's per-example clipping means nothing under BatchNorm (a batch's
    statistics mix its examples), and its first step used to crash the
    rounds with a torch.func error about in-place operations."""
    with pytest.raises(ConfigError) as err:
        type("MyTrainer", (_UserTrainer,), {})(TrainerContext(0, 1, 0, device="cpu", options={"dp_clip": 1.0}))
    assert str(err.value) == ("trainer MyTrainer: example-level privacy (dp_clip > 0) cannot train a model with "
                              "BatchNorm (layers 1): its batch statistics mix examples, so per-example clipping "
                              "does not bound one example's influence; use GroupNorm or LayerNorm")
    assert _build().train(1).steps == 1  # without dp_clip the same model trains
