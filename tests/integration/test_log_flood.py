"""What remote peers make a node log is bounded per peer and in total, and summarised.

A running Node (real upgrade, real records and streams) is sprayed by authenticated peers:
10,000 messages it must refuse from 50 identities, and one identity that
reaches a handler bug again and again. Each refusal used to be one WARNING
line (each handler failure a whole traceback), so the log grew with what
the attackers sent. Now each peer gets ``PEER_LOG_BUDGET.per_key`` lines a
window, all of them together ``PEER_LOG_BUDGET.total``, and one summary line
counts the rest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from murmur.node.daemon import PEER_LOG_BUDGET, Node
from murmur.protocol.identity import Identity
from murmur.protocol.messages import Goodbye, LearnerInfo, Message, PeerExchangeResponse, ShuffleResponse
from murmur.testnet.hostile import hello
from tests.integration.cluster import Cluster, wait_until
from tests.integration.handpeer import CLOSED_S, HandPeer

IDENTITIES = 50
TRANSPORT_LOGGERS = "murmur.protocol.libp2p."  # the host and its connections
MESSAGES = 10_000


@pytest.fixture
async def victim(tmp_path: Path) -> AsyncIterator[Node]:
    async with Cluster(1, tmp_path) as cluster:
        yield cluster.node(0)


def _records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def _summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in _records(caplog, "log_suppressed") if r.what == "peer faults"]


async def test_ten_thousand_refused_messages_from_50_identities_write_a_bounded_log(
        victim: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Unsolicited shuffle and peer-exchange responses: each is a LimitExceeded
    (penalty 5, no drop on its own), so a peer is penalised message after
    message until its score bans it and the victim drops it."""
    caplog.set_level(logging.INFO, logger="murmur")
    per_identity = MESSAGES // IDENTITIES
    spam: list[Message] = [ShuffleResponse(entries=()) if i % 2 else PeerExchangeResponse(peers=())
                           for i in range(per_identity)]
    identities = [Identity.generate() for _ in range(IDENTITIES)]
    for identity in identities:
        peer = await HandPeer.connect_to(victim, identity)
        await peer.send(spam)
        await peer.closed()
    assert all(victim.table.is_banned(i.peer_id) for i in identities)  # every one was penalised to a ban
    faults = sum(victim.status()["faults"].values())
    assert faults >= IDENTITIES * 20  # a ban takes 21 of them at 5 points each

    lines = _records(caplog, "fault")
    per_peer = Counter(r.peer for r in lines)
    assert len(lines) <= PEER_LOG_BUDGET.total, len(lines)
    assert max(per_peer.values()) <= PEER_LOG_BUDGET.per_key, per_peer.most_common(3)
    # nothing else above the transport (whose per-connection lines are its own
    # budget's business) logged about them at INFO or up: bans are in the fault lines
    others = [r for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith(TRANSPORT_LOGGERS)
              and getattr(r, "event", None) != "fault"]
    assert others == [], [r.getMessage() for r in others[:5]]

    await victim.stop()
    (summary,) = _summaries(caplog)
    assert summary.levelno == logging.WARNING
    assert summary.suppressed == faults - len(lines)  # nothing lost: every fault is a line or counted
    assert 1 <= summary.keys <= IDENTITIES


async def test_a_handler_bug_reached_again_and_again_by_one_peer_logs_few_tracebacks(
        victim: Node, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises (a bug, not a PeerFault) costs the connection and
    no points, so the same identity may reconnect and reach it again at once;
    every time used to be a full traceback in the log."""
    caplog.set_level(logging.INFO, logger="murmur")

    async def buggy(session: object, msg: LearnerInfo) -> None:
        raise RuntimeError("a handler bug")

    victim.dispatcher.register({LearnerInfo: buggy})  # learning is off: nothing else handles it
    identity = Identity.generate()
    tries = 40
    for _ in range(tries):
        peer = await HandPeer.connect_to(victim, identity)
        await peer.send([LearnerInfo(fingerprint=bytes(32), model="m", next_round=0, initial=bytes(32))])
        await peer.closed()
    await wait_until(lambda: victim.session(identity.peer_id) is None, CLOSED_S, "last connection gone")
    tracebacks = [r for r in caplog.records if "handler failed" in r.getMessage() and r.exc_info]
    assert len(tracebacks) == PEER_LOG_BUDGET.per_key
    assert not victim.table.is_banned(identity.peer_id)  # a bug of ours is not the peer's fault

    await victim.stop()
    (summary,) = _summaries(caplog)
    assert (summary.suppressed, summary.keys) == (tries - PEER_LOG_BUDGET.per_key, 1)
    assert str(identity.peer_id) in summary.top


async def test_fresh_identities_saying_goodbye_write_no_info_lines(
        victim: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Connect, greet, say goodbye, as many identities as one likes: each was
    three INFO lines (connection open, peer said goodbye with a reason of the
    peer's choosing, peer evicted), 820 lines a second from one address."""
    caplog.set_level(logging.DEBUG, logger="murmur")
    for i in range(20):
        peer = await HandPeer.connect_to(victim, Identity.generate())
        await peer.send([hello(), Goodbye(reason="x" * 200)])
        await peer.closed()
    assert len([r for r in caplog.records if r.getMessage() == "peer said goodbye"]) == 20  # read, at DEBUG
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud == [], [r.getMessage() for r in loud[:5]]
