"""The node's state directory: layout, single-daemon lock, checkpoints.

Layout (all under one directory, mode 0700)::

    identity.key      Ed25519 seed, peer id, checksum (protocol.identity.Identity.load_or_create)
    node.lock         flock()ed by the running daemon; never deleted
    .NAME.tmp-PID     a write in progress (fsutil); one whose writer died is removed at the next start
    node.pid          pid of the daemon holding the lock
    api.json          where the local HTTP API listens (for `murmur status`)
    peers.json        peer table (protocol.peertable)
    checkpoint.bin    model checkpoint, checkpoint.bin.prev the one before
    history.bin       SybilWall histories (same container as checkpoints)
    metrics.jsonl     one JSON object per round, appended
    murmur.log        the daemon's log (`murmur node start`), rotated to murmur.log.1 ...

Why flock and not just a pid file: the kernel drops a flock when its process
dies, even on kill -9, so a crashed daemon never leaves a stale lock behind
and two live daemons can never share keys, peer table or checkpoints.

Array files are never pickled. Container format (``ARRAY_FILE_MAGIC``)::

    magic (8 bytes) | BLAKE2b-256 of body (32 bytes) | body

where body is msgpack ``{"meta": {...}, "arrays": {name: [dtype str, shape, raw bytes]}}``
with only plain numeric dtypes accepted. The checksum detects torn or
bit-rotted files; writes go through :func:`murmur.fsutil.atomic_write_bytes`
and the previous good file is kept as ``*.prev`` to fall back to.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from murmur.errors import OptionError, StateDamaged, StateError, StateInUse
from murmur.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_parts, remove_stale_temps
from murmur.protocol.identity import KEY_FILE_NAME, Identity

log = logging.getLogger(__name__)

STATE_DIR_MODE = 0o700
LOCK_FILE = "node.lock"
PID_FILE = "node.pid"
API_FILE = "api.json"
PEERS_FILE = "peers.json"
CHECKPOINT_FILE = "checkpoint.bin"
HISTORY_FILE = "history.bin"
METRICS_FILE = "metrics.jsonl"
PRIVACY_FILE = "privacy.json"  # the privacy ledger: what this node's ε was spent on, across restarts
PRIVACY_FORMAT = 1
METRICS_TAIL_BYTES = 64 * 1024  # more than any one metrics row
# metrics.jsonl moves to metrics.jsonl.1 (.1 to .2, ...) once it holds this
# much: a row is ~0.6 KiB, so a node training a round a second until stopped
# wrote ~55 MB a day, for good, until the disk was full and the node stopped.
METRICS_FILE_BYTES = 32 * 1024 * 1024  # ~50,000 rows
METRICS_FILE_BACKUPS = 3  # metrics.jsonl.1 .. .3 kept: at most 128 MiB per node
LOG_FILE = "murmur.log"  # `murmur node start` logs here too (rotated: murmur.log.1, ...)
PREV_SUFFIX = ".prev"

ARRAY_FILE_MAGIC = b"MURMARR1"
_DIGEST_LEN = 32
_HEADER_LEN = len(ARRAY_FILE_MAGIC) + _DIGEST_LEN
#: dtype kinds allowed in array files: bool, signed/unsigned int, float, complex.
#: Object, string and void dtypes could smuggle in anything; refuse them.
_SAFE_DTYPE_KINDS = frozenset("biufc")
_BIN32 = b"\xc6"  # msgpack's bin 32 marker; a big-endian u32 length follows


@dataclass(frozen=True)
class ArrayBundle:
    """What an array file holds, and which file it actually came from."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    source: Path


LEDGER_ADVICE = ("refusing to start from epsilon 0; restore it from a backup (removing it would spend the "
                 "privacy budget again)")
MAX_PID = 2**22
"""Linux's largest pid_max."""


@dataclass(frozen=True)
class ApiInfo:
    """Contents of ``api.json``."""

    host: str
    port: int
    pid: int
    peer_id: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# ---------------------------------------------------------------- array files


def _safe_dtype(text: str) -> np.dtype[Any]:
    try:
        dtype = np.dtype(text)
    except TypeError as exc:
        raise StateError(f"bad dtype {text!r}") from exc
    if dtype.kind not in _SAFE_DTYPE_KINDS or dtype.hasobject:
        raise StateError(f"refusing dtype {text!r}: only plain numeric arrays are stored")
    return dtype


