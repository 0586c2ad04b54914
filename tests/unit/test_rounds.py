"""Known-answer tests of the D-SGD round engine and the gossip-learning merge.

The trainer is a real (tiny) one: least squares on a fixed per-node data set,
full-batch gradient descent through torch autograd and ``torch.optim.SGD`` -
deterministic, so every expected model can be computed independently, in
float64 numpy, from the D-SGD formulas (Lian et al., NeurIPS 2017):

    x_i^{t+1/2} = x_i^t - lr * E steps of grad,   x_i^{t+1} = sum_j W_ij x_j^{t+1/2}

with Metropolis-Hastings W_ij = 1 / (max(deg_i, deg_j) + 1), W_ii = 1 - sum.
A node that did not hear from j in a round leaves W_ij on its own weight.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pytest
import torch

from murmur.learning.aggregators import PeerUpdate, get_aggregator
from murmur.learning.aggregators.base import AggregationResult, Aggregator, Combine
from murmur.learning.aggregators.mean import MeanAggregator
from murmur.learning.aggregators.median import MedianAggregator
from murmur.learning.sketch import model_sketch
from murmur.learning.rounds import MAX_FUTURE_ROUNDS, GossipModel, Message, Offer, RoundConfig, RoundEngine, TrainFrom
from murmur.learning.trainers.base import TrainerContext, TrainStats
from tests.trainers import LeastSquaresTrainer

DIM = 5
SAMPLES = 12
LR = 0.1
STEPS = 3
SEED = 42
ATOL = 1e-5

# 0 - 1 - 2, 1 - 3, 2 - 3: degrees 1, 3, 2, 2 (MH weights differ per edge).
GRAPH: dict[int, list[int]] = {0: [1], 1: [0, 2, 3], 2: [1, 3], 3: [1, 2]}


# ------------------------------------------------------------------ the trainer


class LinearTrainer(LeastSquaresTrainer):
    name = "linear-test"
    dim, samples, lr, steps, data_seed = DIM, SAMPLES, LR, STEPS, 1000


_node_data = LinearTrainer.node_data
_initial_model = LinearTrainer.initial_model


def _ctx(index: int, seed: int = SEED) -> TrainerContext:
    return TrainerContext(node_index=index, num_nodes=len(GRAPH), seed=seed, device="cpu")


# ------------------------------------------------------------------ the reference


def _half_step(index: int, w: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """E gradient steps in float64: w - lr * X^T (X w - y) / m, repeated."""
    x, y = _node_data(index)
    for _ in range(steps):
        w = w - LR * x.T @ (x @ w - y) / SAMPLES
    return w


def _mh_matrix(graph: Mapping[int, Sequence[int]], heard: Mapping[int, Iterable[int]] | None = None) -> np.ndarray:
    """W with W_ij = 1/(max(deg_i, deg_j)+1) for the j that i heard from; rest on W_ii."""
    n = len(graph)
    w = np.zeros((n, n))
    for i in range(n):
        senders = graph[i] if heard is None else heard[i]
        for j in senders:
            w[i, j] = 1.0 / (max(len(graph[i]), len(graph[j])) + 1)
        w[i, i] = 1.0 - w[i].sum()
    return w


def _reference(rounds: int, heard: Sequence[Mapping[int, Iterable[int]] | None] | None = None) -> np.ndarray:
    """Rows: every node's model after ``rounds`` rounds of D-SGD (privacy off)."""
    n = len(GRAPH)
    x = np.tile(_initial_model(SEED), (n, 1))
    for r in range(rounds):
        half = np.stack([_half_step(i, x[i]) for i in range(n)])
        x = _mh_matrix(GRAPH, None if heard is None else heard[r]) @ half
    return x


# ------------------------------------------------------------------ drivers


def _name(i: int) -> str:
    return f"n{i}"


def _neighbours(i: int) -> dict[str, int]:
    return {_name(j): len(GRAPH[j]) for j in GRAPH[i]}


def _engines(aggregator: str = "mean", config: RoundConfig | None = None) -> list[RoundEngine]:
    cfg = config or RoundConfig(local_steps=STEPS)
    return [RoundEngine(LinearTrainer(_ctx(i)), get_aggregator(aggregator), cfg) for i in GRAPH]


def _open_all(engines: Sequence[RoundEngine]) -> list[Message]:
    return [engine.begin_round(_neighbours(i)) for i, engine in enumerate(engines)]


def _deliver(engines: Sequence[RoundEngine], messages: Sequence[Message], round_: int,
             skip: set[tuple[int, int]] = frozenset()) -> None:  # type: ignore[assignment]
    """Every sender's message to every neighbour except (sender, receiver) in ``skip``."""
    for i in GRAPH:
        for j in GRAPH[i]:
            if (i, j) not in skip:
                outcome = engines[j].offer(_name(i), round_, messages[i].increment)
                assert outcome is Offer.ACCEPTED, (i, j, outcome)


def _sync_round(engines: Sequence[RoundEngine], skip: set[tuple[int, int]] = frozenset()) -> None:  # type: ignore[assignment]
    round_ = engines[0].round
    messages = _open_all(engines)
    _deliver(engines, messages, round_, skip)
    for engine in engines:
        engine.finish_round()


def _models(engines: Sequence[RoundEngine]) -> np.ndarray:
    return np.stack([engine.trainer.get_flat().double().numpy() for engine in engines])


def _message(engine: RoundEngine, index: int) -> tuple[Message, int]:
    """Open the engine's round alone and return its message (no neighbours needed)."""
    round_ = engine.round
    return engine.begin_round(_neighbours(index)), round_


# ------------------------------------------------------------------ known answers


def test_reference_trainer_matches_closed_form_gradient_descent() -> None:
    trainer = LinearTrainer(_ctx(2))
    trainer.train(STEPS)
    np.testing.assert_allclose(trainer.get_flat().numpy(), _half_step(2, _initial_model(SEED)), atol=ATOL)


def test_one_round_is_dsgd_with_metropolis_hastings() -> None:
    engines = _engines()
    reports = []
    messages = _open_all(engines)
    _deliver(engines, messages, 0)
    reports = [engine.finish_round() for engine in engines]
    np.testing.assert_allclose(_models(engines), _reference(1), atol=ATOL)
    # Node 1 (degree 3) weights its degree-1 and degree-2 neighbours 1/4 each.
    assert reports[1].weights == pytest.approx({"self": 0.25, "n0": 0.25, "n2": 0.25, "n3": 0.25})
    assert reports[0].weights == pytest.approx({"self": 0.75, "n1": 0.25})
    assert all(engine.round == 1 for engine in engines)


