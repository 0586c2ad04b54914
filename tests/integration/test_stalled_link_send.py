"""A neighbour that stopped reading holds neighbour maintenance no longer than a deadline.

maintain() sends its Links and Unlinks one after another, and sent them
without a deadline: a send to a neighbour whose connection held more than
the write buffer's mark waited for room. Here a linked neighbour stops
reading while 8 MB round messages come to it (a stalled process); when the
sampler moves on from it, the Unlink held maintain() until the drain watch
cut the connection: 22.2 s measured, no other neighbour dialled or linked
meanwhile (the round loop's unlink of a silent neighbour sends the same
way). Now maintain() skips a peer whose connection has no room (a later
tick asks), and any Link or Unlink not sent by LINK_SEND_TIMEOUT_S is
undone, to be asked again; the slow neighbour is not dropped for it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from murmur.node.membership import LINK_SEND_TIMEOUT_S
from tests.integration.cluster import Cluster
from tests.integration.test_learning_links import learning

SIZE = 2_000_000  # 8 MB round messages: one is more than the write buffer's mark (one 4 MB frame)


async def test_an_unlink_to_a_neighbour_that_stopped_reading_waits_no_longer_than_its_deadline(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, learning(size=SIZE)) as cluster:
        node, stuck = cluster.node(0), cluster.node(1)
        await cluster.wait_until(lambda: stuck.learner.last_report is not None and stuck.learner.last_report.received,
                                 30.0, "a round message delivered (its stream negotiated)")
        session, theirs = node.session(stuck.peer_id), stuck.session(node.peer_id)
        assert session is not None and theirs is not None and session.link_out and session.chosen
        theirs.conn._tr.pause_reading()  # its process stalls: it reads nothing more
        theirs.conn._tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn = session.conn
        await cluster.wait_until(lambda: not conn._writable.is_set(), 30.0, "no write room to the stuck peer")
        node.membership.report_failure(stuck.peer_id, reason="test: the sampler moves on", penalise=False)
        started = time.monotonic()
        await node.membership.maintain()
        took = time.monotonic() - started
        print(f"maintain() took {took:.2f} s; connection closed: {conn.closed}")
        assert took < LINK_SEND_TIMEOUT_S / 4, f"maintain() waited {took:.1f} s for the stuck neighbour"
        assert session.link_out and session.chosen and not conn.closed  # skipped: a later tick unlinks it
        # The round loop's unlink of a silent neighbour checks no room first: its deadline bounds it.
        started = time.monotonic()
        await node.membership.unlink(session, reason="test: silent")
        took = time.monotonic() - started
        print(f"unlink() took {took:.2f} s")
        assert took < LINK_SEND_TIMEOUT_S + 1.0, f"unlink() waited {took:.1f} s for the stuck neighbour"
        assert session.link_out and session.chosen and not conn.closed  # not sent: undone, asked again later
