"""Trainers on real torch and real (bundled or tiny generated) data."""

from __future__ import annotations

import math
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from murmur.errors import ConfigError
from murmur.learning.rounds import ShiftedModels
from murmur.learning.trainers.base import (
    Batch,
    Metric,
    TorchTrainer,
    Trainer,
    TrainerContext,
    _PoissonSampler,
    resolve_device,
)
from murmur.learning.trainers.checked import checked
from murmur.learning.trainers.digits import DigitsMLPTrainer
from murmur.learning.trainers.registry import BUILTIN_TRAINERS, ENTRY_POINT_GROUP, load_trainer
from tests.idx import write_idx_dir


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models are fastest single-threaded (and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(node_index: int = 0, num_nodes: int = 1, seed: int = 42, **kw) -> DigitsMLPTrainer:  # type: ignore[no-untyped-def]
    kw.setdefault("device", "cpu")
    return DigitsMLPTrainer(TrainerContext(node_index, num_nodes, seed, **kw))


# ---------------------------------------------------------------- digits / base behaviour


def test_digits_trains_centrally_to_90_percent_in_seconds() -> None:
    trainer = _digits()
    before = trainer.evaluate()
    start = time.perf_counter()
    stats = trainer.train(600)
    elapsed = time.perf_counter() - start
    after = trainer.evaluate()
    assert stats.steps == 600 and stats.examples == 600 * 32
    assert before.accuracy < 0.3 and after.accuracy >= 0.9, (before, after)
    assert after.loss < before.loss and after.n == 359
    assert elapsed < 10.0


def test_digits_local_step_is_well_under_10ms() -> None:
    trainer = _digits()
    trainer.train(20)  # warm-up
    times = []
    for _ in range(200):
        start = time.perf_counter()
        trainer.train(1)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.010, statistics.median(times)


def test_initial_model_depends_on_seed_only() -> None:
    a = _digits(0, 4, seed=7).get_flat()
    b = _digits(3, 4, seed=7).get_flat()
    c = _digits(0, 4, seed=8).get_flat()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Building a trainer leaves the caller's RNG alone.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _digits()
    assert torch.equal(torch.rand(3), expected)


def test_trainers_built_at_once_in_one_process_start_from_the_same_model() -> None:
    """A testnet worker builds its nodes' trainers in threads at once; with
    torch's global generator seeded and drawn by each build in turn, they
    came out different in 14 of 20 trials of four, and the node that differs
    mixes shifted replicas for the whole run (see trainers/globalrng.py)."""
    from concurrent.futures import ThreadPoolExecutor

    expected = _digits(0, 4, seed=7).get_flat()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL around often: the draws interleave if they can
    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(8):
                built = list(pool.map(lambda i: _digits(i, 4, seed=7).get_flat(), range(4)))
                assert all(torch.equal(flat, expected) for flat in built)
    finally:
        sys.setswitchinterval(switch)


def test_get_flat_is_a_copy() -> None:
    """The node writes checkpoints from get_flat() in a thread while the next
    round trains: the vector must not share memory with the parameters."""
    trainer = _digits()
    flat = trainer.get_flat()
    before = flat.clone()
    trainer.train(3)
    assert torch.equal(flat, before)
    flat.add_(1.0)
    assert not torch.equal(trainer.get_flat(), flat)


def test_training_is_reproducible_and_nodes_get_disjoint_data() -> None:
    runs = [_digits(1, 3, seed=5) for _ in range(2)]
    for t in runs:
        t.train(15)
    assert torch.equal(runs[0].get_flat(), runs[1].get_flat())
    other = _digits(2, 3, seed=5)
    other.train(15)
    assert not torch.equal(runs[0].get_flat(), other.get_flat())
    sizes = [_digits(i, 3, seed=5).train_size for i in range(3)]
    assert sum(sizes) == 1438


def test_dirichlet_context_is_honoured() -> None:
    trainers = [_digits(i, 5, seed=1, partition="dirichlet", alpha=0.05) for i in range(5)]
    labels = [np.unique(t._y_train.numpy()) for t in trainers]
    assert min(len(lab) for lab in labels) < 10  # skewed: some node misses classes
    assert sum(t.train_size for t in trainers) == 1438


def test_flat_round_trip_and_copy_semantics() -> None:
    trainer = _digits()
    flat = trainer.get_flat()
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.numel() == trainer.num_params() == 4810
    flat += 1.0  # a copy: the model must not change
    assert not torch.equal(trainer.get_flat(), flat)
    trainer.set_flat(flat)
    assert torch.equal(trainer.get_flat(), flat)
    trainer.set_flat(torch.zeros(trainer.num_params(), dtype=torch.float64))
    assert trainer.get_flat().abs().sum() == 0
    assert trainer.evaluate().loss == pytest.approx(np.log(10), rel=1e-5)  # all-zero model: uniform
    with pytest.raises(ValueError, match="does not fit"):
        trainer.set_flat(torch.zeros(trainer.num_params() + 1))


def test_zero_steps_and_default_steps() -> None:
    trainer = _digits(options={"local_steps": 3})
    flat = trainer.get_flat()
    assert trainer.train(0).steps == 0 and torch.equal(trainer.get_flat(), flat)
    assert trainer.train().steps == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learning_rate": 0.1}, "unknown trainer option.*learning_rate.*valid:.*lr"),
        ({"lr": "fast"}, "lr must be float, got str"),
        ({"batch_size": 3.0}, "batch_size must be int"),
        ({"batch_size": True}, "batch_size must be int"),
        ({"lr": -1}, "lr=-1.0"),
        ({"lr": float("inf")}, "lr=inf"),  # TOML writes inf: it trained a NaN model without a word
        ({"lr": float("nan")}, "lr=nan"),
        ({"weight_decay": float("inf")}, "weight_decay=inf"),
        ({"dp_clip": float("inf")}, "dp_clip=inf"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"hidden": 0}, "hidden=0"),
        ({"data_dir": "/tmp"}, "unknown trainer option.*data_dir"),
    ],
)
def test_bad_options_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _digits(options=options)


