"""A fork server: import torch and the node's stack once, fork every worker from it.

Why: a testnet worker spends ~5 s of CPU importing before it can run a node
(torch ~1.8 s, ``torch._dynamo`` ~1.5 s, which every ``torch.optim`` call
pulls in, the privacy stack ~1.8 s). The controller starts 4-13 such processes
at once, and on a 2-core box they shared the cores for 14-48 s before the
first round. Forked from a server that has done those imports, a worker is up
in the time its nodes take to open their state dirs.

The server is an ordinary child of the :class:`~murmur.testnet.procs.Supervisor`
(own session, ``PR_SET_PDEATHSIG``). The parent talks to it over a
``SOCK_SEQPACKET`` socket pair, one JSON request per packet:

* ``spawn``: fork, run ``<module>.main(args)`` in the child with its output on
  the log file whose descriptor rides along (``SCM_RIGHTS``); reply the pid.
  The child starts its own session and asks for ``PR_SET_PDEATHSIG`` against
  the server, so a killed controller takes the server, and the server its
  children, with it — the chain the supervisor gives its direct children.
* ``reap``: ``waitpid`` one child that has exited; reply its exit code in
  ``subprocess``'s convention (negative: killed by that signal).

The server never reaps on its own: an exited child stays a zombie until the
parent, which watches it through a pidfd, asks. So a child's pid cannot be
reused while the parent may still signal its process group — the guarantee
``Popen`` gives the supervisor for children it started itself.

Fork safety: the server only imports. It runs no torch op (no intra-op pool
exists to be lost in the fork), no event loop, and no threads of its own; the
workers get OMP/MKL set to one thread in their environment.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from murmur.fastexit import exit_after_shutdown
from murmur.testnet.spawn import popen_supervised, set_parent_death_signal

MAX_PACKET = 64 * 1024  # a spawn request is a module name and a worker's arguments
PRELOAD_ATTRIBUTE = "FORK_PRELOAD"  # module-level tuple of module names the server imports too
START_TIMEOUT_S = 120.0  # imports on a loaded 2-core box; the caller falls back to plain processes
CLOSE_WAIT_S = 5.0
REQUEST_TIMEOUT_S = 30.0  # a fork of a big interpreter takes milliseconds; this bounds a wedged server


class ForkServerError(RuntimeError):
    """The fork server is not there, or refused a request."""


class Op(enum.StrEnum):
    SPAWN = "spawn"
    REAP = "reap"


# ---------------------------------------------------------------- server side


def _exit_code(value: object) -> int:
    """``SystemExit.code`` as a process exit code (as the interpreter does it)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _run_child(sock: socket.socket, log_fd: int, settled: int, module: str, args: list[str], server_pid: int) -> NoReturn:
    """The forked child: become a supervised worker, run ``module.main(args)``,
    and never return into the server's loop. Writing to (closing) ``settled``
    tells the server the child leads its own process group: only then does the
    parent learn the pid, so its first ``killpg`` cannot miss (Popen, too,
    returns only once the child has run its ``setsid``)."""
    code = 1
    try:
        sock.close()
        os.setsid()
        set_parent_death_signal(server_pid)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(settled)
        sys.argv = [module, *args]
        code = importlib.import_module(module).main(args)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - the child must end here, with the traceback in its log
        traceback.print_exc()
        code = 1
    finally:
        _ignore_stop_signals()
    exit_after_shutdown(code)


def _ignore_stop_signals() -> None:
    """The worker's main is over: a stop signal now (a handler of the
    worker's, raising SystemExit) would escape into the server's code that
    this process was forked from, and change the exit code. CPython runs a
    pending Python handler only if it is still installed, so this also
    drops one that arrived a moment ago."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _spawn(sock: socket.socket, request: Mapping[str, Any], fds: list[int]) -> dict[str, Any]:
    if len(fds) != 1:
        raise ForkServerError(f"spawn needs one log descriptor, got {len(fds)}")
    module, args = request["module"], [str(a) for a in request["args"]]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing buffered may be written twice
    settled_r, settled_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(settled_r)
        _run_child(sock, fds[0], settled_w, module, args, os.getppid())
    os.close(settled_w)
    try:
        os.read(settled_r, 1)  # EOF once the child closed its end (or died)
    finally:
        os.close(settled_r)
    return {"pid": pid}


def _reap(request: Mapping[str, Any]) -> dict[str, Any]:
    """Collect a child that has exited (the parent asks once its pidfd says
    so); one still running is an error, never a wait that wedges the server."""
    pid, status = os.waitpid(int(request["pid"]), os.WNOHANG)
    if pid == 0:
        raise ForkServerError(f"pid {request['pid']} has not exited")
    return {"returncode": os.waitstatus_to_exitcode(status)}


def serve(sock: socket.socket) -> None:
    """Answer requests until the parent closes its end."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, 1)
        except ConnectionResetError:
            return
        if not msg:
            return
        try:
            request = json.loads(msg)
            op = Op(request["op"])
            reply = _spawn(sock, request, fds) if op is Op.SPAWN else _reap(request)
        except Exception as exc:  # noqa: BLE001 - a bad request is answered, never the server's end
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def preload(module: str) -> None:
    """Import ``module`` and what it names in ``FORK_PRELOAD``."""
    mod = importlib.import_module(module)
    for name in getattr(mod, PRELOAD_ATTRIBUTE, ()):
        importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m murmur.testnet.forkserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="our end of the parent's SOCK_SEQPACKET socket pair")
    parser.add_argument("--tag", default="", help="ignored; names the run in ps output (the run dir)")
    parser.add_argument("module", help="the module whose main(args) every child runs")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    preload(args.module)
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    serve(sock)
    return 0


