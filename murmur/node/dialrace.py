"""Dialling a peer's addresses in staggered lanes, as happy eyeballs does
(RFC 8305): the first connection that comes up wins, the other dials are
cancelled.

Why: a node behind NAT advertises its own (LAN or router) address and its
``/p2p-circuit`` addresses. Tried one after another, the first dial to such a
node goes to an address whose router drops the SYN, and waits the whole
connect timeout (5 s by default) before the circuit, which would have
answered in a few round trips, is tried at all. Here the circuits form a
second lane that starts :data:`CIRCUIT_DIAL_DELAY_S` after the direct one
(as go-libp2p's dial ranker delays relay addresses) or at once when every
direct address already failed: a peer that answers directly still gets a
direct connection without costing its relays anything, and a NATed one is
reached through a relay in about that delay plus the circuit's handshakes.

Within a lane the addresses are dialled one after another. Cancelling a
lane's dial closes its socket; a dial already past TCP (its upgrade is
shielded) finishes on its own and is the application's to sort out (the
node's session table keeps one connection per peer, a direct one over a
relayed one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# How long the direct addresses have to themselves before a peer's relay
# circuits are dialled too (go-libp2p's dial ranker: RelayDelay, 500 ms).
CIRCUIT_DIAL_DELAY_S = 0.5

Attempt = Callable[[], Awaitable[T]]


@dataclass(frozen=True)
class Lane(Generic[T]):
    """Dials tried one after another; ``delay_s``: how long after the previous
    lane's start this one starts, unless that lane failed first (the first
    lane starts at once)."""

    attempts: Sequence[Attempt[T]]
    delay_s: float = 0.0


async def first_of(lanes: Sequence[Lane[T]], failures: tuple[type[BaseException], ...]) -> T:
    """The first result of any lane's attempts; an attempt raising one of
    ``failures`` makes way for its lane's next one. Everything still running
    is cancelled (and awaited) before this returns or raises. Raises the last
    failure when every attempt failed, ``ValueError`` when there is none."""
    lanes = [lane for lane in lanes if lane.attempts]
    if not lanes:
        raise ValueError("no address to dial")
    loop = asyncio.get_running_loop()
    won: asyncio.Future[T] = loop.create_future()
    errors: list[BaseException] = []
    exhausted = [asyncio.Event() for _ in lanes]

    async def run(i: int, lane: Lane[T]) -> None:
        try:
            if i > 0:
                waiting = asyncio.ensure_future(exhausted[i - 1].wait())
                try:
                    await asyncio.wait([waiting], timeout=lane.delay_s)
                finally:
                    waiting.cancel()
            for attempt in lane.attempts:
                if won.done():
                    return
                try:
                    result = await attempt()
                except failures as exc:
                    errors.append(exc)
                    continue
                if not won.done():
                    won.set_result(result)
                return
        finally:
            exhausted[i].set()

    tasks = [asyncio.ensure_future(run(i, lane)) for i, lane in enumerate(lanes)]
    everything = asyncio.ensure_future(asyncio.gather(*tasks))
    try:
        await asyncio.wait([won, everything], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(everything, return_exceptions=True)
    if won.done():
        return won.result()
    problems = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if problems:  # an attempt raised something that is no dial failure: a bug, not the peer
        raise problems[0]  # type: ignore[misc]
    assert errors
    raise errors[-1]
