"""Other libp2p implementations as real processes, installed by the tests themselves.

* py-libp2p (PyPI ``libp2p==0.8.1``, trio-based) in its own virtualenv;
* js-libp2p (npm ``libp2p`` with ``@chainsafe/libp2p-noise``,
  ``@chainsafe/libp2p-yamux``, ``@libp2p/identify``, ``@libp2p/ping``; the
  exact versions are in ``js/package.json``) under the machine's Node.

Both are installed once into a cache (``$MURMUR_INTEROP_CACHE``, default
``~/.cache/murmur-interop``; a marker file says an install completed, a lock
keeps concurrent runs from installing twice) and reused by later runs. A test
is skipped, with the reason, only when its implementation cannot be
installed (no network to the registry, no ``node``).

Each peer is a long-lived subprocess (one per test module and
implementation) driven by JSON lines: :class:`RemotePeer`. Its stderr is kept
in the cache's ``logs/`` and its tail appended to any failure: the evidence,
if the other implementation misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PY_LIBP2P = "libp2p==0.8.1"
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 60


def cache_root() -> Path:
    root = Path(os.environ.get("MURMUR_INTEROP_CACHE", Path.home() / ".cache" / "murmur-interop"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv[:3])}... exited {proc.returncode}: {' | '.join(tail)}")


def _installed(name: str, install) -> tuple[Path, float]:  # type: ignore[no-untyped-def]
    """``install(dir)`` once per cache; returns the directory and the seconds
    this run spent installing (0 when cached). Skips the test with the reason
    when it fails."""
    root = cache_root()
    target = root / name
    marker = target / ".installed"
    with _locked(root / f"{name}.lock"):
        if marker.exists():
            return target, 0.0
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        start = time.monotonic()
        try:
            install(target)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(target, ignore_errors=True)
            pytest.skip(f"{name} could not be installed: {exc}")
        seconds = time.monotonic() - start
        marker.write_text(json.dumps({"install_s": round(seconds, 1), "at": time.time()}))
        return target, seconds


def py_libp2p_python() -> tuple[Path, float]:
    def install(target: Path) -> None:
        _run([sys.executable, "-m", "venv", str(target / "venv")])
        _run([str(target / "venv" / "bin" / "pip"), "install", "--quiet", PY_LIBP2P])

    target, seconds = _installed("py-libp2p-0.8.1", install)
    return target / "venv" / "bin" / "python", seconds


def js_libp2p_dir() -> tuple[Path, float]:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("js-libp2p needs node and npm on the PATH")
    manifests = ("package.json", "package-lock.json")  # the lock pins every transitive version too
    digest = hashlib.sha256(b"".join((HERE / "js" / m).read_bytes() for m in manifests)).hexdigest()[:12]

    def install(target: Path) -> None:
        for manifest in manifests:
            shutil.copy(HERE / "js" / manifest, target / manifest)
        _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target)

    target, seconds = _installed(f"js-libp2p-{digest}", install)
    for script in ("peer.mjs", "polyfill.mjs", "private-ranges.mjs", "private-ranges-loader.mjs"):  # ours: always current
        shutil.copy(HERE / "js" / script, target / script)
    return target, seconds


class RemotePeer:
    """Another implementation's peer in a subprocess; one JSON command, one JSON reply."""

    def __init__(self, name: str, argv: list[str], cwd: Path, install_s: float) -> None:
        self.name = name
        self.install_s = install_s
        logs = cache_root() / "logs"
        logs.mkdir(exist_ok=True)
        self.log_path = logs / f"{name}-{os.getpid()}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "w")
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()
        ready = self._reply(START_TIMEOUT_S)
        self.start_s = time.monotonic() - started
        self.peer_id: str = ready["peer_id"]
        self.addrs: list[str] = ready["addrs"]
        self.lock = threading.Lock()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no answer within {timeout}s{self.evidence()}") from None
        if line is None:
            raise AssertionError(f"{self.name} exited ({self.proc.poll()}){self.evidence()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise AssertionError(f"{self.name}: {reply.get('error')}{self.evidence()}")
        return reply

    def call(self, cmd: str, timeout: float = 60, **args: object) -> dict:
        with self.lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": cmd, "timeout": timeout, **args}) + "\n")
            self.proc.stdin.flush()
            return self._reply(timeout + 5)

    async def acall(self, cmd: str, timeout: float = 60, **args: object) -> dict:
        """``call`` off the event loop, so our host serves the peer meanwhile."""
        return await asyncio.to_thread(self.call, cmd, timeout, **args)

    def evidence(self) -> str:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return f"\n--- {self.name} stderr ({self.log_path}), last lines:\n" + "\n".join(tail) if tail else ""

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="module", params=["py-libp2p", "js-libp2p"])
def remote(request: pytest.FixtureRequest) -> Iterator[RemotePeer]:
    if request.param == "py-libp2p":
        python, install_s = py_libp2p_python()
        peer = RemotePeer("py-libp2p", [str(python), str(HERE / "py_peer.py")], HERE, install_s)
    else:
        target, install_s = js_libp2p_dir()
        peer = RemotePeer("js-libp2p", ["node", "--import", "./polyfill.mjs", "peer.mjs"], target, install_s)
    try:
        yield peer
    finally:
        peer.close()
