"""A peer driven by hand over a plain socket: any identity, Noise by hand, frames by hand.

For hostile-peer tests that need many identities (or one identity many
times) against a real Node, without a Transport of their own per identity.
"""

from __future__ import annotations

import asyncio

from murmur.node.daemon import Node
from murmur.protocol.framing import FrameEncoder, FrameType
from murmur.protocol.identity import Identity
from murmur.protocol.messages import Message, encode
from murmur.protocol.noise import Libp2pNoiseHandshake
from tests.integration.test_transport import closed_within, raw_handshake

CLOSED_S = 5.0


class HandPeer:
    """One authenticated connection to ``node`` as ``identity``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, enc: FrameEncoder) -> None:
        self.reader, self.writer, self.enc = reader, writer, enc

    @classmethod
    async def connect(cls, node: Node, identity: Identity) -> HandPeer:
        addr = node.addrs[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        hs = Libp2pNoiseHandshake(identity, initiator=True, expected=node.peer_id)
        enc, _dec = await raw_handshake(reader, writer, hs, node.config.transport.max_frame)
        return cls(reader, writer, enc)

    async def send(self, messages: list[Message]) -> None:
        for msg in messages:
            self.writer.write(bytes(self.enc.encode(FrameType.DATA, encode(msg))))
        try:
            await self.writer.drain()
        except ConnectionError:
            pass  # dropped mid-way: what is left was never read

    async def closed(self, within_s: float = CLOSED_S) -> None:
        """Until the node closed the connection (fails after ``within_s``)."""
        await closed_within(self.reader, within_s)
        self.writer.close()

    async def hang_up(self) -> None:
        """Close our side; what we sent before is still read by the node."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
