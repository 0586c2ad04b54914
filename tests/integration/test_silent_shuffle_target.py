"""A shuffle target that never answers holds one shuffle no longer than its deadline.

Cyclon shuffles run one after another (one periodic task), and a shuffle
sent its request without a deadline: a peer that took the connection and
then answered no stream negotiation (never read) held the shuffle for the
transport's negotiate_timeout_s, 10 s, and every shuffle of the node waited
behind it (measured: 10.0 s for one call, two honest peers' shuffles not
started meanwhile). Now the loop moves on at the request's deadline, and the silent peer pays
for its stream negotiation when the transport's timeout for it runs out.
"""

from __future__ import annotations

import time
from pathlib import Path

from murmur.node.membership import SHUFFLE_SEND_TIMEOUT_S
from murmur.protocol.messages import Hello
from tests.integration.cluster import Cluster, wait_until
from tests.integration.test_node_faults import RawPeer

NEGOTIATE_TIMEOUT_S = 5.0


async def test_a_silent_shuffle_target_costs_one_deadline_and_a_penalty(tmp_path: Path) -> None:
    # The node's own shuffles are driven by hand here; a shorter negotiate_timeout_s than the
    # default 10 s, still past the shuffle's deadline, for the penalty to come soon.
    overrides = {"network.shuffle_interval_s": 600.0, "transport.negotiate_timeout_s": NEGOTIATE_TIMEOUT_S}
    async with Cluster(1, tmp_path, overrides=overrides) as cluster:
        node = cluster.node(0)
        silent = await RawPeer.to(node)  # upgraded; from here on it reads nothing and answers nothing
        silent.push(Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="silent", round=0, degree=1))
        await wait_until(lambda: silent.peer_id in node.sampler, 5.0, "the silent peer is in the view")
        assert [d.peer for d in node.sampler.view()] == [silent.peer_id]  # the only entry: the shuffle target
        started = time.monotonic()
        await node.membership.shuffle()
        took = time.monotonic() - started
        print(f"one shuffle with a silent target took {took:.2f} s")
        assert took < SHUFFLE_SEND_TIMEOUT_S + 1.0, f"the shuffle waited {took:.1f} s for the silent peer"
        assert silent.peer_id not in node.sampler and silent.peer_id not in node.membership._shuffles
        await wait_until(lambda: node.table.score(silent.peer_id) < 0, NEGOTIATE_TIMEOUT_S, "the silent peer penalised")
        await wait_until(lambda: node.session(silent.peer_id) is None, 2.0, "the silent peer dropped")
        silent.close()
