"""What tests on the emulated internet share: the root check, and plain TCP
endpoints made inside its hosts from the test process itself (no helper
processes: :func:`murmur.testnet.internet.socket_in`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import Libp2pHost
from murmur.protocol.libp2p.host import HostConfig
from murmur.protocol.transport import TransportLimits
from murmur.testnet import internet
from murmur.testnet.internet import Internet

IO_TIMEOUT_S = 10.0
RTT_PROBES = 9  # UDP round trips a measured RTT is the median of
APT_TIMEOUT_S = 300.0


def require_internet() -> None:
    """Skip when not root (namespaces, nftables and tc need it); as root,
    install nftables if it is missing, and fail, not skip, when the
    emulation still cannot run: CI runs as root and must run these tests."""
    if os.geteuid() != 0:
        pytest.skip("the emulated internet needs root (network namespaces, nftables, tc)")
    if shutil.which("nft") is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "-q", "nftables"], capture_output=True, timeout=APT_TIMEOUT_S,
                       check=False)
    reason = internet.probe().internet
    if reason is not None:
        pytest.fail(f"running as root, yet the emulated internet cannot run: {reason}")


@dataclass(frozen=True)
class TestnetRun:
    returncode: int
    stdout: str
    stderr: str
    left: list[str]  # namespaces of its emulated internet still there after it exited (removed since)


def run_testnet(argv: list[str], env: dict[str, str], timeout_s: float) -> TestnetRun:
    """Run ``murmur testnet run`` with ``[network]``; whatever happens, remove
    the namespaces its emulated internet left (those named after its pid: other
    runs' on the machine are not ours) and say which there were."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        internet.cleanup_stale()  # killed: its namespaces stay behind (its workers died with it)
        raise
    left = [ns for ns in internet.owned_namespaces() if ns.startswith(f"{internet.NS_PREFIX}{proc.pid}.")]
    internet.remove_namespaces(left)  # gone whatever follows; and the controller should have removed them
    return TestnetRun(proc.returncode, stdout, stderr, left)


def listen(net: Internet, host: str, port: int) -> socket.socket:
    s = internet.socket_in(net.ns(host))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((net.address(host), port))
    s.listen(16)
    s.settimeout(IO_TIMEOUT_S)
    return s


def dial(net: Internet, host: str, dst: tuple[str, int], src_port: int = 0,
         timeout_s: float = IO_TIMEOUT_S) -> socket.socket:
    """A TCP connection from ``host`` (from ``src_port``, shared with other
    sockets as libp2p's port reuse does) to ``dst``."""
    s = internet.socket_in(net.ns(host))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", src_port))
    s.settimeout(timeout_s)
    try:
        s.connect(dst)
    except BaseException:
        s.close()
        raise
    return s


def seen_from(server: socket.socket) -> tuple[str, int]:
    """Accept one connection: the (address, port) it came from, as the server sees it."""
    conn, peer = server.accept()
    conn.close()
    return peer[0], peer[1]


@dataclass(frozen=True)
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mbit_s(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6


def _send(conn: socket.socket, nbytes: int) -> None:
    block = b"\0" * (1 << 16)
    left = nbytes
    while left > 0:
        conn.sendall(block[:min(left, len(block))])
        left -= len(block)
    conn.shutdown(socket.SHUT_WR)


def _receive(conn: socket.socket) -> Transfer:
    got, first = 0, None
    while chunk := conn.recv(1 << 16):
        first = first or time.monotonic()
        got += len(chunk)
    assert first is not None, "nothing arrived"
    return Transfer(got, time.monotonic() - first)


def transfer(net: Internet, client: str, server: str, nbytes: int, port: int, *, upload: bool) -> Transfer:
    """``client`` dials ``server`` (at its public address); then ``nbytes``
    go up (client to server) or down, timed at the receiver from the first
    byte to the last."""
    listener = listen(net, server, port)
    result: list[Transfer | BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                if upload:
                    result.append(_receive(conn))
                else:
                    _send(conn, nbytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    thread = threading.Thread(target=serve, name="serve", daemon=True)
    thread.start()
    try:
        with dial(net, client, (net.plan.public_address(server), port)) as conn:
            if upload:
                _send(conn, nbytes)
                conn.recv(1)  # until the server closed: it has timed every byte
            else:
                result.append(_receive(conn))
        thread.join(IO_TIMEOUT_S)
    finally:
        listener.close()
    for outcome in result:
        if isinstance(outcome, BaseException):
            raise outcome
    (measured,) = [r for r in result if isinstance(r, Transfer)]
    assert measured.nbytes == nbytes
    return measured


def rtt_ms(net: Internet, client: str, server: str, port: int, probes: int = RTT_PROBES) -> float:
    """The median round trip of ``probes`` UDP datagrams from ``client`` to
    an echo in ``server``: the sockets are made first, so only the wire is timed."""
    echo = internet.socket_in(net.ns(server), type=socket.SOCK_DGRAM)
    probe = internet.socket_in(net.ns(client), type=socket.SOCK_DGRAM)
    echo.bind((net.address(server), port))
    echo.settimeout(IO_TIMEOUT_S)
    probe.settimeout(IO_TIMEOUT_S)

    def serve() -> None:
        with contextlib.suppress(OSError):
            for _ in range(probes):
                data, peer = echo.recvfrom(16)
                echo.sendto(data, peer)

    thread = threading.Thread(target=serve, name="echo", daemon=True)
    thread.start()
    rtts = []
    try:
        for i in range(probes):
            started = time.monotonic()
            probe.sendto(i.to_bytes(4, "big"), (net.address(server), port))
            assert probe.recv(16) == i.to_bytes(4, "big")
            rtts.append((time.monotonic() - started) * 1000)
    finally:
        probe.close()
        echo.close()
        thread.join(IO_TIMEOUT_S)
    return statistics.median(rtts)


def ns_host(net: Internet, name: str, connect_timeout_s: float = 1.0) -> Libp2pHost:
    """A libp2p host whose sockets are made in host ``name``'s namespace (from this process)."""
    ns = net.ns(name)
    config = HostConfig(limits=TransportLimits(connect_timeout_s=connect_timeout_s))
    return Libp2pHost(Identity.generate(), config, make_socket=lambda family: internet.socket_in(ns, family))
