"""Many nodes' rounds in one process, without a network.

The benches that sweep attacks and privacy budgets (bench/sybil.py,
bench/privacy.py) need hundreds of node-rounds per table cell; running real
daemons for each would measure the machine, not the algorithms. This driver
runs the very same :class:`~murmur.learning.rounds.RoundEngine`, aggregators
and privacy stage as the daemon, and delivers deltas in memory along a fixed
graph. The integration tests check the daemon separately on real sockets.

With compression (:class:`SimCompression`) every node's engine compresses as
a daemon's does, and the bytes its round messages would take on a
connection are counted exactly: the payload size is a pure function of the
format, and the messages around it (DeltaStart, chunk envelopes, DeltaEnd)
are encoded once per run as the node would (:func:`transfer_bytes`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from murmur.learning.adversary import AttackPlan, Sleeper, SybilShaper, Tactic, compressed_wire
from murmur.learning.aggregators.base import get_aggregator
from murmur.learning.aggregators.sybilwall import HistoryRecordData, RecordVerdict, SybilWallAggregator
from murmur.learning.compression import Compressor
from murmur.learning.outer import OuterConfig, OuterOptimizer
from murmur.learning.rounds import Message, Perturber, RoundConfig, RoundEngine, TrainFrom
from murmur.learning.sketch import model_sketch
from murmur.learning.topology import Graph, random_regularish
from murmur.learning.trainers.base import TrainerContext
from murmur.learning.trainers.registry import load_trainer
from murmur.protocol.codecs import DeltaCodec, Rounding
from murmur.protocol.delta import transfer_bytes
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import RoundFormat

log = logging.getLogger(__name__)

ATTACKER_AGGREGATOR = "mean"
"""The attacker keeps its model near the honest ones by averaging what its
Sybils receive; otherwise its poisoned delta would be trivially far off."""


@dataclass(frozen=True)
class SybilAttack:
    """One attacker running ``sybils`` identities; ``plan`` says what each
    identity sends (default: all send its one model, as in the SybilWall paper's
    evaluation, Werthenbach & Pouwelse 2023)."""

    kind: str  # "label_flip" | "backdoor"
    sybils: int
    edges_per_sybil: int = 2
    plan: AttackPlan = AttackPlan()


@dataclass(frozen=True)
class SimCompression:
    """How every node compresses its round messages (as ``[compression]`` and
    ``learning.codec`` configure a daemon)."""

    format: RoundFormat = RoundFormat()
    codec: DeltaCodec = DeltaCodec.FP32
    rounding: Rounding = Rounding.NEAREST


@dataclass(frozen=True)
class SimConfig:
    trainer: str = "digits-mlp"
    trainer_options: Mapping[str, Any] = field(default_factory=dict)
    nodes: int = 8
    degree: int = 3
    graph: Graph | None = None  # overrides degree
    partition: str = "dirichlet"
    alpha: float = 0.5
    aggregator: str = "mean"
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 30
    local_steps: int | None = None
    seed: int = 0
    eval_every: int = 5
    attack: SybilAttack | None = None
    device: str | None = "cpu"
    train_from: TrainFrom = TrainFrom.PRIVATE  # PUBLIC for example-level DP-SGD (see TrainFrom)
    mixing_rounds: int = 0  # after `rounds`, rounds that only mix public models (no training, no noise)
    compression: SimCompression | None = None  # None: exact fp32 messages, as a daemon without [compression]
    consensus_step: float = 1.0
    outer: OuterConfig | None = None
    eval_nodes: int | None = None  # evaluate only the first this many honest nodes (None: all)


@dataclass
class RoundRow:
    round: int
    mean_accuracy: float
    min_accuracy: float
    attack_rate: float | None
    sybil_weight: float | None  # mean weight an honest node gave a Sybil it heard from
    honest_weight: float  # mean weight an honest node gave an honest peer
    mean_metric: float = float("nan")  # the trainer's metric (accuracy or perplexity), mean over nodes
    bytes: int = 0  # round-message bytes all nodes sent up to this round (envelopes included)


@dataclass
class SimResult:
    config: SimConfig
    rows: list[RoundRow]
    metric: str = "accuracy"
    message_bytes: int = 0  # one round message on one connection, envelopes included
    round_bytes: list[int] = field(default_factory=list)  # every node's round messages, per round
    compute_s: list[float] = field(default_factory=list)  # per round: the slowest node's local steps + compression

    @property
    def final(self) -> RoundRow:
        return self.rows[-1]


PerturberFactory = Callable[[int, Sequence[str]], Perturber | None]


def node_name(i: int) -> str:
    return f"n{i}"


def sybil_name(i: int) -> str:
    return f"sybil{i}"


def run_simulation(
    cfg: SimConfig,
    perturber_factory: PerturberFactory | None = None,
    progress: Callable[[RoundRow], None] | None = None,
) -> SimResult:
    """Run ``cfg.rounds`` synchronous rounds, then ``cfg.mixing_rounds``
    mixing-only ones; evaluate every ``eval_every`` and after the last."""
    torch.manual_seed(cfg.seed)
    graph = cfg.graph if cfg.graph is not None else random_regularish(cfg.nodes, cfg.degree, cfg.seed)
    n = len(graph)
    trainer_cls = load_trainer(cfg.trainer)
    total_nodes = n + (1 if cfg.attack else 0)

    def ctx(i: int, attack: str | None = None) -> TrainerContext:
        return TrainerContext(
            node_index=i,
            num_nodes=total_nodes,
            seed=cfg.seed,
            partition=cfg.partition,
            alpha=cfg.alpha,
            device=cfg.device,
            options=dict(cfg.trainer_options),
            attack=attack,
        )

    names = [node_name(i) for i in range(n)]
    neighbours: list[dict[str, int]] = [{names[j]: len(graph[j]) for j in graph[i]} for i in range(n)]

    # Attack edges: each Sybil gets edges_per_sybil distinct honest neighbours.
    rng = random.Random(cfg.seed + 7919)
    sybil_links: dict[str, list[int]] = {}
    if cfg.attack:
        for s in range(cfg.attack.sybils):
            targets = rng.sample(range(n), min(cfg.attack.edges_per_sybil, n))
            sybil_links[sybil_name(s)] = targets
            for t in targets:
                neighbours[t][sybil_name(s)] = len(targets)

    round_cfg = RoundConfig(local_steps=cfg.local_steps, quorum=1.0, train_from=cfg.train_from,
                            consensus_step=cfg.consensus_step)
    engines = []
    for i in range(n):
        perturber = perturber_factory(i, list(neighbours[i])) if perturber_factory else None
        engines.append(
            RoundEngine(
                trainer_cls(ctx(i)),
                get_aggregator(cfg.aggregator, self_id=names[i], **dict(cfg.aggregator_options)),
                round_cfg,
                perturber=perturber,
                compressor=_compressor(cfg, names[i], i),
                outer=OuterOptimizer(cfg.outer) if cfg.outer is not None else None,
            )
        )

    layout = TransferLayout.for_model(engines[0].num_params, Message.ROWS,
                                      cfg.compression.format if cfg.compression else RoundFormat())
    attacker: _SimAttacker | None = None
    if cfg.attack and cfg.attack.sybils > 0:
        attack = cfg.attack
        attacker = _SimAttacker(
            attack, sybil_links, names, graph,
            lambda sleeping: trainer_cls(ctx(n, None if sleeping else attack.kind)), round_cfg, cfg.seed,
            _compressor(cfg, "attacker", n), layout,
            {sybil: c for s, sybil in enumerate(sybil_links) if (c := _compressor(cfg, sybil, n + 1 + s)) is not None},
        )

    record_rng = random.Random(cfg.seed + 104729)
    payloads: Payloads = [{} for _ in range(n)]
    rows: list[RoundRow] = []
    total = cfg.rounds + cfg.mixing_rounds
    codec = cfg.compression.codec if cfg.compression else DeltaCodec.FP32
    message_bytes = transfer_bytes(layout.payload_bytes(TransferKind.ROUND, codec), layout.shape(TransferKind.ROUND),
                                   layout.meta(TransferKind.ROUND, degree=cfg.degree), codec)
    connections = sum(len(graph[i]) for i in range(n)) + sum(len(t) for t in sybil_links.values())
    result = SimResult(cfg, rows, engines[0].trainer.metric.value, message_bytes)
    sent_bytes = 0
    for r in range(total):
        training = r < cfg.rounds
        sent = {}
        slowest = 0.0
        for i in range(n):
            started = time.perf_counter()
            sent[names[i]] = (engines[i].begin_round(neighbours[i]) if training
                              else engines[i].begin_mixing_round(neighbours[i]))
            slowest = max(slowest, time.perf_counter() - started)
        result.compute_s.append(slowest)
        if attacker is not None:
            attacker.play(r, sent, engines, payloads)
        for i in range(n):
            for j in graph[i]:
                engines[j].offer(names[i], r, sent[names[i]].increment)
        sent_bytes += connections * message_bytes
        result.round_bytes.append(connections * message_bytes)
        _gossip_history_records(engines, names, graph, record_rng, payloads)
        evaluate = (r + 1) % cfg.eval_every == 0 or r == total - 1
        judged = cfg.eval_nodes if cfg.eval_nodes is not None else n
        reports = [engine.finish_round(evaluate=evaluate and i < judged) for i, engine in enumerate(engines)]
        if attacker is not None:
            attacker.engine.finish_round()
        if evaluate:
            row = _row(r, engines[:judged], reports[:judged], cfg, set(sybil_links))
            row.bytes = sent_bytes
            rows.append(row)
            if progress:
                progress(row)
    return result


def _compressor(cfg: SimConfig, name: str, index: int) -> Compressor | None:
    if cfg.compression is None:
        return None
    c = cfg.compression
    return Compressor(c.format, c.codec, name.encode(), c.rounding, rng_seed=cfg.seed * 100_003 + index)


def _as_sent_by(attacker: RoundEngine, message: Message, round_: int, sybil: str, layout: TransferLayout):  # noqa: ANN202
    """What a receiver decodes of the attacker's message sent under ``sybil``'s
    identity: with per-sender masks, the values at that identity's mask."""
    compressor = attacker.compressor
    if compressor is None or not compressor.per_sender or message.compressed is None:
        return message.increment
    payload = compressor.payload_as(message.increment, round_, sybil.encode())
    array = layout.decode(TransferKind.ROUND, payload, message.compressed.codec, round_, sybil.encode())
    return torch.from_numpy(array[0].copy()).to(message.increment.device)