def test_several_rounds_stay_exact_dsgd() -> None:
    """Rounds after the first go through the consensus term and the replicas."""
    engines = _engines()
    for _ in range(4):
        _sync_round(engines)
    np.testing.assert_allclose(_models(engines), _reference(4), atol=ATOL)


def test_the_network_average_moves_only_by_the_average_step() -> None:
    """W is doubly stochastic: mixing preserves the mean of the half-step models."""
    engines = _engines()
    before = _models(engines)
    _sync_round(engines)
    half = np.stack([_half_step(i, before[i]) for i in GRAPH])
    np.testing.assert_allclose(_models(engines).mean(axis=0), half.mean(axis=0), atol=ATOL)


# ------------------------------------------------------------------ timing of messages


def test_late_message_is_dropped_and_changes_nothing() -> None:
    engines = _engines()
    messages = _open_all(engines)
    _deliver(engines, messages, 0, skip={(1, 0)})  # node 0 closes round 0 without node 1
    for engine in engines:
        engine.finish_round()
    before = engines[0].trainer.get_flat()
    assert engines[0].offer("n1", 0, messages[1].increment) is Offer.LATE
    assert torch.equal(engines[0].trainer.get_flat(), before)
    assert engines[0].late_dropped == 1
    # Round 0 for node 0: its own half-step only. The late message still
    # advanced the replica, so round 1 uses node 1's true public model.
    _sync_round(engines)
    heard0 = {i: GRAPH[i] for i in GRAPH} | {0: []}
    np.testing.assert_allclose(_models(engines), _reference(2, [heard0, None]), atol=ATOL)


def test_late_message_counts_in_the_next_report() -> None:
    engines = _engines()
    messages = _open_all(engines)
    _deliver(engines, messages, 0, skip={(1, 0)})
    for engine in engines:
        engine.finish_round()
    engines[0].offer("n1", 0, messages[1].increment)
    messages = _open_all(engines)
    _deliver(engines, messages, 1)
    assert engines[0].finish_round().late_dropped == 1


def test_future_messages_are_buffered_and_used_when_their_round_opens() -> None:
    engines = _engines()
    # Node 0 sends and receives round 0 but is slow to close it ...
    messages = _open_all(engines)
    _deliver(engines, messages, 0)
    for engine in engines[1:]:
        engine.finish_round()
    # ... so node 1's round-1 message reaches it while round 0 is still open.
    ahead = engines[1].begin_round(_neighbours(1))
    assert engines[0].offer("n1", 1, ahead.increment) is Offer.BUFFERED
    engines[0].finish_round()
    own = engines[0].begin_round(_neighbours(0))
    assert engines[0].quorum_reached()  # the buffered message counts at once
    assert engines[0].missing() == []
    others = [own, ahead] + [engines[i].begin_round(_neighbours(i)) for i in (2, 3)]
    for i in GRAPH:
        for j in GRAPH[i]:
            if (i, j) != (1, 0):
                assert engines[j].offer(_name(i), 1, others[i].increment) is Offer.ACCEPTED
    for engine in engines:
        engine.finish_round()
    np.testing.assert_allclose(_models(engines), _reference(2), atol=ATOL)


def test_message_before_the_round_opens_is_buffered() -> None:
    engines = _engines()
    message, _ = _message(engines[1], 1)
    assert engines[0].offer("n1", 0, message.increment) is Offer.BUFFERED
    engines[0].begin_round(_neighbours(0))
    assert engines[0].quorum_reached()
    report = engines[0].finish_round()
    assert report.received == 1 and report.weights["n1"] == pytest.approx(0.25)


