"""Network impairments for the testnet: latency, loss and partitions.

Real impairments need each node in its own network namespace, joined to a
bridge by a veth pair, so traffic between two nodes crosses interfaces we can
shape: ``tc netem`` adds delay/loss on a node's interface, and blackhole routes
inside a namespace cut it off from the other side of a partition (silently, as
a real partition does: packets vanish, connections time out).

This module only *builds* exact command lines (pure, unit-tested) and runs them
(:func:`run`). It needs root, ``ip`` and ``tc``, and for latency/loss the
``sch_netem`` kernel module; :func:`probe` reports what is missing so the
controller can log ``skipped: <reason>`` instead of pretending. A loopback-only
testnet (all nodes on 127.0.0.1) cannot be shaped per node this way; there the
controller implements partition/heal at the application level.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from murmur.errors import MurmurError

log = logging.getLogger(__name__)

Command = list[str]

BRIDGE = "murmurbr0"
NS_PREFIX = "murmur-n"
HOST_VETH_PREFIX = "mveth"
NODE_IFACE = "eth0"
SUBNET_PREFIX = "10.77"  # 10.77.x.y/16: room for 65k nodes
PREFIX_LEN = 16
BRIDGE_ADDR = f"{SUBNET_PREFIX}.255.254"
COMMAND_TIMEOUT_S = 10.0


class NetemError(MurmurError):
    """A network command failed; the message holds the command and its stderr."""


# ----------------------------------------------------------------- naming


def namespace(i: int) -> str:
    return f"{NS_PREFIX}{i}"


def node_address(i: int) -> str:
    """The IPv4 address of node ``i`` inside its namespace (skips .0 and .255)."""
    if not 0 <= i < 254 * 255:
        raise ValueError(f"node index {i} out of range for {SUBNET_PREFIX}.0.0/{PREFIX_LEN}")
    return f"{SUBNET_PREFIX}.{i // 254}.{i % 254 + 1}"


def exec_prefix(i: int) -> Command:
    """Prepend to a node's argv so it runs inside its namespace."""
    return ["ip", "netns", "exec", namespace(i)]


# --------------------------------------------------------------- builders


def setup_commands(n: int) -> list[Command]:
    """Bridge + one namespace and veth pair per node, addressed and up."""
    cmds: list[Command] = [
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ]
    for i in range(n):
        ns, host = namespace(i), f"{HOST_VETH_PREFIX}{i}"
        cmds += [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns],
            ["ip", "link", "set", host, "master", BRIDGE],
            ["ip", "link", "set", host, "up"],
            ["ip", "-n", ns, "addr", "add", f"{node_address(i)}/{PREFIX_LEN}", "dev", NODE_IFACE],
            ["ip", "-n", ns, "link", "set", NODE_IFACE, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
    return cmds


def teardown_commands(n: int) -> list[Command]:
    """Deleting a namespace deletes its veth end, which deletes the pair."""
    return [["ip", "netns", "del", namespace(i)] for i in range(n)] + [["ip", "link", "del", BRIDGE]]


@dataclass(frozen=True)
class Shaping:
    """What netem applies on one node's interface (egress)."""

    delay_ms: float = 0.0
    loss_percent: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.loss_percent <= 100:
            raise ValueError(f"invalid shaping {self}")

    @property
    def is_clear(self) -> bool:
        return self.delay_ms == 0 and self.loss_percent == 0


def shaping_commands(i: int, shaping: Shaping) -> list[Command]:
    """Set (replace) or clear node ``i``'s netem qdisc. Delay and loss live in
    one qdisc, so the controller passes the node's combined state."""
    base = ["tc", "-n", namespace(i), "qdisc"]
    if shaping.is_clear:
        return [[*base, "del", "dev", NODE_IFACE, "root"]]
    args = [*base, "replace", "dev", NODE_IFACE, "root", "netem"]
    if shaping.delay_ms:
        args += ["delay", f"{shaping.delay_ms:g}ms"]
    if shaping.loss_percent:
        args += ["loss", f"{shaping.loss_percent:g}%"]
    return [args]


def partition_commands(side: Iterable[int], n: int) -> list[Command]:
    """Cut ``side`` off from the other nodes: blackhole routes both ways."""
    a = sorted(set(side))
    b = [j for j in range(n) if j not in set(a)]
    cmds = []
    for src, dsts in [(i, b) for i in a] + [(j, a) for j in b]:
        cmds += [["ip", "-n", namespace(src), "route", "add", "blackhole", f"{node_address(d)}/32"] for d in dsts]
    return cmds


def heal_commands(n: int) -> list[Command]:
    return [["ip", "-n", namespace(i), "route", "flush", "type", "blackhole"] for i in range(n)]


# ----------------------------------------------------------------- running

Runner = Callable[[Command], subprocess.CompletedProcess[str]]


def _default_runner(cmd: Command) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def run(cmds: Sequence[Command], runner: Runner = _default_runner) -> None:
    """Run commands in order; the first failure raises :class:`NetemError`."""
    for cmd in cmds:
        result = runner(cmd)
        if result.returncode != 0:
            raise NetemError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Capabilities:
    """None = available; otherwise the reason it is not."""

    netns: str | None
    netem: str | None


PROBE_NS = f"murmur-probe-{os.getpid()}"


def probe(runner: Runner = _default_runner) -> Capabilities:
    """Find out, by trying in a throw-away namespace, what this host allows."""
    if os.geteuid() != 0:
        return Capabilities("not running as root", "not running as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (iproute2)"
        return Capabilities(reason, reason)
    try:
        run([["ip", "netns", "add", PROBE_NS]], runner)
    except NetemError as exc:
        return Capabilities(f"cannot create network namespaces: {exc}", "needs network namespaces")
    try:
        run([["ip", "-n", PROBE_NS, "link", "set", "lo", "up"],
             ["tc", "-n", PROBE_NS, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]], runner)
        netem = None
    except NetemError as exc:
        netem = f"tc netem unavailable (kernel module sch_netem?): {exc}"
    finally:
        runner(["ip", "netns", "del", PROBE_NS])
    return Capabilities(None, netem)


def skipped(what: str, reason: str) -> None:
    """The one way an impairment that cannot run is reported."""
    log.warning("skipped: %s: %s", what, reason)