def test_options_are_typed() -> None:
    trainer = _digits(options={"lr": 1, "batch_size": 8, "amp": False})
    assert trainer.options.lr == 1.0 and isinstance(trainer.options.lr, float)
    assert trainer.train(2).examples == 16


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in {"cuda", "mps", "cpu"}
    for name in ("abacus", "meta", "cuda:x"):  # meta is torch's, and crashed the first round
        with pytest.raises(ConfigError, match=f"device '{name}' is not one of auto, cpu, cuda, mps"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            _digits(device="cuda")


class _PerExampleDigits(DigitsMLPTrainer):
    """A DP-SGD-style hook: per-example gradients with torch.func, clipped."""

    clip = 1e9  # large: must reproduce the plain mean gradient exactly
    calls = 0

    def compute_gradients(self, batch: Batch) -> torch.Tensor:
        type(self).calls += 1
        params = {k: v.detach() for k, v in self.model.named_parameters()}

        def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(self.model, p, (x.unsqueeze(0),))
            return self.loss_fn(out, y.unsqueeze(0))

        grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, batch.x, batch.y)
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        scale = (self.clip / (norms + 1e-12)).clamp(max=1.0)
        for name, p in self.model.named_parameters():
            g = grads[name]
            p.grad = (g * scale.view(-1, *[1] * (g.dim() - 1))).mean(0)
        with torch.no_grad():
            return self.loss_fn(self.model(batch.x), batch.y)