def test_too_early_beyond_max_future_rounds() -> None:
    receiver = RoundEngine(LinearTrainer(_ctx(0)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    sender = RoundEngine(LinearTrainer(_ctx(1)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    receiver.begin_round(_neighbours(0))
    outcomes = []
    for _ in range(4):  # the sender runs rounds 0..3 alone
        message, round_ = _message(sender, 1)
        sender.finish_round()
        outcomes.append(receiver.offer("n1", round_, message.increment))
    assert outcomes == [Offer.ACCEPTED, Offer.BUFFERED, Offer.BUFFERED, Offer.TOO_EARLY]
    # what the node decodes after every urgent job: the rounds offer() calls TOO_EARLY (past a slack)
    assert [receiver.beyond_buffer(r) for r in range(4)] == [False, False, False, True]
    assert [receiver.beyond_buffer(r, slack=1) for r in range(5)] == [False] * 4 + [True]


def test_max_future_rounds_zero_buffers_nothing_ahead() -> None:
    cfg = RoundConfig(local_steps=STEPS, max_future_rounds=0)
    receiver = RoundEngine(LinearTrainer(_ctx(0)), get_aggregator("mean"), cfg)
    sender = RoundEngine(LinearTrainer(_ctx(1)), get_aggregator("mean"), cfg)
    receiver.begin_round(_neighbours(0))
    first, _ = _message(sender, 1)
    sender.finish_round()
    second, _ = _message(sender, 1)
    assert receiver.offer("n1", 0, first.increment) is Offer.ACCEPTED
    assert receiver.offer("n1", 1, second.increment) is Offer.TOO_EARLY


def test_duplicate_and_not_neighbour() -> None:
    engines = _engines()
    messages = _open_all(engines)
    assert engines[0].offer("n1", 0, messages[1].increment) is Offer.ACCEPTED
    assert engines[0].offer("n1", 0, messages[1].increment) is Offer.DUPLICATE
    # Node 2 is no neighbour of node 0 this round.
    assert engines[0].offer("n2", 0, messages[2].increment) is Offer.NOT_NEIGHBOUR
    report = engines[0].finish_round()
    assert set(report.weights) == {"self", "n1"}


# ------------------------------------------------------------------ replicas


def test_replica_gap_needs_sync_and_set_replica_fixes_it() -> None:
    engines = _engines()
    # Rounds 0 and 1: node 0 hears nothing from node 1 (it is cut off one way).
    _sync_round(engines, skip={(1, 0)})
    messages = _open_all(engines)
    assert engines[0].offer("n1", 1, messages[1].increment) is Offer.NEEDS_SYNC
    _deliver(engines, messages, 1, skip={(1, 0)})
    for engine in engines:
        engine.finish_round()
    # The driver fetches node 1's public model (as of its round-1 message).
    public, state_round = engines[1].public_state()
    assert state_round == 1
    engines[0].set_replica("n1", public, state_round)
    _sync_round(engines)  # round 2: every message accepted (asserted in _deliver)
    heard = {i: GRAPH[i] for i in GRAPH} | {0: []}
    np.testing.assert_allclose(_models(engines), _reference(3, [heard, heard, None]), atol=ATOL)


def test_gap_after_a_known_round_needs_sync() -> None:
    engines = _engines()
    sender = engines[1]
    first, _ = _message(sender, 1)
    sender.finish_round()
    _message(sender, 1)  # round 1, lost
    sender.finish_round()
    third, _ = _message(sender, 1)
    receiver = engines[0]
    receiver.begin_round(_neighbours(0))
    assert receiver.offer("n1", 0, first.increment) is Offer.ACCEPTED
    assert receiver.offer("n1", 2, third.increment) is Offer.NEEDS_SYNC


def test_a_neighbour_that_started_elsewhere_is_fetched_not_replayed_from_our_start() -> None:
    """Round-0 replicas are our own start plus the neighbour's first message:
    right only when both started from one model. Node 1 starts from another
    (another seed); each side learns it from the other's digest, holds the
    other's round 0 for its model, and then holds exactly the other's public
    model. Without the digest the replica stays off by the two starts'
    difference for good (a testnet node ended 0.3 below its neighbours)."""
    engines = _engines()
    engines[1] = RoundEngine(LinearTrainer(_ctx(1, seed=SEED + 1)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    assert engines[0].initial_digest == engines[2].initial_digest != engines[1].initial_digest
    unmarked = _engines()
    unmarked[1] = RoundEngine(LinearTrainer(_ctx(1, seed=SEED + 1)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    for group in (engines, unmarked):
        messages = _open_all(group)
        if group is engines:  # what each node does on the other's LearnerInfo
            for j in GRAPH[1]:
                group[j].started_elsewhere("n1")
                group[1].started_elsewhere(_name(j))
            for i in GRAPH:
                for j in GRAPH[i]:
                    expected = Offer.NEEDS_SYNC if 1 in (i, j) else Offer.ACCEPTED
                    assert group[j].offer(_name(i), 0, messages[i].increment) is expected
            for i, j in ((i, j) for i in GRAPH for j in GRAPH[i] if 1 in (i, j)):
                public, sent = group[i].public_state()
                assert group[j].set_replica(_name(i), public, sent) is Offer.ACCEPTED  # the held round 0, filed
        else:
            _deliver(group, messages, 0)
        for engine in group:
            engine.finish_round()
    messages = _open_all(engines)
    _deliver(engines, messages, 1)  # round 1 replays on the fetched replicas
    off = _open_all(unmarked)
    _deliver(unmarked, off, 1)
    for j in GRAPH[1]:
        replica, _ = engines[j].replica("n1")
        assert torch.equal(replica, engines[1].public_state()[0])
        wrong, _ = unmarked[j].replica("n1")
        assert float((wrong - unmarked[1].public_state()[0]).norm()) > 0.1
    assert torch.equal(engines[1].replica("n0")[0], engines[0].public_state()[0])


def test_the_engine_tells_the_aggregator_which_rounds_only_mix() -> None:
    """SybilWall keeps its trust in mixing-only rounds (converging models look
    alike); the engine says which rounds those are, round by round."""
    engines = _engines("sybilwall")
    seen = []
    for mixing in (False, True, False):
        for i, engine in enumerate(engines):
            open_round = engine.begin_mixing_round if mixing else engine.begin_round
            open_round(_neighbours(i))
        seen.append(engines[0].aggregator.mixing)  # type: ignore[attr-defined]
        for engine in engines:
            engine.finish_round()
    assert seen == [False, True, False]


def test_set_replica_refuses_bad_models() -> None:
    engine = _engines()[0]
    with pytest.raises(ValueError):
        engine.set_replica("n1", torch.zeros(DIM + 1), 0)
    with pytest.raises(ValueError):
        engine.set_replica("n1", torch.full((DIM,), math.nan), 0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(DIM + 1),
        torch.zeros(DIM - 1),
        torch.zeros(DIM, dtype=torch.float64),
        torch.zeros(1, DIM),
        torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0]),
        torch.tensor([0.0, 0.0, math.inf, 0.0, 0.0]),
    ],
    ids=["long", "short", "float64", "2d", "nan", "inf"],
)
def test_bad_shape_leaves_no_trace(bad: torch.Tensor) -> None:
    engines = _engines()
    messages = _open_all(engines)
    good = messages[1]
    assert engines[0].offer("n1", 0, bad) is Offer.BAD_SHAPE
    # Neither the replica nor the round saw it: the good message is still accepted.
    assert engines[0].offer("n1", 0, good.increment) is Offer.ACCEPTED
    engines[0].finish_round()
    for engine in engines[1:]:
        engine.finish_round()


def test_increments_that_overflow_a_replica_are_refused_and_mixing_goes_on() -> None:
    """Each increment finite, their sum past float32's range: the replica
    would hold inf, and every later consensus step (honest neighbours' with
    it) would be non-finite and skipped. The offer is refused instead, and
    the peer's replica dropped (it must resync)."""
    engines = _engines("median")
    huge = torch.full((DIM,), 3.0e38)
    for round_ in range(3):
        messages = _open_all(engines)
        for sender in (2, 3):
            assert engines[1].offer(_name(sender), round_, messages[sender].increment) is Offer.ACCEPTED
        outcome = engines[1].offer(_name(0), round_, huge)
        assert outcome is (Offer.ACCEPTED if round_ == 0 else Offer.BAD_SHAPE if round_ == 1 else Offer.NEEDS_SYNC)
        report = engines[1].finish_round()
        for i in (0, 2, 3):
            engines[i].finish_round()
        assert math.isfinite(report.consensus_norm) and report.consensus_norm > 0, round_
        assert bool(torch.isfinite(engines[1].trainer.get_flat()).all())


class DivergingTrainer(LinearTrainer):
    def train(self, steps: int | None = None) -> TrainStats:
        stats = super().train(steps)
        with torch.no_grad():
            self._w.fill_(math.nan)
        return stats


def test_a_diverged_local_step_is_skipped_not_applied() -> None:
    engine = RoundEngine(DivergingTrainer(_ctx(0)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    before = engine.trainer.get_flat()
    update = engine.local_update()
    assert torch.equal(update.delta, torch.zeros(DIM))
    message = engine.open_round(_neighbours(0), update)
    assert bool(torch.isfinite(message.increment).all())
    engine.finish_round()
    assert torch.equal(engine.trainer.get_flat(), before)


def test_a_diverging_setting_is_logged_once_per_hundred_rounds_in_a_row(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = RoundEngine(DivergingTrainer(_ctx(0)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    with caplog.at_level(logging.ERROR, logger="murmur.learning.rounds"):
        for _ in range(250):
            engine.local_update()
    assert [r.rounds_in_a_row for r in caplog.records] == [1, 101, 201]  # type: ignore[attr-defined]
    assert engine.diverged_streak == 250


# ------------------------------------------------------------------ quorum


def test_quorum_closes_early_at_the_configured_fraction() -> None:
    engines = _engines(config=RoundConfig(local_steps=STEPS, quorum=0.5))
    messages = _open_all(engines)
    hub = engines[1]  # three neighbours: ceil(0.5 * 3) = 2 messages close it
    assert not hub.quorum_reached()
    assert hub.offer("n0", 0, messages[0].increment) is Offer.ACCEPTED
    assert not hub.quorum_reached()
    assert sorted(hub.missing()) == ["n2", "n3"]
    assert hub.offer("n2", 0, messages[2].increment) is Offer.ACCEPTED
    assert hub.quorum_reached()
    assert hub.missing() == ["n3"]
    report = hub.finish_round()
    assert (report.received, report.neighbours) == (2, 3)
    # The missing neighbour's MH share stays on the own model.
    assert report.weights == pytest.approx({"self": 0.5, "n0": 0.25, "n2": 0.25})


def test_full_quorum_needs_everyone_and_no_round_no_quorum() -> None:
    engines = _engines()
    assert not engines[1].quorum_reached()  # no round open
    messages = _open_all(engines)
    for j in (0, 2):
        engines[1].offer(_name(j), 0, messages[j].increment)
    assert not engines[1].quorum_reached()
    engines[1].offer("n3", 0, messages[3].increment)
    assert engines[1].quorum_reached()


def test_a_neighbour_heard_at_or_past_the_open_round_is_not_waited_for() -> None:
    """Node 1 (neighbours n0, n2, n3, full quorum) fell behind. n0 is three
    rounds ahead (we re-synced its replica at its round 2): its round-3
    message is refused as too early, and its round-0 one will never come.
    n2's round-1 message came before we held a replica of it (a gap:
    re-sync needed) and was not filed. Neither is waited for; n3, not heard
    from yet, still is. Nothing of n0 or n2 is aggregated."""
    engines = _engines()
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    ahead = engines[0]
    for _ in range(3):
        _message(ahead, 0)
        ahead.finish_round()
    hub.set_replica("n0", ahead.public_state()[0], ahead.public_state()[1])
    far, far_round = _message(ahead, 0)
    assert far_round == 3
    assert hub.offer("n0", far_round, far.increment) is Offer.TOO_EARLY
    assert not hub.quorum_reached()
    gap_sender = engines[2]
    _message(gap_sender, 2)
    gap_sender.finish_round()
    gap, gap_round = _message(gap_sender, 2)
    assert hub.offer("n2", gap_round, gap.increment) is Offer.NEEDS_SYNC
    assert gap_round == 1  # past our round 0: n2 is ahead and done with it
    assert not hub.quorum_reached()
    assert sorted(hub.missing()) == ["n0", "n2", "n3"]
    last, _ = _message(engines[3], 3)
    assert hub.offer("n3", 0, last.increment) is Offer.ACCEPTED
    assert hub.quorum_reached()
    report = hub.finish_round()
    assert set(report.weights) == {"self", "n3"}


def test_neighbours_heard_only_past_the_round_do_not_close_it_alone() -> None:
    engines = _engines(config=RoundConfig(local_steps=STEPS, quorum=0.5))
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    for j in (0, 2):  # both a round ahead, before we hold replicas of them: not filed
        _message(engines[j], j)
        engines[j].finish_round()
        message, round_ = _message(engines[j], j)
        assert hub.offer(_name(j), round_, message.increment) is Offer.NEEDS_SYNC
    assert not hub.quorum_reached()  # two of three are done, but nothing is held: a round alone
    message, _ = _message(engines[3], 3)
    assert hub.offer("n3", 0, message.increment) is Offer.ACCEPTED
    assert hub.quorum_reached()


def test_a_neighbour_heard_only_for_past_rounds_is_still_waited_for() -> None:
    engines = _engines()
    _sync_round(engines)  # round 0: every neighbour delivered (proven)
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    for j in (2, 3):
        message, _ = _message(engines[j], j)
        hub.offer(_name(j), 1, message.increment)
    assert not hub.quorum_reached()  # n0: never heard from for round 1 or later


def test_a_neighbour_that_never_delivered_does_not_hold_a_round_proven_ones_make() -> None:
    """n0's round-0 message to node 1 was lost, so node 1 never used one:
    on probation, it is not waited for once proven neighbours delivered
    (a stranger that links and stays silent cannot hold rounds), but its
    message is still used when it comes in time."""
    engines = _engines()
    _sync_round(engines, skip={(0, 1)})
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    assert not hub.quorum_reached()
    message, _ = _message(engines[2], 2)
    hub.offer("n2", 1, message.increment)
    assert not hub.quorum_reached()  # n3, proven, is still waited for
    message, _ = _message(engines[3], 3)
    hub.offer("n3", 1, message.increment)
    assert hub.quorum_reached()
    late, _ = _message(engines[0], 0)
    assert hub.offer("n0", 1, late.increment) is Offer.NEEDS_SYNC  # (its round-0 was lost: a gap)
    hub.set_replica("n0", *engines[0].public_state())
    assert set(hub.finish_round().weights) == {"self", "n0", "n2", "n3"}


def test_a_neighbour_that_left_is_not_waited_for() -> None:
    engines = _engines()
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    for j in (2, 3):
        message, _ = _message(engines[j], j)
        assert hub.offer(_name(j), 0, message.increment) is Offer.ACCEPTED
    assert not hub.quorum_reached()
    hub.forget("n0")  # its connection closed: nothing more will come
    assert hub.quorum_reached()
    assert set(hub.finish_round().weights) == {"self", "n2", "n3"}


def test_a_neighbour_linked_after_opening_its_round_is_not_waited_for() -> None:
    engines = _engines()
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    for j in (2, 3):
        message, _ = _message(engines[j], j)
        hub.offer(_name(j), 0, message.increment)
    assert not hub.quorum_reached()
    hub.note_next_round("n0", 1)  # its round 0 went out before it linked us
    assert hub.quorum_reached()
    hub.note_next_round("n0", 0)
    assert not hub.quorum_reached()


def test_a_link_made_mid_round_counts_in_that_round_at_both_ends() -> None:
    """Two nodes open round 0 before linking each other; at the link each
    adds the other and files the message it already got (sent before the
    link reached it) or gets next: both rounds use the new edge."""
    engines = _engines()
    a, b = engines[0], engines[3]  # not neighbours in GRAPH
    a_msg = a.begin_round({})
    b_msg = b.begin_round({})
    assert a.offer("n3", 0, b_msg.increment) is Offer.NOT_NEIGHBOUR  # ahead of the link
    a.add_neighbour("n3", 1)
    b.add_neighbour("n0", 1)
    assert b.offer("n0", 0, a_msg.increment) is Offer.ACCEPTED
    assert a.quorum_reached() and b.quorum_reached()
    assert set(a.finish_round().weights) == {"self", "n3"}
    assert set(b.finish_round().weights) == {"self", "n0"}


def test_a_message_that_needed_a_replica_is_filed_when_the_replica_arrives() -> None:
    """A neighbour first heard from in round 1 (linked late): its message is
    held, and the public model fetched for it files it in the same round."""
    engines = _engines()
    sender, hub = engines[1], engines[0]
    _message(sender, 1)
    sender.finish_round()
    hub.begin_round({})
    hub.finish_round()
    hub.begin_round({"n1": 2})
    message, round_ = _message(sender, 1)
    assert round_ == 1
    assert hub.offer("n1", 1, message.increment) is Offer.NEEDS_SYNC
    public, state_round = sender.public_state()
    assert state_round == 1  # its model already contains the held message
    assert hub.set_replica("n1", public, state_round) is Offer.ACCEPTED
    assert hub.quorum_reached()
    assert set(hub.finish_round().weights) == {"self", "n1"}


def test_a_round_without_neighbours_is_complete_and_trains_alone() -> None:
    engine = _engines()[2]
    engine.begin_round({})
    assert engine.quorum_reached()
    engine.finish_round()
    np.testing.assert_allclose(engine.trainer.get_flat().numpy(), _half_step(2, _initial_model(SEED)), atol=ATOL)


@pytest.mark.parametrize("quorum", [0.0, -0.1, 1.5])
def test_quorum_out_of_range_is_refused(quorum: float) -> None:
    with pytest.raises(ValueError):
        RoundConfig(quorum=quorum)


def test_round_state_machine_misuse_raises() -> None:
    engine = _engines()[0]
    with pytest.raises(RuntimeError):
        engine.finish_round()
    engine.begin_round(_neighbours(0))
    with pytest.raises(RuntimeError):
        engine.begin_round(_neighbours(0))


# ------------------------------------------------------------------ adopt, state, restore


def test_adopt_moves_to_the_round_and_model() -> None:
    engines = _engines()
    _sync_round(engines)
    engine = engines[0]
    assert torch.count_nonzero(engine.state()["consensus"]) > 0  # a step is pending ...
    model = torch.arange(DIM, dtype=torch.float32)
    engine.adopt(model, 5)
    assert engine.round == 5
    assert torch.equal(engine.trainer.get_flat(), model)
    public, state_round = engine.public_state()
    assert torch.equal(public, model) and state_round == 4
    message = engine.begin_round(_neighbours(0))
    # ... and adopt() dropped it: the increment is the local update alone.
    expected = _half_step(0, model.double().numpy()) - model.double().numpy()
    np.testing.assert_allclose(message.increment.numpy(), expected, atol=ATOL)
    with pytest.raises(ValueError):
        engine.adopt(torch.zeros(DIM + 1), 6)


def test_adopt_drops_buffered_rounds_it_skips() -> None:
    engines = _engines()
    receiver, sender = engines[0], engines[1]
    first, _ = _message(sender, 1)
    assert receiver.offer("n1", 0, first.increment) is Offer.BUFFERED
    receiver.adopt(sender.trainer.get_flat(), 3)
    receiver.begin_round(_neighbours(0))
    assert receiver.finish_round().received == 0


def test_a_neighbour_resyncs_after_we_adopt() -> None:
    engines = _engines()
    _sync_round(engines)
    joiner, peer = engines[0], engines[1]
    joiner.adopt(torch.ones(DIM), 4)
    message = joiner.begin_round(_neighbours(0))
    assert peer.offer("n0", 4, message.increment) is Offer.NEEDS_SYNC
    peer.set_replica("n0", *joiner.public_state())
    joiner.finish_round()
    message = joiner.begin_round(_neighbours(0))
    for _ in range(peer.round, 5):
        peer.begin_round(_neighbours(1))
        peer.finish_round()
    peer.begin_round(_neighbours(1))
    assert peer.offer("n0", 5, message.increment) is Offer.ACCEPTED


def test_state_restore_round_trip_through_a_checkpoint() -> None:
    engines = _engines()
    for _ in range(2):
        _sync_round(engines)
    original = engines[1]
    buffer = io.BytesIO()
    torch.save({"model": original.trainer.get_flat(), "engine": original.state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    restored = RoundEngine(LinearTrainer(_ctx(1)), get_aggregator("mean"), RoundConfig(local_steps=STEPS))
    restored.restore(saved["model"], saved["engine"])
    assert restored.round == original.round == 2
    assert restored.last_sent_round == original.last_sent_round == 1
    assert torch.equal(restored.trainer.get_flat(), original.trainer.get_flat())
    assert torch.equal(restored.public_state()[0], original.public_state()[0])
    # The next message (update plus the pending consensus step) is identical.
    assert torch.count_nonzero(original.state()["consensus"]) > 0  # the round-1 consensus step is carried
    a = original.begin_round(_neighbours(1))
    b = restored.begin_round(_neighbours(1))
    assert torch.equal(a.increment, b.increment)


# ------------------------------------------------------------------ Combine.VALUES


class RecordingMedian(MedianAggregator):
    """The real median; also keeps what the engine handed it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, list[PeerUpdate]]] = []

    def aggregate(self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int) -> AggregationResult:
        self.calls.append((own.clone(), list(updates)))
        return super().aggregate(own, updates, own_degree)


def test_values_aggregator_gets_models_not_updates() -> None:
    assert MedianAggregator.combine is Combine.VALUES
    triangle = {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    neighbours = {i: {_name(j): 2 for j in triangle[i]} for i in triangle}
    median = RecordingMedian()
    aggregators: list[Aggregator] = [median, get_aggregator("mean"), get_aggregator("mean")]
    engines = [RoundEngine(LinearTrainer(_ctx(i)), aggregators[i], RoundConfig(local_steps=STEPS)) for i in triangle]
    x = np.tile(_initial_model(SEED), (3, 1))
    w_mean = np.full((3, 3), 1.0 / 3.0)
    for round_ in range(3):
        messages = [engine.begin_round(neighbours[i]) for i, engine in enumerate(engines)]
        for i in triangle:
            for j in triangle[i]:
                assert engines[j].offer(_name(i), round_, messages[i].increment) is Offer.ACCEPTED
        for engine in engines:
            engine.finish_round()
        half = np.stack([_half_step(i, x[i]) for i in triangle])
        # The engine handed the median the peers' half-step models relative to
        # ours (own row zero), not their updates ...
        own, updates = median.calls[-1]
        assert torch.count_nonzero(own) == 0
        for update in updates:
            j = int(update.peer[1:])
            np.testing.assert_allclose(update.delta.numpy(), half[j] - half[0], atol=ATOL)
        # ... so node 0 lands on the coordinate-wise median of the three models.
        x = np.stack([np.median(half, axis=0), *(w_mean @ half)[1:]])
        np.testing.assert_allclose(_models(engines), x, atol=ATOL)


# ------------------------------------------------------------------ gossip learning


def _gossip(index: int, age: int) -> GossipModel:
    return GossipModel(LinearTrainer(_ctx(index, seed=SEED + index)), age=age)


def test_gossip_merge_is_age_weighted() -> None:
    shares: list[tuple[str, float]] = []
    ours = _gossip(0, age=3)
    ours.merge_hook = lambda peer, share: shares.append((peer, share))
    w1 = ours.trainer.get_flat()
    w2 = torch.tensor(_initial_model(SEED + 1), dtype=torch.float32)
    ours.merge("n1", w2, peer_age=1)
    np.testing.assert_allclose(ours.trainer.get_flat().numpy(), ((3 * w1 + 1 * w2) / 4).numpy(), atol=1e-6)
    assert ours.age == 3
    assert shares == [("n1", pytest.approx(0.25))]
    # Merging with an older model: age becomes the max, the move is larger.
    before = ours.trainer.get_flat()
    ours.merge("n2", w2, peer_age=9)
    np.testing.assert_allclose(ours.trainer.get_flat().numpy(), ((3 * before + 9 * w2) / 12).numpy(), atol=1e-6)
    assert ours.age == 9


def test_gossip_merge_of_two_fresh_models_is_the_midpoint() -> None:
    ours = _gossip(0, age=0)
    w1 = ours.trainer.get_flat()
    w2 = torch.tensor(_initial_model(SEED + 1), dtype=torch.float32)
    ours.merge("n1", w2, peer_age=0)
    np.testing.assert_allclose(ours.trainer.get_flat().numpy(), ((w1 + w2) / 2).numpy(), atol=1e-6)
    assert ours.age == 0


def test_gossip_step_ages_by_local_steps() -> None:
    ours = _gossip(0, age=2)
    ours.step(4)
    assert ours.age == 6


@pytest.mark.parametrize(
    ("model", "age"),
    [(torch.zeros(DIM + 1), 1), (torch.full((DIM,), math.nan), 1), (torch.zeros(DIM), -1)],
    ids=["size", "nan", "negative-age"],
)
def test_gossip_merge_refuses_bad_input(model: torch.Tensor, age: int) -> None:
    ours = _gossip(0, age=1)
    before = ours.trainer.get_flat()
    with pytest.raises(ValueError):
        ours.merge("n1", model, peer_age=age)
    assert torch.equal(ours.trainer.get_flat(), before) and ours.age == 1


# ------------------------------------------------------------------ where training starts (TrainFrom)


class _FixedNoise:
    """A perturber adding a fixed, node- and round-specific vector (no randomness to average)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.index + round)
        return delta + torch.randn(delta.shape, generator=g, dtype=delta.dtype)


def _noised_engines(train_from: TrainFrom) -> list[RoundEngine]:
    engines = _engines(config=RoundConfig(local_steps=STEPS, train_from=train_from))
    for i, engine in enumerate(engines):
        engine.perturber = _FixedNoise(i)
    return engines


def test_train_from_public_is_dsgd_on_what_was_sent() -> None:
    """PUBLIC: every model after a round is W·(model + sent update) — a
    function of released messages only, as example-level DP-SGD needs."""
    engines = _noised_engines(TrainFrom.PUBLIC)
    w = _mh_matrix(GRAPH)
    for _ in range(3):
        before = _models(engines)
        carried = [engine._consensus.clone() for engine in engines]  # the increment carries last round's step
        round_ = engines[0].round
        messages = _open_all(engines)
        _deliver(engines, messages, round_)
        for engine in engines:
            engine.finish_round()
        sent = np.stack([(m.increment - c).double().numpy() for m, c in zip(messages, carried)])
        np.testing.assert_allclose(_models(engines), w @ (before + sent), atol=1e-4)
        np.testing.assert_allclose(_models(engines)[1], (engines[1].public + engines[1]._consensus).numpy(), atol=1e-5)


def test_train_from_private_keeps_the_clean_own_update() -> None:
    """PRIVATE (the default) mixes the node's clean half step instead, so it differs from the public model."""
    engines = _noised_engines(TrainFrom.PRIVATE)
    w = _mh_matrix(GRAPH)
    before = _models(engines)
    _sync_round(engines)
    clean = np.stack([_half_step(i, before[i]) for i in GRAPH])
    half = np.stack([e.public.double().numpy() for e in engines])  # ŝ_i: the noised half steps
    public = np.stack([(e.public + e._consensus).double().numpy() for e in engines])
    # x_i = W_ii·(clean own half step) + Σ_j W_ij·(neighbours' noised half steps)
    np.testing.assert_allclose(_models(engines), w @ half + np.diag(w)[:, None] * (clean - half), atol=1e-4)
    assert np.abs(_models(engines) - public).max() > 0.1


def test_mixing_rounds_send_nothing_private_and_reach_the_network_mean() -> None:
    """Mixing-only rounds send a zero update, never call the privacy stage,
    keep the network mean and contract every model toward it."""
    engines = _noised_engines(TrainFrom.PUBLIC)
    _sync_round(engines)  # one noised training round: models now differ by the noise
    start = _models(engines)
    calls = []
    for engine in engines:
        engine.perturber.perturb = lambda *a, **k: calls.append(a)  # type: ignore[method-assign, union-attr]
    spread = []
    for _ in range(30):
        round_ = engines[0].round
        carried = [engine._consensus.clone() for engine in engines]
        messages = [engine.begin_mixing_round(_neighbours(i)) for i, engine in enumerate(engines)]
        assert all(torch.equal(m.increment, c) for m, c in zip(messages, carried))  # a zero update
        _deliver(engines, messages, round_)
        for engine in engines:
            engine.finish_round()
        spread.append(float(np.abs(_models(engines) - start.mean(axis=0)).max()))
    assert calls == []
    np.testing.assert_allclose(_models(engines).mean(axis=0), start.mean(axis=0), atol=1e-4)
    assert spread[-1] < 0.05 * np.abs(start - start.mean(axis=0)).max()
    assert all(b <= a + 1e-6 for a, b in zip(spread, spread[1:]))


def _fp16(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.to(torch.float16).to(torch.float32)


def _round_with_lossy_link(engines: Sequence[RoundEngine]) -> None:
    """One round where every message crosses an fp16 wire, as a lossy codec does."""
    round_ = engines[0].round
    messages = [_fp16(m.stacked()) for m in _open_all(engines)]
    for i in GRAPH:
        for j in GRAPH[i]:
            assert engines[j].offer(_name(i), round_, messages[i][0]) is Offer.ACCEPTED
    for engine in engines:
        engine.finish_round()


def _replica_gap(engines: Sequence[RoundEngine]) -> float:
    return max(float((engines[j]._replicas[_name(i)].model - engines[i].public).abs().max())
               for i in GRAPH for j in GRAPH[i])


@pytest.mark.parametrize("wired", [True, False])
def test_a_lossy_wire_keeps_replicas_exact_only_when_the_engine_knows_it(wired: bool) -> None:
    """With ``wire`` the sender advances its public model by the decoded
    values, so every neighbour's replica equals it exactly; without, they drift."""
    engines = _noised_engines(TrainFrom.PRIVATE)
    for engine in engines:
        engine.wire = _fp16 if wired else None
    for _ in range(3):
        _round_with_lossy_link(engines)
    if wired:
        assert _replica_gap(engines) == 0.0
    else:
        assert _replica_gap(engines) > 1e-4


def test_replicas_equal_the_senders_public_models_bit_for_bit() -> None:
    """Sender and receivers advance a public model by the same float32
    operations in the same order, so a replica never drifts from the model
    it mirrors (the basis of exchanging differences at all)."""
    engines = _noised_engines(TrainFrom.PRIVATE)
    for _ in range(4):
        _sync_round(engines)
    assert _replica_gap(engines) == 0.0


def test_a_round_every_neighbour_has_just_left_behind_closes_at_once() -> None:
    """A node that caught up finds its neighbours a round ahead: their
    messages for its round went out before it could file them. It does not
    wait a deadline for nothing; a claim from far ahead still does not rush it."""
    engines = _engines()
    _sync_round(engines)
    hub = engines[1]
    hub.begin_round(_neighbours(1))
    for j in (0, 2, 3):
        engines[j].begin_round(_neighbours(j))  # round 1 everywhere else
        engines[j].finish_round()
    for j in (0, 2, 3):
        message, round_ = _message(engines[j], j)
        assert round_ == 2 and hub.offer(_name(j), 2, message.increment) is Offer.NEEDS_SYNC
    assert hub.quorum_reached()
    others = _engines()
    far = others[1]
    far.begin_round({"n0": 1})
    message, _ = _message(others[0], 0)
    far.offer("n0", 1 + MAX_FUTURE_ROUNDS + 5, message.increment)
    assert not far.quorum_reached()


# ------------------------------------------------------------------ Combine.WEIGHTS: what is scored


class RecordingMean(MeanAggregator):
    """Plain averaging; also keeps what the engine handed it to score."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def aggregate(self, own: torch.Tensor, updates: Sequence[PeerUpdate], own_degree: int) -> AggregationResult:
        self.calls.append((own.clone(), {u.peer: u.delta.clone() for u in updates}))
        return super().aggregate(own, updates, own_degree)


def _recording_engines() -> tuple[list[RoundEngine], RecordingMean]:
    recorder = RecordingMean()
    engines = [RoundEngine(LinearTrainer(_ctx(i)), recorder if i == 1 else get_aggregator("mean"),
                           RoundConfig(local_steps=STEPS)) for i in GRAPH]
    return engines, recorder


def test_weights_aggregators_score_each_public_model_against_the_point_we_last_mixed_to() -> None:
    engines, recorder = _recording_engines()
    _sync_round(engines)
    hub = engines[1]
    reference = hub.public + hub._consensus  # where round 0 left us
    round_ = hub.round
    messages = _open_all(engines)
    _deliver(engines, messages, round_)
    for engine in engines:
        engine.finish_round()
    own, scored = recorder.calls[-1]
    assert set(scored) == {"n0", "n2", "n3"}
    for j in (0, 2, 3):  # each neighbour's public model after its message, as its replica holds it
        torch.testing.assert_close(scored[_name(j)], engines[j].public - reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(own, hub.public - reference, rtol=0, atol=1e-6)  # our own noised step


@pytest.mark.parametrize("setup", ["consensus-step", "outer", "compressed-outer"])
def test_the_scoring_reference_is_the_step_the_round_actually_took(setup: str) -> None:
    """The point our last round mixed to is our model as published: with a
    consensus step below 1 the scaled step, with an outer optimizer its move,
    with compression less the residual not yet sent. A reference built from
    the raw consensus step (before the engine scales or replaces it) makes
    every neighbour's offset carry our own unfinished step."""
    from murmur.learning.compression import Compressor
    from murmur.learning.outer import OuterConfig, OuterOptimizer
    from murmur.protocol.codecs import DeltaCodec, Rounding
    from murmur.protocol.sparse import MaskScope, RoundFormat, Sparsifier

    config = RoundConfig(local_steps=STEPS, consensus_step=0.5 if setup != "outer" else 1.0)
    recorder = RecordingMean()

    def engine(i: int) -> RoundEngine:
        compressor = (Compressor(RoundFormat(Sparsifier.RANDK, 0.4, MaskScope.SENDER, seed=SEED), DeltaCodec.FP32,
                                 _name(i).encode(), Rounding.NEAREST, rng_seed=i) if setup == "compressed-outer" else None)
        outer = OuterOptimizer(OuterConfig(lr=0.7, momentum=0.9, nesterov=True)) if "outer" in setup else None
        return RoundEngine(LinearTrainer(_ctx(i)), recorder if i == 1 else get_aggregator("mean"), config,
                           compressor=compressor, outer=outer)

    engines = [engine(i) for i in GRAPH]
    for _ in range(2):
        _sync_round(engines)
    hub = engines[1]
    unsent = hub._residual if hub._residual is not None else torch.zeros(DIM)
    reference = hub.trainer.get_flat() - unsent
    torch.testing.assert_close(hub.public + hub._consensus, reference, rtol=0, atol=1e-5)
    round_ = hub.round
    _deliver(engines, _open_all(engines), round_)
    for e in engines:
        e.finish_round()
    own, scored = recorder.calls[-1]
    for j in (0, 2, 3):
        torch.testing.assert_close(scored[_name(j)], engines[j].public - reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(own, hub.public - reference, rtol=0, atol=1e-5)


def test_a_model_a_resync_installs_is_scored_like_any_message() -> None:
    """A neighbour that skips a round makes us fetch its public model; what
    that model holds beyond its messages reaches our model only through
    what the aggregator scores (it used to score only increments, and a
    re-sync carried anything past it)."""
    engines, recorder = _recording_engines()
    _sync_round(engines)
    hub, sender = engines[1], engines[3]
    reference = hub.public + hub._consensus
    round_ = hub.round
    messages = _open_all(engines)
    _deliver(engines, messages, round_, skip={(3, 1)})
    poison = torch.full((DIM,), 50.0)
    public, state_round = sender.public_state()
    hub.forget("n3")  # its connection dropped (the replica is gone), and it links again
    hub.add_neighbour("n3", len(GRAPH[3]))
    assert hub.offer("n3", round_, messages[3].increment) is Offer.NEEDS_SYNC
    assert hub.set_replica("n3", public + poison, state_round) is Offer.ACCEPTED  # it serves a poisoned model
    for engine in engines:
        engine.finish_round()
    _, scored = recorder.calls[-1]
    torch.testing.assert_close(scored["n3"], public + poison - reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aggregator", ["mean", "sybilwall"])
def test_records_are_scored_against_the_reference_of_their_own_round(aggregator: str) -> None:
    engines = _engines(aggregator)
    node = engines[0]
    references = {}
    for _ in range(4):
        _sync_round(engines)
        references[node.round] = (node.public + node._consensus).clone()
    sketch = model_sketch(torch.arange(DIM, dtype=torch.float32))
    now = node.round
    for r in (now, now - 1, now - 2) if aggregator == "sybilwall" else (now,):
        torch.testing.assert_close(node.relative_sketch(sketch, r), sketch - model_sketch(references[r]))
    assert node.relative_sketch(sketch, now - 3) is None  # too old: its reference is gone
    assert node.relative_sketch(sketch, now + 1) is None  # the future has no reference yet


class _AddNothing:
    """A privacy stage stand-in that noises nothing: only its presence matters here."""

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        return delta

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        return delta


@pytest.mark.parametrize("private", [False, True])
def test_sybilwalls_probe_reads_our_data_only_without_privacy(private: bool) -> None:
    """The probe's losses come from the node's private data; under privacy its
    weights would reach the published consensus step unaccounted, so the
    engine gives the aggregator no probe then, and tells it that its messages
    are noised (SybilWall's noise bound, aggregators/noise_bound.py)."""
    from murmur.learning.trainers.digits import DigitsMLPTrainer

    trainer = DigitsMLPTrainer(TrainerContext(0, 2, 0, device="cpu"))
    aggregator = get_aggregator("sybilwall")
    engine = RoundEngine(trainer, aggregator, perturber=_AddNothing() if private else None)
    assert aggregator.noised is private  # type: ignore[attr-defined]
    offsets = [torch.zeros(engine.num_params), torch.randn(engine.num_params)]
    probed = aggregator.probe(offsets)  # type: ignore[attr-defined]
    if private:
        assert probed is None
    else:
        assert probed is not None and len(probed.losses) == 2 and probed.losses[1] > probed.losses[0]


def test_a_mixing_only_round_is_not_judged_as_noised() -> None:
    """In the mixing rounds after training nobody adds noise, and our own
    step is ~0 (a lossy codec's residue): SybilWall's noise bound, judging
    every neighbour by it, gave them none of the weight and the mixing rounds
    mixed nothing (a default testnet node: self 1.0 in 4 of its 5). The
    engine says noised only for a round whose message it noised."""
    from murmur.learning.trainers.digits import DigitsMLPTrainer

    def fp16(stacked: torch.Tensor) -> torch.Tensor:  # a lossy codec: our step in a mixing round is its residue
        return stacked.to(torch.float16).to(torch.float32)

    aggregator = get_aggregator("sybilwall")
    engine = RoundEngine(DigitsMLPTrainer(TrainerContext(0, 2, 0, device="cpu")), aggregator,
                         perturber=_AddNothing(), wire=fp16)
    g = torch.Generator().manual_seed(5)
    ours = engine.begin_round({"n1": 1}).increment
    assert aggregator.noised is True  # type: ignore[attr-defined]
    near = ours + 0.01 * torch.randn(engine.num_params, generator=g)  # close enough to mix: a consensus step
    engine.offer("n1", 0, fp16(near[None])[0])
    assert engine.finish_round().consensus_norm > 0
    engine.begin_mixing_round({"n1": 1})
    assert aggregator.noised is False  # type: ignore[attr-defined]
    engine.offer("n1", 1, torch.zeros(engine.num_params))
    report = engine.finish_round()
    assert report.weights["n1"] == pytest.approx(0.5)  # SybilWall's own weight 1, a full-trust peer 1


class _StayPut(MeanAggregator):
    """Mean weights, but every neighbour's model mixed as our own (no pull at all)."""

    def mixed_offsets(self, own: torch.Tensor, updates: Sequence[PeerUpdate]) -> list[torch.Tensor] | None:
        return [own.clone() for _ in updates]


@pytest.mark.parametrize("private", [False, True])
def test_the_engine_mixes_what_mixed_offsets_returns_without_privacy(private: bool) -> None:
    """A WEIGHTS aggregator's mixed_offsets replaces the neighbours' models in
    the mix (SybilWall's coordinate bound): with every pull cut to nothing,
    each node ends the round at its own half step, not at D-SGD's average.
    Under privacy whole models are mixed (correlated noise cancels only in
    whole sums): D-SGD's answer (the perturber here adds nothing)."""
    cfg = RoundConfig(local_steps=STEPS)
    engines = [RoundEngine(LinearTrainer(_ctx(i)), _StayPut(), cfg, perturber=_AddNothing() if private else None)
               for i in GRAPH]
    _sync_round(engines)
    half = np.stack([_half_step(i, _initial_model(SEED)) for i in GRAPH])
    np.testing.assert_allclose(_models(engines), _reference(1) if private else half, atol=ATOL)
    assert not np.allclose(_reference(1), half, atol=ATOL)


@pytest.mark.parametrize(("value", "finite"), [(1.0, True), (3e20, True), (math.nan, False), (math.inf, False),
                                                (-math.inf, False)])
def test_the_fast_finite_check_is_exact(value: float, finite: bool) -> None:
    """A sum of squares in one pass; 3e20 overflows it while finite, and
    the exact check then decides."""
    from murmur.learning.rounds import _all_finite

    t = torch.ones(1000)
    t[500] = value
    assert _all_finite(t) is finite
    assert _all_finite(torch.empty(0)) is True
