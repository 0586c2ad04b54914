"""Compressed gossip with error feedback in the round engine (CHOCO-SGD,
Koloskova, Stich, Jaggi, ICML 2019), the outer optimizer, and how compression
meets privacy.

Every message here crosses the real wire format: the sender's payload is
decoded by a receiver-side TransferLayout exactly as the node's assembler
does, and what the receiver offers its engine is that decoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from murmur.learning.aggregators import get_aggregator
from murmur.learning.compression import Compressor, top_k_indices
from murmur.learning.outer import OuterConfig, OuterOptimizer
from murmur.learning.rounds import Message, Offer, RoundConfig, RoundEngine, TrainFrom
from murmur.learning.trainers.base import TrainerContext
from murmur.protocol.codecs import DeltaCodec, Rounding
from murmur.protocol.layout import TransferKind, TransferLayout
from murmur.protocol.sparse import MaskScope, RoundFormat, Sparsifier
from tests.trainers import LeastSquaresTrainer

DIM = 64
SAMPLES = 40
LR = 0.05
STEPS = 2
SEED = 3
GRAPH: dict[int, list[int]] = {0: [1], 1: [0, 2, 3], 2: [1, 3], 3: [1, 2]}


class QuadTrainer(LeastSquaresTrainer):
    name = "quad-test"
    dim, samples, lr, steps, data_seed = DIM, SAMPLES, LR, STEPS, 100


def _name(i: int) -> str:
    return f"n{i}"


def _neighbours(i: int) -> dict[str, int]:
    return {_name(j): len(GRAPH[j]) for j in GRAPH[i]}


COMPRESSORS: dict[str, tuple[RoundFormat, DeltaCodec, Rounding]] = {
    "fp16": (RoundFormat(), DeltaCodec.FP16, Rounding.NEAREST),
    "int8": (RoundFormat(), DeltaCodec.INT8, Rounding.NEAREST),
    "int4-stochastic": (RoundFormat(), DeltaCodec.INT4, Rounding.STOCHASTIC),
    "int2": (RoundFormat(), DeltaCodec.INT2, Rounding.NEAREST),
    "topk": (RoundFormat(Sparsifier.TOPK, 0.1), DeltaCodec.FP32, Rounding.NEAREST),
    "topk-int4": (RoundFormat(Sparsifier.TOPK, 0.1), DeltaCodec.INT4, Rounding.STOCHASTIC),
    "randk-int4": (RoundFormat(Sparsifier.RANDK, 0.1, MaskScope.SENDER, seed=SEED), DeltaCodec.INT4, Rounding.NEAREST),
    "randk-network-int2": (RoundFormat(Sparsifier.RANDK, 0.25, MaskScope.NETWORK, seed=SEED), DeltaCodec.INT2,
                           Rounding.STOCHASTIC),
}


def _compressor(key: str, i: int) -> Compressor:
    fmt, codec, rounding = COMPRESSORS[key]
    return Compressor(fmt, codec, _name(i).encode(), rounding, rng_seed=i)


def _engines(key: str | None, config: RoundConfig | None = None, outer: OuterConfig | None = None,
             perturbers: Sequence[object] | None = None) -> list[RoundEngine]:
    cfg = config or RoundConfig(local_steps=STEPS)
    return [
        RoundEngine(QuadTrainer(TrainerContext(node_index=i, num_nodes=len(GRAPH), seed=SEED, device="cpu")),
                    get_aggregator("mean"), cfg,
                    perturber=None if perturbers is None else perturbers[i],  # type: ignore[arg-type]
                    compressor=None if key is None else _compressor(key, i),
                    outer=None if outer is None else OuterOptimizer(outer))
        for i in GRAPH
    ]


def _received(engine: RoundEngine, message: Message, sender: int, round_: int) -> torch.Tensor:
    """What a receiver's assembler decodes of ``message`` (the real wire path)."""
    compressed = message.compressed
    assert compressed is not None
    fmt = engine.compressor.format if engine.compressor is not None else RoundFormat()
    layout = TransferLayout.for_model(DIM, Message.ROWS, fmt)
    assert len(compressed.payload) == layout.payload_bytes(TransferKind.ROUND, compressed.codec)
    array = layout.decode(TransferKind.ROUND, bytes(compressed.payload), compressed.codec, round_, _name(sender).encode())
    return torch.from_numpy(array[0].copy())


