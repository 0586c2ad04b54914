"""Compressed gossip, local steps with an outer optimizer, and checkpoints on
an interval, on real daemons (Noise transport, signed chunked transfers).

Each node checks what it recorded itself: every round closed with a message
from every neighbour (a compressed payload a receiver could not size or
decode would be a refused transfer and a round alone), and what it sent in
bytes is what the compressed format promises."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from murmur.node.decoding import DECODE_WORKERS
from murmur.node.state import StateDir
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.delta import DeltaSender, PreparedDelta
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import MaskScope, RoundFormat, Sparsifier
from tests.integration.cluster import Cluster
from tests.integration.test_model_sizes import assert_learnt_together, trainer_options

ROUNDS = 4
RUN_S = 90.0
DIGITS_PARAMS = 4810  # digits-mlp


def learning(n: int, rounds: int = ROUNDS, **more: Any) -> dict[str, Any]:
    return {
        "learning.enabled": True,
        "learning.trainer": "digits-mlp",
        "learning.num_nodes": n,
        "learning.rounds": rounds,
        "learning.local_steps": 2,
        "learning.round_deadline_s": 20.0,
        "learning.threads": 1,
        "learning.device": "cpu",
        "network.neighbours": n - 1,
        **more,
    }


async def run_rounds(cluster: Cluster, rounds: int) -> None:
    await cluster.wait_until(lambda: all(len(n.state.read_metrics()) >= rounds for n in cluster), RUN_S,
                             f"{rounds} rounds recorded")
    assert_learnt_together(cluster.live, rounds)


@pytest.mark.parametrize(
    ("sparsifier", "codec", "mask"),
    [("topk", "int8", "sender"), ("randk", "int4", "sender"), ("randk", "int2", "network"), ("none", "int4", "sender")],
)
async def test_compressed_rounds_complete_between_daemons(tmp_path: Path, sparsifier: str, codec: str, mask: str) -> None:
    overrides = learning(3, **{"compression.sparsifier": sparsifier, "compression.ratio": 0.05,
                               "compression.mask": mask, "compression.consensus_step": 0.5,
                               "learning.codec": codec})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, ROUNDS)
        fmt = RoundFormat(Sparsifier(sparsifier), 0.05 if sparsifier != "none" else 1.0, MaskScope(mask))
        payload = fmt.nbytes(DeltaCodec[codec.upper()], DIGITS_PARAMS)
        for node in cluster:
            learner = node.learner
            assert learner.layout.round_format == RoundFormat(fmt.sparsifier, fmt.ratio, fmt.scope, seed=0)
            rows = node.state.read_metrics()
            sent = rows[-1]["bytes_out"] - rows[0]["bytes_out"]  # rounds 1..3: round messages plus small talk
            dense = (ROUNDS - 1) * 2 * 4 * DIGITS_PARAMS  # what fp32 round messages to 2 neighbours would be
            assert sent < dense / 2, (sent, dense)
            assert payload < 4 * DIGITS_PARAMS


async def test_random_k_with_pairwise_privacy_learns_together(tmp_path: Path) -> None:
    overrides = learning(3, **{"compression.sparsifier": "randk", "compression.ratio": 0.1,
                               "compression.mask": "network", "learning.codec": "int8",
                               "privacy.enabled": True, "privacy.rounds": 100, "privacy.scheme": "decor"})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, ROUNDS)
        for node in cluster:
            privacy = node.learner.privacy
            assert privacy.stage.pairwise_sums  # pairwise terms were drawn ...
            assert all(v.numel() == RoundFormat(Sparsifier.RANDK, 0.1).count(DIGITS_PARAMS)
                       for v in privacy.stage.pairwise_sums.values())  # ... for the coordinates sent only
            assert node.learner.status()["epsilon"] > 0


async def test_outer_optimizer_state_and_residual_survive_a_restart(tmp_path: Path) -> None:
    """Checkpoints on a round interval carry the residual and the outer
    momentum; a restarted node resumes them exactly, and shutdown always
    writes one."""
    overrides = learning(2, rounds=6, **{"outer.optimizer": "nesterov", "compression.sparsifier": "randk",
                                         "compression.ratio": 0.2, "learning.checkpoint_every_rounds": 3,
                                         "learning.checkpoint_every_s": 0.0})
    async with Cluster(2, tmp_path, overrides) as cluster:
        node = cluster.node(1)
        writes: list[int] = []
        save = node.state.save_checkpoint
        node.state.save_checkpoint = lambda arrays, meta: (writes.append(meta["round"]), save(arrays, meta))[1]
        await cluster.wait_until(lambda: len(node.state.read_metrics()) >= 4, RUN_S, "4 rounds")
        assert writes and all(r % 3 == 0 for r in writes), writes  # every 3 rounds, not every round
        await cluster.stop(1)
        saved = StateDir(cluster.members[1].data_dir).load_checkpoint()
        assert saved is not None
        momentum, residual = saved.arrays["outer_momentum"], saved.arrays["residual"]
        assert np.count_nonzero(momentum) > 0 and np.count_nonzero(residual) > 0
        restarted = await cluster.restart(1)
        engine = restarted.learner.engine
        assert engine.round == saved.meta["round"]
        np.testing.assert_array_equal(engine.outer.momentum.numpy(), momentum)
        np.testing.assert_array_equal(engine.state()["residual"].numpy(), residual)


@pytest.mark.parametrize("trainer", ["fashion-resnet", "shakespeare-transformer"])
async def test_the_bigger_built_in_models_learn_compressed_and_report_their_metric(tmp_path: Path, trainer: str) -> None:
    """The real model sizes (0.94 M and 3.2 M parameters) over random-k 1% +
    4-bit messages; each node reports the trainer's own metric."""
    options: dict[str, Any] = {"batch_size": 8, "max_test_samples": 32, "eval_batch_size": 32}
    if trainer == "fashion-resnet":
        options.update(trainer_options("fashion-mnist-cnn", tmp_path))
    overrides = learning(3, rounds=2, **{"learning.trainer": trainer, "learning.trainer_options": options,
                                         "learning.local_steps": 1, "learning.codec": "int4",
                                         "compression.sparsifier": "randk", "compression.ratio": 0.01,
                                         "compression.consensus_step": 0.3})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, 2)
        metric = "perplexity" if trainer == "shakespeare-transformer" else "accuracy"
        for node in cluster:
            status = node.status()["learning"]
            assert status["metric"] == metric and status["compression"] == "int4+randk(0.01,sender)"
            row = node.state.read_metrics()[-1]
            assert row["metric"] == metric
            if metric == "perplexity":
                assert status["perplexity"] > 1 and row["perplexity"] == pytest.approx(status["perplexity"])
            else:
                assert row["perplexity"] is None and 0 <= row["accuracy"] <= 1
            assert node.metrics.value("murmur_perplexity", split="test") == (
                None if metric == "accuracy" else pytest.approx(row["perplexity"]))


