"""A reusable test base: N real :class:`~murmur.node.daemon.Node` s in one process.

``async with Cluster(n, tmp_path, **overrides) as cluster:`` starts node 0,
then nodes 1..n-1 with node 0's one address as their only bootstrap peer, all
listening on 127.0.0.1 with real Noise, real msgpack and real Cyclon. Config
overrides are dotted keys, given either as ``overrides={"network.neighbours": 4}``
or as keyword arguments with ``__`` for the dot (``network__neighbours=4``).

Synchronisation is by polling real state (:meth:`Cluster.wait_until`), never
by fixed sleeps: a test states the condition it needs and a bound on how long
the system may take to reach it, and the bound is what it asserts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.node.config import NodeConfig, load_config
from murmur.node.daemon import Node
from murmur.protocol.identity import PeerId
from murmur.protocol.multiaddr import Multiaddr

LOOPBACK = "127.0.0.1"
DEFAULT_K = 3
POLL_INTERVAL_S = 0.02
BASE_OVERRIDES: Mapping[str, Any] = {
    "network.allow_loopback": True,  # every node is 127.0.0.1: exempt loopback from subnet buckets
    "network.neighbours": DEFAULT_K,
    "network.shuffle_interval_s": 0.5,
    "api.port": 0,
    "learning.enabled": False,  # membership and transport only; the learner is tested elsewhere
}

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_until(predicate: Predicate, timeout: float, what: str = "condition") -> float:
    """Poll ``predicate`` (sync or async) until true; return the seconds it took.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(POLL_INTERVAL_S)


