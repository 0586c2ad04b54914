"""Addresses that keep getting their connections dropped wait before they may connect again.

Peers are banned by identity (peertable.py), and identities are free: a
peer dropped for garbage came back as a new identity from the same address,
and every return cost the node a TCP accept, multistream-select and a Noise
handshake. The soak bench's request attack did that 5,519 times in two
minutes from 64 addresses and took the honest rounds to 0.69x. An address
whose connections were dropped for faults ``offences`` times within
``window_s`` is refused at accept, before any crypto, for ``cool_s``.

Bounded: at most ``max_addrs`` addresses are remembered (oldest forgotten).
The machine's own loopback address is never cooled: it is local tools and
tests, never a remote party (other 127.x addresses are, in our testnets).
Sans-IO: the host asks :meth:`cooling` at accept, the node reports
:meth:`offence` when it drops an inbound connection for a fault.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

OFFENCES = 3
WINDOW_S = 30.0
COOL_S = 30.0
MAX_ADDRS = 4096
NEVER_COOLED = frozenset({"127.0.0.1", "::1"})


@dataclass
class Cooloff:
    offences: int = OFFENCES
    window_s: float = WINDOW_S
    cool_s: float = COOL_S
    max_addrs: int = MAX_ADDRS
    clock: Callable[[], float] = time.monotonic
    refused: int = 0  # connections refused while their address cooled off
    _seen: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _until: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def offence(self, addr: str) -> bool:
        """A connection from ``addr`` was dropped for a fault; True iff the address now cools off."""
        if addr in NEVER_COOLED:
            return False
        now = self.clock()
        seen = self._seen.pop(addr, None) or deque(maxlen=self.offences)
        seen.append(now)
        self._seen[addr] = seen
        _bound(self._seen, self.max_addrs)
        if len(seen) < self.offences or now - seen[0] > self.window_s:
            return False
        seen.clear()
        self._until.pop(addr, None)
        self._until[addr] = now + self.cool_s
        _bound(self._until, self.max_addrs)
        return True

    def recent(self, addr: str) -> int:
        """Offences of ``addr`` counted towards its next cool-off."""
        return len(self._seen.get(addr, ()))

    def cooling_until(self, addr: str) -> float | None:
        """When ``addr``'s cool-off ends (clock time), if one was started."""
        return self._until.get(addr)

    def cooling(self, addr: str) -> bool:
        """Whether a new connection from ``addr`` is to be refused now (counted in ``refused``)."""
        until = self._until.get(addr)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[addr]
            return False
        self.refused += 1
        return True


def _bound(table: OrderedDict[str, object], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)
