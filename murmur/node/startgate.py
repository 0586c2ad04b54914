"""A gate that holds learners' first round until every one of them is ready.

A testnet's first nodes come up over a second or two (one worker process
builds four learners while another builds three), and a node begins its
rounds once its neighbours are linked. The first group up linked among
themselves and ran 20 and more rounds (of ~70 ms) before the last group had
begun; in one default-scenario run of eight the two groups stayed apart to
the end (accuracy 0.38-0.44, against 0.70 where they began together), and
in most runs with privacy the first and the last node closed round 0 0.9-1.9
s apart. Opening the gate only when every learner held by it has linked to
its neighbours (or waited ``learning.start_wait_s`` for them) removes the
start-up order from the run.

A daemon started by hand has no gate: its rounds begin as before.
"""

from __future__ import annotations

import asyncio


class StartGate:
    """``expected`` learners each call :meth:`arrive` once ready, then wait
    for :meth:`open`; whoever holds the gate waits for :attr:`all_arrived`
    (of this gate; several gates may be opened together) before opening it."""

    def __init__(self, expected: int) -> None:
        if expected < 0:
            raise ValueError("a start gate expects at least 0 learners")
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.opened = asyncio.Event()
        if expected == 0:
            self.all_arrived.set()

    def arrive(self) -> None:
        """One learner is ready to begin its rounds (it calls this once)."""
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()

    def open(self) -> None:
        """The learners' rounds begin."""
        self.opened.set()

    async def passed(self) -> None:
        """Arrive, and wait until the gate is open."""
        self.arrive()
        await self.opened.wait()