def node_config(data_dir: Path, port: int = 0, bootstrap: tuple[Multiaddr, ...] = (),
                overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """A loopback test node's config; ``overrides`` win over the test defaults."""
    merged: dict[str, Any] = {
        **BASE_OVERRIDES,
        "node.data_dir": str(data_dir),
        "node.listen": [f"/ip4/{LOOPBACK}/tcp/{port}"],
        "network.bootstrap": [str(a) for a in bootstrap],
    }
    merged.update(overrides or {})
    return load_config(None, merged)


def attacked_learning(honest: int, rounds: int, *, alpha: float, deadline_s: float) -> dict[str, Any]:
    """Overrides for ``honest`` nodes learning digits next to one label-flip
    attacker that holds the last data partition (its Sybils' own index)."""
    return {
        "learning.enabled": True,
        "learning.num_nodes": honest + 1,  # the attacker holds the last data partition
        "learning.partition": "dirichlet",
        "learning.alpha": alpha,
        "learning.rounds": rounds,
        "learning.local_steps": 10,
        "learning.round_deadline_s": deadline_s,
        "learning.threads": 1,
        "learning.device": "cpu",
        "learning.eval_attack": "label_flip",
        "network.neighbours": 3,
        "network.shuffle_interval_s": 1.0,
    }


@dataclass
class Member:
    """One slot of the cluster: a data dir that outlives the Node running on it."""

    index: int
    data_dir: Path
    node: Node | None = None
    port: int = 0  # the listen port, kept so a restarted node is found where it was
    peer_id: PeerId | None = None
    history: list[str] = field(default_factory=list)  # "started", "crashed", "stopped"


class Cluster:
    """N in-process nodes on loopback with a single bootstrap address (node 0)."""

    def __init__(self, n: int, tmp_path: Path, overrides: Mapping[str, Any] | None = None, **kw: Any) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.tmp_path = Path(tmp_path)
        self.overrides: dict[str, Any] = {k.replace("__", "."): v for k, v in kw.items()}
        self.overrides.update(overrides or {})
        self.members = [Member(i, self.tmp_path / f"node{i}") for i in range(n)]
        self.bootstrap: tuple[Multiaddr, ...] = ()
        self._extra = 0

    @property
    def k(self) -> int:
        return int(self.overrides.get("network.neighbours", DEFAULT_K))

    # -- lifetime --------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        try:
            await self._start_member(self.members[0])
            node0 = self.node(0)
            self.bootstrap = (node0.addrs[0],)
            await asyncio.gather(*(self._start_member(m) for m in self.members[1:]))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m.index) for m in self.members if m.node is not None),
                             return_exceptions=True)

    def config_for(self, member: Member) -> NodeConfig:
        return node_config(member.data_dir, member.port, self.bootstrap, self.overrides)

    async def _start_member(self, member: Member) -> Node:
        node = Node(self.config_for(member))
        await node.start()
        member.node = node
        member.port = node.addrs[0].port
        member.peer_id = node.peer_id
        member.history.append("started")
        return node

    async def add_node(self, bootstrap: bool = False, **kw: Any) -> Node:
        """An extra, well-behaved node outside the N (stopped by :meth:`close`).
        Without ``bootstrap`` it knows nobody until the test connects it."""
        self._extra += 1
        member = Member(len(self.members), self.tmp_path / f"extra{self._extra}")
        self.members.append(member)
        overrides = {**self.overrides, **{k.replace("__", "."): v for k, v in kw.items()}}
        config = node_config(member.data_dir, 0, self.bootstrap if bootstrap else (), overrides)
        node = Node(config)
        await node.start()
        member.node, member.port, member.peer_id = node, node.addrs[0].port, node.peer_id
        member.history.append("started")
        return node

    async def stop(self, i: int) -> None:
        """Graceful stop: Goodbye to every peer, peer table saved, lock released."""
        member = self.members[i]
        node, member.node = member.node, None
        if node is not None:
            await node.stop()
            member.history.append("stopped")

    async def crash(self, i: int) -> None:
        """Die like ``kill -9``: every socket reset, no Goodbye, no CLOSE frame.

        The listener and dialler are shut first so that the dying node cannot
        reconnect in the instant between the reset and the end of its tasks;
        then every TCP connection (authenticated or half-open) is aborted, and
        only after the peers' sockets have seen the reset are the node's
        in-process resources (tasks, API, state-dir lock) released.
        """
        member = self.members[i]
        node, member.node = member.node, None
        assert node is not None, f"node {i} is not running"
        await node.host.abort()
        assert not node.host.connections, f"node {i}'s sockets were not reset"
        await node.stop()  # its sessions are all closed: no Goodbye can reach anyone
        member.history.append("crashed")

    async def restart(self, i: int) -> Node:
        """Start node ``i`` again on its data dir and its previous port."""
        member = self.members[i]
        assert member.node is None, f"node {i} is still running"
        return await self._start_member(member)

    # -- views -----------------------------------------------------------------

    def node(self, i: int) -> Node:
        node = self.members[i].node
        assert node is not None, f"node {i} is not running"
        return node

    @property
    def live(self) -> list[Node]:
        return [m.node for m in self.members if m.node is not None]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.live)

    def live_ids(self) -> set[PeerId]:
        return {n.peer_id for n in self.live}

    def dead_ids(self) -> set[PeerId]:
        return {m.peer_id for m in self.members if m.node is None and m.peer_id is not None}

    @staticmethod
    def neighbours(node: Node) -> set[PeerId]:
        """Learning neighbours: connected peers with a Link in either direction."""
        return {s.peer for s in node.membership.learning_neighbours()}

    def sampler_neighbours(self, node: Node) -> set[PeerId]:
        return set(node.sampler.neighbours(self.k))

    def healthy(self, node: Node) -> bool:
        """``node``'s sampler has k live neighbours and it has >= k learning
        neighbours, none of them dead."""
        live = self.live_ids()
        sampled = self.sampler_neighbours(node)
        learning = self.neighbours(node)
        return len(sampled) == self.k and sampled <= live and len(learning) >= self.k and learning <= live

    def all_healthy(self) -> bool:
        return all(self.healthy(n) for n in self.live)

    # -- synchronisation ---------------------------------------------------------

    @staticmethod
    async def wait_until(predicate: Predicate, timeout: float, what: str = "condition") -> float:
        return await wait_until(predicate, timeout, what)
