"""State directory: layout, exclusive lock, checksummed checkpoints with fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest

from murmur.errors import OptionError, StateDamaged, StateError
from murmur.node import state as state_module
from murmur.node.state import (
    ARRAY_FILE_MAGIC,
    ApiInfo,
    StateDir,
    decode_arrays,
    encode_array_parts,
    encode_arrays,
    write_array_file,
)


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model": rng.standard_normal(1000).astype(np.float32),
        "momentum": rng.standard_normal((10, 7)).astype(np.float64),
        "counts": np.arange(5, dtype=np.int64),
        "flag": np.array(True),
    }


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        np.testing.assert_array_equal(a[name], b[name])


def test_checkpoint_roundtrip(tmp_path):
    state = StateDir(tmp_path / "s").create()
    assert state.load_checkpoint() is None
    state.save_checkpoint(arrays(1), {"round": 3, "peer": "12D3KooW", "acc": 0.5})
    bundle = state.load_checkpoint()
    assert bundle is not None and bundle.source == state.checkpoint_path
    assert_same(bundle.arrays, arrays(1))
    assert bundle.meta == {"round": 3, "peer": "12D3KooW", "acc": 0.5}
    assert (state.checkpoint_path.stat().st_mode & 0o777) == 0o600
    assert (state.path.stat().st_mode & 0o777) == 0o700


def test_corrupt_checkpoint_is_detected_and_previous_one_used(tmp_path):
    state = StateDir(tmp_path).create()
    state.save_checkpoint(arrays(1), {"round": 1})
    state.save_checkpoint(arrays(2), {"round": 2})
    data = bytearray(state.checkpoint_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor bytes
    state.checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum mismatch"):
        decode_arrays(bytes(data), state.checkpoint_path)
    bundle = state.load_checkpoint()
    assert bundle is not None
    assert bundle.source.name == "checkpoint.bin.prev"
    assert bundle.meta == {"round": 1}
    assert_same(bundle.arrays, arrays(1))


def test_torn_checkpoint_falls_back_and_does_not_evict_good_prev(tmp_path):
    state = StateDir(tmp_path).create()
    state.save_checkpoint(arrays(1), {"round": 1})
    state.save_checkpoint(arrays(2), {"round": 2})
    full = state.checkpoint_path.read_bytes()
    state.checkpoint_path.write_bytes(full[: len(full) // 3])  # torn write
    assert state.load_checkpoint().meta == {"round": 1}
    # saving over a damaged current file must keep the good .prev
    state.save_checkpoint(arrays(3), {"round": 3})
    assert state.load_checkpoint().meta == {"round": 3}
    state.checkpoint_path.write_bytes(b"")
    assert state.load_checkpoint().meta == {"round": 1}


def test_both_checkpoints_damaged_is_a_damaged_state(tmp_path):
    """StateDamaged, which the CLI reports with exit 2 like a bad config: a
    restart cannot mend it (systemd's Restart=on-failure restarted a plain
    failure every 5 s for good)."""
    state = StateDir(tmp_path).create()
    state.save_checkpoint(arrays(1), {"round": 1})
    state.save_checkpoint(arrays(2), {"round": 2})
    state.checkpoint_path.write_bytes(b"garbage")
    state.checkpoint_path.with_name("checkpoint.bin.prev").write_bytes(ARRAY_FILE_MAGIC)
    with pytest.raises(StateDamaged, match="no usable file.*restore checkpoint.bin from a backup, or move it away"):
        state.load_checkpoint()


def test_a_damaged_privacy_ledger_is_a_damaged_state(tmp_path):
    state = StateDir(tmp_path).create()
    state.privacy_path.write_text('{"format": 1, "ledger": [')
    with pytest.raises(StateDamaged, match="refusing to start from epsilon 0; restore it from a backup"):
        state.load_privacy_ledger()


def test_checksummed_but_hostile_content_is_refused(tmp_path):
    """A file with a valid checksum but an object dtype or lying length must
    still be rejected: the checksum protects against damage, not malice."""
    import hashlib

    def container(body: dict) -> bytes:
        packed = msgpack.packb(body, use_bin_type=True)
        return ARRAY_FILE_MAGIC + hashlib.blake2b(packed, digest_size=32).digest() + packed

    hostile_dtype = container({"meta": {}, "arrays": {"x": ["|O", [1], b"\0" * 8]}})
    with pytest.raises(StateError, match="refusing dtype"):
        decode_arrays(hostile_dtype, tmp_path / "x")
    short = container({"meta": {}, "arrays": {"x": ["<f4", [1000], b"\0" * 8]}})
    with pytest.raises(StateError, match="expected 4000"):
        decode_arrays(short, tmp_path / "x")
    with pytest.raises(StateError, match="refusing dtype"):
        encode_arrays({"x": np.array([object()])}, {})


def test_history_uses_same_safe_container(tmp_path):
    state = StateDir(tmp_path).create()
    state.save_history({"12D3KooWa": np.ones(4, np.float32)}, {"round": 9})
    assert state.load_history().meta == {"round": 9}
    assert state.history_path.read_bytes().startswith(ARRAY_FILE_MAGIC)


def test_lock_excludes_second_daemon_and_is_released(tmp_path):
    first = StateDir(tmp_path)
    second = StateDir(tmp_path)
    with first:
        assert first.read_pid() == os.getpid()
        with pytest.raises(StateError, match=rf"in use by another murmur daemon \(pid {os.getpid()}\)"):
            second.acquire()
        assert not second.locked
    assert not first.pid_path.exists()
    with second:  # free again
        assert second.locked


def test_lock_held_by_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from murmur.node.state import StateDir
            s = StateDir({str(tmp_path)!r}); s.acquire()
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=rf"pid {holder.pid}"):
            StateDir(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9 semantics: the kernel drops the flock
        holder.wait()
    with StateDir(tmp_path) as state:
        assert state.read_pid() == os.getpid()


def test_api_info_roundtrip_and_missing(tmp_path):
    state = StateDir(tmp_path).create()
    with pytest.raises(StateError, match="no running node"):
        state.read_api_info()
    info = ApiInfo(host="127.0.0.1", port=45123, pid=77, peer_id="12D3KooWx")
    state.write_api_info(info)
    assert state.read_api_info() == info
    assert info.url == "http://127.0.0.1:45123"
    assert ApiInfo("::1", 1, 1, "p").url == "http://[::1]:1"


def test_an_api_info_that_cannot_be_written_is_a_state_error(tmp_path):
    state = StateDir(tmp_path).create()
    state.api_path.mkdir()  # what the rename lands on fails as a full disk's write does: an OSError
    with pytest.raises(StateError, match=r"cannot write .*api\.json: Is a directory"):
        state.write_api_info(ApiInfo(host="127.0.0.1", port=45123, pid=77, peer_id="12D3KooWx"))


def test_metrics_log_skips_partial_last_line(tmp_path):
    state = StateDir(tmp_path).create()
    state.append_metrics({"round": 1, "acc": 0.5})
    state.append_metrics({"round": 2, "acc": 0.6})
    with open(state.metrics_path, "a") as fh:
        fh.write('{"round": 3, "ac')  # crash mid-write
    assert [r["round"] for r in state.read_metrics()] == [1, 2]


def test_the_next_run_ends_a_torn_last_line_before_its_first_row(tmp_path):
    state = StateDir(tmp_path).create()
    state.append_metrics({"round": 1})
    with open(state.metrics_path, "a") as fh:
        fh.write('{"round": 2, "ac')  # the last run crashed mid-write
    restarted = StateDir(tmp_path)
    restarted.append_metrics({"round": 2})
    restarted.append_metrics({"round": 3})
    assert [r["round"] for r in restarted.read_metrics()] == [1, 2, 3]  # the first new row was glued on, and lost
    assert state.metrics_path.read_text().count("\n") == 4


def test_api_info_with_a_pid_or_port_out_of_range_is_unreadable(tmp_path):
    """A pid past C's int raised OverflowError out of `murmur status`; 0 and
    -1 name process groups, which os.kill reports alive."""
    state = StateDir(tmp_path).create()
    for pid, port in ((99999999999, 5), (0, 5), (-1, 5), (7, 0), (7, 70000)):
        state.api_path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "pid": pid, "peer_id": "p"}))
        with pytest.raises(StateError, match="out of range"):
            state.read_api_info()


def test_identity_created_once_in_state_dir(tmp_path):
    state = StateDir(tmp_path / "new")
    first = state.identity()
    assert state.identity_path.exists()
    assert state.identity().peer_id == first.peer_id


def test_a_file_this_process_wrote_is_not_read_back_before_it_becomes_prev(tmp_path, monkeypatch):
    """Keeping the current checkpoint as .prev needs it intact; one this
    StateDir wrote itself (same inode, size and times) is, and is not re-hashed.
    Anything else — another process's file, one rewritten in place — is checked."""
    from murmur.node import state as state_mod

    checked = []
    real = state_mod.decode_arrays
    monkeypatch.setattr(state_mod, "decode_arrays", lambda data, source: checked.append(source) or real(data, source))
    prev = tmp_path / "checkpoint.bin.prev"
    state = StateDir(tmp_path).create()
    state.save_checkpoint(arrays(1), {"round": 1})
    state.save_checkpoint(arrays(2), {"round": 2})
    assert checked == []  # nothing there the first time; our own file the second
    assert decode_arrays(prev.read_bytes(), prev).meta == {"round": 1}
    # our own file, torn in place afterwards (same inode, new size and times): checked, and not kept
    full = state.checkpoint_path.read_bytes()
    state.checkpoint_path.write_bytes(full[: len(full) // 2])
    state.save_checkpoint(arrays(3), {"round": 3})
    assert checked == [state.checkpoint_path]
    assert decode_arrays(prev.read_bytes(), prev).meta == {"round": 1}
    # a restarted process knows nothing it wrote: it checks before keeping
    StateDir(tmp_path).save_checkpoint(arrays(4), {"round": 4})
    assert checked == [state.checkpoint_path] * 2
    assert decode_arrays(prev.read_bytes(), prev).meta == {"round": 3}
    assert state.load_checkpoint().meta == {"round": 4}


def test_array_file_parts_are_views_and_decode_to_the_same_arrays(tmp_path: Path) -> None:
    """The checkpoint is written from the arrays themselves (no joined copy),
    and what comes back is equal for every shape the node stores."""
    big = np.arange(100_000, dtype=np.float32)
    stored = {
        "big": big,
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],
        "flags": np.array([True, False]),
    }
    parts = encode_array_parts(stored, {"round": 7})
    assert any(isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), big) for p in parts)
    path = tmp_path / "x.bin"
    write_array_file(path, stored, {"round": 7})
    bundle = decode_arrays(path.read_bytes(), path)
    assert bundle.meta == {"round": 7}
    for name, array in stored.items():
        assert bundle.arrays[name].shape == array.shape and bundle.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(bundle.arrays[name], array)
    assert b"".join(parts) == encode_arrays(stored, {"round": 7})


