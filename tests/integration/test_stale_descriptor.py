"""A dial whose new socket gets a descriptor number uvloop still maps to a
transport (its descriptor closed under it: a uvloop defect) is a failed dial,
and the next dial works: a CI daemon's ``link-*`` task crashed on that
RuntimeError ("File descriptor 19 is used by transport") and the daemon
exited 1 while its peers were killed around it."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from murmur.protocol.identity import Identity
from murmur.protocol.libp2p.host import Libp2pHost


async def _scenario() -> None:
    loop = asyncio.get_running_loop()
    a, b = Libp2pHost(Identity.generate()), Libp2pHost(Identity.generate())
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    try:
        await a.listen("127.0.0.1", 0)
        (addr,) = await b.listen("127.0.0.1", 0)
        # A transport whose descriptor is closed under it, as the defect leaves one.
        stale, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname()[:2])
        fd = stale.get_extra_info("socket").fileno()
        os.close(fd)
        with pytest.raises(OSError, match="event loop refused the socket"):
            await a.dial(addr)  # before: the RuntimeError itself, which crashed the dialling task
        conn = await a.dial(addr)  # the refused socket is held: this one gets another number
        assert conn.peer_id == b.peer_id
    finally:
        await a.close()
        await b.close()
        server.close()


def test_a_descriptor_uvloop_still_maps_to_a_transport_is_a_failed_dial_and_the_next_dial_works() -> None:
    uvloop.run(_scenario())
