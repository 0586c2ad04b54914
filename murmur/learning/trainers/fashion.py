"""``fashion-mnist-cnn``: Fashion-MNIST (60k/10k, 28×28) with the MNIST CNN.

Data: the IDX files Debian's ``dataset-fashion-mnist`` installs under
``/usr/share/datasets/fashion-mnist/``; ``options.data_dir`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchOptions, TorchTrainer
from murmur.learning.trainers.mnist import ImageFileOptions, build_small_cnn

FASHION_HINT = "install them with: apt-get install dataset-fashion-mnist (or set options.data_dir)"


class FashionCNNTrainer(TorchTrainer):
    name: ClassVar[str] = "fashion-mnist-cnn"
    Options: ClassVar[type[TorchOptions]] = ImageFileOptions
    options: ImageFileOptions

    def load_dataset(self) -> ArrayDataset:
        directory = Path(self.options.data_dir or data.FASHION_MNIST_DIR).resolve()
        return data.load_idx_dir(directory, missing_hint=FASHION_HINT)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        return build_small_cnn(dataset, self.options.width, self.options.hidden)
