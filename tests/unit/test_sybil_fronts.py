"""The testnet attacker's identities each send a message of their own
(murmur.testnet.sybil.ShapedFronts over murmur.learning.adversary), and
every honest replica of each identity stays exactly what it tracks."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from murmur.learning.adversary import AttackPlan, Sleeper, Tactic
from murmur.learning.aggregators.base import get_aggregator
from murmur.learning.compression import Compressor
from murmur.learning.rounds import Message, RoundConfig, RoundEngine
from murmur.learning.trainers.base import TrainerContext
from murmur.node.config import Attack, load_config
from murmur.protocol.codecs import DeltaCodec
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import RoundFormat, Sparsifier
from murmur.testnet.sybil import ShapedFronts, SybilAttacker
from tests.trainers import VectorTrainer

DIM = 1000
HONEST = 3
ROUNDS = 5
SEED = 11


def _trainer(index: int) -> VectorTrainer:
    return VectorTrainer(TrainerContext(node_index=index, num_nodes=HONEST + 1, seed=SEED, device="cpu",
                                        options={"size": DIM, "lr": 0.3}))


def _engine(index: int, name: bytes, fmt: RoundFormat | None, codec: DeltaCodec) -> RoundEngine:
    compressor = None if fmt is None else Compressor(fmt, codec, name)
    return RoundEngine(_trainer(index), get_aggregator("mean"), RoundConfig(local_steps=1), compressor=compressor)


def _decoded(message: Message, fmt: RoundFormat | None, round_: int, sender: PeerId) -> torch.Tensor:
    """What an honest receiver's assembler decodes of ``message`` sent by ``sender``."""
    if message.compressed is None:
        return message.increment
    layout = TransferLayout.for_model(DIM, Message.ROWS, fmt or RoundFormat())
    array = layout.decode(TransferKind.ROUND, bytes(message.compressed.payload), message.compressed.codec,
                          round_, sender.raw)
    return torch.from_numpy(array[0].copy())


@pytest.mark.parametrize(("fmt", "codec"), [
    (None, DeltaCodec.FP32),
    (RoundFormat(), DeltaCodec.FP16),
    (RoundFormat(Sparsifier.RANDK, 0.2, seed=3), DeltaCodec.FP16),  # random-k, a mask per sender
], ids=["fp32", "fp16", "randk-fp16"])
def test_each_front_sends_its_own_increment_and_every_replica_of_it_stays_exact(
    fmt: RoundFormat | None, codec: DeltaCodec,
) -> None:
    fronts = [Identity.generate().peer_id for _ in range(3)]
    names = [f"h{i}".encode() for i in range(HONEST)]
    honest = [_engine(i, names[i], fmt, codec) for i in range(HONEST)]
    attacker = _engine(HONEST, b"attacker", fmt, codec)
    shaping = ShapedFronts(AttackPlan.tuned(Tactic.DIVERSIFIED), fronts, attacker.public, SEED, attacker.compressor)
    for r in range(ROUNDS):
        sent = []
        for i, engine in enumerate(honest):
            neighbours = {n.decode(): HONEST + 2 for n in names if n != names[i]} | {str(f): HONEST for f in fronts}
            sent.append(engine.begin_round(neighbours))
        attacker.begin_round({n.decode(): HONEST + 2 for n in names})
        for i, message in enumerate(sent):
            attacker.offer(names[i].decode(), r, message.increment)
            for j, engine in enumerate(honest):
                if j != i:
                    engine.offer(names[i].decode(), r, message.increment)
        shaped = shaping.shape(r, attacker, [n.decode() for n in names])
        assert set(shaped) == set(fronts)
        for front, mine in shaped.items():
            received = _decoded(mine.message, fmt, r, front)
            assert torch.equal(received, mine.message.increment)  # it tracks exactly what receivers decode
            for engine in honest:
                engine.offer(str(front), r, received)
        for a, b in itertools.combinations(fronts, 2):
            assert not torch.equal(shaped[a].message.increment, shaped[b].message.increment), (r, a, b)
        for engine in [*honest, attacker]:
            engine.finish_round()
        for front in fronts:
            state = shaping.public_state(front)
            assert state is not None and state[1] == r
            for engine in honest:
                replica = engine.replica(str(front))
                assert replica is not None and replica[1] == r
                assert torch.equal(replica[0], state[0]), (r, front)  # bit-exact, every round
    # the fronts are really apart: no two public models alike
    publics = [shaping.public_state(f)[0] for f in fronts]  # type: ignore[index]
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(publics, 2))


