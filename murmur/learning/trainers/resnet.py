"""``fashion-resnet``: Fashion-MNIST with a small residual CNN (~1 M parameters).

Three stages of basic residual blocks (two 3x3 convolutions and a skip) at
28x28, 14x14 and 7x7, ``width``, 2x and 4x channels, global average pooling
and a linear head. The defaults (width 40; one block, one block, two blocks)
give 0.94 M parameters (width 8: 38 k, for quick runs). Evaluation uses
1000 fixed test images by default (``max_test_samples``; 0: all 10,000,
some 50 s a round on one CPU thread at the default width). Normalisation is GroupNorm, not BatchNorm:
BatchNorm's running statistics are buffers a node keeps to itself while its
weights are averaged with its neighbours', so a node would evaluate the
averaged model with its own data's statistics.

Data: the IDX files Debian's ``dataset-fashion-mnist`` installs under
``/usr/share/datasets/fashion-mnist/``; ``options.data_dir`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from murmur.errors import ConfigError
from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchOptions, TorchTrainer
from murmur.learning.trainers.fashion import FASHION_HINT

GROUPS = 8  # GroupNorm groups per layer (widths must be multiples of it)


@dataclass(frozen=True)
class ResNetOptions(TorchOptions):
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    max_test_samples: int = 1000
    data_dir: str | None = None
    width: int = 40  # channels of the first stage; the second has 2x, the third 4x
    blocks: tuple[int, ...] = (1, 1, 2)  # residual blocks per stage

    def validate(self) -> None:
        super().validate()
        checks = {
            "width": self.width >= GROUPS and self.width % GROUPS == 0,
            "blocks": (isinstance(self.blocks, (list, tuple)) and len(self.blocks) >= 1
                       and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.blocks)),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid trainer option(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                + f" (width a multiple of {GROUPS}; at least one stage of at least one block)"
            )


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm plus the input (1x1 projection when the shape changes), then relu."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(GROUPS, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, outputs)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.skip = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.GroupNorm(GROUPS, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.GroupNorm(GROUPS, width), nn.ReLU())
        layers: list[nn.Module] = []
        inputs = width
        for stage, count in enumerate(blocks):
            outputs = width * 2**stage
            for b in range(count):
                layers.append(BasicBlock(inputs, outputs, 2 if (stage > 0 and b == 0) else 1))
                inputs = outputs
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class FashionResNetTrainer(TorchTrainer):
    name: ClassVar[str] = "fashion-resnet"
    Options: ClassVar[type[TorchOptions]] = ResNetOptions
    options: ResNetOptions

    def load_dataset(self) -> ArrayDataset:
        directory = Path(self.options.data_dir or data.FASHION_MNIST_DIR).resolve()
        return data.load_idx_dir(directory, missing_hint=FASHION_HINT)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        channels = dataset.x_train.shape[1]
        return SmallResNet(channels, dataset.num_classes, self.options.width, tuple(self.options.blocks))
