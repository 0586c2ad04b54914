"""When churn events fire, and what a partition means per node (pure, no I/O).

Events fire in file order (the scenario checker validates them in that order:
a restart follows its crash), each once its trigger is met: ``at_round`` when
the *network round* reaches it, ``at_s`` when that many seconds have passed
since the nodes were started. The network round is the highest round that a
live honest node reports in ``/status``: the front of training, which is what
"at round 10" means to someone watching the run; a node that lags behind
(restarting, catching up) does not hold the schedule back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from murmur.testnet.scenario import ChurnEvent


@dataclass
class ChurnSchedule:
    events: Sequence[ChurnEvent]
    _next: int = 0

    def due(self, network_round: int | None, elapsed_s: float) -> list[ChurnEvent]:
        """Events whose trigger is met now, in order; each is returned once."""
        out = []
        while self._next < len(self.events):
            ev = self.events[self._next]
            if ev.at_round is not None and (network_round is None or network_round < ev.at_round):
                break
            if ev.at_s is not None and elapsed_s < ev.at_s:
                break
            out.append(ev)
            self._next += 1
        return out

    @property
    def pending(self) -> int:
        return len(self.events) - self._next

    def upcoming(self) -> Sequence[ChurnEvent]:
        """Events not fired yet, in order."""
        return self.events[self._next:]


def partition_groups(side: Iterable[int], total: int) -> list[list[int]]:
    """A partition event names one side; everybody else is the other."""
    inside = sorted(set(side))
    return [inside, [i for i in range(total) if i not in set(inside)]]


def network_round(rounds: Mapping[str, int | None]) -> int | None:
    """The front of training: the highest round a live node reports."""
    known = [r for r in rounds.values() if r is not None]
    return max(known) if known else None
