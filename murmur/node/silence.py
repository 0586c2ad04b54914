"""Neighbours that send nothing usable stop costing us anything.

A learning neighbour is worth its place only if its round messages arrive.
One that stays silent (a stranger that linked and went quiet, a crashed
peer whose connection lingers, a node that finished) used to be waited for
every round and sent our signed delta every round: ten silent identities
took a victim from 69 to 0.33 rounds/s. :class:`SilenceTracker` mutes a
neighbour after ``mute_after`` rounds without a usable message: it is left
out of the quorum and of what we send, until it sends something usable. One
muted for ``evict_after_rounds`` rounds and ``evict_after_s`` seconds is
unlinked by the node (its slot freed for someone else). Sans-IO: the learner
feeds it each round's outcome and every well-formed message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

MUTE_AFTER_ROUNDS = 3
EVICT_AFTER_ROUNDS = 10
EVICT_AFTER_S = 30.0


@dataclass
class _Muted:
    since: float
    rounds: int = 0


@dataclass
class SilenceTracker:
    mute_after: int = MUTE_AFTER_ROUNDS
    evict_after_rounds: int = EVICT_AFTER_ROUNDS
    evict_after_s: float = EVICT_AFTER_S
    clock: Callable[[], float] = time.monotonic
    _silent: dict[Hashable, int] = field(default_factory=dict)  # consecutive rounds without a usable message
    _muted: dict[Hashable, _Muted] = field(default_factory=dict)

    def muted(self, peer: Hashable) -> bool:
        return peer in self._muted

    @property
    def muted_peers(self) -> list[Hashable]:
        return list(self._muted)

    def on_round(self, delivered: Iterable[Hashable], absent: Iterable[Hashable]) -> list[Hashable]:
        """A round closed: ``delivered`` sent a usable message for it,
        ``absent`` were its neighbours and did not. Returns who is muted now."""
        for peer in delivered:
            self._silent.pop(peer, None)
            self._muted.pop(peer, None)
        newly = []
        for peer in absent:
            count = self._silent[peer] = self._silent.get(peer, 0) + 1
            if count >= self.mute_after and peer not in self._muted:
                self._muted[peer] = _Muted(self.clock())
                newly.append(peer)
        for state in self._muted.values():
            state.rounds += 1
        return newly

    def on_usable(self, peer: Hashable) -> bool:
        """``peer`` sent a well-formed round message (for any round): it is
        alive and sending to us again. True if that unmuted it."""
        self._silent.pop(peer, None)
        return self._muted.pop(peer, None) is not None

    def to_evict(self) -> list[Hashable]:
        """Muted long enough, in rounds and in time, to give its slot up."""
        now = self.clock()
        return [peer for peer, state in self._muted.items()
                if state.rounds >= self.evict_after_rounds and now - state.since >= self.evict_after_s]

    def forget(self, peer: Hashable) -> None:
        self._silent.pop(peer, None)
        self._muted.pop(peer, None)
