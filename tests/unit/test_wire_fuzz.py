"""The upgrade of an inbound TCP connection (``libp2p/wire.py``) fed arbitrary bytes.

Whatever a stranger sends before it proved an identity, in whatever pieces:
the wire either waits for more or fails with a typed
:class:`~murmur.errors.PeerFault` reported to the host, aborts the socket,
and never raises into the event loop. Three starting points: nothing
negotiated, murmur's fast path agreed (the bytes are its handshake), and
``/noise`` agreed. A socket stand-in collects what the wire writes; the host
is real.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.errors import PeerFault
from murmur.protocol import multistream
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import HostConfig, Libp2pHost
from murmur.protocol.libp2p.wire import FAST_SECURITY, NOISE, Phase, Wire
from murmur.protocol.transport import TransportLimits

IDENTITY = Identity.generate()
PREFIXES = {
    "clear": b"",
    "fast": multistream.Dialer([FAST_SECURITY]).start(),
    "noise": multistream.Dialer([NOISE]).start(),
}


class FakeSocket(asyncio.Transport):
    """What a wire needs of a TCP transport, recording what happens to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.9.9.9", 4242), "sockname": ("127.0.0.1", 4001)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = self.closing = True

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _feed(wire: Wire, data: bytes, sizes: list[int]) -> None:
    view, i = memoryview(data), 0
    while view and wire.phase is not Phase.CLOSED:
        want = sizes[i % len(sizes)] if sizes else len(view)
        i += 1
        buf = wire.get_buffer(want)
        n = min(len(buf), len(view), max(1, want))
        buf[:n] = view[:n]
        view = view[n:]
        wire.buffer_updated(n)


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(sorted(PREFIXES)), data=st.binary(max_size=2000),
       sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=8), eof=st.booleans())
def test_fuzz_an_inbound_upgrade_fails_typed_or_waits(start: str, data: bytes, sizes: list[int], eof: bool) -> None:
    async def scenario() -> None:
        faults: list[tuple[object, PeerFault]] = []
        host = Libp2pHost(IDENTITY, HostConfig(limits=TransportLimits(handshake_timeout_s=60.0)),
                          on_fault=lambda peer, fault: faults.append((peer, fault)))
        sock = FakeSocket()
        wire = Wire(host, outbound=False, conn_no=1)
        wire.connection_made(sock)
        assert sock.written.startswith(multistream.encode_message(multistream.PROTOCOL_ID))
        _feed(wire, PREFIXES[start] + data, sizes)
        if eof and wire.phase is not Phase.CLOSED:
            wire.eof_received()
        if wire.phase is Phase.CLOSED:
            assert sock.aborted and len(faults) == 1
            peer, fault = faults[0]
            assert peer is None and isinstance(fault, PeerFault)  # nobody proved who they are
        else:
            assert not faults and not sock.aborted and wire.phase in (Phase.SECURITY, Phase.HANDSHAKE)
        assert wire.conn is None  # random bytes never make it through a Noise handshake
        wire.connection_lost(None)
        assert host.wires == 0 and host.inbound == 0
        await host.close()

    asyncio.run(scenario())
