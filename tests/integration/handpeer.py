"""A peer driven by hand against an in-process Node: any identity, the upgrade by hand, records by hand.

For hostile-peer tests that need many identities (or one identity many
times) against a real Node, without a Transport of their own per identity.
The connection itself is :class:`murmur.testnet.hostile.RawPeer`.
"""

from __future__ import annotations

import asyncio

from murmur.node.daemon import Node
from murmur.protocol import multistream
from murmur.protocol.framing import FrameType
from murmur.protocol.identity import Identity
from murmur.testnet.hostile import RawPeer, read_record
from tests.integration.test_transport import closed_within

CLOSED_S = 5.0


class HandPeer(RawPeer):
    """One authenticated connection to ``node`` as ``identity``."""

    @classmethod
    async def connect_to(cls, node: Node, identity: Identity) -> HandPeer:
        peer = await RawPeer.connect(node.addrs[0], identity, max_frame=node.config.transport.max_frame)
        return cls(peer.reader, peer.writer, peer.identity, peer.enc, peer.dec)

    async def agree_to_streams(self) -> None:
        """Until the connection ends: agree to every stream the node opens
        (it keeps a peer that answers its negotiations) and drop what comes
        on them: a peer that looks alive and reads nothing it is sent."""
        listeners: dict[int, multistream.Listener] = {}
        try:
            while True:
                for frame in await read_record(self.reader, self.dec):
                    if frame.type is FrameType.OPEN:
                        listener = listeners[frame.stream] = multistream.Listener(lambda _protocol: True)
                        self.writer.write(self.frame(FrameType.DATA, listener.start(), frame.stream))
                    elif frame.type is FrameType.DATA and frame.stream in listeners and not listeners[frame.stream].done:
                        answer = listeners[frame.stream].feed(bytes(frame.payload))
                        if answer:
                            self.writer.write(self.frame(FrameType.DATA, answer, frame.stream))
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def closed(self, within_s: float = CLOSED_S) -> None:
        """Until the node closed the connection (fails after ``within_s``)."""
        await closed_within(self.reader, within_s)
        self.writer.close()
