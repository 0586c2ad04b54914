"""The trainer contract (``Trainer``) and a torch implementation helper (``TorchTrainer``).

A trainer owns one node's model and local data. The rest of murmur sees only
flat float32 parameter vectors (``get_flat``/``set_flat``), so aggregation,
privacy noise and the wire format never depend on a model's layer structure.

Reproducibility rules, and why:

* The initial model is built from ``ctx.seed`` alone (the seed the whole
  network shares), never from the node index: deltas of different nodes are
  only comparable if they start from the same point in round 0.
* Data shuffling is seeded from ``(ctx.seed, ctx.node_index)``: nodes draw
  different batch orders, yet a rerun of the same network is identical.
* Model construction happens inside :func:`.globalrng.forked_global_rng`, so
  building a trainer never disturbs another trainer's (or the caller's) RNG
  state, and two trainers built at once in one process do not interleave
  their draws.
"""

from __future__ import annotations

import enum
import importlib
import math
import secrets
import threading
import types
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from murmur.errors import ConfigError
from murmur.learning import attacks, partition
from murmur.learning.data import ArrayDataset
from murmur.learning.options import check_device
from murmur.learning.options import parse_options as _parse_options
from murmur.learning.privacy import dpsgd
from murmur.learning.probe import ProbeResult
from murmur.learning.trainers.fit import check_fit, check_per_example
from murmur.learning.trainers.globalrng import forked_global_rng

#: Stream tag for the per-node shuffling seed (kept apart from other uses of
#: the network seed, e.g. the partition's).
_SHUFFLE_STREAM = 0x5F1E
#: Seed of the fixed subsample used when ``max_test_samples`` caps the test set.
_TEST_SUBSAMPLE_SEED = 7
#: Stream tag of the probe sample's seed (see ``probe_models``).
_PROBE_STREAM = 0x9B0BE
#: Training examples ``probe_models`` evaluates models on.
PROBE_SAMPLES = 128


@dataclass(frozen=True)
class TrainerContext:
    """Everything a trainer needs from the node; see ARCHITECTURE.md."""

    node_index: int
    num_nodes: int
    seed: int  # shared by the whole network
    partition: str = "iid"
    alpha: float = 0.5
    shards: int = 2
    device: str | None = None  # None: cuda > mps > cpu
    options: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    attack: str | None = None  # "label_flip" | "backdoor": poison this node's data
    # DP-SGD's batches (dp_clip > 0) from fresh OS randomness: a node's, which
    # nobody can predict. Else from ``seed`` (simulations, reproducible).
    secret_batches: bool = False


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps
    examples: int  # samples processed (steps x batch size)
    steps: int


@dataclass(frozen=True)
class EvalStats:
    loss: float  # mean cross-entropy on the test set
    accuracy: float
    n: int  # number of test samples


class Metric(enum.StrEnum):
    """The quality a trainer reports (status, metrics rows, testnet report),
    computed from its :class:`EvalStats`: a classifier's test accuracy, or
    a language model's perplexity, exp(mean cross-entropy per token)."""

    ACCURACY = "accuracy"
    PERPLEXITY = "perplexity"

    def of(self, stats: EvalStats) -> float:
        return self.from_loss_and_accuracy(stats.loss, stats.accuracy)

    def from_loss_and_accuracy(self, loss: float, accuracy: float) -> float:
        if self is Metric.PERPLEXITY:
            return math.exp(min(loss, 700.0))  # a diverged model is inf-like, not an overflow
        return accuracy

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.ACCURACY


def resolve_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (and usable), else cuda > mps > cpu."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(requested)
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {requested!r} requested but MPS is not available")
    return device


OPTIMIZER_SUPPORT = "torch._dynamo"
"""What every ``torch.optim`` optimizer imports on first use: its
``add_param_group``, ``zero_grad`` and ``step`` are wrapped by torch's dynamo
guards, which import it unconditionally (``TORCH_COMPILE_DISABLE`` does not
skip it), 1.9-2.3 s of CPU on a 2-core box."""