def test_a_write_killed_midway_leaves_no_temp_file_after_the_next_start(tmp_path):
    # The writer is killed -9 between writing its temp file and renaming it
    # (held there at fsync); every restart had a new pid, so these piled up.
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sys
            import numpy as np
            from murmur.node.state import StateDir
            def hold(fd):
                print("writing", flush=True)
                sys.stdin.read()
            os.fsync = hold
            state = StateDir({str(tmp_path)!r}).create()
            state.save_checkpoint({{"model": np.zeros(100_000, np.float32)}}, {{"round": 1}})
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait()
    left = list(tmp_path.glob(".checkpoint.bin.tmp-*"))
    assert [p.name for p in left] == [f".checkpoint.bin.tmp-{writer.pid}"]
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        in_progress = tmp_path / f".identity.key.tmp-{live.pid}"  # a live process's write is not touched
        in_progress.write_bytes(b"x")
        with StateDir(tmp_path):
            assert not left[0].exists()
            assert in_progress.exists()
    finally:
        live.kill()
        live.wait()
    with StateDir(tmp_path):
        assert not in_progress.exists()


def test_metrics_rotate_at_their_size_and_keep_a_bounded_number_of_files(tmp_path, monkeypatch):
    """A node training until stopped appended ~55 MB of rows a day, for good."""
    monkeypatch.setattr(state_module, "METRICS_FILE_BYTES", 1000)
    state = StateDir(tmp_path).create()
    row = {"round": 0, "pad": "x" * 80}
    for r in range(200):
        state.append_metrics(row | {"round": r})
    files = sorted(p.name for p in tmp_path.glob("metrics.jsonl*") if p.name != "metrics.jsonl")
    assert files == [f"metrics.jsonl.{i}" for i in range(1, state_module.METRICS_FILE_BACKUPS + 1)]
    assert all(p.stat().st_size < 1000 + 200 for p in tmp_path.glob("metrics.jsonl*"))
    rows = [r["round"] for p in (f"metrics.jsonl.{i}" for i in range(3, 0, -1))
            for r in map(json.loads, (tmp_path / p).read_text().splitlines())] + \
        [r["round"] for r in state.read_metrics()]
    assert rows == list(range(rows[0], 200))  # whole rows, in order, none lost between the files
    assert state.last_metrics()["round"] == 199
    (tmp_path / "metrics.jsonl").write_text("")  # just rotated: the last row is in .1
    assert state.last_metrics()["round"] == json.loads((tmp_path / "metrics.jsonl.1").read_text().splitlines()[-1])["round"]


def test_a_state_dir_that_cannot_be_created_is_the_options_error(tmp_path: Path) -> None:
    """Exit 2 naming node.data_dir, like preflight's refusals, not a state fault (exit 1)."""
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(OptionError, match="cannot create") as caught:
        StateDir(blocker / "state").create()
    assert caught.value.key == "node.data_dir"
    with pytest.raises(OptionError, match="File exists"):  # a file where the dir should be
        StateDir(blocker).create()