# ---------------------------------------------------------------- parent side


class ForkedProcess:
    """The part of ``subprocess.Popen`` a :class:`~murmur.testnet.procs.ChildProcess`
    uses, for a child of the fork server: exit seen through a pidfd, exit code
    from the server's ``waitpid``."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server
        self._pidfd: int | None = os.pidfd_open(pid)  # the server does not reap it before we ask
        self._lock = threading.Lock()

    def _exited(self, timeout: float | None) -> bool:
        assert self._pidfd is not None
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None and self._exited(0):
                self._collect()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._lock:
            if self.returncode is None:
                if not self._exited(timeout):
                    raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout or 0.0)
                self._collect()
            assert self.returncode is not None
            return self.returncode

    def _collect(self) -> None:
        try:
            self.returncode = self._server.reap(self.pid)
        except ForkServerError:
            # the server is gone, and PDEATHSIG with it took the child: the
            # kernel's init reaped it, and SIGKILL is what it died of
            self.returncode = -signal.SIGKILL
        assert self._pidfd is not None
        os.close(self._pidfd)
        self._pidfd = None


class ForkServer:
    """Parent side: starts the server, forks children through it.

    ``serves(argv, env, cwd)`` says whether a command is one the server can
    run instead: ``[sys.executable, "-m", module, *args]`` for its module, in
    the environment it was started with. Requests are serialised by a lock;
    the supervisor's callers use it from the event loop and worker threads.
    """

    def __init__(self, module: str, *, env: Mapping[str, str], log_path: Path, tag: str = "") -> None:
        self.module = module
        self.env = dict(env)
        self.log_path = log_path
        self.tag = tag
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._pending: socket.socket | None = None  # our end, from launch() until wait_ready()
        self._closed = False  # close() may run while wait_ready() waits in another thread (Ctrl-C)

    @property
    def ready(self) -> bool:
        return self._sock is not None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """:meth:`launch`, then :meth:`wait_ready`."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process (quick: call it from the thread that
        starts the other children; the fork behind ``Popen`` is safest there)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--tag", self.tag, self.module]
            with self._lock:
                if self._closed or self._popen is not None:
                    raise ForkServerError("the fork server was closed, or launched already")
                self._popen = popen_supervised(argv, log_path=self.log_path, env=self.env, pass_fds=(theirs.fileno(),))
                self._pending = ours
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the server's imports are done (seconds: run it off the
        event loop); raises :class:`ForkServerError`, and leaves nothing
        running, if it does not get there."""
        with self._lock:
            ours, self._pending = self._pending, None
        if ours is None or self._popen is None:
            raise ForkServerError("the fork server was not launched, or was closed")
        ours.settimeout(timeout)
        try:
            hello = json.loads(ours.recv(MAX_PACKET) or b"{}")
        except (OSError, ValueError) as exc:
            hello = {"error": str(exc)}
        if "ready" not in hello:
            ours.close()
            self._stop_process(kill=True)
            raise ForkServerError(f"the fork server did not start ({hello.get('error', 'it exited')}; see {self.log_path})")
        ours.settimeout(REQUEST_TIMEOUT_S)
        with self._lock:
            if not self._closed:
                self.pid, self._sock = self._popen.pid, ours
                return
        ours.close()  # closed while we waited: close() has already stopped the process
        raise ForkServerError("the fork server was closed while it started")

    def serves(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: object) -> bool:
        return (self.ready and cwd is None and env is not None and dict(env) == self.env
                and list(argv[:3]) == [sys.executable, "-m", self.module])

    def _request(self, request: Mapping[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        with self._lock:
            if self._sock is None:
                raise ForkServerError("the fork server is closed")
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], list(fds))
                raw = self._sock.recv(MAX_PACKET)
            except OSError as exc:
                raise ForkServerError(f"fork server: {exc}") from exc
        if not raw:
            raise ForkServerError("the fork server exited")
        reply = json.loads(raw)
        if "error" in reply:
            raise ForkServerError(f"fork server refused {request['op']}: {reply['error']}")
        return reply

    def spawn(self, args: Sequence[str], log_path: Path) -> ForkedProcess:
        """Fork a child that runs ``module.main(args)``, output appended to ``log_path``."""
        with open(log_path, "ab") as out:  # the server receives its own copy of the descriptor
            pid = int(self._request({"op": Op.SPAWN, "module": self.module, "args": list(args)}, [out.fileno()])["pid"])
        return ForkedProcess(self, pid)

    def reap(self, pid: int) -> int:
        return int(self._request({"op": Op.REAP, "pid": pid})["returncode"])

    def close(self) -> None:
        """Let the server go (call it after its children have been stopped:
        they die with it). Closing our end is its signal to exit."""
        with self._lock:
            self._closed = True
            for sock in (self._sock, self._pending):
                if sock is not None:
                    sock.close()
            self._sock = self._pending = None
            ready = self.pid is not None
        self._stop_process(kill=not ready)  # still importing: nothing to finish

    def _stop_process(self, kill: bool = False) -> None:
        """Wait for the server to leave after EOF (``kill``: do not wait)."""
        if self._popen is None:
            return
        try:
            self._popen.wait(0 if kill else CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait()


if __name__ == "__main__":
    exit_after_shutdown(main())