def _round(engines: Sequence[RoundEngine]) -> list[Message]:
    round_ = engines[0].round
    messages = [engine.begin_round(_neighbours(i)) for i, engine in enumerate(engines)]
    for i in GRAPH:
        for j in GRAPH[i]:
            got = _received(engines[j], messages[i], i, round_)
            assert torch.equal(got, messages[i].increment)  # the receiver decodes exactly what the sender applied
            assert engines[j].offer(_name(i), round_, got) is Offer.ACCEPTED
    for engine in engines:
        engine.finish_round()
    return messages


def _replica_gap(engines: Sequence[RoundEngine]) -> float:
    return max(float((engines[j]._replicas[_name(i)].model - engines[i].public).abs().max())
               for i in GRAPH for j in GRAPH[i])


def _loss(engines: Sequence[RoundEngine]) -> float:
    return float(np.mean([engine.trainer.evaluate().loss for engine in engines]))


# --------------------------------------------------------------------------- replicas and error feedback


@pytest.mark.parametrize("key", list(COMPRESSORS))
def test_replicas_stay_bit_exact_under_every_compressor(key: str) -> None:
    engines = _engines(key)
    for _ in range(5):
        _round(engines)
    assert _replica_gap(engines) == 0.0


@pytest.mark.parametrize("key", ["topk", "topk-int4", "randk-int4", "int2"])
def test_error_feedback_carries_exactly_the_untransmitted_remainder(key: str) -> None:
    """e' = e + c + Δ − q to the bit, q is C(e + c + Δ), and nothing is lost:
    public model + residual is the initial model plus every update and
    consensus step taken so far."""
    engines = _engines(key)
    node = engines[1]
    total = node.public.double().clone()
    for round_ in range(4):
        residual, consensus = node._residual.clone(), node._consensus.clone()
        update = node.local_update()
        v = residual + consensus
        v += update.delta
        message = node.open_round(_neighbours(1), update)
        assert torch.equal(node._residual, v - message.increment)
        if node.compressor.format.sparsifier is Sparsifier.TOPK and node.compressor.codec is DeltaCodec.FP32:
            sent = message.increment != 0
            assert int(sent.sum()) == node.compressor.format.count(DIM)
            assert torch.equal(message.increment[sent], v[sent])  # the largest coordinates go out whole ...
            assert torch.equal(node._residual[~sent], v[~sent])  # ... and the others wait
            assert v[~sent].abs().max() <= v[sent].abs().min()
        total += (consensus + update.delta).double()
        np.testing.assert_allclose((node.public.double() + node._residual.double()).numpy(), total.numpy(),
                                   atol=1e-4)
        messages = {1: message}
        for i, engine in enumerate(engines):
            if i != 1:
                messages[i] = engine.begin_round(_neighbours(i))
        for i in GRAPH:
            for j in GRAPH[i]:
                assert engines[j].offer(_name(i), round_, messages[i].increment) is Offer.ACCEPTED
        for engine in engines:
            engine.finish_round()


def test_a_random_k_message_carries_only_its_shared_mask() -> None:
    engines = _engines("randk-int4")
    fmt = COMPRESSORS["randk-int4"][0]
    masks = []
    for round_ in range(3):
        messages = _round(engines)
        mask = fmt.mask(DIM, round_, _name(2).encode())
        support = torch.nonzero(messages[2].increment).flatten().numpy()
        assert set(support) <= set(mask.tolist())
        masks.append(mask)
        other = fmt.mask(DIM, round_, _name(3).encode())
        assert not np.array_equal(mask, other)
    assert not np.array_equal(masks[0], masks[1])


