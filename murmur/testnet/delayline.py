"""A delay line: a small process that forwards Ethernet frames between two
interfaces, holding each frame for the current delay of its direction.

Why: a testnet ``latency`` step must delay one host's link, and the kernels
this runs on need not have ``tc netem`` (nor ``fq`` or ``etf``, the other
qdiscs that can hold a packet until a time). Packet sockets (``AF_PACKET``)
are in every Linux, so the delay is done in userspace, per host, on the
emulated internet's cable (:mod:`murmur.testnet.internet`)::

    host: eth0 <-veth-> far: <p>h  [this process]  <p>b <-veth-> <p> (bridge port)

Link rates (tbf) and loss (nftables) stay on ``eth0`` and ``<p>``, where
they were. Both wire ends drop every frame at nftables' ingress hook: a
packet socket gets its copy before that hook, and the far namespace's own
stack (a router's, with its addresses and ARP) never sees them.

* FIFO per direction (:class:`DelayQueue`): a frame leaves at its arrival
  plus the direction's delay, but never before the frame ahead of it, so
  when the delay is lowered the queue drains in order and nothing overtakes
  (a path's queue behaves so too); 0 forwards at once.
* Bounded memory: at most :data:`QUEUE_CAP_BYTES` wait in each direction;
  a frame beyond that is dropped, as a router's full buffer drops it (TCP
  backs off). The socket receive buffers are bounded by the kernel
  (:data:`SOCKET_BUFFER_BYTES`), and so is the frame a read takes
  (:data:`FRAME_BUFFER_BYTES`; a larger one is dropped and counted).
* Large frames: the host's TCP hands veth GSO super-frames (up to 64 KiB)
  with checksums left to the device. ``PACKET_VNET_HDR`` on both sockets
  carries their GSO and checksum fields through (a ``virtio_net_hdr`` ahead
  of each frame), so a frame leaves as it came and the kernel segments it
  where a later hop needs that; without it checksums would arrive wrong and
  super-frames could not be sent at all. A bulk TCP transfer through the
  line measured 7-11 Gbit/s at 0 ms on a 2-core VM (30 on a plain veth);
  at a 20 Mbit/s link rate, whose tbf cuts frames to MTU size first, the
  line took 7 % of a core.
* One ``selectors`` loop that sleeps until the next frame is due or one
  arrives: no busy loop, no threads.

Control, one line each way: ``set <link> <up_ms> <down_ms>`` on stdin
(``up``: what the host sends), answered ``ok ...`` or ``error <why>`` on
stdout; ``ready`` on stdout once every socket is bound. End of stdin ends
the process, so it also ends when its owner dies. It logs its start and its
exit (with its counts), never a line per frame.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from murmur.errors import MurmurError

log = logging.getLogger("murmur.testnet.delayline")  # also when run as __main__

ETH_P_ALL = 0x0003  # <linux/if_ether.h>: every protocol
SOL_PACKET = 263  # <linux/socket.h>
PACKET_VNET_HDR = 15  # <linux/if_packet.h>
PACKET_IGNORE_OUTGOING = 23  # <linux/if_packet.h> (Linux 4.20): not the frames this socket's device sends
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>: past rmem_max (root)
QUEUE_CAP_BYTES = 4 * 1024 * 1024  # per direction: 0.67 s of a 50 Mbit/s link, 80 ms of 400 Mbit/s
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # what the kernel holds for one socket until the loop reads it
FRAME_BUFFER_BYTES = 256 * 1024  # one read: a 64 KiB GSO frame and its virtio_net_hdr fit with room
MAX_BATCH = 64  # frames read from one socket before the others get their turn
MAX_DELAY_MS = 60_000.0
READY = "ready"
SET = "set"
CLOSE_TIMEOUT_S = 5.0  # after its stdin closed, before it is killed
FAILED_START_GRACE_S = 1.0  # for one that never said ready: time to exit with its own status


class DelayLineError(MurmurError):
    """A delay line did not start, or did not take a setting."""


# --------------------------------------------------------------------- queue


@dataclass
class DelayQueue:
    """Frames of one direction waiting for their release time (pure: no
    sockets, no clock). FIFO: frames leave from the head only, so a frame is
    released at ``now + delay`` or with the frame ahead of it, whichever is
    later."""

    cap_bytes: int = QUEUE_CAP_BYTES
    dropped: int = 0  # frames refused because the queue was full
    _frames: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    _bytes: int = 0

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: bytes, now: float, delay_s: float) -> bool:
        """Queue ``frame`` (False: dropped, the queue would pass its cap)."""
        if self._bytes + len(frame) > self.cap_bytes:
            self.dropped += 1
            return False
        self._frames.append((now + delay_s, frame))
        self._bytes += len(frame)
        return True

    def next_release(self) -> float | None:
        """When the head is due (what comes behind it waits for it anyway)."""
        return self._frames[0][0] if self._frames else None

    def pop_due(self, now: float) -> list[bytes]:
        """The frames due at ``now``, in the order they came."""
        due = []
        while self._frames and self._frames[0][0] <= now:
            _, frame = self._frames.popleft()
            self._bytes -= len(frame)
            due.append(frame)
        return due


# ------------------------------------------------------------------ protocol


@dataclass(frozen=True)
class LinkSpec:
    """One host's wire: ``host_side`` faces its ``eth0``, ``bridge_side`` its bridge port."""

    name: str
    host_side: str
    bridge_side: str

    def arg(self) -> str:
        return f"{self.name}:{self.host_side}:{self.bridge_side}"

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        parts = text.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"a link is name:host_iface:bridge_iface, got {text!r}")
        return cls(*parts)


