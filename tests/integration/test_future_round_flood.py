"""A neighbour's round messages far ahead of ours are refused at their start, not decoded.

The engine buffers a neighbour's message up to ``max_future_rounds`` ahead
of our round; one further ahead is only held until we fetch that peer's
model, or advances a replica we use nowhere. Each was still assembled and
decoded first (the node's one decode slot: ~0.5 s of CPU at 10M parameters,
random-k 0.5), before the engine looked at its round. One linked neighbour
sending complete, signed messages for rounds far ahead, as fast as its link
allowed, had every one decoded (measured: 40 of 40), its honest neighbours'
messages queued behind them for the decode slot. The round is in the
DeltaStart: such a transfer is now refused there (its chunks are dropped
unread) and only the round it claims is noted (catch-up votes, the quorum).
Messages for the next rounds are decoded and buffered as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from murmur.learning.rounds import MAX_FUTURE_ROUNDS
from murmur.node.learner import FAR_AHEAD_SLACK
from murmur.protocol.delta import CompletedDelta, DeltaSender, VerifiedDelta
from murmur.protocol.identity import Identity
from murmur.protocol.layout import TransferKind
from murmur.protocol.messages import Hello, LearnerInfo, Link, MurmurProtocol
from tests.integration.cluster import Cluster
from tests.integration.handpeer import HandPeer
from tests.integration.test_hostile_neighbours import LEARNING

FLOOD = 40
AHEAD = 10  # rounds ahead of the victim's where the flood starts: far past what it buffers


async def test_a_neighbour_cannot_have_far_future_rounds_decoded(tmp_path: Path) -> None:
    assert AHEAD > MAX_FUTURE_ROUNDS + FAR_AHEAD_SLACK
    async with Cluster(1, tmp_path, {**LEARNING, "learning.round_deadline_s": 5.0,
                                        # the attacker answers none of the victim's streams: no timeout in the test
                                        "transport.negotiate_timeout_s": 60.0}) as cluster:
        victim = cluster.node(0)
        learner = victim.learner
        decoded: list[int] = []
        decode = learner._decoder.decode

        async def counting(verified: VerifiedDelta) -> CompletedDelta:
            decoded.append(verified.start.round)
            return await decode(verified)

        learner._decoder.decode = counting  # type: ignore[method-assign]
        identity = Identity.generate()
        attacker = await HandPeer.connect_to(victim, identity)
        info = learner._info()  # the victim's own fingerprint: it claims the same model
        hello = Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="ahead", round=learner.round, degree=1)
        await attacker.send([hello, LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0),
                             Link(active=1, degree=1)])
        await cluster.wait_until(lambda: (s := victim.session(identity.peer_id)) is not None and s.linked, 5.0,
                                 "the victim accepts the link")
        layout = learner.layout
        zeros = np.zeros(layout.shape(TransferKind.ROUND), dtype=np.float32)
        meta = layout.meta(TransferKind.ROUND, degree=1)

        def message(round_: int) -> bytes:
            sender = DeltaSender(identity, victim.peer_id, round_, zeros, learner.codec, meta=meta)
            return b"".join(attacker.message(b"".join(bytes(p) for p in parts), MurmurProtocol.DELTA) for parts in sender)

        # From round 0 on, one after another: each the next of our replica of the
        # peer (no gap, no model to fetch), the later ones far ahead of the victim.
        own = learner.round
        first = own + AHEAD
        for round_ in range(first + FLOOD):
            attacker.write(message(round_))
        ends = lambda: victim.metrics.value("murmur_messages_total", direction="in", kind="DeltaEnd") or 0  # noqa: E731
        await cluster.wait_until(lambda: ends() >= first + FLOOD, 30.0, "every message read")
        await cluster.wait_until(lambda: learner._peer_rounds.get(identity.peer_id, -1) == first + FLOOD - 1, 5.0,
                                 "the claimed round noted")
        far = [r for r in decoded if r >= first]
        print(f"{len(far)} of {FLOOD} far-future round messages decoded")
        assert far == [], f"{len(far)} of {FLOOD} far-future round messages decoded"
        assert learner.status()["deltas_refused_far_ahead"] >= FLOOD
        assert set(range(own + MAX_FUTURE_ROUNDS + 1)) <= set(decoded), "rounds up to what is buffered are decoded"
        assert victim.session(identity.peer_id) is not None and victim.status()["faults"] == {}  # far ahead is no fault
        attacker.close()