@pytest.mark.parametrize("codec", [DeltaCodec.FP32, DeltaCodec.FP16])
def test_unscored_fronts_skip_every_other_round_and_replicas_resync_to_their_poison(codec: DeltaCodec) -> None:
    """An unscored identity's messages are honest-looking (the mean honest
    increment), each after a gap: a receiver files it only after a re-sync,
    and then holds exactly what the identity tracks, the poison included."""
    from murmur.learning.rounds import Offer
    from murmur.testnet.sybil import UNSCORED_EVERY

    fmt = None if codec is DeltaCodec.FP32 else RoundFormat()
    fronts = [Identity.generate().peer_id for _ in range(2)]
    names = [f"h{i}" for i in range(HONEST)]
    honest = [_engine(i, names[i].encode(), fmt, codec) for i in range(HONEST)]
    attacker = _engine(HONEST, b"attacker", fmt, codec)
    shaping = ShapedFronts(AttackPlan.tuned(Tactic.UNSCORED), fronts, attacker.public, SEED, attacker.compressor)
    sent_rounds = []
    for r in range(2 * UNSCORED_EVERY + 1):
        sent = [e.begin_round({n: HONEST + 1 for n in names if n != names[i]} | {str(f): HONEST for f in fronts})
                for i, e in enumerate(honest)]
        attacker.begin_round(dict.fromkeys(names, HONEST + 1))
        for i, message in enumerate(sent):
            attacker.offer(names[i], r, message.increment)
            for j, engine in enumerate(honest):
                if j != i:
                    engine.offer(names[i], r, message.increment)
        shaped = shaping.shape(r, attacker, names)
        if all(mine.message is None for mine in shaped.values()):
            for engine in [*honest, attacker]:
                engine.finish_round()
            continue
        sent_rounds.append(r)
        for front, mine in shaped.items():
            assert mine.message is not None
            received = _decoded(mine.message, fmt, r, front)
            for engine in honest:
                assert engine.offer(str(front), r, received) is Offer.NEEDS_SYNC  # a gap: it must ask
                model, state_round = shaping.public_state(front)  # type: ignore[misc]
                assert engine.set_replica(str(front), model, state_round) is Offer.ACCEPTED
                held = shaping.replica_state(front)
                assert held is not None and held[1] == r
                assert torch.equal(engine.replica(str(front))[0], held[0])  # type: ignore[index]
        for engine in [*honest, attacker]:
            engine.finish_round()
    assert sent_rounds == [r for r in range(2 * UNSCORED_EVERY + 1) if r % UNSCORED_EVERY == UNSCORED_EVERY - 1]


def test_a_sleeper_trains_clean_until_sleep_rounds_then_on_poisoned_data() -> None:
    engine = RoundEngine(_trainer(HONEST), get_aggregator("mean"), RoundConfig(local_steps=1))
    made: list[VectorTrainer] = []

    def poisoned() -> VectorTrainer:
        made.append(_trainer(HONEST + 1))  # another target: what it trains on once awake
        return made[-1]

    plan = dataclasses.replace(AttackPlan.tuned(Tactic.SLEEPER), sleep_rounds=3)
    sleeper = Sleeper(plan, poisoned)
    clean = engine.trainer
    for r in range(3):
        assert not sleeper.on_round(r, engine)
        assert engine.trainer is clean and sleeper.awake_round is None
        engine.begin_round({})
        engine.finish_round()
    held = engine.trainer.get_flat()
    assert sleeper.on_round(3, engine)
    assert sleeper.awake_round == 3 and len(made) == 1
    assert engine.trainer is not clean and torch.equal(engine.trainer.get_flat(), held)  # from the model it holds
    assert not sleeper.on_round(4, engine) and len(made) == 1  # once
    assert Sleeper(AttackPlan.tuned(Tactic.DIVERSIFIED), poisoned).awake_round == 0  # others: poisoned from the start