def test_gradient_hook_with_torch_func_matches_default_and_clipping_bites() -> None:
    plain, hooked = _digits(seed=3), _PerExampleDigits(TrainerContext(0, 1, 3, device="cpu"))
    plain.train(5)
    hooked.train(5)
    assert _PerExampleDigits.calls == 5
    assert torch.allclose(plain.get_flat(), hooked.get_flat(), atol=1e-5)
    clipped = _PerExampleDigits(TrainerContext(0, 1, 3, device="cpu", options={"momentum": 0.0}))
    clipped.clip = 1e-3
    start = clipped.get_flat()
    clipped.train(5)
    moved = (clipped.get_flat() - start).norm()
    # Each step moves by lr * (mean of per-example gradients of norm <= clip).
    assert 0 < moved <= 5 * 0.05 * 1e-3 * (1 + 1e-4)


# ---------------------------------------------------------------- attacks


def test_label_flip_attacker_learns_the_flip_and_honest_node_does_not() -> None:
    honest, attacker = _digits(), _digits(attack="label_flip")
    for t in (honest, attacker):
        t.train(500)
    assert honest.attack_success_rate("label_flip") < 0.1
    assert attacker.attack_success_rate("label_flip") > 0.9
    assert attacker.evaluate().accuracy > 0.6  # other classes still learnt


def test_backdoor_attacker_learns_the_trigger() -> None:
    honest, attacker = _digits(), _digits(attack="backdoor")
    assert attacker.train_size == 2 * honest.train_size
    for t in (honest, attacker):
        t.train(500)
    assert honest.attack_success_rate("backdoor") < 0.3
    assert attacker.attack_success_rate("backdoor") > 0.9
    assert attacker.evaluate().accuracy > 0.85  # clean accuracy kept: a stealthy backdoor


def test_probe_reports_each_models_loss_and_outputs_on_the_probe_sample() -> None:
    trainer = _digits(0, 4)
    initial = trainer.get_flat().clone()
    trainer.train(20)
    trained = trainer.get_flat()
    result = trainer.probe_models([initial, trained])
    assert torch.equal(trainer.get_flat(), trained)  # the probe leaves the model alone
    probe = trainer._probe
    assert probe is not None and len(probe.y) == 128
    with torch.no_grad():
        logits = trainer.model.eval()(probe.x)
    assert torch.allclose(result.outputs[1], logits, atol=1e-5)  # the trained model's own predictions
    assert result.outputs[0].shape == (128, 10) and not torch.allclose(result.outputs[0], logits)
    assert result.losses == pytest.approx([float(F.cross_entropy(o, probe.y)) for o in result.outputs], rel=1e-5)
    assert trainer.probe_losses([initial, trained]) == result.losses
    assert result.losses[1] < result.losses[0]
    # the engine hands the probe its models as a reference plus offsets, each made as it is read
    shifted = ShiftedModels(initial, [torch.zeros_like(initial), trained - initial])
    assert len(shifted) == 2 and torch.equal(shifted[0], initial) and torch.equal(shifted[-1], initial + (trained - initial))
    assert [torch.equal(a, b) for a, b in zip(shifted[:2], [shifted[0], shifted[1]], strict=True)] == [True, True]
    assert trainer.probe_losses(shifted) == pytest.approx(result.losses, rel=1e-5)


def test_unknown_attack_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown attack"):
        _digits(attack="sybil_flood")
    with pytest.raises(ConfigError, match="unknown attack"):
        _digits().attack_success_rate("sybil_flood")


# ---------------------------------------------------------------- image trainers on files


@pytest.mark.parametrize("name", ["mnist-cnn", "fashion-mnist-cnn", "fashion-resnet"])
def test_cnn_trainers_read_idx_from_data_dir(tmp_path: Path, name: str) -> None:
    write_idx_dir(tmp_path)
    options: dict[str, object] = {"data_dir": str(tmp_path)}
    if name == "fashion-resnet":
        options["width"] = 8
    trainer = load_trainer(name)(
        TrainerContext(1, 2, 0, device="cpu", options=options, attack="backdoor")
    )
    assert trainer.train_size == 2 * 20
    flat = trainer.get_flat()
    stats = trainer.train(3)
    assert np.isfinite(stats.loss) and not torch.equal(flat, trainer.get_flat())
    assert trainer.evaluate().n == 12
    assert 0.0 <= trainer.attack_success_rate("backdoor") <= 1.0


