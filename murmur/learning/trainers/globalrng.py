"""Torch's global RNG, used from many threads of one process.

Why. A module's initial weights come from torch's *global* generator
(``nn.Linear`` and friends take no generator), so a trainer builds its model
with that generator seeded by the network's seed: every node starts from the
same model, and a round-0 replica of a neighbour needs no transfer (see
:mod:`murmur.learning.rounds`). ``torch.random.fork_rng`` saves and restores
that generator but is not thread-safe, and a process may build several
trainers at once: a testnet worker starts its nodes together, each building
its trainer in a worker thread. Two builds then drew from one generator in
turn and got different models (14 of 20 trials with four threads), and a node
whose start differed from its neighbours' mixed replicas shifted by the
difference for the whole run: one default testnet node ended at 0.36 while
its neighbours reached 0.68, its model 7.1 away from every other (theirs
within 1.0 of each other).

Every use of the global generator in murmur takes this one lock. Code outside
murmur (a user's model drawing dropout masks in another node's training
thread) can still draw in between; a node whose start differs from a
neighbour's is then found by the initial model's digest its neighbours
compare (``LearnerInfo.initial``) and has its replica fetched, not assumed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.RLock()
"""Process-wide, as torch's global generator is; re-entrant, so that a
trainer whose build_model builds another model (or trainer) does not wait
on itself."""


@contextlib.contextmanager
def forked_global_rng(seed: int | None = None) -> Iterator[None]:
    """Hold the global generator alone, seeded with ``seed`` when given, and
    restore its state afterwards (the caller's draws are not disturbed)."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield
