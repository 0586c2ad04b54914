"""Learning neighbourship must be earned: strangers that link and stay silent,
and strangers that ask for our model, against a live learning node.

Measured before: any stranger's ``Link(active=1)`` made it a learning
neighbour; with the default quorum every round then waited the deadline for
it (10 silent identities took a victim from 69 to 0.33 rounds/s), the victim
sent each of them its signed delta every round, and ``ModelRequest`` served
the full public model to anyone (616x more bytes out than in).

A victim and one honest neighbour learn digits on loopback (real Noise, real
rounds); the attackers are hand-driven identities with real keys and a
compatible model fingerprint, so they look like learning peers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from murmur.node.daemon import Node
from murmur.protocol.identity import Identity
from murmur.protocol.messages import Hello, LearnerInfo, Link, ModelRequest
from tests.integration.cluster import Cluster
from tests.integration.handpeer import HandPeer

ATTACKERS = 10
WINDOW_S = 4.0
DEADLINE_S = 2.0
LEARNING: dict[str, Any] = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.num_nodes": 2,
    "learning.rounds": 100_000,
    "learning.local_steps": 2,
    "learning.round_deadline_s": DEADLINE_S,
    "learning.threads": 1,
    "learning.device": "cpu",
    "network.neighbours": 1,
}


async def _stranger(victim: Node, *messages: Any) -> HandPeer:
    identity = Identity.generate()
    peer = await HandPeer.connect_to(victim, identity)
    info = victim.learner._info()  # the victim's own fingerprint: the stranger claims the same model
    hello = Hello(listen_addrs=("/ip4/127.0.0.1/tcp/9",), agent="stranger", round=victim.learner.round, degree=1)
    await peer.send([hello, LearnerInfo(fingerprint=info.fingerprint, model=info.model, next_round=0, initial=info.initial), *messages])
    return peer


async def _rounds_in(victim: Node, seconds: float) -> float:
    start_round, start = victim.learner.round, time.monotonic()
    await asyncio.sleep(seconds)  # a measurement window, not synchronisation: the rate is what is measured
    return (victim.learner.round - start_round) / (time.monotonic() - start)


async def test_silent_link_only_strangers_cannot_slow_rounds_or_take_every_slot(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, LEARNING) as cluster:
        victim, honest = cluster.node(0), cluster.node(1)
        await cluster.wait_until(lambda: victim.learner.round >= 5, 30.0, "warm-up rounds")
        baseline = await _rounds_in(victim, WINDOW_S)
        attack_from = time.time()
        strangers = [await _stranger(victim, Link(active=1, degree=1)) for _ in range(ATTACKERS)]
        attacked = await _rounds_in(victim, WINDOW_S)
        linked = cluster.neighbours(victim)
        status = victim.status()
        print(f"rounds/s without strangers {baseline:.1f}, with {ATTACKERS} silent ones {attacked:.1f} "
              f"(bench/hostile.py measures the ratio); links refused {victim.membership.links_refused}")
        # The pace is kept: no round waited out its deadline for a stranger (each
        # did before); the rate itself is bench/hostile.py's to compare.
        rows = [r for r in victim.state.read_metrics() if r["ts"] > attack_from]
        assert len(rows) >= 10 and all(r["missed"] == 0 for r in rows), rows[-3:]
        assert max(r["wait_s"] for r in rows) < DEADLINE_S / 2, max(r["wait_s"] for r in rows)
        assert honest.peer_id in linked
        assert len(linked) <= victim.membership.max_links  # the rest were refused
        assert victim.membership.links_refused >= ATTACKERS - (victim.membership.max_links - 1)
        stranger_weights = [p for p in status["learning"]["weights"] if p not in {"self", str(honest.peer_id)}]
        assert stranger_weights == []
        # Muted: no longer waited for or sent to (those linked are silent for >= 3 rounds by now).
        assert all(victim.learner.silence.muted(str(p)) for p in linked - {honest.peer_id})
        for stranger in strangers:
            await stranger.hang_up()


async def test_model_requests_from_strangers_are_not_served(tmp_path: Path) -> None:
    async with Cluster(2, tmp_path, LEARNING) as cluster:
        victim = cluster.node(0)
        await cluster.wait_until(lambda: victim.learner.round >= 2, 30.0, "warm-up rounds")
        sent_before = victim.metrics.value("murmur_messages_total", direction="out", kind="Model") or 0.0
        strangers = [await _stranger(victim, *[ModelRequest(round=0)] * 20) for _ in range(5)]
        # The requests were read (the session dispatched them) before we look at what went out.
        await cluster.wait_until(
            lambda: (victim.metrics.value("murmur_messages_total", direction="in", kind="ModelRequest") or 0) >= 100,
            10.0, "every request read")
        sent = (victim.metrics.value("murmur_messages_total", direction="out", kind="Model") or 0.0) - sent_before
        assert sent == 0, f"{sent} model messages went to strangers"
        for stranger in strangers:
            await stranger.hang_up()
