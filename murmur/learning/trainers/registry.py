"""Find a trainer class from a config string.

A spec is tried as, in order:

1. a built-in name (:data:`BUILTIN_TRAINERS`, the one table of them);
2. ``package.module:Class`` (``Class`` may be a dotted attribute path);
3. the name of an entry point in group ``murmur.trainers`` — how a separately
   installed package contributes a trainer without touching murmur.

Built-ins are listed as import paths, not imported classes, so naming
``digits-mlp`` never imports the Shakespeare code (and vice versa).

Drivers build their trainer with :func:`create_trainer`, which puts it behind
the contract checks of :mod:`murmur.learning.trainers.checked`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from types import MappingProxyType

from murmur.errors import ConfigError
from murmur.learning.trainers.base import Trainer, TrainerContext
from murmur.learning.trainers.checked import checked

ENTRY_POINT_GROUP = "murmur.trainers"

BUILTIN_TRAINERS: Mapping[str, str] = MappingProxyType(
    {
        "digits-mlp": "murmur.learning.trainers.digits:DigitsMLPTrainer",
        "mnist-cnn": "murmur.learning.trainers.mnist:MnistCNNTrainer",
        "fashion-mnist-cnn": "murmur.learning.trainers.fashion:FashionCNNTrainer",
        "shakespeare-lstm": "murmur.learning.trainers.shakespeare:ShakespeareLSTMTrainer",
    }
)


def _import_object(path: str) -> object:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"{path!r} is not of the form package.module:Class")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} for trainer {path!r}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _check_trainer(obj: object, origin: str) -> type[Trainer]:
    if not (isinstance(obj, type) and issubclass(obj, Trainer)):
        raise ConfigError(f"{origin} is {obj!r}, not a subclass of murmur Trainer")
    return obj


def load_trainer(spec: str) -> type[Trainer]:
    """The trainer class named by ``spec``; :class:`ConfigError` says what was tried."""
    if spec in BUILTIN_TRAINERS:
        return _check_trainer(_import_object(BUILTIN_TRAINERS[spec]), f"built-in {spec!r}")
    if ":" in spec:
        return _check_trainer(_import_object(spec), f"trainer {spec!r}")
    matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if matches:
        try:
            loaded = matches[0].load()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"entry point {spec!r} ({matches[0].value}) failed to load: {exc}") from exc
        return _check_trainer(loaded, f"entry point {spec!r} ({matches[0].value})")
    raise ConfigError(
        f"unknown trainer {spec!r}: not a built-in ({', '.join(BUILTIN_TRAINERS)}), "
        f"not of the form package.module:Class, and no entry point named {spec!r} "
        f"in group {ENTRY_POINT_GROUP!r}"
    )


def create_trainer(spec: str, ctx: TrainerContext) -> Trainer:
    """A trainer named by ``spec`` for ``ctx``, its return values checked
    (a contract violation is a ``TrainerError`` naming the method)."""
    return checked(load_trainer(spec)(ctx))