def import_optimizer_support() -> None:
    """Import :data:`OPTIMIZER_SUPPORT`, so that a node's first train step
    does not: ``node start`` runs this in a thread once it listens, while it
    links to its first neighbours and waits for them
    (``learning.start_wait_s``). Only after the node's own imports are done:
    two threads importing modules that import each other can get a
    half-initialised module. A second importer of the same module waits for
    the first, so a train step that needs it sooner is still correct."""
    importlib.import_module(OPTIMIZER_SUPPORT)


class Trainer(ABC):
    """One node's model and data. Implementations may use any framework
    internally; the interface is torch tensors of flat float32 parameters."""

    name: ClassVar[str] = "trainer"
    #: What :meth:`evaluate` is judged by (accuracy unless a trainer says otherwise).
    metric: ClassVar[Metric] = Metric.ACCURACY
    device: torch.device

    def __init__(self, ctx: TrainerContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def num_params(self) -> int: ...

    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of the tensors the flat vector concatenates, for the
        model fingerprint peers compare before learning together. One flat
        vector unless a trainer knows better (TorchTrainer does)."""
        return ((self.num_params(),),)

    @abstractmethod
    def get_flat(self) -> torch.Tensor:
        """A float32 1-D *copy* of the parameters on ``self.device``."""

    @abstractmethod
    def set_flat(self, flat: torch.Tensor) -> None:
        """Overwrite the parameters from a flat vector of ``num_params()`` values."""

    @abstractmethod
    def train(self, steps: int | None = None) -> TrainStats:
        """Run ``steps`` local optimisation steps (None: the options' default)."""

    @abstractmethod
    def evaluate(self) -> EvalStats:
        """Loss and accuracy on the held-out test set."""

    @abstractmethod
    def attack_success_rate(self, attack: str) -> float:
        """Accuracy on the flipped / backdoored test set (see ``attacks``)."""

    def probe_models(self, models: Sequence[torch.Tensor]) -> ProbeResult | None:
        """Mean loss and outputs of each flat model on a fixed sample of this
        node's own training data, without changing the trainer's model; None
        (the default) when the trainer cannot. SybilWall uses it to take
        weight from a neighbour whose model does clearly worse on our data
        than ours (a behavioural check: a flipped label costs loss where no
        geometry shows it) and to compare neighbours by what their models
        predict (``functional``)."""
        return None

    def probe_losses(self, models: Sequence[torch.Tensor]) -> list[float] | None:
        """The losses of :meth:`probe_models`."""
        result = self.probe_models(models)
        return None if result is None else result.losses


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class TorchOptions:
    """Options every :class:`TorchTrainer` understands. Trainers subclass this
    to change defaults or add fields; :func:`parse_options` does the checking."""

    lr: float = 0.05
    batch_size: int = 32
    local_steps: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 1024
    max_test_samples: int = 0  # 0: the whole test set
    amp: bool = True  # autocast + GradScaler, only ever on CUDA
    #: The inner optimizer: "sgd" (with ``momentum``) or "adamw" (betas 0.9,
    #: 0.95 as DiLoCo's inner AdamW; ``weight_decay`` decoupled). Its state
    #: lives in the trainer across rounds (not checkpointed).
    optimizer: str = "sgd"
    #: Example-level DP-SGD: clip every example's gradient to this L2 norm
    #: before the batch mean (0: off). One step's mean gradient then moves by
    #: at most dp_clip/batch_size per example; the trainer adds no noise — the
    #: node's privacy stage adds it to the round delta. With local_steps=1 and
    #: momentum=0 the delta is −lr·(clipped mean gradient), so noise on the
    #: delta is DP-SGD noise on the gradient (Abadi et al., CCS 2016; example level).
    dp_clip: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that type-check but make no sense."""
        checks = {
            # TOML writes inf and nan: both pass a bare comparison (or fail it
            # silently), and an infinite lr trains a NaN model without a word.
            "lr": 0 < self.lr < math.inf,
            "batch_size": self.batch_size >= 1,
            "local_steps": self.local_steps >= 1,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": 0 <= self.weight_decay < math.inf,
            "eval_batch_size": self.eval_batch_size >= 1,
            "max_test_samples": self.max_test_samples >= 0,
            "dp_clip": 0 <= self.dp_clip < math.inf,
            "optimizer": self.optimizer in INNER_OPTIMIZERS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid trainer option(s): "
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            )


INNER_OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETAS = (0.9, 0.95)

O = TypeVar("O", bound=TorchOptions)


def parse_options(cls: type[O], raw: Mapping[str, Any]) -> O:
    """Build ``cls`` from a config mapping: unknown keys, wrong types and
    invalid values are :class:`ConfigError`\\ s naming the option."""
    return _parse_options(cls, raw, "trainer")


# ---------------------------------------------------------------- torch trainer


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # inputs on the trainer's device
    y: torch.Tensor  # int64 class labels on the trainer's device


class _BatchSampler:
    """Endless epochs of seeded random batches over ``n`` samples."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self._n = n
        self._batch = self.expected = min(batch_size, n)
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n, generator=self._gen)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self._batch > self._n:
            self._order = torch.randperm(self._n, generator=self._gen)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self._batch]
        self._pos += self._batch
        return idx