def test_a_sleeping_attackers_identities_start_on_clean_data(tmp_path) -> None:  # noqa: ANN001
    configs = [load_config(None, {"node.data_dir": str(tmp_path / f"s{i}"), "learning.enabled": True,
                                  "learning.attack": "label_flip", "learning.rounds": 10}) for i in range(2)]
    sleeping = SybilAttacker(configs, dataclasses.replace(AttackPlan.tuned(Tactic.SLEEPER), sleep_rounds=3))
    assert {c.learning.attack for c in sleeping.configs} == {Attack.NONE}
    awake = SybilAttacker(configs, AttackPlan.tuned(Tactic.DIVERSIFIED))
    assert {c.learning.attack for c in awake.configs} == {Attack.LABEL_FLIP}


def test_the_worker_runs_the_plan_its_scenario_gives_the_attacker() -> None:
    from murmur.errors import ConfigError
    from murmur.testnet.scenario import parse_scenario
    from murmur.testnet.worker import attack_plan, attacker_arguments, parser

    sc = parse_scenario('nodes = 4\n[topology]\ndegree = 2\n[duration]\nrounds = 5\n'
                        '[[attackers]]\ntactic = "sleeper"\nsleep_rounds = 2\nboost = 1.5\n')
    plan = sc.attackers[0].plan()
    assert attack_plan(parser().parse_args([*attacker_arguments(plan), "a.toml"])) == plan
    assert attack_plan(parser().parse_args(["a.toml"])) is None  # honest nodes
    with pytest.raises(ConfigError, match="unknown tactic 'mimic'"):
        attack_plan(parser().parse_args(["--attacker", "--tactic", "mimic", "a.toml"]))


def test_forged_records_name_made_up_twins_and_pass_every_signature_check() -> None:
    from murmur.node.records import check_record, describe

    fronts = [Identity.generate() for _ in range(2)]
    names = [f"h{i}" for i in range(HONEST)]
    honest = [_engine(i, names[i].encode(), None, DeltaCodec.FP32) for i in range(HONEST)]
    attacker = _engine(HONEST, b"attacker", None, DeltaCodec.FP32)
    sent = [e.begin_round({}) for e in honest]
    attacker.begin_round(dict.fromkeys(names, HONEST))
    for name, message in zip(names, sent, strict=True):
        attacker.offer(name, 0, message.increment)
    peer = Identity.generate().peer_id  # the honest neighbour told
    forging = ShapedFronts(AttackPlan.tuned(Tactic.FORGED_RECORDS), [f.peer_id for f in fronts], attacker.public, SEED)
    forging.shape(0, attacker, names)
    records = forging.records(fronts[0], peer, attacker)
    assert len(records) == AttackPlan.tuned(Tactic.FORGED_RECORDS).forged_per_round
    for record in records:
        check_record(record)  # both signatures hold: only the record rules can refuse it
        assert record.observer == fronts[0].peer_id and record.distance == 1 and record.round == 0
        assert record.subject not in {f.peer_id for f in fronts} | {peer}
        copies = [describe(attacker.replica(n)[0].numpy())[0] for n in names]  # type: ignore[index]
        assert record.digest in copies  # a copy of an honest peer's public model
    diversified = ShapedFronts(AttackPlan.tuned(Tactic.DIVERSIFIED), [f.peer_id for f in fronts], attacker.public, SEED)
    diversified.shape(0, attacker, names)
    assert diversified.records(fronts[0], peer, attacker) == ()


def test_the_attacker_tuned_under_privacy_is_its_own_plan() -> None:
    """Under DP noise the tuning found another attacker (a large boost with a
    fresh offset hides below the noise, forged_records with four twins a
    round); without noise the same boost is caught by the round's clip and
    the other bounds, and the plans tuned without noise stay."""
    for tactic in (Tactic.DIVERSIFIED, Tactic.UNSCORED, Tactic.SLEEPER, Tactic.FORGED_RECORDS):
        private = AttackPlan.tuned(tactic, private=True)
        assert private.tactic is tactic and private.boost == 4.0 and private.fresh == 1.0 and private.diversify == 0.0
        assert AttackPlan.tuned(tactic) != private
    assert AttackPlan.tuned(Tactic.SLEEPER, private=True).sleep_rounds == AttackPlan.tuned(Tactic.SLEEPER).sleep_rounds
    assert AttackPlan.tuned(Tactic.FORGED_RECORDS, private=True).forged_per_round == 4
    assert AttackPlan.tuned(Tactic.IDENTICAL, private=True) == AttackPlan.tuned(Tactic.IDENTICAL)  # nothing to tune
