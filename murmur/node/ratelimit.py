"""A budget of requests a peer may make of us (public models served, gossip forwarded).

Why not the transport's :class:`~murmur.protocol.transport.TokenBucket`: that
bucket goes into debt by design (the bytes it meters have already arrived, and
reading pauses until the debt is repaid), so a refused request would still be
charged. Used as a request limit, a peer asking slightly faster than the
refill rate then sinks deeper with every refusal and is refused forever: in
the churn testnet a node that joined behind asked its neighbour for a model
every 1.5 s (catch-up, plus replica re-syncs), was refused from then on,
never caught up, and held its neighbours (quorum 1) to full-deadline rounds
for the rest of the run. Here only what is granted is charged: over-asking
is refused until the budget refills, then served again.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RequestBudget:
    """``burst`` requests at once, one more every ``refill_s`` seconds."""

    def __init__(self, burst: int, refill_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or not refill_s > 0:
            raise ValueError("a request budget needs burst >= 1 and refill_s > 0")
        self.burst = burst
        self.refill_s = refill_s
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, cost: float = 1.0) -> bool:
        """Grant a request of ``cost`` tokens (and charge it) if the budget
        holds them; a refusal costs nothing."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) / self.refill_s)
        self._stamp = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