class _PoissonSampler:
    """DP-SGD's batches: every example in with probability q = batch/n, on
    its own, each draw (Poisson sampling, what the example-level accountant
    assumes). Fixed-size batches of seeded epochs were what ran: each
    example in a known 7-10 of 100 batches, reproducible by anyone from the
    network's seed, so the sampling amplified nothing (ε 23.9 where 10 was
    reported, in the audit's 4-node digits run). ``expected`` (= batch) is
    what a step's gradient sum is divided by, whatever a draw's size."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self._n = n
        self.expected = min(batch_size, n)
        self._q = self.expected / n
        self._gen = generator

    def next(self) -> torch.Tensor:
        return torch.nonzero(torch.rand(self._n, generator=self._gen) < self._q).flatten()


def _batch_generator(ctx: TrainerContext) -> torch.Generator:
    """Seeded from fresh OS randomness (``secret_batches``) or from the network's seed."""
    seed = secrets.randbits(63) if ctx.secret_batches else _shuffle_seed(ctx.seed, ctx.node_index)
    return torch.Generator().manual_seed(seed)


def _shuffle_seed(seed: int, node_index: int) -> int:
    state = np.random.SeedSequence([_SHUFFLE_STREAM, seed, node_index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class TorchTrainer(Trainer):
    """Classification trainer on in-memory tensors: SGD, seeded batches, AMP.

    Subclasses provide :meth:`load_dataset` (a cached :class:`ArrayDataset`)
    and :meth:`build_model`, and may set ``Options`` to their own
    :class:`TorchOptions` subclass. The base partitions the pool
    (``ctx.partition``; whole groups when the data set has ``train_groups``),
    poisons it when ``ctx.attack`` is set, and moves this node's share to the
    device once.

    **Gradient hook.** Each step calls :meth:`compute_gradients`, which must
    leave the gradient of the batch loss in every parameter's ``.grad`` and
    return the (detached) mean loss; the base then runs the optimiser step.
    The default is a plain mean cross-entropy backward, with autocast and
    GradScaler loss scaling on CUDA. An override — e.g. DP-SGD per-example
    clipping with ``torch.func`` (``privacy/dpsgd.py``) — must write *true,
    unscaled* fp32 gradients; the base notices the override and then turns the
    GradScaler off and steps the optimiser directly (autocast in the forward
    pass stays the override's choice). ``self.model``, ``self.loss_fn`` and
    ``self.device`` are available to it; the batch is a :class:`Batch`.
    """

    Options: ClassVar[type[TorchOptions]] = TorchOptions
    #: False for trainers whose inputs are not images (see ``attacks``).
    supports_attacks: ClassVar[bool] = True
    #: Examples of the training data :meth:`probe_models` scores each model on
    #: (SybilWall, the default aggregator, probes every neighbour every round).
    probe_samples: ClassVar[int] = PROBE_SAMPLES

    def __init__(self, ctx: TrainerContext) -> None:
        super().__init__(ctx)
        self._interrupted = threading.Event()  # see interrupt()
        self._optimizer: torch.optim.Optimizer | None = None  # built on first use (see optimizer)
        self._optimizer_lock = threading.Lock()
        self.options = parse_options(self.Options, ctx.options)
        self.device = resolve_device(ctx.device)
        self._attack = self._parse_attack(ctx.attack) if ctx.attack is not None else None
        spec = partition.PartitionSpec(
            partition.PartitionKind.parse(ctx.partition), ctx.alpha, ctx.shards
        )

        dataset = self.load_dataset()
        with forked_global_rng(ctx.seed):  # one build at a time in this process (see globalrng)
            model = self.build_model(dataset)
        self.model: nn.Module = model.to(self.device)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_fn: nn.Module = nn.CrossEntropyLoss()
        self._amp = self.options.amp and self.device.type == "cuda"
        # An overridden gradient hook, or dp_clip, writes true gradients, so loss
        # scaling is off for it (also when it calls super().compute_gradients()).
        self._default_gradients = (
            type(self).compute_gradients is TorchTrainer.compute_gradients and self.options.dp_clip == 0
        )
        self._dp_linear = dpsgd.linear_only(self.model)
        self._scaler = torch.amp.GradScaler("cuda", enabled=self._amp and self._default_gradients)

        own = partition.node_indices(
            dataset.y_train, ctx.node_index, ctx.num_nodes, ctx.seed, spec, dataset.train_groups
        )
        if self._attack is not None:
            poisoned = attacks.poison_training_set(
                self._attack, dataset.x_train, dataset.y_train, own
            )
            x_train, y_train = poisoned.x, poisoned.y
        else:
            x_train, y_train = dataset.x_train[own], dataset.y_train[own]
        self._x_train = self._to_device(x_train)
        self._y_train = self._to_device(y_train)
        self._x_test_np, self._y_test_np = self._test_subset(dataset)
        self._x_test = self._to_device(self._x_test_np)
        self._y_test = self._to_device(self._y_test_np)
        # A model that cannot take its data fails here, naming itself, not in round 1 (trainers/fit.py).
        fit_x, fit_y = (self._x_train, self._y_train) if len(y_train) else (self._x_test, self._y_test)
        check_fit(f"trainer {type(self).__name__}", self.model, dataset, fit_x, fit_y,
                  lambda logits, x, y: self.probe_loss(logits, Batch(x, y)))
        if self.options.dp_clip > 0:
            check_per_example(f"trainer {type(self).__name__}", self.model)
        self._batches: _BatchSampler | _PoissonSampler = (
            _PoissonSampler(len(y_train), self.options.batch_size, _batch_generator(ctx)) if self.options.dp_clip > 0
            else _BatchSampler(len(y_train), self.options.batch_size, _shuffle_seed(ctx.seed, ctx.node_index)))
        self._probe: Batch | None = None  # drawn on first use (probe_losses)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer (``options.optimizer``), built on first use.

        Why not in ``__init__``: building any ``torch.optim`` optimizer imports
        ``torch._dynamo`` (``add_param_group`` and ``step`` are wrapped by
        torch's dynamo guards, with no flag to skip the import), 1.9-2.3 s of
        CPU on a 2-core box. ``murmur config check`` builds the trainer only to
        check that it fits its data, so it paid that for an optimizer it never
        uses (3.4-4.8 s for the default digits-mlp, 2.5-3.5 s without);
        ``node start`` imports it ahead in a thread while it waits for its
        first neighbours (:func:`import_optimizer_support`), else the first
        step, in a worker thread, imports it. The
        optimizer holds the same parameter objects and starts with empty state
        either way, so training is bit-for-bit the same. A subclass may assign
        its own optimizer (``self.optimizer = ...``) after ``super().__init__``.
        """
        with self._optimizer_lock:  # the first train() and a hook of the user's may race
            if self._optimizer is None:
                self._optimizer = self._new_optimizer()
            return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        with self._optimizer_lock:
            self._optimizer = optimizer

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.options.optimizer == "adamw":
            return torch.optim.AdamW(
                self._params, lr=self.options.lr, betas=ADAMW_BETAS, weight_decay=self.options.weight_decay
            )
        return torch.optim.SGD(
            self._params,
            lr=self.options.lr,
            momentum=self.options.momentum,
            weight_decay=self.options.weight_decay,
        )

    # -- subclass interface

    @abstractmethod
    def load_dataset(self) -> ArrayDataset:
        """The full training pool and test set (cache it: many nodes share a process)."""

    @abstractmethod
    def build_model(self, dataset: ArrayDataset) -> nn.Module:
        """A fresh model; called under ``torch.manual_seed(ctx.seed)``."""

    def compute_gradients(self, batch: Batch) -> torch.Tensor:
        """Fill ``.grad`` for one batch and return the detached mean loss (the hook).

        With ``options.dp_clip`` > 0: the mean of per-example gradients each
        clipped to ``dp_clip`` (fp32, no autocast), by the exact Linear-layer
        fast path when the model allows it, else ``vmap`` per-example grads.
        """
        if self.options.dp_clip > 0:
            return self._dp_clipped_gradients(batch)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self._amp):
            loss = self.loss_fn(self.model(batch.x), batch.y)
        self._scaler.scale(loss).backward()
        return loss.detach()

    def _dp_clipped_gradients(self, batch: Batch) -> torch.Tensor:
        clip = self.options.dp_clip
        expected = self._batches.expected  # a Poisson draw's size varies; what a step is divided by does not
        if len(batch.y) == 0:  # a Poisson draw of no example: a zero gradient
            dpsgd.apply_grads(self.model, {n: torch.zeros_like(p) for n, p in self.model.named_parameters()})
            return torch.zeros((), device=self.device)
        if self._dp_linear:
            grads, loss = dpsgd.linear_clipped_mean_grad(self.model, self.loss_fn, batch.x, batch.y, clip, expected)
        else:
            grads = dpsgd.clipped_mean_grad(self.model, self.loss_fn, batch.x, batch.y, clip, denominator=expected)
            with torch.no_grad():
                loss = self.loss_fn(self.model(batch.x), batch.y)
        dpsgd.apply_grads(self.model, grads)
        return loss.detach()

    # -- Trainer

    @property
    def train_size(self) -> int:
        """Number of samples in this node's (possibly poisoned) training set."""
        return len(self._y_train)

    def num_params(self) -> int:
        return sum(p.numel() for p in self._params)

    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(p.shape) for p in self._params)

    def get_flat(self) -> torch.Tensor:
        # torch.cat inside allocates a new vector: no clone on top (every round reads it)
        return nn.utils.parameters_to_vector(self._params).detach().to(torch.float32)

    def set_flat(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.num_params():
            raise ValueError(
                f"flat vector of shape {tuple(flat.shape)} does not fit {self.num_params()} parameters"
            )
        with torch.no_grad():
            nn.utils.vector_to_parameters(flat.to(self.device, torch.float32), self._params)

    def train(self, steps: int | None = None) -> TrainStats:
        steps = self.options.local_steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.model.train()
        total = torch.zeros((), device=self.device)
        examples = 0
        done = 0
        for _ in range(steps):
            if self._interrupted.is_set():
                break
            idx = self._batches.next().to(self.device, non_blocking=True)
            batch = Batch(self._x_train[idx], self._y_train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            total += self.compute_gradients(batch).float()
            # With the scaler disabled (CPU, MPS, or a custom hook) step() is a
            # plain optimizer.step(); with it, steps with inf/NaN gradients are skipped.
            self._scaler.step(self.optimizer)
            self._scaler.update()
            examples += len(idx)
            done += 1
        mean_loss = float(total.item()) / done if done else 0.0
        return TrainStats(loss=mean_loss, examples=examples, steps=done)

    def interrupt(self) -> None:
        """End a :meth:`train` running in another thread at its next step, and
        every later one at once: the node is stopping. Its worker thread
        otherwise trained on after SIGTERM, for as long as a round's local
        steps take (52 s for 60,000 digits steps), and the process could not
        exit until it was done."""
        self._interrupted.set()

    def evaluate(self) -> EvalStats:
        loss_sum, correct = 0.0, 0
        for logits, y in self._logits(self._x_test, self._y_test):
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == y).sum().item())
        n = len(self._y_test)
        return EvalStats(loss=loss_sum / n, accuracy=correct / n, n=n)

    def attack_success_rate(self, attack: str) -> float:
        kind = self._parse_attack(attack)
        target = attacks.attack_test_set(kind, self._x_test_np, self._y_test_np)
        x, y = self._to_device(target.x), self._to_device(target.y)
        predictions = [logits.argmax(dim=1).cpu() for logits, _ in self._logits(x, y)]
        if not predictions:
            return 0.0
        return attacks.success_rate(torch.cat(predictions).numpy(), target)

    def probe_models(self, models: Sequence[torch.Tensor]) -> ProbeResult:
        """Cross-entropy and logits of each model on ``probe_samples`` of our (possibly
        poisoned) training examples, drawn once with the node's seed; the
        model's own parameters are left alone (``torch.func.functional_call``)."""
        if self._probe is None:
            count = min(self.probe_samples, len(self._y_train))
            gen = torch.Generator().manual_seed(_shuffle_seed(self.ctx.seed, self.ctx.node_index) ^ _PROBE_STREAM)
            idx = torch.randperm(len(self._y_train), generator=gen)[:count].to(self.device)
            self._probe = Batch(self._x_train[idx], self._y_train[idx])
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        shapes = [p.shape for p in self._params]
        sizes = [math.prod(shape) for shape in shapes]
        was_training = self.model.training
        self.model.eval()
        losses, outputs = [], []
        try:
            with torch.no_grad():
                for flat in models:
                    parts = flat.to(self.device, torch.float32).split(sizes)
                    params = {n: part.view(shape) for n, part, shape in zip(names, parts, shapes, strict=True)}
                    logits = torch.func.functional_call(self.model, params, (self._probe.x,))
                    logits = logits.float()
                    losses.append(float(self.probe_loss(logits, self._probe)))
                    outputs.append(logits.reshape(-1, logits.shape[-1]))
        finally:
            self.model.train(was_training)
        return ProbeResult(losses, outputs)

    def probe_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The mean loss ``probe_models`` scores a model by: cross-entropy of
        one label per example (a sequence model predicts one per position)."""
        return F.cross_entropy(logits, batch.y)

    # -- helpers

    def _parse_attack(self, attack: str) -> attacks.AttackKind:
        kind = attacks.AttackKind.parse(attack)
        if not self.supports_attacks:
            raise ConfigError(f"trainer {self.name} does not support the {kind.value} attack")
        return kind

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Tensor on the device. On CPU a read-only cached array is aliased, not
        copied (many nodes share one test set); nothing here writes inputs."""
        array = np.ascontiguousarray(array)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array).to(self.device)

    def _test_subset(self, dataset: ArrayDataset) -> tuple[np.ndarray, np.ndarray]:
        cap = self.options.max_test_samples
        if cap == 0 or cap >= len(dataset.y_test):
            return dataset.x_test, dataset.y_test
        pick = np.sort(
            np.random.default_rng(_TEST_SUBSAMPLE_SEED).choice(len(dataset.y_test), cap, replace=False)
        )
        return dataset.x_test[pick], dataset.y_test[pick]

    def _logits(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield fp32 logits and labels per evaluation batch (eval mode, no grad)."""
        self.model.eval()
        step = self.options.eval_batch_size
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._amp):
            for start in range(0, len(y), step):
                yield self.model(x[start : start + step]).float(), y[start : start + step]