@pytest.mark.parametrize("key", ["topk", "randk-int4", "int4-stochastic"])
def test_compressed_gossip_still_learns(key: str) -> None:
    """CHOCO with γ small enough for the compression (here 0.1; 0.5 diverges
    with random-k 10%, as the theory expects: γ must shrink with δ) learns
    as well as exact D-SGD."""
    exact = _engines(None)
    compressed = _engines(key, RoundConfig(local_steps=STEPS, consensus_step=0.1))
    start = _loss(exact)
    for _ in range(40):
        _round_plain(exact)
        _round(compressed)
    assert _loss(compressed) < start / 4
    assert _loss(compressed) < 1.5 * _loss(exact)


def _round_plain(engines: Sequence[RoundEngine]) -> None:
    round_ = engines[0].round
    messages = [engine.begin_round(_neighbours(i)) for i, engine in enumerate(engines)]
    for i in GRAPH:
        for j in GRAPH[i]:
            engines[j].offer(_name(i), round_, messages[i].increment)
    for engine in engines:
        engine.finish_round()


def test_the_consensus_step_scales_the_move_toward_the_neighbours() -> None:
    full, half = _engines(None), _engines(None, RoundConfig(local_steps=STEPS, consensus_step=0.5))
    for engines in (full, half):
        _round_plain(engines)
    assert torch.allclose(half[1]._consensus, 0.5 * full[1]._consensus, atol=1e-6)


def test_a_catch_up_clears_the_residual() -> None:
    engines = _engines("topk")
    _round(engines)
    assert torch.count_nonzero(engines[0]._residual) > 0
    engines[0].adopt(engines[1].public.clone(), 5)
    assert torch.count_nonzero(engines[0]._residual) == 0


# --------------------------------------------------------------------------- outer optimizer


def test_outer_nesterov_is_torch_sgd_on_the_pseudo_gradient() -> None:
    outer = OuterOptimizer(OuterConfig(lr=0.7, momentum=0.9, nesterov=True))
    param = torch.nn.Parameter(torch.zeros(3))
    reference = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    model = torch.zeros(3)
    for step in range(4):
        target = model + torch.tensor([1.0, -2.0, 0.5]) * (step + 1)
        param.grad = (param.detach() - target).clone()
        reference.step()
        model = outer.step(model, target)
        assert torch.allclose(model, param.detach(), atol=1e-6)


def test_outer_state_survives_a_restart() -> None:
    """A node restored from its checkpoint continues exactly as one that
    never stopped: model, public model, residual and outer momentum (its
    neighbours' replicas it re-syncs, as after any restart)."""
    outer = OuterConfig(lr=0.7, momentum=0.9)
    engines = _engines("randk-int4", outer=outer)
    for _ in range(3):
        _round(engines)
    original = engines[2]
    state = original.state()
    assert torch.count_nonzero(state["outer_momentum"]) > 0 and "residual" in state

    def restored(with_outer_state: bool) -> RoundEngine:
        engine = _engines("randk-int4", outer=outer)[2]
        kept = dict(state) if with_outer_state else {k: v for k, v in state.items() if k != "outer_momentum"}
        engine.restore(original.trainer.get_flat(), kept)
        for peer, replica in original._replicas.items():
            engine.set_replica(peer, replica.model.clone(), replica.round)
        return engine

    resumed, forgetful = restored(True), restored(False)
    round_ = original.round
    messages = {j: engines[j].begin_round(_neighbours(j)) for j in GRAPH[2]}
    for engine in (original, resumed, forgetful):
        engine.begin_round(_neighbours(2))
        for j, message in messages.items():
            assert engine.offer(_name(j), round_, message.increment) is Offer.ACCEPTED
        engine.finish_round()
    assert torch.equal(resumed.trainer.get_flat(), original.trainer.get_flat())
    assert torch.equal(resumed.state()["outer_momentum"], original.state()["outer_momentum"])
    assert torch.equal(resumed.state()["residual"], original.state()["residual"])
    assert not torch.allclose(forgetful.trainer.get_flat(), original.trainer.get_flat(), atol=1e-3)


