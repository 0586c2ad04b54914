"""yamux, sans-IO: the spec's frames byte for byte, flow control drawn from the
peer budget, and every way a peer can misbehave (typed, bounded, fuzzed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import MuxerError, PeerFault, StreamRefused
from murmur.protocol.budget import BytePool, PeerBudget
from murmur.protocol.yamux import (
    HEADER,
    INITIAL_WINDOW,
    MAX_WINDOW,
    DataReceived,
    Event,
    Flag,
    FrameType,
    GoAwayCode,
    GoAwayReceived,
    PongReceived,
    Refused,
    StreamAcked,
    StreamEnded,
    StreamError,
    StreamOpened,
    StreamReset,
    WindowOpened,
    YamuxLimits,
    YamuxSession,
)
from tests.clocks import ManualClock

MIB = 1024 * 1024


def _budget(limit: int = 64 * MIB, pool: BytePool | None = None) -> PeerBudget:
    return (pool or BytePool(1024 * MIB)).budget(limit, 256 * 1024)


def _pair(limits: YamuxLimits = YamuxLimits(), server_budget: PeerBudget | None = None):  # type: ignore[no-untyped-def]
    return YamuxSession(True, _budget(), limits), YamuxSession(False, server_budget or _budget(), limits)


def _pump(a: YamuxSession, b: YamuxSession) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until quiet; events seen by a and by b."""
    ea: list[Event] = []
    eb: list[Event] = []
    for _ in range(1000):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return ea, eb
        if to_b:
            eb += b.receive(to_b)
        if to_a:
            ea += a.receive(to_a)
    raise AssertionError("sessions never went quiet")


