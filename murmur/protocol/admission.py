"""Which inbound connection gives way when a new one needs its slot or its memory.

Sans-IO: the transport describes its inbound connections as :class:`Slot`
facts and asks :func:`choose_victim`; this module never sees a socket.

A full node that simply refuses newcomers can be squatted: an attacker with
a few /24s (or cheap IPv6 /48s) opens ``max_inbound`` connections, half-open
or authenticated and pinging, and nobody else ever gets in. Instead, as
Bitcoin's inbound eviction and libp2p's connection manager do, a newcomer
takes the slot of the connection worth least, chosen in this order:

1. never a *useful* one: the node said (recently, within ``useful_ttl_s``)
   that the peer delivered something of value (``Libp2pConnection.mark_useful``).
   Pings, ``Hello`` and ``Link`` are free to send and never make a
   connection useful. Outbound connections are not inbound slots at all.
2. from the subnet (/24, /48) holding the most evictable connections: an
   attacker spread over fewer subnets than it has connections always loses
   its own connections first, and an honest newcomer alone in its subnet is
   chosen only once every subnet is down to one connection;
3. within that subnet, a half-open connection (no identity proved yet)
   before an authenticated one, and an authenticated one that was useful
   once (now stale) last;
4. then the oldest: it had the longest time to prove itself (for a
   handshake, the one closest to its timeout anyway).

The same order picks the connection to shed when the node's byte pool is
exhausted (``murmur.protocol.budget``): then only connections that hold
pool bytes are candidates.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


class SlotState(enum.IntEnum):
    """How much a connection has shown; lower gives way first."""

    HALF_OPEN = 0  # TCP accepted, handshake not finished
    UNPROVEN = 1  # authenticated, never useful
    STALE = 2  # useful once, not within useful_ttl_s


@dataclass(frozen=True, slots=True)
class Slot:
    """What the policy needs to know about one inbound connection."""

    key: int  # the transport's connection number
    subnet: Hashable
    opened_at: float  # monotonic seconds
    authenticated: bool
    useful_at: float | None = None  # last mark_useful, monotonic seconds

    def protected(self, now: float, useful_ttl_s: float) -> bool:
        return self.useful_at is not None and now - self.useful_at <= useful_ttl_s

    def state(self) -> SlotState:
        if not self.authenticated:
            return SlotState.HALF_OPEN
        return SlotState.UNPROVEN if self.useful_at is None else SlotState.STALE


def choose_victim(slots: Iterable[Slot], now: float, useful_ttl_s: float) -> Slot | None:
    """The connection to close for a newcomer, or ``None`` when every one is
    protected (then the newcomer is refused). See the module docstring."""
    candidates = [s for s in slots if not s.protected(now, useful_ttl_s)]
    if not candidates:
        return None
    per_subnet = Counter(s.subnet for s in candidates)

    def worth(slot: Slot) -> tuple[int, int, float]:
        since = slot.useful_at if slot.state() is SlotState.STALE and slot.useful_at is not None else slot.opened_at
        return (-per_subnet[slot.subnet], slot.state(), since)

    return min(candidates, key=worth)