def test_outer_optimizer_with_lr_one_and_no_momentum_is_the_plain_engine() -> None:
    plain = _engines("topk")
    outer = _engines("topk", outer=OuterConfig(lr=1.0, momentum=0.0))
    for _ in range(3):
        _round(plain)
        _round(outer)
    for a, b in zip(plain, outer, strict=True):
        assert torch.allclose(a.trainer.get_flat(), b.trainer.get_flat(), atol=1e-5)


# --------------------------------------------------------------------------- privacy


class _PairNoise:
    """A pairwise-noise stand-in: node 1 adds +v and node 2 adds −v, v drawn
    from (round, dimension) alone, so both ends draw the same v, as a DECOR
    edge does; clipping to a fixed norm like the real stage."""

    CLIP = 0.5

    def __init__(self, sign: float) -> None:
        self.sign = sign
        self.dims: list[int] = []

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * min(1.0, self.CLIP / (float(delta.norm()) + 1e-12))

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        self.dims.append(delta.numel())
        v = torch.randn(delta.numel(), generator=torch.Generator().manual_seed(round))
        return self.clip(delta) + self.sign * 5.0 * v


def _private_engines(scope: MaskScope, train_from: TrainFrom = TrainFrom.PRIVATE) -> list[RoundEngine]:
    fmt = RoundFormat(Sparsifier.RANDK, 0.25, scope, seed=SEED)
    COMPRESSORS["private"] = (fmt, DeltaCodec.FP32, Rounding.NEAREST)
    perturbers = [_PairNoise(0.0), _PairNoise(1.0), _PairNoise(-1.0), _PairNoise(0.0)]
    return _engines("private", RoundConfig(local_steps=STEPS, train_from=train_from), perturbers=perturbers)


def test_privacy_clips_and_noises_only_the_coordinates_sent_and_carries_the_rest() -> None:
    engines = _private_engines(MaskScope.NETWORK)
    node = engines[1]
    update = node.local_update()
    message = node.open_round(_neighbours(1), update)
    k = node.compressor.format.count(DIM)
    assert node.perturber.dims == [k]  # type: ignore[union-attr]
    mask = torch.from_numpy(node.compressor.format.mask(DIM, 0, b""))
    off = torch.ones(DIM, dtype=torch.bool)
    off[mask] = False
    assert torch.count_nonzero(message.increment[off]) == 0
    clipped = node.perturber.clip(update.delta[mask])  # type: ignore[union-attr]
    expected = update.delta.clone()
    expected[mask] -= clipped
    assert torch.allclose(node._carry, expected, atol=1e-7)  # the clean remainder waits, nothing else


def test_example_level_drops_the_unsent_clean_update() -> None:
    engines = _private_engines(MaskScope.NETWORK, TrainFrom.PUBLIC)
    engines[1].open_round(_neighbours(1), engines[1].local_update())
    assert engines[1]._carry is None


@pytest.mark.parametrize("scope", [MaskScope.NETWORK, MaskScope.SENDER])
def test_pairwise_noise_cancels_only_on_a_network_wide_mask(scope: MaskScope) -> None:
    """The sum of the two ends' public increments holds no noise when both
    drew the same coordinates (network mask); with per-sender masks their
    terms land on different coordinates and stay (why privacy needs the
    network-wide mask)."""
    noisy = _private_engines(scope)
    messages = [engine.begin_round(_neighbours(i)) for i, engine in enumerate(noisy)]
    pair = messages[1].increment + messages[2].increment
    quiet = _private_engines(scope)
    for engine in quiet:
        engine.perturber.sign = 0.0  # type: ignore[union-attr]
    clean = [engine.begin_round(_neighbours(i)) for i, engine in enumerate(quiet)]
    leftover = float((pair - clean[1].increment - clean[2].increment).abs().max())
    if scope is MaskScope.NETWORK:
        assert leftover < 1e-5
    else:
        assert leftover > 1.0


def test_top_k_with_privacy_is_refused() -> None:
    with pytest.raises(ValueError, match="top-k"):
        RoundEngine(QuadTrainer(TrainerContext(node_index=0, num_nodes=1, seed=SEED, device="cpu")),
                    get_aggregator("mean"), perturber=_PairNoise(1.0),  # type: ignore[arg-type]
                    compressor=_compressor("topk", 0))