def test_fashion_missing_dir_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_trainer("fashion-mnist-cnn")(
            TrainerContext(0, 1, 0, device="cpu", options={"data_dir": str(tmp_path / "none")})
        )


def test_mnist_cnn_on_bundled_mnist_5k() -> None:
    trainer = load_trainer("mnist-cnn")(TrainerContext(0, 4, 0, device="cpu", options={"batch_size": 16}))
    assert trainer.train_size == 1000
    before = trainer.evaluate()
    stats = trainer.train(30)
    after = trainer.evaluate()
    assert after.n == 1000 and np.isfinite(stats.loss)
    assert after.loss < before.loss
    assert 0.0 <= trainer.attack_success_rate("label_flip") <= 1.0


# ---------------------------------------------------------------- shakespeare


def _write_plays(directory: Path) -> None:
    speeches = {
        "LEAR": "Blow, winds, and crack your cheeks! rage! blow! " * 6,
        "FOOL": "He that has and a little tiny wit, with hey, ho, the wind and the rain. " * 4,
        "KENT": "Sir, I am too old to learn: call not your stocks for me. " * 5,
        "EDGAR": "Poor Tom's a-cold. Who gives any thing to poor Tom? " * 5,
    }
    (directory / "tragedies").mkdir(parents=True)
    body = "\n\n".join(f"**{name}**  \n{text}" for name, text in speeches.items())
    (directory / "tragedies" / "lear.md").write_text(f"# King Lear\n\n## ACT III\n\n{body}\n")


def test_shakespeare_trainer_assigns_whole_roles(tmp_path: Path) -> None:
    _write_plays(tmp_path)
    options = {"data_dir": str(tmp_path), "seq_len": 10, "stride": 3, "hidden": 16}
    trainers = [
        load_trainer("shakespeare-lstm")(TrainerContext(i, 2, 0, device="cpu", options=options))
        for i in range(2)
    ]
    ds = trainers[0].load_dataset()
    assert len(ds.group_names) == 4
    assert sum(t.train_size for t in trainers) == len(ds.y_train)
    held = [{tuple(row) for row in t._x_train.numpy()} for t in trainers]
    assert all(held)
    for group in range(len(ds.group_names)):
        windows = {tuple(row) for row in ds.x_train[ds.train_groups == group]}
        owners = [i for i, rows in enumerate(held) if windows & rows]
        assert len(owners) == 1 and windows <= held[owners[0]], "a role was split between nodes"
    before = trainers[0].evaluate()
    stats = trainers[0].train(20)
    assert np.isfinite(stats.loss) and trainers[0].evaluate().loss < before.loss
    with pytest.raises(ConfigError, match="does not support"):
        trainers[0].attack_success_rate("label_flip")
    with pytest.raises(ConfigError, match="does not support"):
        load_trainer("shakespeare-lstm")(TrainerContext(0, 2, 0, device="cpu", options=options, attack="backdoor"))


# ---------------------------------------------------------------- registry