def _frame(ftype: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + payload


# --- the spec's frames ------------------------------------------------------------------


def test_header_layout_known_bytes() -> None:
    client = YamuxSession(True, _budget(), YamuxLimits())
    assert client.open_stream() == 1
    # version 0, WINDOW_UPDATE, SYN, stream 1, delta 0: the initial 256 KiB window is implicit
    assert client.data_to_send() == bytes.fromhex("00 01 0001 00000001 00000000")
    client.send(1, b"hi")
    assert client.data_to_send() == bytes.fromhex("00 00 0000 00000001 00000002") + b"hi"
    client.close_write(1)
    assert client.data_to_send() == bytes.fromhex("00 01 0004 00000001 00000000")
    assert client.ping() == 1
    assert client.data_to_send() == bytes.fromhex("00 02 0001 00000000 00000001")
    client.go_away()
    assert client.data_to_send() == bytes.fromhex("00 03 0000 00000000 00000000")


def test_client_odd_server_even_and_the_implicit_initial_window() -> None:
    client, server = _pair()
    assert [client.open_stream(), client.open_stream()] == [1, 3]
    syn = client.data_to_send()[:12]
    assert HEADER.unpack(syn) == (0, FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
    assert server.receive(syn) == [StreamOpened(1)]
    ack = server.data_to_send()
    assert HEADER.unpack(ack) == (0, FrameType.WINDOW_UPDATE, Flag.ACK, 1, 0)
    assert server.open_stream() == 2
    assert client.receive(ack) == [StreamAcked(1)]
    assert client.send_window(1) == INITIAL_WINDOW


def test_data_both_ways_half_close_and_stream_forgotten_with_budget_back() -> None:
    client, server = _pair()
    sid = client.open_stream()
    client.send(sid, b"request")
    client.close_write(sid)
    _, ev = _pump(client, server)
    assert StreamOpened(sid) in ev and DataReceived(sid, 7) in ev and StreamEnded(sid) in ev
    server.accept(sid)
    assert server.read(sid) == b"request" and server.at_eof(sid)
    server.send(sid, b"response")  # half-closed by the client: the server still writes
    server.close_write(sid)
    assert not server.is_live(sid) and server.budget.used == 0
    ec, _ = _pump(client, server)
    assert client.read(sid) == b"response" and client.at_eof(sid)
    assert not client.is_live(sid) and client.budget.used == 0


def test_windows_are_drawn_from_the_budget_and_regranted_as_read() -> None:
    client, server = _pair()
    sid = client.open_stream()
    assert client.budget.used == INITIAL_WINDOW
    _pump(client, server)
    assert server.budget.used == INITIAL_WINDOW
    assert client.send(sid, bytes(3 * MIB)) == INITIAL_WINDOW  # the window, no more
    assert client.send(sid, b"x") == 0
    _pump(client, server)
    quarter = INITIAL_WINDOW // 4
    assert server.buffered(sid) == INITIAL_WINDOW and server.budget.used == INITIAL_WINDOW
    server.read(sid, quarter)
    assert server.budget.used == INITIAL_WINDOW - quarter  # released, not yet granted back (under half)
    server.read(sid, quarter)
    assert server.budget.used == INITIAL_WINDOW  # half read: granted back, paid again; half still buffered: no growth
    ec, _ = _pump(client, server)
    assert WindowOpened(sid) in ec and client.send_window(sid) == 2 * quarter


def test_a_promptly_read_stream_grows_its_window_up_to_the_maximum() -> None:
    client, server = _pair(YamuxLimits(max_stream_window=4 * INITIAL_WINDOW))
    sid = client.open_stream()
    _pump(client, server)
    windows = []
    for _ in range(4):
        client.send(sid, bytes(client.send_window(sid)))
        _pump(client, server)
        server.read(sid)  # everything, at once
        _pump(client, server)
        windows.append(client.send_window(sid))
    assert windows == [2 * INITIAL_WINDOW, 4 * INITIAL_WINDOW, 4 * INITIAL_WINDOW, 4 * INITIAL_WINDOW]
    assert server.budget.used == 4 * INITIAL_WINDOW


def test_starved_window_update_waits_for_budget() -> None:
    """Read bytes go back to the budget at once; the window update that grants
    them to the peer again must be paid anew, and waits if someone else took them."""
    pool = BytePool(1024 * MIB)
    tight = pool.budget(2 * INITIAL_WINDOW, 0)
    client, server = _pair(server_budget=tight)
    a, b = client.open_stream(), client.open_stream()
    _pump(client, server)
    assert tight.used == 2 * INITIAL_WINDOW
    client.send(a, bytes(INITIAL_WINDOW))
    _pump(client, server)
    quarter = INITIAL_WINDOW // 4
    server.read(a, quarter)
    assert tight.try_acquire(quarter)  # another holder of this peer's memory takes what was released
    server.read(a, quarter)  # half read: an update of half the window is due, a quarter is free
    assert server.starved and client.send_window(a) == 0
    tight.release(quarter)
    server.regrant_starved()
    assert not server.starved
    ec, _ = _pump(client, server)
    assert WindowOpened(a) in ec and client.send_window(a) == 2 * quarter and b in server.stream_ids()


def test_reset_mid_transfer_leaves_other_streams_alone() -> None:
    client, server = _pair()
    a, b = client.open_stream(), client.open_stream()
    client.send(a, bytes(100_000))
    client.send(b, b"keep")
    client.reset(a)
    client.send(b, b" going")
    _, ev = _pump(client, server)
    assert StreamReset(a) in ev and not server.is_live(a)
    assert server.read(b) == b"keep going"
    assert server.budget.used == server.held() == INITIAL_WINDOW - 10  # b's 10 read bytes released, not regranted
    assert client.budget.used == INITIAL_WINDOW  # a's window went back at once


def test_frames_for_a_stream_reset_in_flight_are_tolerated_within_its_window() -> None:
    client, server = _pair()
    sid = client.open_stream()
    _pump(client, server)
    server.reset(sid)  # the server resets while the client is still sending
    client.send(sid, bytes(1000))
    client.receive(server.data_to_send())  # RST arrives
    assert server.receive(client.data_to_send()) == []  # discarded, not a fault
    assert server.receive(_frame(FrameType.WINDOW_UPDATE, 0, sid, 5)) == []
    with pytest.raises(MuxerError, match="closed stream"):
        server.receive(_frame(FrameType.DATA, 0, sid, MIB, bytes(10)))


def test_ping_answered_once_with_the_latest_opaque_value() -> None:
    client, server = _pair()
    for opaque in (7, 8, 9):
        server.receive(_frame(FrameType.PING, Flag.SYN, 0, opaque))
    assert server.data_to_send(control=False) == b""  # the socket is full: the pong waits
    assert server.data_to_send() == _frame(FrameType.PING, Flag.ACK, 0, 9)
    assert server.data_to_send() == b""
    opaque = client.ping()
    ec, _ = _pump(client, server)
    assert ec == [PongReceived(opaque)]
    assert client.receive(_frame(FrameType.PING, Flag.ACK, 0, 12345)) == []  # unsolicited pong: ignored


def test_go_away_stops_new_streams_both_ways() -> None:
    client, server = _pair()
    sid = client.open_stream()
    _pump(client, server)
    server.go_away()
    ec, _ = _pump(client, server)
    assert ec == [GoAwayReceived(GoAwayCode.NORMAL)]
    with pytest.raises(StreamError):
        client.open_stream()
    client.send(sid, b"still fine")  # existing streams go on
    _pump(client, server)
    assert server.read(sid) == b"still fine"


# --- faults ------------------------------------------------------------------------------


def _server_with_stream() -> YamuxSession:
    server = YamuxSession(False, _budget())
    server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0))
    server.data_to_send()
    return server


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (HEADER.pack(1, 0, 0, 1, 0), "version"),
        (_frame(4, 0, 1, 0), "frame type"),
        (_frame(FrameType.DATA, 0x10, 1, 0), "flags"),
        (_frame(FrameType.WINDOW_UPDATE, 0, 1, MAX_WINDOW), "overflows"),  # 256 KiB + 2^32 - 1
        (_frame(FrameType.DATA, 0, 1, MIB + 1), "beyond"),
        (_frame(FrameType.DATA, 0, 5, 3, b"abc"), "never opened"),
        (_frame(FrameType.WINDOW_UPDATE, 0, 2, 1), "never opened"),  # our parity, never opened by us
        (_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0), "already open"),
        (_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 4, 0), "parity"),
        (_frame(FrameType.PING, Flag.SYN, 1, 0), "PING on a stream"),
        (_frame(FrameType.PING, 0, 0, 0), "without SYN or ACK"),
        (_frame(FrameType.GO_AWAY, 0, 1, 0), "GO_AWAY on a stream"),
        (_frame(FrameType.DATA, 0, 0, 0), "stream 0"),
    ],
)
def test_protocol_violations_are_muxer_errors_with_go_away(frame: bytes, match: str) -> None:
    server = _server_with_stream()
    with pytest.raises(MuxerError, match=match) as info:
        server.receive(frame)
    assert info.value.drop and info.value.penalty > 0
    assert server.data_to_send().endswith(_frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR))
    with pytest.raises(MuxerError):
        server.receive(b"")  # dead from now on


