"""A Ray cluster of several hosts on one machine, for tests: each host a
network namespace with its own address on 198.18.0.0/15 (RFC 2544's
benchmarking range, routed nowhere real), all joined by one bridge that lives
in a namespace of its own (no interface is added to the machine's own
namespace), a Ray head in the first and a worker raylet in each other.

Ownership and cleanup: every namespace's name carries this process's pid;
leaving the ``with`` block kills every process inside them (all ours: nothing
else runs in a namespace we made) and deletes them, which removes their veths
and the bridge, also when the block fails. :func:`remove_stale` deletes what a
killed earlier test process left. Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PREFIX = "murmur-ray-"
NETNS_DIR = Path("/run/netns")
PREFIX_LEN = 15  # 198.18.0.0/15
BRIDGE = "br0"
HOST_IFACE = "eth0"
RAY_PORT = 6379
HOST_LABEL = "murmur-host"  # every raylet is labelled murmur-host=h<k>
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` notes its address
READY_TIMEOUT_S = float(os.environ.get('RAYNET_READY_S', 90))
POLL_S = 0.5
_OWNED = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check)


def can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    try:
        probe = f"{PREFIX}{os.getpid()}-probe"
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot create a network namespace: {getattr(exc, 'stderr', None) or exc}"
    return None


def _kill_inside(ns: str) -> None:
    """SIGKILL every process in ``ns`` until none is left (ours by construction)."""
    for _ in range(20):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)  # the kernel reaps asynchronously; bounded by the loop


def remove(namespaces: list[str]) -> list[str]:
    """Kill what runs in them and delete them; the problems (empty: all gone)."""
    problems = []
    for ns in namespaces:
        if not (NETNS_DIR / ns).exists():
            continue
        _kill_inside(ns)
        result = _ip("netns", "del", ns, check=False)
        if result.returncode != 0:
            problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
    return problems


def remove_stale() -> None:
    """Namespaces of earlier test processes that are gone (killed before cleaning up)."""
    if not NETNS_DIR.exists():
        return
    stale = []
    for entry in NETNS_DIR.iterdir():
        m = _OWNED.match(entry.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(entry.name)
    remove(stale)


@dataclass
class RayHosts:
    """``hosts`` namespaces (the first runs the head) on one bridge; see the module docstring."""

    hosts: int = 3
    cpus_per_host: int = 2
    env: dict[str, str] = field(default_factory=dict)  # for the raylets (and the actors they start)
    log_dir: Path | None = None
    namespaces: list[str] = field(default_factory=list)
    _raylets: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, k: int) -> str:
        return f"{PREFIX}{os.getpid()}-h{k}"

    @staticmethod
    def address(k: int) -> str:
        return f"198.18.{k}.1"

    @property
    def head_address(self) -> str:
        return f"{self.address(0)}:{RAY_PORT}"

    def exec_prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k)]

    def __enter__(self) -> RayHosts:
        remove_stale()
        try:
            self._wire()
            self._start_ray()
        except BaseException:
            self.close()
            raise
        return self

    def _wire(self) -> None:
        seg = f"{PREFIX}{os.getpid()}-seg"
        self.namespaces.append(seg)
        _ip("netns", "add", seg)
        _ip("-n", seg, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", seg, "link", "set", BRIDGE, "up")
        for k in range(self.hosts):
            ns, far = self.ns(k), f"v{k}"
            self.namespaces.append(ns)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", HOST_IFACE, "type", "veth", "peer", "name", far, "netns", seg)
            _ip("-n", seg, "link", "set", far, "master", BRIDGE)
            _ip("-n", seg, "link", "set", far, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(k)}/{PREFIX_LEN}", "dev", HOST_IFACE)
            _ip("-n", ns, "link", "set", HOST_IFACE, "up")
            # on-link default: Ray finds a host's address by the route to a public
            # one; packets to anything outside 198.18.0.0/15 die on the bridge
            _ip("-n", ns, "route", "add", "default", "dev", HOST_IFACE)

    def _start_ray(self) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        env = dict(os.environ) | self.env
        for k in range(self.hosts):
            role = (["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if k == 0
                    else [f"--address={self.head_address}"])
            argv = [*self.exec_prefix(k), ray, "start", "--block", *role, f"--node-ip-address={self.address(k)}",
                    f"--labels={HOST_LABEL}=h{k}",
                    f"--num-cpus={self.cpus_per_host}", "--num-gpus=0", "--disable-usage-stats"]
            out = open(self.log_dir / f"raylet{k}.log", "ab") if self.log_dir else subprocess.DEVNULL
            with out if self.log_dir else contextlib.nullcontext():
                self._raylets.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                      start_new_session=True))
            # one at a time: a raylet gives up after 30 s unregistered, and on a
            # loaded 2-core box several starting at once did
            self._wait_nodes(k + 1)

    def _wait_nodes(self, count: int) -> None:
        """Until ``count`` raylets are alive in the cluster (asked from the head's namespace)."""
        check = (f"import ray,sys; ray.init(address='{self.head_address}', logging_level='error'); "
                 f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)")
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: list[str] = []
        while time.monotonic() < deadline:
            dead = [p for p in self._raylets if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited ({dead[0].returncode}); see {self.log_dir}")
            probe = subprocess.run([*self.exec_prefix(0), sys.executable, "-c", check], capture_output=True,
                                   env=dict(os.environ) | self.env, timeout=READY_TIMEOUT_S)
            if probe.returncode == 0:
                return
            last = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
            time.sleep(POLL_S)  # polling the cluster's membership
        raise RuntimeError(f"{count} Ray hosts did not come up in {READY_TIMEOUT_S:.0f} s: {last}")

    def close(self) -> list[str]:
        for p in self._raylets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        problems = remove(self.namespaces)
        for p in self._raylets:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        # a killed head leaves Ray's "current cluster" note behind; a later
        # ray.init() without an address would try to join our gone head
        with contextlib.suppress(OSError):
            if CURRENT_CLUSTER.read_text().strip() == self.head_address:
                CURRENT_CLUSTER.unlink()
        return problems

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        problems = self.close()
        if problems and exc is None:
            raise RuntimeError("; ".join(problems))
