"""The delay line's queue and control protocol (pure), and its forwarding
loop on Unix datagram sockets standing in for packet sockets (no root).
Real interfaces: tests/integration/test_internet.py."""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from murmur.testnet import delayline
from murmur.testnet.delayline import DelayQueue, Direction, Link, LinkSpec, SetDelay

MS = 1e-3


def test_a_frame_leaves_after_its_delay_and_not_before() -> None:
    q = DelayQueue()
    assert q.push(b"a", now=10.0, delay_s=0.05)
    assert q.next_release() == pytest.approx(10.05)
    assert q.pop_due(10.049) == [] and q.pop_due(10.05) == [b"a"]
    assert q.next_release() is None and q.queued_bytes == 0 and len(q) == 0


def test_zero_delay_is_due_at_once() -> None:
    q = DelayQueue()
    q.push(b"now", now=3.0, delay_s=0.0)
    assert q.pop_due(3.0) == [b"now"]


def test_lowering_the_delay_never_lets_a_frame_overtake() -> None:
    """A frame behind one with a longer delay leaves with it, not before it."""
    q = DelayQueue()
    q.push(b"slow", now=0.0, delay_s=0.100)
    q.push(b"fast", now=0.010, delay_s=0.0)  # delay lowered to 0 after "slow" came
    assert q.pop_due(0.050) == []  # "fast" was due at 0.010 on its own, but waits
    assert q.pop_due(0.100) == [b"slow", b"fast"]
    q.push(b"later", now=0.2, delay_s=0.0)  # the queue is empty again: at once
    assert q.pop_due(0.2) == [b"later"]


def test_raising_the_delay_holds_new_frames_longer_and_keeps_order() -> None:
    q = DelayQueue()
    q.push(b"1", now=0.0, delay_s=0.0)
    q.push(b"2", now=0.0, delay_s=0.040)
    q.push(b"3", now=0.001, delay_s=0.040)
    assert q.pop_due(0.0) == [b"1"]
    assert q.pop_due(0.040) == [b"2"] and q.pop_due(0.041) == [b"3"]


def test_the_byte_cap_drops_what_does_not_fit_and_frees_as_frames_leave() -> None:
    q = DelayQueue(cap_bytes=10)
    assert q.push(b"x" * 6, now=0.0, delay_s=1.0)
    assert not q.push(b"y" * 5, now=0.0, delay_s=1.0)  # 11 > 10: dropped, as a full buffer drops
    assert q.push(b"z" * 4, now=0.0, delay_s=1.0)  # 10 fits exactly
    assert (q.queued_bytes, q.dropped, len(q)) == (10, 1, 2)
    assert q.pop_due(1.0) == [b"x" * 6, b"z" * 4]
    assert q.push(b"w" * 10, now=1.0, delay_s=0.0) and q.dropped == 1
    assert delayline.QUEUE_CAP_BYTES >= 1 << 20  # room for a bandwidth-delay product, not unbounded


def test_set_lines_round_trip_and_bad_ones_are_refused() -> None:
    cmd = SetDelay("node4", 40.0, 12.5)
    assert cmd.line() == "set node4 40 12.5\n"
    assert SetDelay.parse(cmd.line()) == cmd
    for bad, why in [("set node4 40", "expected 'set <link>"), ("get node4 1 2", "expected"),
                     ("set node4 x 2", "numbers of ms"), ("set node4 -1 2", "0-60000 ms"),
                     ("set node4 nan 2", "0-60000 ms"), ("set node4 1 1e9", "0-60000 ms")]:
        with pytest.raises(ValueError, match=why):
            SetDelay.parse(bad)
    with pytest.raises(ValueError, match="0-60000 ms"):
        SetDelay("node4", 1.0, -0.5)  # made in this process, not parsed: the same bounds


def test_link_args_round_trip() -> None:
    spec = LinkSpec("node4", "p1h", "p1b")
    assert spec.arg() == "node4:p1h:p1b" and LinkSpec.parse(spec.arg()) == spec
    for bad in ("node4:p1h", "node4::p1b", "a:b:c:d"):
        with pytest.raises(ValueError, match="name:host_iface:bridge_iface"):
            LinkSpec.parse(bad)


# ------------------------------------------------------- the loop, on socketpairs


class _Wire:
    """A link whose two "interfaces" are Unix datagram socketpairs: the test
    holds the host's and the bridge's ends, the loop the others."""

    def __init__(self) -> None:
        self.host, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.bridge, bridge_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (host_side, bridge_side):
            s.setblocking(False)
        spec = LinkSpec("h", "hs", "bs")
        self.link = Link(spec, Direction("h up", host_side, bridge_side), Direction("h down", bridge_side, host_side))
        for s in (self.host, self.bridge):
            s.settimeout(2.0)

    def close(self) -> None:
        self.link.close()
        self.host.close()
        self.bridge.close()


