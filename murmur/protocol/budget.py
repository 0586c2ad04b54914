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

import time
from collections.abc import Callable

from murmur.errors import MuxerError

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


class RequestBudget:
    """``burst`` requests at once, one more every ``refill_s`` seconds.

    Why not the transport's :class:`~murmur.protocol.transport.TokenBucket`:
    that bucket goes into debt by design (the bytes it meters have already
    arrived, and reading pauses until the debt is repaid), so a refused
    request would still be charged. Used as a request limit, a peer asking
    slightly faster than the refill rate then sinks deeper with every refusal
    and is refused forever: in the churn testnet a node that joined behind
    asked its neighbour for a model every 1.5 s (catch-up, plus replica
    re-syncs), was refused from then on, never caught up, and held its
    neighbours (quorum 1) to full-deadline rounds for the rest of the run.
    Here only what is granted is charged: over-asking is refused until the
    budget refills, then served again. (The node's request limits, public
    models served and gossip forwarded, and the muxers' stream opens,
    :class:`StreamOpens`, all use it.)
    """

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


FLOOD_REFUSAL_REFILL_S = 1.0
"""A peer refused for opening streams too fast is forgiven one such refusal
per second: an honest peer that overshoots now and then is refused a few
streams and stays, one that keeps opening as fast as it can is dropped."""


class StreamOpens:
    """The streams one connection's peer opens, as both muxers police them:
    their ids (the peer's parity, each above the last), their rate
    (``burst`` at once, one more every ``refill_s``; after ``max_refused``
    refusals for rate beyond what :data:`FLOOD_REFUSAL_REFILL_S` forgives,
    the peer floods), the live-stream bound and the refusals in a row
    (``max_refused`` of them with no stream accepted between: a stream
    flood). A muxer asks :meth:`open` first, adds refusals of its own
    (yamux: the accept backlog, the receive budget), then reports the
    outcome (:meth:`refused` or :meth:`accepted`).

    Why the rate: a stream the peer opens costs us a task, a multistream-select
    negotiation and its bookkeeping whether or not the peer ever uses it.
    The live-stream and refused-in-a-row bounds do not limit the
    *rate*: a peer that opened and reset streams as fast as it could
    (30,000 a second over loopback) held 25-65% of the victim's core with no
    fault on its score. Honest peers open a handful per connection (one per
    murmur protocol, identify, pings, a relay's circuits), far below this.
    Why in one place: the two muxers (yamux for libp2p peers, murmur's own
    on the fast path) must hold a peer to the same rules."""

    def __init__(self, client: bool, burst: int, refill_s: float, max_refused: int, max_live: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._parity = 0 if client else 1  # of the ids the peer opens: the dialler's are odd
        self.last_id = 0  # the peer's last stream id
        self._max_live = max_live
        self._max_refused = max_refused
        self._refused_in_a_row = 0
        self._opens = RequestBudget(burst, refill_s, clock)
        self._refusals = RequestBudget(max_refused, FLOOD_REFUSAL_REFILL_S, clock)

    def open(self, stream_id: int, live: int, going_away: bool) -> str | None:
        """The peer opens ``stream_id`` while ``live`` streams are: why it is
        refused (None: not for any shared reason). A
        :class:`~murmur.errors.MuxerError` for an id of the wrong parity or
        not above the last, and for a rate flood; a stream refused for rate
        is charged no open."""
        if stream_id % 2 != self._parity or stream_id <= self.last_id:
            raise MuxerError(f"peer opened stream {stream_id}: wrong parity or not increasing")
        self.last_id = stream_id
        if going_away:
            return "session is going away"
        if not self._opens.take():
            if not self._refusals.take():
                raise MuxerError("stream open flood: refused for rate more than it is forgiven")
            return "streams opened too fast"
        if live >= self._max_live:
            return f"stream limit {self._max_live} reached"
        return None

    def refused(self) -> None:
        """The open was refused: a :class:`~murmur.errors.MuxerError` once
        more than ``max_refused`` were in a row."""
        self._refused_in_a_row += 1
        if self._refused_in_a_row > self._max_refused:
            raise MuxerError(f"stream flood: {self._refused_in_a_row} streams refused in a row")

    def accepted(self) -> None:
        self._refused_in_a_row = 0

    def never_opened(self, stream_id: int, next_local_id: int) -> bool:
        """Whether a frame for ``stream_id`` (not live now) names a stream
        neither side ever opened: ours from ``next_local_id`` on, or the
        peer's above its last (a protocol error; one that was live is a late frame)."""
        if stream_id % 2 == next_local_id % 2:
            return stream_id >= next_local_id
        return stream_id > self.last_id