async def test_sybilwall_vouches_for_and_weighs_what_compressed_messages_decode_to(tmp_path: Path) -> None:
    """Issue 15's records and probe on issue 18's compressed messages: each
    node's signed statement of its public model (advanced by its decoded
    increment) matches, bit for bit, the replica its neighbours built from
    the payloads they decoded, so each can vouch for it in a history record;
    and SybilWall, probe on, keeps honest neighbours' weight."""
    overrides = learning(3, **{"compression.sparsifier": "randk", "compression.ratio": 0.1,
                               "compression.mask": "sender", "compression.consensus_step": 0.5,
                               "learning.codec": "int4", "learning.aggregator": "sybilwall"})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, ROUNDS)
        for node in cluster:
            learner = node.learner
            peers = [s.peer for s in node.membership.learning_neighbours()]
            assert len(peers) == 2
            for peer in peers:
                record = await learner.records.observed(node, str(peer))
                assert record is not None, f"{peer.short()}'s statement does not match our replica of it"
            weights = learner.last_report.weights
            assert all(weights.get(str(peer), 0.0) > 0.0 for peer in peers), weights


def _threads_calling(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    """The threads that call ``cls.name`` from now on, one entry per call."""
    threads: list[int] = []
    method = getattr(cls, name)

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, recording)
    return threads