def test_a_boosting_testnet_attacker_sends_random_k_messages() -> None:
    """The testnet's Sybil attacker puts BoostedUpdate where the privacy stage
    goes; with a random-k mask the engine also asks it for its clip."""
    from murmur.testnet.sybil import BoostedUpdate

    fmt = RoundFormat(Sparsifier.RANDK, 0.4, MaskScope.SENDER, seed=SEED)
    COMPRESSORS["boosted"] = (fmt, DeltaCodec.FP32, Rounding.NEAREST)
    engines = _engines("boosted", perturbers=[BoostedUpdate(3.0) for _ in GRAPH])
    node = engines[1]
    update = node.local_update()
    message = node.open_round(_neighbours(1), update)
    mask = torch.from_numpy(fmt.mask(DIM, 0, _name(1).encode()))
    torch.testing.assert_close(message.increment[mask], 3.0 * update.delta[mask])
    assert torch.count_nonzero(node._carry[mask]) == 0  # all of it went out, boosted


@pytest.mark.parametrize("k", [1, 3, 5, 7, 8])
def test_top_k_takes_the_largest_magnitudes_and_the_lowest_indices_among_ties(k: int) -> None:
    """The k largest |v|, sorted; at the k-th largest magnitude, ties go to
    the lowest indices (topk's choice among them was unspecified)."""
    v = torch.tensor([0.5, -2.0, 0.5, 1.0, -0.5, 3.0, 0.5, -1.0])
    expected = {1: [5], 3: [1, 3, 5], 5: [1, 3, 5, 7, 0], 7: [0, 1, 2, 3, 4, 5, 7], 8: list(range(8))}[k]
    assert top_k_indices(v, k).tolist() == sorted(expected)


def test_top_k_among_many_ties_is_the_lowest_indices_at_real_sizes() -> None:
    """A residual whose magnitudes mostly tie (one value repeated): the
    selection is the larger values, then the lowest tied indices, whatever
    the ratio; exactly k of them, strictly increasing."""
    d = 200_000
    v = torch.full((d,), 0.25)
    v[::1000] = -4.0  # 200 clear winners
    for k in (100, 200, 5_000, 100_000):
        chosen = top_k_indices(v, k)
        assert chosen.numel() == k and bool((chosen[1:] > chosen[:-1]).all())
        winners = torch.arange(0, d, 1000)
        if k <= winners.numel():
            assert chosen.tolist() == winners[:k].tolist()
        else:
            rest = torch.tensor(sorted(set(range(d)) - set(winners.tolist()))[: k - winners.numel()])
            assert chosen.tolist() == sorted(winners.tolist() + rest.tolist())


def test_a_top_k_message_breaks_ties_toward_the_lower_index() -> None:
    """Same vector, same message, whatever torch's topk does with ties."""
    compressor = Compressor(RoundFormat(Sparsifier.TOPK, 0.375), DeltaCodec.FP32, b"me")
    v = torch.tensor([0.5, -2.0, 0.5, 1.0, -0.5, 3.0, 0.5, -1.0])
    compressed = compressor.compress(v.clone(), 0)
    assert torch.nonzero(compressed.dense).squeeze(1).tolist() == [1, 3, 5]


def test_a_prepared_random_k_mask_is_the_one_the_round_uses_and_only_for_its_round() -> None:
    fmt = RoundFormat(Sparsifier.RANDK, 0.3, seed=5)
    compressor = Compressor(fmt, DeltaCodec.FP32, b"me")
    compressor.prepare_mask(4, 1000)
    drawn = compressor._drawn
    assert drawn is not None
    assert compressor.mask(4, 1000).tolist() == fmt.mask(1000, 4, b"me").tolist()
    assert compressor._drawn is drawn  # taken, not drawn again
    assert compressor.mask(5, 1000).tolist() == fmt.mask(1000, 5, b"me").tolist()  # another round: its own
    assert compressor.mask(5, 999).tolist() == fmt.mask(999, 5, b"me").tolist()