@pytest.fixture
def running() -> Iterator[tuple[_Wire, int, _Replies]]:
    """The loop in a thread; the test writes commands into ``control``."""
    wire = _Wire()
    read_fd, control = os.pipe()
    out = _Replies()
    thread = threading.Thread(target=delayline.serve, args=({"h": wire.link}, read_fd, out), daemon=True)
    thread.start()
    try:
        yield wire, control, out
    finally:
        os.close(control)  # end of input ends the loop
        thread.join(5.0)
        assert not thread.is_alive()
        os.close(read_fd)
        wire.close()


class _Replies(io.BytesIO):
    """stdout for the loop: flush() signals each reply."""

    def __init__(self) -> None:
        super().__init__()
        self.replied = threading.Semaphore(0)

    def flush(self) -> None:
        self.replied.release()


def _set(control: int, out: _Replies, line: str) -> None:
    os.write(control, line.encode())
    assert out.replied.acquire(timeout=2.0)


def test_the_loop_forwards_each_way_after_the_set_delay_and_replies(running: tuple[_Wire, int, _Replies]) -> None:
    wire, control, out = running
    wire.host.send(b"up0")
    assert wire.bridge.recv(64) == b"up0"  # 0 ms at start: straight through
    _set(control, out, SetDelay("h", 60.0, 30.0).line())
    _set(control, out, "set nobody 1 1\n")
    _set(control, out, "set h fast slow\n")
    assert out.getvalue().decode().splitlines() == [
        "ok h 60 30", "error no link named 'nobody'", "error delays must be numbers of ms, got 'fast' 'slow'"]
    for payload, sender, receiver, delay_s in ((b"up1", wire.host, wire.bridge, 60 * MS),
                                               (b"down1", wire.bridge, wire.host, 30 * MS)):
        started = time.monotonic()
        sender.send(payload)
        assert receiver.recv(64) == payload
        assert delay_s <= time.monotonic() - started < delay_s + 0.5  # never early; late only by load
    _set(control, out, SetDelay("h", 0.0, 0.0).line())
    started = time.monotonic()
    wire.host.send(b"up2")
    assert wire.bridge.recv(64) == b"up2" and time.monotonic() - started < 0.5


def test_the_loop_keeps_order_when_the_delay_drops(running: tuple[_Wire, int, _Replies]) -> None:
    wire, control, out = running
    _set(control, out, SetDelay("h", 80.0, 0.0).line())
    wire.host.send(b"first")
    _set(control, out, SetDelay("h", 0.0, 0.0).line())
    wire.host.send(b"second")
    assert [wire.bridge.recv(64), wire.bridge.recv(64)] == [b"first", b"second"]


# ------------------------------------------------------------------ the handle

# a stand-in child that speaks the protocol: ready, then "ok" to each set line
_SPEAKER = """
import sys
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    print("ok " + " ".join(words[1:]) if words[1] != "refuse" else "error no link named 'refuse'", flush=True)
"""


def test_the_handle_waits_for_ready_and_each_reply_and_reaps_the_process() -> None:
    line = delayline.DelayLine.start([sys.executable, "-c", _SPEAKER], log_path=None, timeout_s=10.0)
    try:
        line.set(SetDelay("h", 40.0, 40.0))
        with pytest.raises(delayline.DelayLineError, match="error no link named 'refuse'"):
            line.set(SetDelay("refuse", 1.0, 1.0))
    finally:
        assert line.close() == 0  # its stdin closed: it ended by itself
    assert line.proc.returncode == 0
    with pytest.raises(delayline.DelayLineError, match="is gone"):
        line.set(SetDelay("h", 1.0, 1.0))


def test_a_line_that_does_not_start_is_an_error_naming_its_exit_and_log(tmp_path: Path) -> None:
    log_path = tmp_path / "delayline.log"
    argv = [sys.executable, "-c", "import sys; print('no packet sockets', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(delayline.DelayLineError, match=rf"did not start: exit 3, said None \(see {log_path}\)"):
        delayline.DelayLine.start(argv, log_path=log_path, timeout_s=10.0)
    assert log_path.read_text() == "no packet sockets\n"


def test_a_silent_line_is_killed_after_the_timeout() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(delayline.DelayLineError, match="did not start"):
        delayline.DelayLine.start(argv, log_path=None, timeout_s=0.5)
    assert time.monotonic() - started < 0.5 + delayline.FAILED_START_GRACE_S + 2  # killed, not waited for
