"""A budget of requests a peer may make of us (public models served, gossip forwarded).

The class lives with the transport's budgets
(:class:`murmur.protocol.budget.RequestBudget`), whose muxers limit stream
opens with it too; the node's request limits import it from here.
"""

from __future__ import annotations

from murmur.protocol.budget import RequestBudget

__all__ = ["RequestBudget"]
