"""A model's fingerprint: what two nodes must share to learn together.

Two nodes can only mix models of the same architecture, exchanged in the
same wire format. Without a check, a user who started one node with another
model (21 against 31 parameters, say) saw ``DecodeError ... round message of
shape (2, 31), expected (2, 21)`` every two seconds, an endless reconnect
loop, and each node training alone. Peers now exchange this fingerprint when
they meet and refuse each other as learning neighbours, once and clearly, if
it differs. It covers the trainer's name, every parameter tensor's shape
(so two models with equal counts but different layers differ too) and the
codec (the network agrees on one wire format: later codecs and compressors
need both ends to agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import numpy as np

FINGERPRINT_DOMAIN = b"murmur-model-v1"


@dataclass(frozen=True)
class ModelFingerprint:
    trainer: str
    shapes: tuple[tuple[int, ...], ...]
    codec: str

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    @property
    def digest(self) -> bytes:
        """32 bytes, equal exactly when trainer, shapes and codec are."""
        text = f"{self.trainer}\0{self.shapes!r}\0{self.codec}".encode()
        return blake3.blake3(FINGERPRINT_DOMAIN + text).digest()

    def describe(self) -> str:
        """One readable line (sent along with the digest, so a refusal can say what the peer runs)."""
        tensors = len(self.shapes)
        return (f"trainer {self.trainer}, {self.num_params:,} parameters in {tensors} "
                f"tensor{'s' if tensors != 1 else ''}, codec {self.codec}")[:256]



def model_digest(model: np.ndarray) -> bytes:
    """BLAKE3-256 of a float32 model's bytes: what a node's statements of its
    public model sign, and what neighbours compare of the model their rounds
    started from (``LearnerInfo.initial``: a round-0 replica is our own start
    plus the neighbour's first message, right only where the two starts are
    one model; another ``learning.seed``, another torch or a build another
    thread disturbed gives another)."""
    return blake3.blake3(memoryview(np.ascontiguousarray(model, dtype=np.float32)).cast("B")).digest()