async def test_received_compressed_payloads_decode_off_the_event_loop(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A random-k payload decodes in a worker thread, never on the event
    loop (at 10 M parameters and ratio 0.5 a decode took ~1 s, during which
    the daemon served nothing: keepalives, other peers, its API), and no
    more than DECODE_WORKERS at once (each holds a decoded model)."""
    loop_thread = threading.get_ident()
    threads = _threads_calling(monkeypatch, TransferLayout, "decode")
    overrides = learning(3, rounds=2, **{"compression.sparsifier": "randk", "compression.ratio": 0.5,
                                         "compression.consensus_step": 0.5, "learning.codec": "int8"})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, 2)
        assert threads, "no compressed payload was decoded"
        assert loop_thread not in threads, f"{threads.count(loop_thread)} of {len(threads)} decoded on the loop"
        for node in cluster:
            assert 1 <= node.learner._decoder.most_in_flight <= DECODE_WORKERS


async def test_a_random_k_sender_draws_its_mask_off_the_event_loop(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender's own random-k mask (~0.6 s at 10 M parameters, ratio 0.5)
    is drawn in a worker thread before open_round takes it, not inside
    open_round on the event loop; receivers draw it off the loop too."""
    loop_thread = threading.get_ident()
    threads = _threads_calling(monkeypatch, RoundFormat, "mask")
    overrides = learning(3, rounds=2, **{"compression.sparsifier": "randk", "compression.ratio": 0.5,
                                         "compression.consensus_step": 0.5})
    async with Cluster(3, tmp_path, overrides) as cluster:
        await run_rounds(cluster, 2)
        assert threads, "no random-k mask was drawn"
        assert loop_thread not in threads, f"{threads.count(loop_thread)} of {len(threads)} masks drawn on the loop"


async def test_a_resent_round_a_replica_already_holds_is_not_decoded(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct bytes for a round are no replay, and offer() calls any
    message for a round the replica holds a duplicate: decoding one first
    (a random-k mask: ~1 s of CPU at 10 M parameters, ratio 0.5) let a
    neighbour that resends old rounds keep the decoder busy, honest
    messages queued behind. Such a message is now refused undecoded."""
    # (round, sender) of every round message decoded, by either node: both run
    # in this process, and the sender's decode of the receiver's round 0 (it
    # may come after the receiver's replica holds round 0) is no such decode.
    decoded: list[tuple[int, bytes]] = []
    decode = TransferLayout.decode

    def counting(self: TransferLayout, kind: TransferKind, payload: Any, codec: DeltaCodec, round: int,
                 sender: bytes) -> np.ndarray:
        decoded.append((round, sender))
        return decode(self, kind, payload, codec, round, sender)

    monkeypatch.setattr(TransferLayout, "decode", counting)
    overrides = learning(2, rounds=0, **{"compression.sparsifier": "randk", "compression.ratio": 0.5,
                                         "compression.consensus_step": 0.5})
    async with Cluster(2, tmp_path, overrides) as cluster:
        sender, receiver = cluster.node(0), cluster.node(1)
        await cluster.wait_until(lambda: receiver.learner.engine.replica(str(sender.peer_id)) is not None, RUN_S,
                                 "the receiver's replica holds round 0")
        guard = receiver.learner._assemblers[receiver.peer_id].replay_guard
        senders_round_0 = (0, sender.peer_id.raw)
        before = decoded.count(senders_round_0)
        fmt = receiver.learner.layout.round_format
        d = receiver.learner.engine.num_params
        k = fmt.count(d)
        payload, _ = fmt.encode(None, np.full(k, 0.125, np.float32), DeltaCodec.FP32, d)  # new bytes for round 0
        session = sender.session(receiver.peer_id)
        assert session is not None
        meta = sender.learner.layout.meta(TransferKind.ROUND, degree=1)
        for data in DeltaSender(sender.identity, receiver.peer_id, 0, PreparedDelta.of_payload(payload, DeltaCodec.FP32,
                                                                                               (1, d)), meta=meta):
            await session.send_encoded(data, "Delta")
        resent = (sender.peer_id, 0, blake3.blake3(payload).digest())
        await cluster.wait_until(lambda: resent in guard._seen, RUN_S, "the resent round received")
        assert before == 1 and decoded.count(senders_round_0) == 1, "a round the replica holds was decoded"