class _SimAttacker:
    """One attacker behind its Sybils: a round engine that trains on its
    poisoned data and averages what its Sybils receive (``mean``), and a
    :class:`~murmur.learning.adversary.SybilShaper` that turns its model into
    what each Sybil sends (see :mod:`murmur.learning.adversary`)."""

    def __init__(
        self, attack: SybilAttack, links: Mapping[str, list[int]], names: Sequence[str], graph: Graph,
        trainer: Callable[[bool], Any], config: RoundConfig, seed: int, compressor: Compressor | None,
        layout: TransferLayout, sybil_compressors: Mapping[str, Compressor],
    ) -> None:
        self.attack, self.plan, self.links, self.names, self.graph = attack, attack.plan, links, names, graph
        self.layout = layout
        # With compressed gossip each Sybil's message is in the network's
        # format too (its own mask where masks are per sender): a shaped
        # increment reaches the replicas only as its receivers decode it.
        self._sybil_compressors = sybil_compressors
        self.engine = RoundEngine(trainer(self.plan.sleeping(0)), get_aggregator(ATTACKER_AGGREGATOR), config,
                                  compressor=compressor)
        self.neighbours = {names[t]: len(graph[t]) for targets in links.values() for t in targets}
        self.shaper = SybilShaper(self.plan, list(links), seed)
        self.sleeper = Sleeper(self.plan, lambda: trainer(False))
        self._initial = self.engine.public.clone()

    def play(self, r: int, sent: Mapping[str, Any], engines: list[RoundEngine], payloads: Payloads) -> None:
        """The attacker's round ``r``: it hears its neighbours first (a rushing
        adversary), then every Sybil's message (or re-sync) and records go out."""
        self.sleeper.on_round(r, self.engine)  # a sleeper's attack starts: poisoned data from now on
        own = self.engine.begin_round(self.neighbours)
        for peer in self.neighbours:
            self.engine.offer(peer, r, sent[peer].increment)
        if self.plan.tactic is Tactic.IDENTICAL:
            for sybil, targets in self.links.items():
                increment = _as_sent_by(self.engine, own, r, sybil, self.layout)
                for t in targets:
                    engines[t].offer(sybil, r, increment)
            return
        honest = [replica[0] for peer in self.neighbours if (replica := self.engine.replica(peer)) is not None]
        wire = compressed_wire(self._sybil_compressors, r)
        increments = self.shaper.step(self.engine.public, honest, self._initial, wire)
        mimic = torch.stack([sent[p].increment for p in self.neighbours]).mean(dim=0)
        for sybil, targets in self.links.items():
            sent_mimic = wire(sybil, mimic)
            for t in targets:
                if self.plan.tactic is Tactic.UNSCORED:
                    # a clean-looking increment; the model comes by re-sync, as the receiver asks after a gap
                    try:
                        engines[t].set_replica(sybil, self.shaper.publics[sybil] - sent_mimic, r - 1)
                    except ValueError:
                        pass  # a model it cannot use (non-finite once plain averaging diverged): refused, as a daemon does
                    engines[t].offer(sybil, r, sent_mimic)
                else:
                    engines[t].offer(sybil, r, increments[sybil])
        if self.plan.tactic is Tactic.FORGED_RECORDS:
            self._forge(r, engines, payloads)

    def _forge(self, r: int, engines: list[RoundEngine], payloads: Payloads) -> None:
        """Each Sybil tells each honest neighbour of made-up identities whose
        public models copy those of that neighbour's honest neighbours (it
        signs as their observer, and as them: the keys are its own)."""
        for sybil, targets in self.links.items():
            for t in targets:
                honest = sorted(self.graph[t])
                for k in range(self.plan.forged_per_round):
                    h = honest[(r * self.plan.forged_per_round + k) % len(honest)]
                    twin = _RecordPayload(engines[h].public.clone(), r, sybil)
                    deliver_record(engines[t], payloads[t], sybil, f"{sybil}-twin-{self.names[h]}", twin, 1)


