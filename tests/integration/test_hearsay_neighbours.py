"""Neighbour slots go to peers a node has spoken with, not to a stranger's fresh hearsay.

A node fills an open neighbour slot from its Cyclon view. Entries a shuffle
brings in are hearsay: whoever sent them chose their ids, addresses and ages.
An attacker identity that shuffled in, within its shuffle budget, records of
age 0 for ids it made up (at addresses nobody answers, one /24 each) made
them the freshest entries of the victim's view, and the age order alone put
them first: when the neighbours a victim chose crashed, the open slots went
to made-up records (each lost again only after a failed dial, and handed to
the next) while live peers it had spoken with waited in its view.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from murmur.node.daemon import Node
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import ShuffleRequest
from tests.integration.cluster import Cluster, wait_until

N = 8
K = 3
SHUFFLE_LENGTH = 8
VICTIM_SHUFFLE_INTERVAL_S = 0.5  # the victim ages its view's entries every half second ...
HONEST_SHUFFLE_INTERVAL_S = 3.0  # ... and hears from each honest peer less often (as in a larger network)
WATCH_S = 4.0
SAMPLE_S = 0.05


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(N, tmp_path, overrides={"network.neighbours": K, "network.shuffle_length": SHUFFLE_LENGTH,
                                               "network.shuffle_interval_s": HONEST_SHUFFLE_INTERVAL_S,
                                               "transport.connect_timeout_s": 1.0}) as c:
        yield c


def made_up(batch: int) -> tuple[tuple[PeerId, tuple[str, ...], int], ...]:
    """Fresh ids at addresses nobody answers, one /24 each (the subnet limit does not stop them), age 0."""
    return tuple((Identity.generate().peer_id, (f"/ip4/10.{batch % 250}.{j}.1/tcp/4001",), 0)
                 for j in range(SHUFFLE_LENGTH - 1))


async def shuffle_in(attacker: Node, victim: Node, fakes: set[PeerId], stop: asyncio.Event) -> None:
    """One shuffle request per victim's interval (within its budget), each of fresh made-up records."""
    session = await attacker.connect(victim.addrs, victim.peer_id)
    own = (attacker.peer_id, tuple(str(a) for a in attacker.addrs), 0)
    batch = 0
    while not stop.is_set():
        entries = made_up(batch)
        fakes.update(peer for peer, _addrs, _age in entries)
        await session.send(ShuffleRequest(entries=(own, *entries)))
        batch += 1
        await asyncio.sleep(VICTIM_SHUFFLE_INTERVAL_S)


async def test_open_neighbour_slots_go_to_peers_spoken_with(cluster: Cluster) -> None:
    victim = await cluster.add_node(bootstrap=True, network__shuffle_interval_s=VICTIM_SHUFFLE_INTERVAL_S)
    await wait_until(lambda: victim.membership.degree() >= K and len(victim.sampler) >= N - 2, 15.0,
                     "the victim meshed")
    for node in cluster.live:  # it has spoken with every honest node (as one a while in the network has)
        if node is not victim:
            await victim.connect(node.addrs, node.peer_id)
    attacker = await cluster.add_node(bootstrap=False)  # known to nobody but the victim
    fakes: set[PeerId] = set()
    stop = asyncio.Event()
    feeder = asyncio.create_task(shuffle_in(attacker, victim, fakes, stop))
    try:
        # Most of what one source may hold (max_per_source: l, its own entry not counted); 10 before that share.
        await wait_until(lambda: sum(d.peer in fakes for d in victim.sampler.view()) >= SHUFFLE_LENGTH - 2, 10.0,
                         "made-up records in the victim's view")
        honest = {node.peer_id for node in cluster.live} - {victim.peer_id, attacker.peer_id}

        def hearsay_freshest() -> bool:
            """The age order alone would fill a slot with a made-up record now."""
            ages = {True: [], False: []}  # type: dict[bool, list[int]]
            for desc in victim.sampler.view():
                if desc.peer in fakes or desc.peer in honest:
                    ages[desc.peer in fakes].append(desc.age)
            return bool(ages[True] and ages[False]) and min(ages[True]) < min(ages[False])

        await wait_until(hearsay_freshest, 10.0, "made-up records fresher than every honest entry")
        chosen = set(victim.sampler.neighbours())
        for i in range(1, N):  # the neighbours it chose crash (not the bootstrap node): their slots open
            if cluster.node(i).peer_id in chosen:
                await cluster.crash(i)
        picks: set[PeerId] = set()
        loop = asyncio.get_running_loop()
        end = loop.time() + WATCH_S
        while loop.time() < end:
            picks.update(victim.sampler.neighbours())
            await asyncio.sleep(SAMPLE_S)
    finally:
        stop.set()
        await feeder
    fake_picks = len(picks & fakes)
    print(f"{fake_picks} of {len(picks)} neighbour choices in {WATCH_S}s were made-up records")
    assert fake_picks == 0, f"{fake_picks} of {len(picks)} neighbour choices were made-up records"