def test_syn_ids_must_increase() -> None:
    server = _server_with_stream()
    server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 5, 0))
    with pytest.raises(MuxerError, match="increasing"):
        server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 3, 0))


def test_data_after_fin_is_a_fault() -> None:
    server = _server_with_stream()
    server.receive(_frame(FrameType.DATA, Flag.FIN, 1, 1, b"x"))
    with pytest.raises(MuxerError, match="after its FIN"):
        server.receive(_frame(FrameType.DATA, 0, 1, 1, b"y"))


def test_window_update_overflow_by_accumulation() -> None:
    server = _server_with_stream()
    server.receive(_frame(FrameType.WINDOW_UPDATE, 0, 1, MAX_WINDOW - INITIAL_WINDOW))
    with pytest.raises(MuxerError, match="overflows"):
        server.receive(_frame(FrameType.WINDOW_UPDATE, 0, 1, 1))


def test_stream_flood_refused_then_dropped_while_good_streams_keep_working() -> None:
    limits = YamuxLimits(max_streams=4, max_refused_streams=10)
    client, server = _pair(limits)
    good = client.open_stream()
    _pump(client, server)
    server.accept(good)
    flood = b"".join(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 101 + 2 * i, 0) for i in range(3))
    events = server.receive(flood)  # fills the limit of 4
    assert [type(e) for e in events] == [StreamOpened] * 3
    events = server.receive(_frame(FrameType.DATA, Flag.SYN, 201, 5, b"hello"))
    assert len(events) == 1 and isinstance(events[0], Refused)
    fault = events[0].fault
    assert isinstance(fault, StreamRefused) and not fault.drop and fault.penalty > 0
    assert HEADER.unpack(server.data_to_send()[-12:]) == (0, FrameType.WINDOW_UPDATE, Flag.RST, 201, 0)
    # the well-behaved stream still works
    client.send(good, b"ok")
    server.receive(client.data_to_send())
    assert server.read(good) == b"ok"
    for i in range(9):  # 10 refusals in a row are allowed
        server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 301 + 2 * i, 0))
    with pytest.raises(MuxerError, match="flood"):
        server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 999, 0))