@dataclass(frozen=True)
class SetDelay:
    """``set <link> <up_ms> <down_ms>``: ``up`` delays what the host sends."""

    link: str
    up_ms: float
    down_ms: float

    def __post_init__(self) -> None:
        for ms in (self.up_ms, self.down_ms):
            if not 0.0 <= ms <= MAX_DELAY_MS:  # also refuses nan
                raise ValueError(f"a delay must be 0-{MAX_DELAY_MS:g} ms, got {ms}")

    def line(self) -> str:
        return f"{SET} {self.link} {self.up_ms:g} {self.down_ms:g}\n"

    @classmethod
    def parse(cls, line: str) -> SetDelay:
        words = line.split()
        if len(words) != 4 or words[0] != SET:
            raise ValueError(f"expected '{SET} <link> <up_ms> <down_ms>', got {line.strip()!r}")
        try:
            up, down = float(words[2]), float(words[3])
        except ValueError:
            raise ValueError(f"delays must be numbers of ms, got {words[2]!r} {words[3]!r}") from None
        return cls(words[1], up, down)


# ------------------------------------------------------------------- process


def packet_socket(iface: str) -> socket.socket:
    """A non-blocking packet socket on ``iface`` that reads and writes frames
    with their virtio_net_hdr, and does not read back what it sends."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER_BYTES)
        sock.bind((iface, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Direction:
    """Frames from ``rx`` go out of ``tx`` after ``delay_s``."""

    name: str
    rx: socket.socket
    tx: socket.socket
    queue: DelayQueue = field(default_factory=DelayQueue)
    delay_s: float = 0.0
    forwarded: int = 0
    oversize: int = 0  # larger than FRAME_BUFFER_BYTES: dropped
    send_failed: int = 0  # the device refused it (a full backlog): dropped, as on a wire

    def receive(self, view: memoryview, now: float) -> None:
        for _ in range(MAX_BATCH):
            try:
                n = self.rx.recv_into(view, 0, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            if n > len(view):
                self.oversize += 1
                continue
            self.queue.push(view[:n].tobytes(), now, self.delay_s)

    def release(self, now: float) -> None:
        for frame in self.queue.pop_due(now):
            try:
                self.tx.send(frame)
            except OSError:
                self.send_failed += 1
            else:
                self.forwarded += 1

    def counts(self) -> dict[str, int]:
        return {"forwarded": self.forwarded, "queue_full": self.queue.dropped, "oversize": self.oversize,
                "send_failed": self.send_failed, "queued": len(self.queue)}


@dataclass
class Link:
    spec: LinkSpec
    up: Direction
    down: Direction

    @classmethod
    def open(cls, spec: LinkSpec) -> Link:
        host = packet_socket(spec.host_side)
        try:
            bridge = packet_socket(spec.bridge_side)
        except BaseException:
            host.close()
            raise
        return cls(spec, Direction(f"{spec.name} up", host, bridge), Direction(f"{spec.name} down", bridge, host))

    def close(self) -> None:
        self.up.rx.close()
        self.down.rx.close()


def _reply(out: BinaryIO, text: str) -> None:
    out.write(text.encode() + b"\n")
    out.flush()


def _command(links: dict[str, Link], line: str) -> str:
    try:
        cmd = SetDelay.parse(line)
    except ValueError as exc:
        return f"error {exc}"
    link = links.get(cmd.link)
    if link is None:
        return f"error no link named {cmd.link!r}"
    link.up.delay_s, link.down.delay_s = cmd.up_ms / 1000.0, cmd.down_ms / 1000.0
    log.info("delay set", extra={"link": cmd.link, "up_ms": cmd.up_ms, "down_ms": cmd.down_ms})
    return f"ok {cmd.link} {cmd.up_ms:g} {cmd.down_ms:g}"


def serve(links: dict[str, Link], control: int, out: BinaryIO) -> None:
    """Forward until ``control`` (the command pipe) ends."""
    directions = [d for link in links.values() for d in (link.up, link.down)]
    view = memoryview(bytearray(FRAME_BUFFER_BYTES))
    pending = b""
    with selectors.DefaultSelector() as sel:
        for d in directions:
            sel.register(d.rx, selectors.EVENT_READ, d)
        sel.register(control, selectors.EVENT_READ, None)
        while True:
            due = [t for d in directions if (t := d.queue.next_release()) is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            events = sel.select(timeout)
            now = time.monotonic()
            for key, _ in events:
                if key.data is not None:
                    key.data.receive(view, now)
                    continue
                chunk = os.read(control, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    _reply(out, _command(links, line.decode(errors="replace")))
            for d in directions:
                d.release(now)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m murmur.testnet.delayline",
                                     description="forward frames between interface pairs with a settable delay")
    parser.add_argument("--link", action="append", required=True, type=LinkSpec.parse,
                        help="name:host_iface:bridge_iface (repeatable)")
    args = parser.parse_args(argv)
    from murmur.node.logs import configure_logging  # the node's structured logs, JSON lines

    configure_logging(fmt="json")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    links: dict[str, Link] = {}
    try:
        for spec in args.link:
            links[spec.name] = Link.open(spec)
        log.info("delay line started", extra={"pid": os.getpid(), "links": [s.arg() for s in args.link]})
        _reply(sys.stdout.buffer, READY)
        serve(links, sys.stdin.fileno(), sys.stdout.buffer)
    finally:
        log.info("delay line exiting", extra={
            "pid": os.getpid(),
            "counts": {d.name: d.counts() for link in links.values() for d in (link.up, link.down)}})
        for link in links.values():
            link.close()
    return 0


# -------------------------------------------------------------------- handle


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """One line of ``proc``'s stdout (None: it ended or stayed silent)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1)  # byte by byte: nothing past the reply is taken from the pipe
        if not chunk:
            return None
        line += chunk
    return line.decode(errors="replace").strip()


