"""Bootstrap against a connection that closes under it (membership.py).

Seen on a loopback testnet: a node restarted with its identity dials its
bootstrap peer while that peer dials it back; one of the two duplicate
connections is dropped, and the peer-exchange request sent on it fails with
StreamResetError. That escaped the bootstrap task, which crashed, and the
daemon exited with code 1 (one restart in two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from murmur.node.membership import Membership, MembershipConfig
from murmur.protocol.identity import Identity
from murmur.protocol.libp2p import StreamResetError
from murmur.protocol.multiaddr import DialAddr, Multiaddr
from murmur.protocol.peertable import PeerTable
from murmur.protocol.sampling import CyclonSampler
from murmur.tasks import TaskManager

SELF = Identity.from_seed(b"s" * 32).peer_id
BOOT = Identity.from_seed(b"b" * 32).peer_id


class _Session:
    def __init__(self, reset: bool) -> None:
        self.peer = BOOT
        self.closed = False
        self.reset = reset
        self.sent: list[Any] = []

    async def send(self, msg: Any, deadline: float | None = None) -> None:
        if self.reset:
            raise StreamResetError("stream 5 was reset")
        self.sent.append(msg)


class _Host:
    """The first connection is the duplicate that gets dropped; the second holds."""

    def __init__(self) -> None:
        self.peer_id = SELF
        self.addrs: list[Multiaddr] = []
        self.dialled: list[_Session] = []

    def session(self, peer: Any) -> Any:
        return None

    def sessions(self) -> list[Any]:
        return [s for s in self.dialled if not s.reset]

    async def connect(self, addrs: Sequence[Any], peer: Any = None) -> Any:
        session = _Session(reset=not self.dialled)
        self.dialled.append(session)
        return session

    def save_peers(self) -> None:
        return None


async def test_a_connection_reset_under_the_peer_request_is_a_failed_dial_not_a_crash() -> None:
    host = _Host()
    boot = DialAddr.parse(f"/ip4/127.0.0.1/tcp/4731/p2p/{BOOT}")
    membership = Membership(host, CyclonSampler(SELF, []), PeerTable(), MembershipConfig(bootstrap=(boot,)),
                            TaskManager("test"))
    await asyncio.wait_for(membership._bootstrap(), 10.0)
    assert len(host.dialled) == 2 and host.dialled[1].sent  # dialled again and asked for peers
    assert BOOT in membership._pex_asked  # asked once, on the connection that held


async def test_a_peer_request_that_could_not_be_sent_is_not_counted_as_asked() -> None:
    """Else the peer's kept connection looked as if an answer were coming,
    and _reseed never asked it again."""
    membership = Membership(_Host(), CyclonSampler(SELF, []), PeerTable(), MembershipConfig(), TaskManager("test"))
    try:
        await membership.request_peers(_Session(reset=True))  # type: ignore[arg-type]
    except StreamResetError:
        pass
    assert BOOT not in membership._pex_asked
