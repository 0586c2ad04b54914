"""``/murmur/mux/2.0.0``, sans-IO: stream lifecycle, memory drawn from the peer
budget and given back, and every way a peer can misbehave (typed, bounded, fuzzed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import MuxerError, StreamRefused
from murmur.protocol.budget import BytePool, PeerBudget
from murmur.protocol.framing import FrameDecoder, FrameEncoder, FrameType
from murmur.protocol.murmux import QUEUED_MESSAGE_COST, MuxLimits, MuxSession

Q = QUEUED_MESSAGE_COST  # what each queued message costs besides its payload
from murmur.protocol.noise import CipherState
from murmur.protocol.sealed import Split
from murmur.protocol.yamux import DataReceived, Refused, StreamEnded, StreamError, StreamOpened, StreamReset

MIB = 1024 * 1024


def _budget(limit: int = 64 * MIB) -> PeerBudget:
    return BytePool(1024 * MIB).budget(limit, 256 * 1024)


def _server(limits: MuxLimits = MuxLimits(), budget: PeerBudget | None = None) -> MuxSession:
    """The listener's session: the peer (the dialler) opens odd streams."""
    return MuxSession(False, budget or _budget(), limits)


def test_a_stream_carries_messages_whole_and_ends_cleanly() -> None:
    client, server = MuxSession(True, _budget()), _server()
    sid = client.open_stream()
    assert sid == 1 and client.control == [(FrameType.OPEN, 1)]
    assert server.on_frame(FrameType.OPEN, sid, b"") == [StreamOpened(1)]
    assert server.on_frame(FrameType.DATA, sid, b"one message") == [DataReceived(1, 11)]
    assert server.on_frame(FrameType.DATA, sid, b"") == [DataReceived(1, 0)]  # an empty message is one too
    assert server.budget.used == 11 + 2 * Q  # the empty one costs its slot
    assert server.read(sid) == b"one message" and server.read(sid) == b"" and server.read(sid) is None
    assert server.budget.used == 0
    assert server.on_frame(FrameType.FIN, sid, b"") == [StreamEnded(1)]
    assert server.at_eof(sid) and server.is_live(sid)
    server.close_write(sid)
    assert server.control == [(FrameType.FIN, 1)] and not server.is_live(sid)  # both sides done: forgotten
    assert client.open_stream() == 3  # the dialler's ids stay odd and increase


def test_close_read_and_reset_give_the_budget_back_and_drop_what_comes() -> None:
    server = _server()
    server.on_frame(FrameType.OPEN, 1, b"")
    server.on_frame(FrameType.OPEN, 3, b"")
    server.on_frame(FrameType.DATA, 1, bytes(1000))
    server.on_frame(FrameType.DATA, 3, bytes(500))
    assert server.budget.used == 1500 + 2 * Q
    server.close_read(1)
    assert server.budget.used == 500 + Q
    assert server.on_frame(FrameType.DATA, 1, bytes(10_000)) == [] and server.budget.used == 500 + Q  # dropped
    server.reset(3)
    assert server.budget.used == 0 and server.control == [(FrameType.RESET, 3)] and not server.is_live(3)
    assert server.on_frame(FrameType.DATA, 3, b"in flight") == []  # late frames of a stream we reset
    assert server.on_frame(FrameType.RESET, 1, b"") == [StreamReset(1)] and not server.is_live(1)


def test_empty_messages_fill_the_budget_too() -> None:
    """Each queued message is charged for what holding it costs, so a flood
    of empty DATA frames puts the budget over (the connection stops
    reading) as bytes would: before, 200,000 of them held 97 MiB at 0 charged."""
    server = _server(budget=BytePool(1 << 30).budget(64 * Q))
    server.on_frame(FrameType.OPEN, 1, b"")
    for _ in range(64):
        assert not server.budget.over
        server.on_frame(FrameType.DATA, 1, b"")
    assert server.budget.over and server.budget.used == 64 * Q
    while server.read(1) is not None:
        pass
    assert server.budget.used == 0


def test_a_split_message_is_charged_whole_until_read_and_dropped_with_its_stream() -> None:
    key = bytes(32)
    enc, dec = FrameEncoder(CipherState(key), MIB), FrameDecoder(CipherState(key), MIB)
    wire = b"".join(bytes(enc.encode(FrameType.DATA, 1, b"head", tail=bytes([n]) * 300_000)) for n in (1, 2))
    first, second = dec.feed(wire)
    server = _server()
    server.on_frame(FrameType.OPEN, 1, b"")
    assert server.on_frame(FrameType.DATA, 1, first.payload, first.tail) == [DataReceived(1, 300_004)]
    server.on_frame(FrameType.DATA, 1, second.payload, second.tail)
    assert server.budget.used == 2 * (300_004 + Q)
    message = server.read(1)
    assert isinstance(message, Split) and message.tail is first.tail and server.budget.used == 300_004 + Q
    assert bytes(message.join()) == b"head" + bytes([1]) * 300_000
    server.reset(1)
    assert server.budget.used == 0 and second.tail.opened  # dropped unopened, its buffer freed
    with pytest.raises(MuxerError):  # a tail goes with DATA only
        server.on_frame(FrameType.OPEN, 3, b"", second.tail)


