"""``digits-mlp``: scikit-learn's bundled 8×8 digits with a small MLP.

The fastest real trainer: the unit-test and CI workhorse (a local step is well
under a millisecond on CPU), and still an image task, so both attacks apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from murmur.errors import ConfigError
from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchOptions, TorchTrainer


@dataclass(frozen=True)
class DigitsOptions(TorchOptions):
    lr: float = 0.05
    momentum: float = 0.9
    hidden: int = 64

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1:
            raise ConfigError(f"invalid trainer option(s): hidden={self.hidden!r}")


class DigitsMLPTrainer(TorchTrainer):
    name: ClassVar[str] = "digits-mlp"
    Options: ClassVar[type[TorchOptions]] = DigitsOptions
    options: DigitsOptions

    def load_dataset(self) -> ArrayDataset:
        return data.load_digits()

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        inputs = int(dataset.x_train[0].size)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, self.options.hidden),
            nn.ReLU(),
            nn.Linear(self.options.hidden, dataset.num_classes),
        )
