"""IDX image files (the MNIST format) for trainers that read a data directory."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_dir(directory: Path, size: int = 8, train: int = 40, test: int = 12) -> None:
    """Random ``size``x``size`` images with cycling labels, as the four
    gzipped IDX files a Fashion-MNIST directory holds."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