class DelayLine:
    """A running delay line process (what :class:`~murmur.testnet.internet.Internet`
    holds): :meth:`start` returns once it forwards; :meth:`set` once it took a
    setting; :meth:`close` ends and reaps it, killing it if it will not go."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        self.proc = proc
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one request and its reply at a time

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, argv: Sequence[str], *, log_path: Path | None, timeout_s: float) -> DelayLine:
        stderr = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                    bufsize=0)
        finally:
            if stderr is not None:
                stderr.close()
        line = cls(proc, timeout_s)
        reply = _read_line(proc, timeout_s)
        if reply != READY:
            code = line.close(FAILED_START_GRACE_S)
            where = f" (see {log_path})" if log_path is not None else ""
            raise DelayLineError(f"{' '.join(argv)}: did not start: exit {code}, said {reply!r}{where}")
        return line

    def set(self, cmd: SetDelay) -> None:
        assert self.proc.stdin is not None
        with self._lock:
            try:
                self.proc.stdin.write(cmd.line().encode())
            except (OSError, ValueError) as exc:  # its end of the pipe closed, or ours
                raise DelayLineError(f"delay line {self.pid} is gone: {exc}") from None
            reply = _read_line(self.proc, self._timeout_s)
        if reply is None or not reply.startswith("ok "):
            raise DelayLineError(f"delay line {self.pid}: {cmd.line().strip()}: {reply or 'no reply'}")

    def close(self, grace_s: float = CLOSE_TIMEOUT_S) -> int:
        """End it (its stdin closes: it logs its counts and exits), reap it,
        and return its exit status; -9 when it was killed after ``grace_s``."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            code = self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


if __name__ == "__main__":
    sys.exit(main())
