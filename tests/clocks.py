"""A clock a test sets by hand (``clock.now = 2.0``), for the components that
take ``clock: Callable[[], float]``: rate limits, cool-offs, muxers, delta
transfers, the peer table, peer sampling, gossip caches, discovery, log budgets."""

from __future__ import annotations


class ManualClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