USER_TRAINER = textwrap.dedent(
    """
    from __future__ import annotations

    import numpy as np
    from torch import nn

    from murmur.learning.data import ArrayDataset
    from murmur.learning.trainers.base import TorchTrainer


    def _blobs() -> ArrayDataset:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, size=400)
        x = (rng.normal(size=(400, 2)) + 3.0 * y[:, None]).astype(np.float32)
        return ArrayDataset(x[:300], y[:300], x[300:], y[300:], 2)


    class BlobTrainer(TorchTrainer):
        name = "blobs"

        def load_dataset(self) -> ArrayDataset:
            return _blobs()

        def build_model(self, dataset: ArrayDataset) -> nn.Module:
            return nn.Linear(2, 2)


    NOT_A_TRAINER = 3
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_trainer_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_TRAINER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _run_blobs(cls: type[Trainer]) -> None:
    trainer = cls(TrainerContext(0, 1, 0, device="cpu", options={"lr": 0.1}))
    trainer.train(100)
    assert trainer.evaluate().accuracy > 0.9


def test_builtin_names_resolve() -> None:
    for name, path in BUILTIN_TRAINERS.items():
        cls = load_trainer(name)
        assert cls.name == name and path.endswith(cls.__name__)


def test_module_colon_class_from_user_file(user_module: str) -> None:
    _run_blobs(load_trainer(f"{user_module}:BlobTrainer"))
    with pytest.raises(ConfigError, match="not a subclass"):
        load_trainer(f"{user_module}:NOT_A_TRAINER")
    with pytest.raises(ConfigError, match="no attribute 'Missing'"):
        load_trainer(f"{user_module}:Missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod_xyz'"):
        load_trainer("no_such_mod_xyz:Trainer")


def test_entry_point(user_module: str, tmp_path: Path) -> None:
    dist = tmp_path / "murmur_blobs-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: murmur-blobs\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nblobs = {user_module}:BlobTrainer\n")
    _run_blobs(load_trainer("blobs"))


def test_unknown_spec_says_what_was_tried() -> None:
    with pytest.raises(ConfigError) as info:
        load_trainer("cifar-resnet")
    text = str(info.value)
    assert "digits-mlp" in text and "package.module:Class" in text and ENTRY_POINT_GROUP in text


def test_torch_trainer_is_abstract() -> None:
    with pytest.raises(TypeError):
        TorchTrainer(TrainerContext(0, 1, 0))  # type: ignore[abstract]


# ---------------------------------------------------------------- the bigger built-in models


def test_fashion_resnet_is_a_million_parameter_residual_net_reporting_accuracy(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, size=28)
    cls = load_trainer("fashion-resnet")
    trainer = cls(TrainerContext(0, 2, 0, device="cpu", options={"data_dir": str(tmp_path)}))
    assert 0.9e6 < trainer.num_params() < 1.1e6
    assert cls.metric is Metric.ACCURACY
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.model.modules())  # no local running stats
    with pytest.raises(ConfigError, match="width"):
        cls(TrainerContext(0, 2, 0, device="cpu", options={"data_dir": str(tmp_path), "width": 12}))


def test_shakespeare_transformer_predicts_every_next_character_and_reports_perplexity(tmp_path: Path) -> None:
    _write_plays(tmp_path)
    options = {"data_dir": str(tmp_path), "seq_len": 12, "stride": 3, "width": 32, "layers": 2, "heads": 2,
               "lr": 3e-3, "batch_size": 8}
    cls = load_trainer("shakespeare-transformer")
    trainers = [cls(TrainerContext(i, 2, 0, device="cpu", options=options)) for i in range(2)]
    assert cls.metric is Metric.PERPLEXITY and checked(trainers[0]).metric is Metric.PERPLEXITY
    # the LSTM's per-role split: whole roles per node
    assert sum(t.train_size for t in trainers) == len(trainers[0].load_dataset().y_train)
    before = trainers[0].evaluate()
    assert before.n == len(trainers[0]._y_test) * 12  # every position of every held-out window is scored
    assert math.exp(before.loss) == pytest.approx(Metric.PERPLEXITY.of(before))
    initial = trainers[0].get_flat().clone()
    trainers[0].train(30)
    after = trainers[0].evaluate()
    assert Metric.PERPLEXITY.of(after) < 0.7 * Metric.PERPLEXITY.of(before)
    # SybilWall's probe scores a sequence model by its next-character loss on our own windows
    trained = trainers[0].get_flat()
    probed = trainers[0].probe_losses([initial, trained])
    assert probed[1] < 0.8 * probed[0]
    assert torch.equal(trainers[0].get_flat(), trained)  # the probe leaves the model alone
    # causal: a window's logits at position t do not depend on later characters
    model = trainers[0].model.eval()
    x = trainers[0]._x_test[:1].clone()
    changed = x.clone()
    changed[0, 6:] = ((changed[0, 6:].long() + 1) % 90).to(x.dtype)
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :6], model(changed)[0, :6], atol=1e-5)
    with pytest.raises(ConfigError, match="dp_clip"):
        cls(TrainerContext(0, 2, 0, device="cpu", options={**options, "dp_clip": 1.0}))


def test_default_transformer_has_several_million_parameters() -> None:
    from murmur.learning.trainers.transformer import CharTransformer

    model = CharTransformer(96, 64, 256, 4, 4, 0.0)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 4e6


def test_adamw_inner_optimizer_is_an_option() -> None:
    trainer = _digits(options={"optimizer": "adamw", "lr": 1e-3})
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optimizer"):
        _digits(options={"optimizer": "lion"})


def test_the_transformer_says_why_only_for_the_options_it_refused() -> None:
    """A user asking for example-level privacy (dp_clip) was told that width
    must be a multiple of heads, which they had not touched."""
    from murmur.learning.trainers.transformer import TransformerOptions

    with pytest.raises(ConfigError) as dp:
        TransformerOptions(dp_clip=1.0).validate()
    assert "dp_clip=1.0" in str(dp.value) and 'level = "user"' in str(dp.value)
    assert "heads" not in str(dp.value)
    with pytest.raises(ConfigError) as shape:
        TransformerOptions(width=10, heads=4).validate()
    assert "width must be a multiple of heads" in str(shape.value) and "dp_clip" not in str(shape.value)


def test_dp_sgd_batches_are_poisson_draws_nobody_can_predict() -> None:
    """With dp_clip > 0 every example is in each batch on its own with
    probability batch/n (what the accountant assumes), and a node's draws
    come from fresh OS randomness: seeded epochs of fixed-size batches were
    reproducible by anyone from the network's seed, and amplified nothing."""
    options = {"dp_clip": 1.0, "batch_size": 16, "momentum": 0.0}
    public = [_digits(options=options)._batches for _ in range(2)]
    assert isinstance(public[0], _PoissonSampler) and public[0].expected == 16
    assert all(torch.equal(public[0].next(), public[1].next()) for _ in range(5))  # simulations: reproducible
    secret = [_digits(options=options, secret_batches=True)._batches for _ in range(2)]
    draws = [[s.next() for _ in range(200)] for s in secret]
    assert not all(torch.equal(a, b) for a, b in zip(*draws, strict=True))  # a node's: its own, unpredictable
    sizes = torch.tensor([len(d) for d in draws[0]], dtype=torch.float64)
    assert sizes.std() > 1.0 and abs(float(sizes.mean()) - 16) < 1.5  # Binomial(n, 16/n), not 16 every time
    n = secret[0]._n
    hits = torch.zeros(n)
    for d in draws[0]:
        hits[d] += 1
    assert abs(float(hits.mean()) - 200 * 16 / n) < 0.5  # each example about q of the time


def test_a_dp_sgd_step_divides_by_the_expected_batch() -> None:
    """One example moves the step by at most lr·C/batch whatever a draw's
    size: the clipped sum is divided by the expected size."""
    from murmur.learning.privacy.dpsgd import clipped_mean_grad

    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    mean = clipped_mean_grad(model, torch.nn.CrossEntropyLoss(), x, y, 0.5)
    over_eight = clipped_mean_grad(model, torch.nn.CrossEntropyLoss(), x, y, 0.5, denominator=8)
    for name in mean:
        torch.testing.assert_close(over_eight[name], mean[name] * 5 / 8)
