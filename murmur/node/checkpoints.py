"""A learning node's checkpoints: what it writes so that a restart (kill -9
included) resumes its rounds, and how it reads them back.

Two files in the state dir (:class:`~murmur.node.state.StateDir`, each
written atomically and checked on read): the model with the round engine's
state (public model, consensus, round, and where in use the compression
residuals and the outer optimizer's momentum), and the aggregator's
history. The snapshot is taken on the event loop between rounds, from
copies the sources promise; the writing runs in a thread, one at a time,
in snapshot order. A checkpoint of another model (the user changed their
trainer) is set aside, never written over.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from murmur.errors import StateError
from murmur.learning.aggregators.base import Aggregator
from murmur.learning.rounds import RoundEngine
from murmur.learning.trainers.base import Trainer
from murmur.node.config import LearningSection
from murmur.node.state import StateDir

log = logging.getLogger(__name__)

OPTIONAL_STATE = ("residual", "carry", "outer_momentum")
"""Engine state a checkpoint holds when the node uses it (compression, privacy
with random-k at user level, an outer optimizer), each one model-sized vector."""


@dataclass(frozen=True)
class _Snapshot:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    history: dict[str, np.ndarray]
    history_meta: dict[str, Any]


class LearnerCheckpoints:
    """Checkpoints of one learner's model, round state and aggregator history."""

    def __init__(self, state: StateDir, cfg: LearningSection, trainer: Trainer, engine: RoundEngine,
                 aggregator: Aggregator, clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._cfg = cfg
        self._trainer = trainer
        self._engine = engine
        self._aggregator = aggregator
        self._clock = clock
        self._last = (engine.round, clock())  # (round, when) of the last checkpoint
        self._write_lock = threading.Lock()  # see _write

    def due(self) -> bool:
        """Whether ``learning.checkpoint_every_rounds`` rounds or
        ``checkpoint_every_s`` seconds passed since the last checkpoint.
        Writing one every round cost a round on the 1M-parameter model
        0.15 -> 0.45 s; shutdown always writes one."""
        cfg = self._cfg
        last_round, last_time = self._last
        by_rounds = cfg.checkpoint_every_rounds > 0 and self._engine.round - last_round >= cfg.checkpoint_every_rounds
        by_time = cfg.checkpoint_every_s > 0 and self._clock() - last_time >= cfg.checkpoint_every_s
        return by_rounds or by_time

    async def save(self) -> None:
        """Persist model, replicas and aggregator history. The snapshot is
        taken here, on the loop, between rounds; the writing (two atomic
        files, each checked, written and fsynced) runs in a thread, so a slow
        disk does not stall the connections and rounds of the nodes sharing
        this event loop (in a busy 8-node testnet worker, checkpointing took
        28% of the loop thread's samples)."""
        snapshot = self._snapshot()
        self._last = (self._engine.round, self._clock())
        await asyncio.to_thread(self._write, snapshot)

    def _snapshot(self) -> _Snapshot:
        """Copies, not views, so the next round cannot change what is being
        written — made by the sources, whose contracts promise them
        (``Trainer.get_flat``, ``RoundEngine.state``, ``Aggregator.state_dict``):
        copying again here would copy the model twice more every round."""
        model = self._trainer.get_flat().detach().to("cpu").numpy()
        engine = self._engine.state()
        arrays = {
            "model": model,
            "public": engine["public"].detach().cpu().numpy(),
            "consensus": engine["consensus"].detach().cpu().numpy(),
        }
        for key in OPTIONAL_STATE:  # compression residuals, outer momentum: present when in use
            if key in engine:
                arrays[key] = engine[key].detach().cpu().numpy()
        meta = {
            "round": engine["round"],
            "last_sent_round": engine["last_sent_round"],
            "trainer": self._cfg.trainer,
            "num_params": int(model.size),
        }
        state = self._aggregator.state_dict()
        history = {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
        history_meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        return _Snapshot(arrays, meta, history, history_meta)

    def _write(self, snapshot: _Snapshot) -> None:
        # One writer at a time, in snapshot order: a round's write still in its
        # thread when the learner stops must finish before the final one.
        with self._write_lock:
            self._state.save_checkpoint(snapshot.arrays, snapshot.meta)
            if snapshot.history or snapshot.history_meta:
                self._state.save_history(snapshot.history, snapshot.history_meta)

    def restore(self) -> None:
        """Load the last checkpoint into the engine and the aggregator, if
        there is one of this model; a damaged or unreadable aggregator
        history is logged and left out (the aggregator starts without it)."""
        bundle = self._state.load_checkpoint()
        if bundle is None:
            return
        arrays = bundle.arrays
        n = self._engine.num_params
        if (
            bundle.meta.get("trainer") != self._cfg.trainer
            or any(arrays.get(k) is None or arrays[k].size != n for k in ("model", "public", "consensus"))
        ):
            self._set_aside(bundle.meta, arrays.get("model"), bundle.source)
            return

        def tensor(key: str) -> torch.Tensor:
            return torch.from_numpy(np.array(arrays[key], dtype=np.float32))

        state: dict[str, Any] = {
            "public": tensor("public"), "consensus": tensor("consensus"),
            "round": int(bundle.meta["round"]), "last_sent_round": int(bundle.meta["last_sent_round"]),
        }
        # A checkpoint written without compression or outer optimizer has none of these: they start at zero.
        state.update({key: tensor(key) for key in OPTIONAL_STATE if arrays.get(key) is not None and arrays[key].size == n})
        self._engine.restore(tensor("model"), state)
        self._last = (self._engine.round, self._clock())
        try:
            history = self._state.load_history()
        except StateError as exc:  # as an unreadable one below: the aggregator starts without it
            log.warning("aggregator history damaged; starting without it", extra={"error": str(exc)})
            history = None
        if history is not None:
            aggregator_state: dict[str, Any] = dict(history.meta)
            aggregator_state.update({k: torch.from_numpy(np.array(v)) for k, v in history.arrays.items()})
            try:
                self._aggregator.load_state_dict(aggregator_state)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("aggregator history unreadable; starting without it", extra={"error": str(exc)})
        log.info("restored checkpoint", extra={"event": "restored", "round": self._engine.round})

    def _set_aside(self, meta: Mapping[str, Any], model: np.ndarray | None, source: Any) -> None:
        """A checkpoint of another model (the user changed their trainer or
        an option that shapes its model): moved aside, not written over, and
        the node starts fresh saying what it found and where it put it."""
        size = model.size if model is not None else 0
        round_ = meta.get("round")
        label = f"{size}-params-round-{round_ if isinstance(round_, int) else 'unknown'}"
        aside = self._state.set_aside_checkpoint(label)
        log.warning(
            f"checkpoint {source} holds another model (trainer {meta.get('trainer')!r}, {size} parameters, round "
            f"{round_}) than this node runs ({self._cfg.trainer!r}, {self._engine.num_params} parameters): moved it "
            f"to {aside.name} and starting fresh (move it back, with the trainer it came from, to resume it)",
            extra={"event": "checkpoint_set_aside", "source": str(source), "aside": str(aside)},
        )