@pytest.mark.parametrize(
    ("frames", "what"),
    [
        ([(FrameType.OPEN, 2)], "wrong parity"),
        ([(FrameType.OPEN, 3), (FrameType.OPEN, 1)], "not increasing"),
        ([(FrameType.DATA, 5)], "never opened"),
        ([(FrameType.FIN, 7)], "never opened"),
        ([(FrameType.OPEN, 1), (FrameType.FIN, 1), (FrameType.DATA, 1)], "after its FIN"),
        ([(FrameType.OPEN, 1), (FrameType.FIN, 1), (FrameType.FIN, 1)], "second FIN"),
        ([(FrameType.DATA, 0)], "stream 0"),
        ([(FrameType.OPEN, 0)], "stream 0"),
    ],
)
def test_protocol_violations_are_muxer_errors(frames: list[tuple[FrameType, int]], what: str) -> None:
    server = _server()
    with pytest.raises(MuxerError, match=what):
        for ftype, sid in frames:
            server.on_frame(ftype, sid, b"x" if ftype is FrameType.DATA else b"")


def test_control_frames_with_a_payload_are_muxer_errors() -> None:
    server = _server()
    with pytest.raises(MuxerError):
        server.on_frame(FrameType.OPEN, 1, b"smuggled")


def test_a_stream_flood_is_refused_then_cut() -> None:
    server = _server(MuxLimits(max_streams=4, max_refused_streams=3))
    opened = [server.on_frame(FrameType.OPEN, sid, b"") for sid in (1, 3, 5, 7)]
    assert all(isinstance(e[0], StreamOpened) for e in opened)
    for sid in (9, 11, 13):
        (event,) = server.on_frame(FrameType.OPEN, sid, b"")
        assert isinstance(event, Refused) and isinstance(event.fault, StreamRefused) and not event.fault.drop
    assert server.control == [(FrameType.RESET, 9), (FrameType.RESET, 11), (FrameType.RESET, 13)]
    assert server.on_frame(FrameType.DATA, 9, b"to a refused stream") == []  # dropped, not a violation
    with pytest.raises(MuxerError, match="flood"):
        server.on_frame(FrameType.OPEN, 15, b"")


def test_streams_opened_too_fast_are_refused_and_a_peer_that_keeps_on_is_dropped() -> None:
    """Opened and reset at once, streams never reach max_streams or the
    refused-in-a-row bound: only the open rate stops a flood of them."""
    now = [0.0]
    server = MuxSession(False, _budget(), MuxLimits(max_open_burst=4, open_refill_s=1.0, max_refused_streams=3),
                        lambda: now[0])
    ids = iter(range(1, 1000, 2))

    def open_and_reset() -> type:
        sid = next(ids)
        (event,) = server.on_frame(FrameType.OPEN, sid, b"")
        server.on_frame(FrameType.RESET, sid, b"")
        return type(event)

    assert [open_and_reset() for _ in range(4)] == [StreamOpened] * 4  # the burst
    (event,) = server.on_frame(FrameType.OPEN, next(ids), b"")
    assert isinstance(event, Refused) and isinstance(event.fault, StreamRefused) and "too fast" in str(event.fault)
    now[0] = 1.0  # one more open, and one refusal forgiven
    assert [open_and_reset() for _ in range(4)] == [StreamOpened, Refused, Refused, Refused]
    with pytest.raises(MuxerError, match="open flood"):
        open_and_reset()


def test_our_own_streams_are_bounded_and_end_with_go_away() -> None:
    client = MuxSession(True, _budget(), MuxLimits(max_streams=8))
    for _ in range(8):
        client.open_stream()
    with pytest.raises(StreamError):
        client.open_stream()
    client.go_away()
    server = _server()
    server.go_away()
    (event,) = server.on_frame(FrameType.OPEN, 1, b"")
    assert isinstance(event, Refused)


FRAMES = st.lists(
    st.tuples(st.sampled_from([FrameType.DATA, FrameType.OPEN, FrameType.FIN, FrameType.RESET]),
              st.integers(min_value=0, max_value=12), st.binary(max_size=64)),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(frames=FRAMES, reads=st.lists(st.integers(min_value=0, max_value=12), max_size=20))
def test_fuzz_only_typed_errors_and_the_budget_always_adds_up(frames, reads) -> None:  # type: ignore[no-untyped-def]
    """Whatever a peer sends: events or a MuxerError, never anything else, and
    the budget holds exactly what waits in the streams (all of it back at close)."""
    server = _server(MuxLimits(max_streams=8, max_refused_streams=4))
    try:
        for ftype, sid, payload in frames:
            server.on_frame(ftype, sid, payload)
            for r in reads[:2]:
                server.read(r)
    except MuxerError:
        pass
    waiting = sum(s.buffered for s in server._streams.values())
    assert server.budget.used == waiting >= 0
    server.close()
    assert server.budget.used == 0
