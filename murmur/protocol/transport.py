"""The bounds of every connection, and the process-wide pieces the network stack shares.

The connections themselves are :mod:`murmur.protocol.libp2p`: TCP upgraded
with multistream-select to murmur's fast path (``/murmur/noise-fast/2.0.0`` +
``/murmur/mux/2.0.0``) or the standard libp2p path (``/noise`` +
``/yamux/1.0.0``), one stream per protocol. What this module names once,
and the host enforces on both paths, is everything a stranger can make a node
spend:

* connect / upgrade / idle timeouts (a slowloris peer is cut by the first
  that applies; idle means "no complete record", so dribbling bytes does not
  count as activity);
* inbound slots overall and per /24 (IPv4) or /48 (IPv6), counted from TCP
  accept, i.e. half-open upgrades count too. A full node does not refuse a
  newcomer: it evicts the inbound connection worth least
  (:mod:`murmur.protocol.admission`: never one the node marked useful, from
  the most crowded subnet, half-open before authenticated, oldest first), so
  an attacker cannot squat the slots;
* receive memory, per peer and per node (:mod:`murmur.protocol.budget`):
  messages waiting to be read, yamux windows and large-record buffers are
  charged to the peer's budget, which draws from the host's pool; over
  either bound, reading pauses (TCP pushes back) and nothing is dropped;
  when the pool runs dry, the inbound connection worth least that holds pool
  bytes is evicted;
* per-peer receive rate (:class:`TokenBucket`), pausing reading the same way;
* send memory: a sender waits while the socket's write buffer holds more
  than one record (:func:`send_high_water`), and may pass a deadline; pongs
  are written only while that buffer is nearly empty, so a peer that pings
  and never reads cannot grow it; and a peer that leaves what we sent
  unread for ``drain_timeout_s`` is cut (:class:`~murmur.errors.WriteStalled`);
* streams and negotiation: ``max_streams`` per connection (a flood of them is
  refused, then dropped), ``max_negotiation_attempts`` proposals per
  multistream-select channel (an endless ``na`` loop ends), each negotiation
  within ``negotiate_timeout_s``;
* the log: warnings a stranger can cause (failed upgrades, refused and
  evicted connections) are rate-limited per subnet and in all, and the rest
  summarised once per interval (:mod:`murmur.ratelog`).
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from murmur.errors import ConnectionClosed
from murmur.protocol.budget import least_peer_limit
from murmur.protocol.framing import FRAME_LENGTH, FRAME_OVERHEAD
from murmur.protocol.noise import NoiseCipher, default_ciphers
from murmur.protocol.yamux import OPEN_BURST, OPEN_REFILL_S, YamuxLimits

__all__ = ["ConnectionClosed", "TokenBucket", "TransportLimits", "send_high_water", "tune_allocator"]

RATE_BURST_S = 0.1  # token-bucket depth, in seconds of the allowed rate


@dataclass(frozen=True)
class TransportLimits:
    """Every transport bound, named once; all overridable from config."""

    max_frame: int = 4 * 1024 * 1024  # plaintext bytes per message (one fast-path record)
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 5.0  # TCP accept to a muxed connection: both negotiations and the handshake
    idle_timeout_s: float = 60.0  # no record at all (pings count) -> close
    ping_interval_s: float = 15.0
    drain_timeout_s: float = 20.0  # nothing we sent was read for this long -> WriteStalled, close
    max_inbound: int = 256  # inbound slots; a newcomer evicts the one worth least (admission.py)
    max_inbound_per_subnet: int = 16  # /24 IPv4, /48 IPv6
    useful_ttl_s: float = 600.0  # how long Libp2pConnection.mark_useful protects an inbound slot
    max_peer_rate_bytes_s: float = 512 * 1024 * 1024
    max_peer_buffered_bytes: int = 64 * 1024 * 1024  # receive memory per peer (budget.py)
    peer_reserve_bytes: int = 256 * 1024  # of which its own, not drawn from the node's pool
    max_buffered_bytes: int = 256 * 1024 * 1024  # the node's pool: all peers beyond their reserves
    warning_interval_s: float = 10.0  # warnings strangers cause (handshakes, refusals, evictions):
    warnings_per_interval: int = 10  # this many per interval pass, in all,
    warnings_per_subnet: int = 3  # and this many per /24 or /48; one summary line counts the rest
    # Noise ciphers, most preferred first: offered in this order when dialling,
    # the set allowed when accepting. AESGCM leads where AES is in hardware.
    ciphers: tuple[NoiseCipher, ...] = field(default_factory=default_ciphers)
    # murmur's fast path (/murmur/noise-fast/2.0.0 + /murmur/mux/2.0.0), offered first when
    # dialling and accepted when listening; off, the node speaks only /noise + /yamux/1.0.0.
    fast_path: bool = True
    negotiate_timeout_s: float = 10.0  # one stream's multistream-select
    identify_timeout_s: float = 10.0
    max_negotiation_attempts: int = 16  # proposals one multistream-select channel may make
    max_streams: int = 256  # live streams per connection, both directions
    max_refused_streams: int = 256  # streams refused in a row before the peer is dropped (a flood)
    max_open_burst: int = OPEN_BURST  # streams a peer may open at once on one connection,
    open_refill_s: float = OPEN_REFILL_S  # and one more every this many seconds (yamux.OPEN_BURST)

    def __post_init__(self) -> None:
        if not self.ciphers or len(set(self.ciphers)) != len(self.ciphers):
            raise ValueError("ciphers must name at least one cipher, each once")
        if min(self.max_frame, self.max_peer_buffered_bytes, self.max_peer_rate_bytes_s, self.max_buffered_bytes,
               self.drain_timeout_s, self.warning_interval_s) <= 0:
            raise ValueError("transport sizes, rates and timeouts must be positive")
        if min(self.peer_reserve_bytes, self.useful_ttl_s, self.warnings_per_interval, self.warnings_per_subnet) < 0:
            raise ValueError("peer_reserve_bytes, useful_ttl_s and the warning counts must be >= 0")
        if self.ping_interval_s >= self.idle_timeout_s:
            raise ValueError("ping_interval_s must be shorter than idle_timeout_s, or live peers time out")
        if self.max_peer_buffered_bytes < least_peer_limit(self.max_frame):
            raise ValueError(f"max_peer_buffered_bytes must be >= {least_peer_limit(self.max_frame)} "
                             "(two largest frames), or a large frame could wait forever")
        if self.peer_reserve_bytes > self.max_peer_buffered_bytes:
            raise ValueError("peer_reserve_bytes must be <= max_peer_buffered_bytes")
        if min(self.negotiate_timeout_s, self.identify_timeout_s, self.max_negotiation_attempts, self.max_streams,
               self.max_refused_streams, self.max_open_burst, self.open_refill_s) <= 0:
            raise ValueError("negotiation, identify and stream bounds must be positive")

    def yamux(self) -> YamuxLimits:
        """The muxers' stream bounds (yamux's windows keep their defaults)."""
        return YamuxLimits(max_streams=self.max_streams, max_ack_backlog=min(self.max_streams, 256),
                           max_refused_streams=self.max_refused_streams, max_open_burst=self.max_open_burst,
                           open_refill_s=self.open_refill_s)


def send_high_water(limits: TransportLimits) -> int:
    """Write-buffer level above which a sender waits: one largest record.

    Not ``max_peer_buffered_bytes`` itself. uvloop only flushes its user-space
    buffer when the loop runs, and ``send()`` does not yield while the buffer
    is under the mark, so a sender looping over a 50 MiB delta under a 64 MiB
    mark encoded and encrypted *every* frame before the first one left, and
    the receiver idled meanwhile: transfer time was sender time + receiver
    time instead of the larger of the two. Waiting once one frame is queued
    keeps the socket busy while the next frame is encoded (the kernel's send
    and receive buffers hold the rest), and bounds queued memory per
    connection by one frame instead of 64 MiB.
    """
    return min(limits.max_peer_buffered_bytes, FRAME_LENGTH.size + limits.max_frame + FRAME_OVERHEAD)


# glibc mallopt parameters (malloc.h) and the ceiling glibc's own heuristic
# raises the mmap threshold to (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep frame-sized buffers on a warm heap instead of mapping one per frame.

    Every DATA frame still makes a few fresh frame-sized objects that are not
    ours to pool: the ``bytes`` that ``recv()`` returns, the message codec's
    copy of a chunk on both sides. glibc's heuristic raises its mmap
    threshold as it sees such buffers freed, but keeps the trim threshold at
    twice that, so with a few 1 MiB objects alive per frame it returned the
    heap top to the kernel and re-faulted it every frame: a page fault per
    4 KiB (measured on the 2-core bench box: 10 MiB deltas at 2.4/3.0 ms per
    MiB of sender/receiver CPU, 1.8/2.2 with this). This fixes the mmap
    threshold at the ceiling that heuristic would reach (32 MiB) and the
    trim threshold at twice it, so the steady state is what glibc converges
    to minus the trim churn; larger buffers are still mapped and unmapped.

    Process-wide, so it is the entry point's call (daemon, bench), made once
    at start-up, not something the transport does behind its back. Returns
    whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(GLIBC_MMAP_THRESHOLD_MAX))
        and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * GLIBC_MMAP_THRESHOLD_MAX))
    )


class TokenBucket:
    """Byte budget refilled at ``rate`` up to ``burst``; may go into debt.

    Debt is how backpressure works here: the bytes already arrived (we never
    drop authenticated data), and reading pauses until the debt is repaid.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def consume(self, nbytes: int) -> float:
        """Take ``nbytes``; return seconds to wait before reading more (0 if none)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