def test_streams_opened_too_fast_are_refused_and_a_peer_that_keeps_on_is_dropped() -> None:
    """Opened and reset at once, streams never reach max_streams or the
    refused-in-a-row bound: only the open rate stops a flood of them."""
    clock = ManualClock()
    server = YamuxSession(False, _budget(), YamuxLimits(max_open_burst=4, open_refill_s=1.0, max_refused_streams=3),
                          clock)
    ids = iter(range(1, 1000, 2))

    def open_and_reset() -> list[type]:
        sid = next(ids)
        events = server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, sid, 0)
                                + _frame(FrameType.WINDOW_UPDATE, Flag.RST, sid, 0))
        return [type(e) for e in events if not isinstance(e, StreamReset)]

    assert [open_and_reset() for _ in range(4)] == [[StreamOpened]] * 4  # the burst
    events = server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, next(ids), 0))
    assert len(events) == 1 and isinstance(events[0], Refused) and isinstance(events[0].fault, StreamRefused)
    assert "too fast" in str(events[0].fault) and not events[0].fault.drop
    clock.now = 1.0  # one more open, and one refusal forgiven
    assert open_and_reset() == [StreamOpened]
    assert open_and_reset() == [Refused]
    assert open_and_reset() == [Refused]
    assert open_and_reset() == [Refused]
    with pytest.raises(MuxerError, match="open flood"):
        open_and_reset()


def test_accept_backlog_bounds_streams_the_application_has_not_taken() -> None:
    server = YamuxSession(False, _budget(), YamuxLimits(max_ack_backlog=2))
    events = server.receive(b"".join(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 2 * i + 1, 0) for i in range(3)))
    assert [type(e) for e in events] == [StreamOpened, StreamOpened, Refused]
    server.accept(1)
    assert server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 7, 0)) == [StreamOpened(7)]


def test_budget_exhaustion_refuses_streams_and_releases_on_reset() -> None:
    pool = BytePool(1024 * MIB)
    small = pool.budget(INITIAL_WINDOW * 2, 0)
    server = YamuxSession(False, small)
    events = server.receive(b"".join(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, 2 * i + 1, 0) for i in range(3)))
    assert [type(e) for e in events] == [StreamOpened, StreamOpened, Refused]
    assert small.used == 2 * INITIAL_WINDOW
    server.receive(_frame(FrameType.WINDOW_UPDATE, Flag.RST, 1, 0))
    assert small.used == INITIAL_WINDOW
    client = YamuxSession(True, pool.budget(INITIAL_WINDOW - 1, 0))
    with pytest.raises(StreamError, match="budget"):
        client.open_stream()


# --- fuzzing -------------------------------------------------------------------------------

