"""A peer driven by hand against an in-process Node: any identity, the upgrade by hand, records by hand.

For hostile-peer tests that need many identities (or one identity many
times) against a real Node, without a Transport of their own per identity.
The connection itself is :class:`murmur.testnet.hostile.RawPeer`.
"""

from __future__ import annotations

from murmur.node.daemon import Node
from murmur.protocol.identity import Identity
from murmur.testnet.hostile import RawPeer
from tests.integration.test_transport import closed_within

CLOSED_S = 5.0


class HandPeer(RawPeer):
    """One authenticated connection to ``node`` as ``identity``."""

    @classmethod
    async def connect_to(cls, node: Node, identity: Identity) -> HandPeer:
        peer = await RawPeer.connect(node.addrs[0], identity, max_frame=node.config.transport.max_frame)
        return cls(peer.reader, peer.writer, peer.identity, peer.enc, peer.dec)

    async def closed(self, within_s: float = CLOSED_S) -> None:
        """Until the node closed the connection (fails after ``within_s``)."""
        await closed_within(self.reader, within_s)
        self.writer.close()
