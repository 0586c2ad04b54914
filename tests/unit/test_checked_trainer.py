"""Trainer contract checks: every wrong return value is a TrainerError naming method and expectation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from murmur.errors import MurmurError, TrainerError
from murmur.learning.aggregators.base import get_aggregator
from murmur.learning.probe import ProbeResult
from murmur.learning.rounds import GossipModel, LocalUpdate, RoundEngine
from murmur.learning.trainers.base import EvalStats, Trainer, TrainerContext, TrainStats
from murmur.learning.trainers.checked import CheckedTrainer, checked
from murmur.learning.trainers.registry import create_trainer

FLAT = "a float32 1-D torch.Tensor of num_params() = 3 values"


class Toy(Trainer):
    """A three-parameter trainer whose return values the test sets."""

    name = "toy"

    def __init__(self) -> None:
        super().__init__(TrainerContext(0, 1, 0))
        self.device = torch.device("cpu")
        self.params = torch.zeros(3)
        self.n: Any = 3
        self.flat: Any = None  # None: the real parameters
        self.stats: Any = TrainStats(loss=0.5, examples=8, steps=1)
        self.eval: Any = EvalStats(loss=0.25, accuracy=0.75, n=4)
        self.rate: Any = 0.125
        self.probed: Any = None  # what probe_models returns
        self.num_params_calls = 0

    def num_params(self) -> int:
        self.num_params_calls += 1
        return self.n

    def get_flat(self) -> torch.Tensor:
        return self.params.clone() if self.flat is None else self.flat

    def set_flat(self, flat: torch.Tensor) -> None:
        self.params = flat.clone()

    def train(self, steps: int | None = None) -> TrainStats:
        self.params += 1.0
        return self.stats

    def evaluate(self) -> EvalStats:
        return self.eval

    def attack_success_rate(self, attack: str) -> float:
        return self.rate

    def probe_models(self, models: Any) -> Any:
        return self.probed


def test_good_values_pass_through_unchanged():
    toy = Toy()
    trainer = checked(toy)
    assert isinstance(trainer, CheckedTrainer) and checked(trainer) is trainer  # wrapping twice is a no-op
    assert trainer.num_params() == 3
    assert torch.equal(trainer.get_flat(), torch.zeros(3))
    assert trainer.train(1) is toy.stats
    assert trainer.evaluate() is toy.eval
    assert trainer.attack_success_rate("backdoor") == 0.125
    toy.stats = TrainStats(loss=np.float32(0.5), examples=np.int64(8), steps=1)  # numpy scalars are numbers too
    toy.eval = EvalStats(loss=math.nan, accuracy=1, n=0)  # a diverged loss is not a contract violation
    toy.rate = np.float64(1.0)
    assert trainer.train().steps == 1 and trainer.evaluate().accuracy == 1 and trainer.attack_success_rate("x") == 1.0
    assert trainer.probe_models([torch.zeros(3)]) is None and trainer.probe_losses([torch.zeros(3)]) is None
    toy.probed = ProbeResult([np.float32(0.5)], [torch.ones(4, 2)])
    assert trainer.probe_losses([torch.zeros(3)]) == [0.5]
    assert torch.equal(trainer.probe_models([torch.zeros(3)]).outputs[0], torch.ones(4, 2))
    # the count is asked once: get_flat's check does not call the trainer's num_params every time
    assert toy.num_params_calls == 1
    # everything else is the wrapped trainer's
    assert (trainer.name, trainer.device, trainer.ctx) == ("toy", toy.device, toy.ctx)


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        (lambda t: setattr(t, "stats", {"loss": 0.5}), lambda c: c.train(), "Toy.train() returned dict, expected TrainStats"),
        (lambda t: setattr(t, "stats", None), lambda c: c.train(), "Toy.train() returned NoneType, expected TrainStats"),
        (lambda t: setattr(t, "stats", TrainStats(loss=torch.tensor(0.5), examples=1, steps=1)), lambda c: c.train(),
         "Toy.train() returned TrainStats.loss of type Tensor, expected float"),
        (lambda t: setattr(t, "stats", TrainStats(loss=0.5, examples=1, steps=-1)), lambda c: c.train(),
         "Toy.train() returned TrainStats.steps = -1, expected an int >= 0"),
        (lambda t: setattr(t, "stats", TrainStats(loss=0.5, examples=1.5, steps=1)), lambda c: c.train(),
         "Toy.train() returned TrainStats.examples = 1.5, expected an int >= 0"),
        (lambda t: setattr(t, "eval", (0.1, 0.9)), lambda c: c.evaluate(), "Toy.evaluate() returned tuple, expected EvalStats"),
        (lambda t: setattr(t, "eval", EvalStats(loss="0.1", accuracy=0.9, n=1)), lambda c: c.evaluate(),
         "Toy.evaluate() returned EvalStats.loss of type str, expected float"),
        (lambda t: setattr(t, "eval", EvalStats(loss=0.1, accuracy=90.0, n=1)), lambda c: c.evaluate(),
         "Toy.evaluate() returned EvalStats.accuracy = 90.0, expected a float in [0, 1]"),
        (lambda t: setattr(t, "eval", EvalStats(loss=0.1, accuracy=math.nan, n=1)), lambda c: c.evaluate(),
         "Toy.evaluate() returned EvalStats.accuracy = nan, expected a float in [0, 1]"),
        (lambda t: setattr(t, "eval", EvalStats(loss=0.1, accuracy=0.9, n=True)), lambda c: c.evaluate(),
         "Toy.evaluate() returned EvalStats.n = True, expected an int >= 0"),
        (lambda t: setattr(t, "flat", np.zeros(3, np.float32)), lambda c: c.get_flat(),
         f"Toy.get_flat() returned ndarray, expected {FLAT}"),
        (lambda t: setattr(t, "flat", torch.zeros(3, dtype=torch.float64)), lambda c: c.get_flat(),
         f"Toy.get_flat() returned a torch.float64 tensor of shape (3,), expected {FLAT}"),
        (lambda t: setattr(t, "flat", torch.zeros(1, 3)), lambda c: c.get_flat(),
         f"Toy.get_flat() returned a torch.float32 tensor of shape (1, 3), expected {FLAT}"),
        (lambda t: setattr(t, "flat", torch.zeros(4)), lambda c: c.get_flat(),
         f"Toy.get_flat() returned a torch.float32 tensor of shape (4,), expected {FLAT}"),
        (lambda t: setattr(t, "device", torch.device("cuda")), lambda c: c.get_flat(),  # a CPU copy from a GPU trainer
         "Toy.get_flat() returned a tensor on cpu, expected one on the trainer's device cuda"),
        (lambda t: setattr(t, "n", 0), lambda c: c.num_params(), "Toy.num_params() returned 0, expected a positive int"),
        (lambda t: setattr(t, "n", 3.0), lambda c: c.num_params(), "Toy.num_params() returned float, expected int"),
        (lambda t: setattr(t, "n", True), lambda c: c.num_params(), "Toy.num_params() returned bool, expected int"),
        (lambda t: setattr(t, "rate", 1.5), lambda c: c.attack_success_rate("backdoor"),
         "Toy.attack_success_rate() returned 1.5, expected a float in [0, 1]"),
        (lambda t: setattr(t, "rate", math.nan), lambda c: c.attack_success_rate("backdoor"),
         "Toy.attack_success_rate() returned nan, expected a float in [0, 1]"),
        (lambda t: setattr(t, "rate", "0.5"), lambda c: c.attack_success_rate("backdoor"),
         "Toy.attack_success_rate() returned str, expected float"),
        (lambda t: setattr(t, "probed", [0.5, 0.5]), lambda c: c.probe_models([torch.zeros(3)] * 2),
         "Toy.probe_models() returned list, expected None or ProbeResult"),
        (lambda t: setattr(t, "probed", ProbeResult([0.5], [torch.zeros(4, 2)])),
         lambda c: c.probe_models([torch.zeros(3)] * 2),
         "Toy.probe_models() returned losses [0.5], expected 2 floats"),
        (lambda t: setattr(t, "probed", ProbeResult([0.5, 0.5], [torch.zeros(4, 2), torch.zeros(3, 2)])),
         lambda c: c.probe_models([torch.zeros(3)] * 2),
         "Toy.probe_models() returned outputs that are not one 2-D tensor of one shape per model"),
    ],
)
def test_each_wrong_return_names_the_method_and_the_expected_type(setup, call, message):
    toy = Toy()
    setup(toy)
    with pytest.raises(TrainerError) as err:
        call(checked(toy))
    assert str(err.value) == message
    assert isinstance(err.value, MurmurError)


def _engine(toy: Toy) -> RoundEngine:
    return RoundEngine(toy, get_aggregator("mean", self_id="n0"))


def test_round_engine_checks_any_trainer_it_is_given():
    """The simulator and the daemon drive RoundEngine: a raw trainer handed to
    it is checked all the same, at the first call that returns a bad value."""
    toy = Toy()
    engine = _engine(toy)
    assert isinstance(engine.trainer, CheckedTrainer) and engine.trainer.inner is toy
    update = engine.local_update()
    assert torch.equal(update.delta, torch.ones(3)) and update.loss == 0.5
    toy.stats = {"loss": 0.5}
    with pytest.raises(TrainerError, match=r"^Toy\.train\(\) returned dict, expected TrainStats$"):
        engine.local_update()
    toy.eval = {"accuracy": 1.0}
    engine.open_round({}, LocalUpdate.mixing_only(engine.num_params))
    with pytest.raises(TrainerError, match=r"^Toy\.evaluate\(\) returned dict, expected EvalStats$"):
        engine.finish_round(evaluate=True)


def test_round_engine_refuses_a_bad_parameter_count_at_construction():
    toy = Toy()
    toy.n = -3
    with pytest.raises(TrainerError, match=r"^Toy\.num_params\(\) returned -3, expected a positive int$"):
        _engine(toy)


def test_gossip_model_checks_its_trainer():
    toy = Toy()
    model = GossipModel(toy)
    assert model.step(1) == 0.5 and model.age == 1
    toy.stats = TrainStats(loss=0.5, examples=1, steps=-2)
    with pytest.raises(TrainerError, match=r"TrainStats\.steps = -2"):
        model.step(1)


def test_create_trainer_checks_a_real_trainer_and_keeps_its_attributes():
    trainer = create_trainer("digits-mlp", TrainerContext(0, 4, 0, device="cpu", options={"local_steps": 2}))
    assert isinstance(trainer, CheckedTrainer)
    assert trainer.name == "digits-mlp" and trainer.device == torch.device("cpu")
    assert trainer.options.local_steps == 2 and trainer.train_size > 0  # what the privacy stage reads
    stats = trainer.train()
    assert isinstance(stats, TrainStats) and stats.steps == 2
    flat = trainer.get_flat()
    assert flat.shape == (trainer.num_params(),) and flat.dtype == torch.float32
    assert 0.0 <= trainer.evaluate().accuracy <= 1.0


def test_the_model_fingerprint_tells_models_of_equal_size_apart():
    """Peers compare a fingerprint of the model's shapes before learning
    together. Behind the contract checks the trainer's shapes were lost (one
    flat vector), so two different models of equal size exchanged deltas."""
    from murmur.learning.fingerprint import ModelFingerprint

    class Split(Toy):
        def param_shapes(self):
            return ((1,), (2,))

    prints = [ModelFingerprint("mine:Model", checked(t).param_shapes(), "fp32") for t in (Toy(), Split())]
    assert prints[0].shapes == ((3,),) and prints[1].shapes == ((1,), (2,))
    assert prints[0].digest != prints[1].digest
    digits = create_trainer("digits-mlp", TrainerContext(0, 1, 0, device="cpu"))
    assert digits.param_shapes() == digits.inner.param_shapes() and len(digits.param_shapes()) > 1


def test_shapes_that_do_not_add_up_to_the_parameters_are_a_trainer_error():
    class Wrong(Toy):
        def param_shapes(self):
            return ((2,),)

    with pytest.raises(TrainerError, match=r"Wrong.param_shapes\(\) returned shapes of 2 values, expected "
                                           r"num_params\(\) = 3"):
        checked(Wrong()).param_shapes()