@dataclass
class _RecordPayload:
    """What a node holds to relay a record: the subject's public model (its
    signed statement, in the daemon) as of ``round``, and who observed it."""

    model: torch.Tensor
    round: int
    observer: str


Payloads = list[dict[str, _RecordPayload]]


def _gossip_history_records(
    engines: list[RoundEngine], names: list[str], graph: Graph, rng: random.Random, payloads: Payloads
) -> None:
    """SybilWall's history gossip between honest neighbours: each sends each
    neighbour one record, a public model it observes (its replica) or one it
    was told of (kept to relay, as the daemon keeps the signed statement)."""
    for i, engine in enumerate(engines):
        aggregator = engine.aggregator
        if not isinstance(aggregator, SybilWallAggregator):
            continue
        for j in graph[i]:
            choice = aggregator.records_to_send(names[j], rng)
            if choice is None:
                continue
            if choice.distance == 1:
                replica = engine.replica(choice.subject)
                if replica is None:
                    continue
                payload = _RecordPayload(replica[0], replica[1], names[i])
            elif choice.subject in payloads[i]:
                payload = payloads[i][choice.subject]
            else:
                continue
            deliver_record(engines[j], payloads[j], names[i], choice.subject, payload, choice.distance)


def deliver_record(
    receiver: RoundEngine, store: dict[str, _RecordPayload], sender: str, subject: str, payload: _RecordPayload,
    distance: int,
) -> RecordVerdict | None:
    """Hand ``receiver`` a record as its node would after checking signatures
    (the subject's model sketch, made relative to the sketch of the
    receiver's reference of that round: sketches are linear)."""
    aggregator = receiver.aggregator
    if not isinstance(aggregator, SybilWallAggregator):
        return None
    if payload.model.numel() != receiver.num_params:
        return None
    offset = receiver.relative_sketch(model_sketch(payload.model), payload.round)  # as a node does (learner)
    if offset is None:
        return None
    verdict = aggregator.receive_record(
        sender, HistoryRecordData(subject, payload.round, offset, payload.observer, distance))
    if verdict is RecordVerdict.KEPT:
        store[subject] = payload
    known = set(aggregator.known_peers())
    for gone in [p for p in store if p not in known]:
        del store[gone]
    return verdict


def _row(r: int, engines: list[RoundEngine], reports: list[Any], cfg: SimConfig, sybils: set[str]) -> RoundRow:
    accs = [rep.eval.accuracy for rep in reports]
    metric = engines[0].trainer.metric
    values = [metric.of(rep.eval) for rep in reports]
    attack_rate = None
    if cfg.attack:
        attack_rate = sum(e.trainer.attack_success_rate(cfg.attack.kind) for e in engines) / len(engines)
    sybil_w: list[float] = []
    honest_w: list[float] = []
    for rep in reports:
        for peer, w in rep.weights.items():
            if peer == "self":
                continue
            (sybil_w if peer in sybils else honest_w).append(w)
    return RoundRow(
        round=r,
        mean_accuracy=sum(accs) / len(accs),
        min_accuracy=min(accs),
        attack_rate=attack_rate,
        sybil_weight=(sum(sybil_w) / len(sybil_w)) if sybil_w else (0.0 if sybils else None),
        honest_weight=(sum(honest_w) / len(honest_w)) if honest_w else 0.0,
        mean_metric=sum(values) / len(values),
    )
