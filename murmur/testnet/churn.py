"""When churn events fire, and what a partition means per node (pure, no I/O).

Events fire in file order (the scenario checker validates them in that order:
a restart follows its crash), each once its trigger is met: ``at_round`` when
the round of the event's ``round_of`` reaches it, ``at_s`` when that many
seconds have passed since the nodes were started.

``round_of`` (:class:`~murmur.testnet.scenario.RoundOf`) says whose round
counts, among the live honest nodes that reported one: ``front`` (the
fastest), ``slowest``, one named node, or by default ``median``: the highest
round that more than half of them have reached (the lower median), which is
what "at round 8" means to someone watching a run. One node racing ahead (it
adopted a model, or trained alone) does not pull the schedule forward, and
one restarting or catching up does not hold it back.

A schedule that falls behind keeps its spacing. The controller sees rounds
through polls; on a loaded box (or through a Ray cluster's relays) its first
view of every node can come many rounds after the nodes started, and a
schedule of absolute rounds would then fire all its overdue events at once:
a partition from round 14 to 20 would hold for no round at all, and a node
joining at round 10 of 40 would arrive after the end. So an event seen more
than ``LATE_SLACK_ROUNDS`` late shifts every later round trigger by its
lateness (:attr:`ChurnSchedule.lag`), but never past the run's last round
but one: the nodes stop there by their own config, and an event due after
it would never fire. The same holds for rounds that pass while an event is
applied (:meth:`ChurnSchedule.took_effect`): a partition relayed to every
worker through a Ray cluster's relays can take seconds, and a heal due six
rounds after it must still find six rounds of partition, not none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from murmur.testnet.scenario import ChurnEvent, Reference, RoundOf


LATE_SLACK_ROUNDS = 2  # an event this late is on time: polls and long polls answer within a round or two


@dataclass
class ChurnSchedule:
    """``lag``: rounds by which the schedule runs behind its file (0 while
    every event fired on time); every round trigger still to come is that
    much later, up to ``last_round - 1`` (the run's last round; None: the
    run is bounded by time)."""

    events: Sequence[ChurnEvent]
    last_round: int | None = None
    _next: int = 0
    lag: int = 0

    def trigger(self, ev: ChurnEvent) -> int | None:
        """The round ``ev`` fires at, the lag included (None: it waits for a time)."""
        if ev.at_round is None:
            return None
        late = ev.at_round + self.lag
        return late if self.last_round is None else max(ev.at_round, min(late, self.last_round - 1))

    def due(self, rounds: Mapping[int, int], elapsed_s: float) -> list[ChurnEvent]:
        """Events whose trigger is met now, in order; each is returned once.

        ``rounds``: the round of every live honest node that reported one, by
        node index (empty while the run is not ready to count rounds)."""
        out = []
        while self._next < len(self.events):
            ev = self.events[self._next]
            due_at = self.trigger(ev)
            now = reference_round(ev.reference, rounds) if due_at is not None else None
            if due_at is not None and (now is None or now < due_at):
                break
            if ev.at_s is not None and elapsed_s < ev.at_s:
                break
            if now is not None and due_at is not None and now - due_at > LATE_SLACK_ROUNDS:
                self.lag += now - due_at
            out.append(ev)
            self._next += 1
        return out

    def took_effect(self, fired_at: int | None, now: int | None) -> None:
        """An event that fired when its reference was at round ``fired_at``
        took effect at round ``now`` (the same reference, read once every
        worker applied it; None: unknown). Rounds that passed meanwhile, past
        the slack, count as lateness like a schedule seen late: the next
        event keeps its spacing from when this one took effect."""
        if fired_at is not None and now is not None and now - fired_at > LATE_SLACK_ROUNDS:
            self.lag += now - fired_at

    @property
    def pending(self) -> int:
        return len(self.events) - self._next

    def upcoming(self) -> Sequence[ChurnEvent]:
        """Events not fired yet, in order."""
        return self.events[self._next:]


def reference_round(of: RoundOf, rounds: Mapping[int, int]) -> int | None:
    """The round ``of`` names, given each live honest node's (by index);
    None when nobody (or not the named node) reported one."""
    if of.reference is Reference.NODE:
        assert of.node is not None
        return rounds.get(of.node)
    if not rounds:
        return None
    ordered = sorted(rounds.values())
    if of.reference is Reference.FRONT:
        return ordered[-1]
    if of.reference is Reference.SLOWEST:
        return ordered[0]
    # the lower median: more than half of the nodes are at it or past it
    return ordered[(len(ordered) - 1) // 2]


def partition_groups(side: Iterable[int], total: int) -> list[list[int]]:
    """A partition event names one side; everybody else is the other."""
    inside = sorted(set(side))
    return [inside, [i for i in range(total) if i not in set(inside)]]
