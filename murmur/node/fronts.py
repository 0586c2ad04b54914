"""What an attacker's identities send when each sends a message of its own.

A :class:`~murmur.node.learner.NodeLearner` behind several identities (an
evaluation attacker, :mod:`murmur.testnet.sybil`) sends its one round message
under each of them unless it has a :class:`FrontShaping`: then each identity
sends the message the shaping made for it, states (signs) the public model
that message makes, serves that public model to a neighbour that asks for it
(a re-sync), and sends the history records the shaping makes for it, so that every neighbour's replica of each identity stays
exactly what the identity tracks. Only the daemon wiring lives here; what the
identities send is the attacker's business (:mod:`murmur.learning.adversary`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from murmur.learning.rounds import Message, RoundEngine
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.messages import HistoryRecord


@dataclass(frozen=True)
class FrontMessage:
    """One identity's round message and the public model it makes (as that
    identity's neighbours' replicas hold it after adding the message), or
    no message: the identity skips the round (its neighbours' replicas then
    see a gap at its next message and ask it for its public model)."""

    message: Message | None
    public: torch.Tensor


class FrontShaping(Protocol):
    def shape(self, round_: int, engine: RoundEngine, neighbours: Sequence[str]) -> Mapping[PeerId, FrontMessage]:
        """Each identity's message for ``round_``, after ``engine`` (the
        attacker's own) opened the round; ``neighbours`` are the round's
        neighbours' keys (their replicas in ``engine`` are what it heard)."""
        ...

    def public_state(self, front: PeerId) -> tuple[torch.Tensor, int] | None:
        """``front``'s public model and the round of the message it reflects
        (what a re-sync installs), or None when it sends the learner's own."""
        ...

    def records(self, front: Identity, peer: PeerId, engine: RoundEngine) -> Sequence[HistoryRecord]:
        """History records ``front`` tells ``peer`` this round besides the
        learner's own (sent through the node's record path, after the round
        message, as every record is)."""
        ...