def encode_array_parts(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> list[bytes | memoryview]:
    """The checksummed container as pieces to write one after another, each
    array's bytes a view of the array itself: a 10M-parameter checkpoint
    (three 40 MB arrays) used to be copied three times over (``tobytes``,
    msgpack's body, the header join), 360 MB of transient memory every round.

    Same bytes as msgpack would write, except that every array payload is a
    bin 32 (any msgpack reader takes it; msgpack picks the shortest form)."""
    views = []
    for name, array in arrays.items():
        arr = np.asarray(array)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # (a 0-d array is contiguous: its shape () is kept)
        dtype = _safe_dtype(arr.dtype.str)
        views.append((name, dtype.str, list(arr.shape), memoryview(arr.reshape(-1)).cast("B")))
    packer = msgpack.Packer(use_bin_type=True)
    try:
        head = packer.pack_map_header(2) + packer.pack("meta") + packer.pack(dict(meta))
    except TypeError as exc:
        raise StateError(f"metadata is not serialisable: {exc}") from exc
    body: list[bytes | memoryview] = [head + packer.pack("arrays") + packer.pack_map_header(len(views))]
    for name, dtype_text, shape, payload in views:
        body.append(packer.pack(name) + packer.pack_array_header(3) + packer.pack(dtype_text) + packer.pack(shape)
                    + _BIN32 + struct.pack(">I", payload.nbytes))
        body.append(payload)
    digest = hashlib.blake2b(digest_size=_DIGEST_LEN)
    for piece in body:
        digest.update(piece)
    return [ARRAY_FILE_MAGIC + digest.digest(), *body]


def encode_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """Serialise arrays + JSON-like metadata into the checksummed container."""
    return b"".join(encode_array_parts(arrays, meta))


def decode_arrays(data: bytes, source: Path) -> ArrayBundle:
    """Verify and decode a container; any damage raises :class:`StateError`."""
    if len(data) < _HEADER_LEN or not data.startswith(ARRAY_FILE_MAGIC):
        raise StateError(f"{source}: not a murmur array file (bad magic or truncated)")
    digest, body = data[len(ARRAY_FILE_MAGIC) : _HEADER_LEN], memoryview(data)[_HEADER_LEN:]
    if hashlib.blake2b(body, digest_size=_DIGEST_LEN).digest() != digest:
        raise StateError(f"{source}: checksum mismatch (torn or corrupted file)")
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
        meta, packed = doc["meta"], doc["arrays"]
        arrays = {}
        for name, (dtype_text, shape, raw) in packed.items():
            dtype = _safe_dtype(dtype_text)
            shape = tuple(shape)
            if not all(isinstance(n, int) and n >= 0 for n in shape):
                raise StateError(f"{source}: array {name!r} has a bad shape {shape!r}")
            count = int(np.prod(shape, dtype=np.int64))
            if count * dtype.itemsize != len(raw):
                raise StateError(f"{source}: array {name!r} has {len(raw)} bytes, expected {count * dtype.itemsize}")
            # copy: the bundle must not pin the whole file buffer, and callers may write to it
            arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    except StateError:
        raise
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise StateError(f"{source}: malformed array file: {exc}") from exc
    if not isinstance(meta, dict):
        raise StateError(f"{source}: metadata is not a map")
    return ArrayBundle(arrays, meta, source)


FileIdentity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def file_identity(path: Path) -> FileIdentity | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_array_file(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, written: FileIdentity | None = None
) -> FileIdentity | None:
    """Atomically replace ``path``, keeping the current file as ``path.prev``
    if (and only if) it is intact — a corrupt current file must never push out
    the last good one. ``written``: the identity this function returned when
    it last wrote ``path``; a current file still bearing it is the one that
    write completed (renamed into place whole), so it is not read back and
    re-hashed — for a real model that was the whole checkpoint, every round.
    Returns the new file's identity."""
    parts = encode_array_parts(arrays, meta)
    prev = path.with_name(path.name + PREV_SUFFIX)
    current = file_identity(path)
    if current is not None:
        try:
            if written is None or current != written:
                decode_arrays(path.read_bytes(), path)
        except StateError as exc:
            log.warning("not keeping damaged file as fallback", extra={"path": str(path), "error": str(exc)})
        else:
            os.replace(path, prev)
    atomic_write_parts(path, parts, mode=0o600)
    return file_identity(path)


def read_array_file(path: Path) -> ArrayBundle | None:
    """Load ``path``, falling back to ``path.prev`` if it is missing or
    damaged. None if neither exists; :class:`StateError` if nothing usable."""
    prev = path.with_name(path.name + PREV_SUFFIX)
    errors = []
    for candidate in (path, prev):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{candidate}: {exc.strerror}")
            continue
        try:
            bundle = decode_arrays(data, candidate)
        except StateError as exc:
            log.warning("damaged state file, trying the previous one", extra={"path": str(candidate), "error": str(exc)})
            errors.append(str(exc))
            continue
        return bundle
    if errors:
        # StateDamaged (exit 2): a restart cannot mend it, and under systemd's
        # Restart=on-failure a plain failure restarted every 5 s for good.
        raise StateDamaged("no usable file: " + "; ".join(errors)
                           + f"; restore {path.name} from a backup, or move it away to start afresh")
    return None


# ------------------------------------------------------------------ state dir


class StateDir:
    """One node's state directory. ``with StateDir(p) as state:`` takes the lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._written: dict[Path, FileIdentity | None] = {}  # array files as this process last wrote them
        self._metrics_line_ended = False  # checked once per run: see append_metrics

    # -- layout
    @property
    def identity_path(self) -> Path:
        return self.path / KEY_FILE_NAME

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def pid_path(self) -> Path:
        return self.path / PID_FILE

    @property
    def api_path(self) -> Path:
        return self.path / API_FILE

    @property
    def peers_path(self) -> Path:
        return self.path / PEERS_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def privacy_path(self) -> Path:
        return self.path / PRIVACY_FILE

    # -- privacy ledger
    def save_privacy_ledger(self, ledger: list[list[Any]]) -> None:
        """Atomically, before the round's noised message leaves (a crash
        right after must not forget the round it spent)."""
        atomic_write_json(self.privacy_path, {"format": PRIVACY_FORMAT, "ledger": ledger}, mode=0o600)

    def load_privacy_ledger(self) -> list[list[Any]]:
        """The saved ledger entries, [] for a node that never spent any. A
        damaged file is a :class:`StateError`: starting again from ε = 0
        would break the node's privacy promise."""
        try:
            doc = json.loads(self.privacy_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise StateDamaged(f"privacy ledger {self.privacy_path} is unreadable ({exc}); {LEDGER_ADVICE}") from None
        if not isinstance(doc, dict) or doc.get("format") != PRIVACY_FORMAT or not isinstance(doc.get("ledger"), list):
            raise StateDamaged(f"privacy ledger {self.privacy_path} is not a format-{PRIVACY_FORMAT} ledger; "
                               f"{LEDGER_ADVICE}")
        return doc["ledger"]

    def create(self) -> StateDir:
        """Create the directory (0700: it holds the private key) if missing."""
        # The option's error (exit 2, naming node.data_dir), as preflight's:
        # a dir that only fails here (mkdir under /proc) exited 1 as a state fault.
        try:
            self.path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError("node.data_dir", f"cannot create {self.path}: {exc.strerror}") from exc
        if not self.path.is_dir():
            raise OptionError("node.data_dir", f"{self.path} is not a directory")
        return self

    def identity(self) -> Identity:
        self.create()
        try:
            return Identity.load_or_create(self.path)
        except OSError as exc:  # unreadable key, read-only dir: one line, not a traceback
            raise StateError(f"cannot load or create {self.identity_path}: {exc.strerror or exc}") from None

    # -- single-daemon lock
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the exclusive lock and write ``node.pid``; raises
        :class:`StateInUse` at once if another daemon holds it."""
        if self._lock_fd is not None:
            raise StateError(f"state dir {self.path} is already locked by this object")
        self.create()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self.read_pid()
                who = f" (pid {holder})" if holder else ""
                raise StateInUse(
                    f"state dir {self.path} is in use by another murmur daemon{who}; "
                    "stop it or choose another --data-dir"
                ) from None
            raise StateError(f"cannot lock {self.lock_path}: {exc.strerror}") from exc
        self._lock_fd = fd
        try:
            self.api_path.unlink(missing_ok=True)  # left by a daemon that died: stale by definition
            stale = remove_stale_temps(self.path)  # what a write interrupted by kill -9 left
            if stale:
                log.info("removed temp files of interrupted writes",
                         extra={"event": "stale_temps", "files": sorted(p.name for p in stale)})
            atomic_write_bytes(self.pid_path, f"{os.getpid()}\n".encode())
        except OSError as exc:
            self._lock_fd = None
            os.close(fd)  # drops the flock
            raise StateError(f"cannot write to state dir {self.path}: {exc.strerror or exc}") from None

    def release(self) -> None:
        if self._lock_fd is None:
            return
        self.pid_path.unlink(missing_ok=True)
        self.api_path.unlink(missing_ok=True)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> StateDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    # -- api.json
    def write_api_info(self, info: ApiInfo) -> None:
        """A :class:`StateError` if it cannot be written: on a full disk
        (node.pid, a few bytes, still fitted) `murmur node start` died with
        an OSError traceback instead of one line."""
        try:
            atomic_write_json(self.api_path, {"host": info.host, "port": info.port, "pid": info.pid,
                                              "peer_id": info.peer_id, "url": info.url})
        except OSError as exc:
            raise StateError(f"cannot write {self.api_path}: {exc.strerror or exc}") from None

    def read_api_info(self) -> ApiInfo:
        try:
            doc = json.loads(self.api_path.read_text())
            info = ApiInfo(host=str(doc["host"]), port=int(doc["port"]), pid=int(doc["pid"]), peer_id=str(doc["peer_id"]))
            if not (0 < info.pid <= MAX_PID and 0 < info.port <= 65535):
                # os.kill(0 or -1, 0) asks about a process group (always "alive"); a
                # pid past C's int raised OverflowError out of `murmur status`.
                raise ValueError(f"pid {info.pid} or port {info.port} out of range")
            return info
        except FileNotFoundError:
            raise StateError(f"no running node found: {self.api_path} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.api_path} is unreadable: {exc}") from exc

    # -- checkpoints and histories
    def save_checkpoint(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self._write_arrays(self.checkpoint_path, arrays, meta)

    def _write_arrays(self, path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self._written[path] = write_array_file(path, arrays, meta, written=self._written.get(path))

    def load_checkpoint(self) -> ArrayBundle | None:
        """The newest intact checkpoint (falls back to ``checkpoint.bin.prev``), or None."""
        return read_array_file(self.checkpoint_path)

    def set_aside_checkpoint(self, label: str) -> Path:
        """Move ``checkpoint.bin`` and its ``.prev`` to ``checkpoint-<label>.bin``
        (and ``.prev``); returns the new path. For a checkpoint of another
        model than the node now runs (the user changed their trainer): starting
        fresh used to write the new model over both files within two
        checkpoints, and the trained model was gone. ``label`` must be a
        plain file-name part."""
        stem, dot, ext = CHECKPOINT_FILE.partition(".")
        aside = self.path / f"{stem}-{label}{dot}{ext}"
        for source, target in ((self.checkpoint_path, aside),
                               (self.checkpoint_path.with_name(CHECKPOINT_FILE + PREV_SUFFIX),
                                aside.with_name(aside.name + PREV_SUFFIX))):
            try:
                os.replace(source, target)
            except FileNotFoundError:
                continue
        return aside

    def save_history(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self._write_arrays(self.history_path, arrays, meta)

    def load_history(self) -> ArrayBundle | None:
        return read_array_file(self.history_path)

    # -- metrics log
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line. A crash can at worst leave a partial last
        line, which :meth:`read_metrics` skips: the first append of a run
        ends such a line first (else the run's first row was glued to it,
        and lost with it)."""
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with open(self.metrics_path, "a+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if not self._metrics_line_ended:
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
                self._metrics_line_ended = True
            fh.write(line.encode())
        if size + len(line) >= METRICS_FILE_BYTES:
            self._rotate_metrics()

    def _rotate_metrics(self) -> None:
        """metrics.jsonl becomes metrics.jsonl.1, and so on up to
        METRICS_FILE_BACKUPS (the oldest dropped), as the node's log rotates;
        the next row starts a new file. Only whole rows move: the row that
        filled the file was just written."""
        base = self.metrics_path
        for i in range(METRICS_FILE_BACKUPS, 0, -1):
            older = base.with_name(f"{base.name}.{i - 1}") if i > 1 else base
            if older.exists():
                os.replace(older, base.with_name(f"{base.name}.{i}"))

    def last_metrics(self) -> dict[str, Any] | None:
        """The last intact metrics row, read from the end of the file (a
        long run's file is not read whole for one row), or of the one it was
        rotated to when it has none yet; None if there is none."""
        for path in (self.metrics_path, self.metrics_path.with_name(f"{METRICS_FILE}.1")):
            try:
                with open(path, "rb") as fh:
                    size = fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, size - METRICS_TAIL_BYTES))
                    tail = fh.read()
            except FileNotFoundError:
                continue
            for line in reversed(tail.splitlines()):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a torn last line, or the cut first one
                if isinstance(row, dict):
                    return row
        return None

    def read_metrics(self) -> list[dict[str, Any]]:
        records = []
        try:
            fh: IO[str] = open(self.metrics_path, encoding="utf-8")
        except FileNotFoundError:
            return records
        with fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("skipping damaged metrics line", extra={"path": str(self.metrics_path)})
        return records