_frames = st.builds(
    _frame,
    st.integers(0, 4),
    st.integers(0, 16),
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 2**32 - 1]),
    st.sampled_from([0, 1, 5, 100, INITIAL_WINDOW, INITIAL_WINDOW + 1, MAX_WINDOW]),
    st.binary(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_frames, st.binary(max_size=40)), max_size=25), st.integers(1, 50))
def test_fuzz_only_typed_errors_and_bounded_memory(parts: list[bytes], split: int) -> None:
    pool = BytePool(1024 * MIB)
    budget = pool.budget(8 * MIB, 0)
    server = YamuxSession(False, budget, YamuxLimits(max_streams=8, max_refused_streams=4))
    wire = b"".join(parts)
    try:
        for i in range(0, len(wire), split):
            for event in server.receive(wire[i : i + split]):
                if isinstance(event, Refused):
                    assert isinstance(event.fault, StreamRefused)
            assert server.streams <= 8
            assert budget.used == server.held() <= 8 * MIB
    except PeerFault as fault:
        assert isinstance(fault, MuxerError) and fault.drop
    assert len(server.data_to_send()) <= 12 * (len(wire) // 12 + 2) + 1  # answers never outgrow the input
    server.close()
    assert budget.used == 0


SMALL_CHUNK = 64  # wire slices below this many bytes ...
SMALL_CHUNK_WRITE = 8_192  # ... carry writes of at most this many bytes (several frames, split everywhere)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 300_000)), min_size=1, max_size=12),
       st.integers(1, 70_000))
def test_fuzz_honest_pair_delivers_every_byte_in_order(writes: list[tuple[int, int]], chunk: int) -> None:
    # Wire slices of a few bytes split headers anywhere; over megabytes they
    # only cost time (one receive call a byte: 16 s of a default test run).
    if chunk < SMALL_CHUNK:
        writes = [(i, min(n, SMALL_CHUNK_WRITE)) for i, n in writes]
    client, server = _pair(YamuxLimits())
    ids = [client.open_stream() for _ in range(3)]
    expected = {sid: bytearray() for sid in ids}
    got = {sid: bytearray() for sid in ids}
    pending = [(ids[i], bytes([n % 251]) * n) for i, n in writes]
    for sid, data in pending:
        expected[sid] += data
    for _ in range(10_000):
        if pending:
            sid, data = pending[0]
            n = client.send(sid, data)
            pending[0] = (sid, data[n:])
            if not pending[0][1]:
                pending.pop(0)
        wire = client.data_to_send()
        for i in range(0, len(wire), chunk):
            server.receive(wire[i : i + chunk])
        for sid in ids:
            got[sid] += server.read(sid, 100_000)
        client.receive(server.data_to_send())
        if not pending and all(len(got[s]) == len(expected[s]) for s in ids):
            break
    assert got == expected


def test_tiny_frames_are_held_merged_and_read_back_in_order() -> None:
    """A window filled with 1-byte DATA frames is kept as a few merged
    pieces, not one object a byte (which held 42 times what the budget was
    charged), and reads, whole or in parts, return the bytes in order."""
    server = YamuxSession(False, _budget(), YamuxLimits())
    payload = bytes(range(256)) * (INITIAL_WINDOW // 256)
    wire = _frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
    wire += b"".join(_frame(FrameType.DATA, 0, 1, 1, payload[i:i + 1]) for i in range(len(payload)))
    server.receive(wire)
    assert server.buffered(1) == INITIAL_WINDOW
    assert len(server._streams[1].buffer) <= INITIAL_WINDOW // (64 * 1024) + 1
    got = [server.read(1, 3), server.read(1, 70_000), server.read(1)]
    assert all(isinstance(part, bytes | memoryview) for part in got)
    assert b"".join(bytes(part) for part in got) == payload
    server.receive(_frame(FrameType.DATA, 0, 1, 2, b"ab"))  # after a partial read: a fresh piece
    assert bytes(server.read(1)) == b"ab"
