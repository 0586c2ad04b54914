"""A bootstrap peer whose session goes between the dial and the peer exchange.

Seen on real daemons started by hand, each the others' bootstrap peer, while
one of them was killed and restarted: the peer exchange request went out on
a stream the peer had reset (it was killed, or closed our connection as the
duplicate of the one it dialled us on), `StreamResetError` ended the
``bootstrap`` task as a crash, and the healthy node stopped with exit code 1
("task 'bootstrap' crashed: StreamResetError: stream 5 was reset"). A peer
going away costs its connection, never the node's health.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.node.session import PeerSession
from murmur.protocol.libp2p.connection import StreamResetError
from murmur.protocol.messages import PeerExchangeRequest
from tests.integration.cluster import node_config, wait_until

BOOTSTRAP_S = 15.0


async def test_a_reset_peer_exchange_does_not_crash_the_bootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    send = PeerSession.send
    resets: list[PeerSession] = []

    async def reset_first_request(self: PeerSession, msg, deadline=None):  # type: ignore[no-untyped-def]
        if isinstance(msg, PeerExchangeRequest) and not resets:
            resets.append(self)
            raise StreamResetError("stream 5 was reset")  # what the killed peer's reset made our send raise
        await send(self, msg, deadline)

    monkeypatch.setattr(PeerSession, "send", reset_first_request)
    async with Node(node_config(tmp_path / "boot")) as boot:
        async with Node(node_config(tmp_path / "node", bootstrap=(boot.addrs[0],))) as node:
            await wait_until(lambda: bool(resets) and "bootstrap" not in node.tasks, BOOTSTRAP_S,
                             "the bootstrap task's end")
            assert node.tasks.crashes() == []
            assert node.healthy()
            assert node.session(boot.peer_id) is not None  # the connection itself is kept
