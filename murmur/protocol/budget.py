"""Byte budgets: what one peer may make the node hold, drawn from one node-wide pool.

Sans-IO accounting, no buffers of its own. Whatever holds bytes *because of*
a peer (a partly received frame, messages waiting for ``recv()``, frames
waiting for the peer to read its socket) charges them to that peer's
:class:`PeerBudget` and releases them when they are gone. Two bounds apply:

* per peer, ``limit``: one peer can never hold more, however many
  connections' worth of memory the node has free;
* per node, the :class:`BytePool`'s ``capacity``: all peers together. Each
  peer's first ``reserve`` bytes are its own and do not draw from the pool,
  so small messages keep flowing from everybody while a few peers hold the
  pool with large frames; what a peer holds beyond its reserve does.

Nothing here blocks or drops: bytes that already arrived are *charged*
(possibly past a bound, by at most what one read brought) and the holder
asks :attr:`PeerBudget.over` whether to stop taking more (pause reading, so
TCP pushes back on the sender). :meth:`PeerBudget.headroom` says how much a
holder may take before that, so a reader can size its next read to fit.
When bytes come back to a pool that was over capacity, every budget that
waited for it is told (:meth:`PeerBudget.wait`), oldest first.

Every connection of the node's libp2p host draws from these: on murmur's
fast path, unread messages and large records are *charged*; on the standard
path, yamux's receive windows are acquired ahead (a window update is
:meth:`PeerBudget.try_acquire`, consumed data :meth:`PeerBudget.release`).
"""

from __future__ import annotations

from collections.abc import Callable

FRAME_SLACK = 64
"""Bytes a frame occupies beyond its payload, rounded up (4 of length, 1 of
type, 16 of tag): what :func:`least_peer_limit` adds per frame."""


def least_peer_limit(max_frame: int) -> int:
    """The smallest per-peer limit with which every frame completes: one
    large frame's buffer, plus up to half the limit of messages waiting for
    ``recv()`` (reading resumes below half), must fit. Here, not in the
    transport, so that config validation needs no crypto imports."""
    return 2 * (max_frame + FRAME_SLACK)


class BytePool:
    """All bytes the node holds for peers beyond their reserves, at most ``capacity``.

    ``used`` may exceed ``capacity`` by what already arrived (see the module
    docstring); :attr:`over` is what holders check.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("a byte pool needs a positive capacity")
        self.capacity = capacity
        self.used = 0
        self._waiters: dict[PeerBudget, Callable[[], None]] = {}  # insertion order: oldest first

    @property
    def available(self) -> int:
        return max(0, self.capacity - self.used)

    @property
    def over(self) -> bool:
        return self.used >= self.capacity

    @property
    def waiting(self) -> int:
        """How many budgets wait for bytes to come back."""
        return len(self._waiters)

    def budget(self, limit: int, reserve: int = 0) -> PeerBudget:
        """A new peer's budget: at most ``limit`` bytes, the first ``reserve`` of them its own."""
        return PeerBudget(self, limit, reserve)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes

    def _give(self, nbytes: int) -> None:
        self.used -= nbytes
        if self._waiters and not self.over:
            waiters, self._waiters = self._waiters, {}
            for callback in waiters.values():
                callback()


class PeerBudget:
    """One peer's bytes: ``used`` of at most ``limit``; what exceeds ``reserve`` is the pool's."""

    def __init__(self, pool: BytePool, limit: int, reserve: int = 0) -> None:
        if limit <= 0 or not 0 <= reserve <= limit:
            raise ValueError("a peer budget needs 0 <= reserve <= limit and a positive limit")
        self.pool = pool
        self.limit = limit
        self.reserve = reserve
        self.used = 0
        self.peak = 0  # the most this peer ever held (for tests and status)
        self.closed = False

    @property
    def pooled(self) -> int:
        """The part of ``used`` drawn from the pool."""
        return max(0, self.used - self.reserve)

    @property
    def over(self) -> bool:
        """Take nothing more: the peer's limit is reached, or its reserve is
        spent and the pool is out of bytes."""
        return self.used >= self.limit or (self.used >= self.reserve and self.pool.over)

    def headroom(self) -> int:
        """Bytes this peer may still take before :attr:`over` turns true."""
        own = max(0, self.reserve - self.used)
        return max(0, min(self.limit - self.used, own + self.pool.available))

    def charge(self, nbytes: int) -> bool:
        """Count ``nbytes`` that are already held (they arrived; nothing is
        refused). Returns ``not over`` afterwards: whether to keep taking."""
        if nbytes < 0:
            raise ValueError("charge a non-negative number of bytes")
        if self.closed:
            return False
        before = self.pooled
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self.pool._take(self.pooled - before)
        return not self.over

    def try_acquire(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` ahead (a receive window) only if they fit in the headroom."""
        if nbytes > self.headroom() or self.closed:
            return False
        self.charge(nbytes)
        return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` charged earlier (nothing once closed: all went back then)."""
        if self.closed:
            return
        if nbytes < 0 or nbytes > self.used:
            raise ValueError(f"release of {nbytes} bytes from a budget holding {self.used}")
        before = self.pooled
        self.used -= nbytes
        self.pool._give(before - self.pooled)

    def wait(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when bytes come back to the pool while it
        is over capacity (the peer's own releases it sees itself). One
        callback per budget; a second call replaces the first."""
        if not self.closed:
            self.pool._waiters[self] = callback

    def close(self) -> None:
        """The peer is gone: give everything back, stop waiting."""
        if self.closed:
            return
        self.pool._waiters.pop(self, None)
        self.release(self.used)
        self.closed = True

    def __repr__(self) -> str:
        return f"<PeerBudget {self.used}/{self.limit} reserve {self.reserve}>"
