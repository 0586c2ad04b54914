"""Find a trainer class from a config string.

A spec is tried as, in order:

1. a built-in name (:data:`BUILTIN_TRAINERS`, the one table of them);
2. ``package.module:Class`` (``Class`` may be a dotted attribute path);
3. the name of an entry point in group ``murmur.trainers`` — how a separately
   installed package contributes a trainer without touching murmur.

Built-ins are listed as import paths, not imported classes, so naming
``digits-mlp`` never imports the Shakespeare code (and vice versa), and this
module imports no torch: :func:`check_trainer_name` vets a spec for a node
that does not learn without loading anything.

Drivers build their trainer with :func:`create_trainer`, which puts it behind
the contract checks of :mod:`murmur.learning.trainers.checked`.

The directory murmur was started from is importable for ``module:Class``
(as with ``python -m``): a user's ``mymod.py`` next to their config is found
without ``PYTHONPATH=.``. It is searched after the installed packages, so it
cannot shadow one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from murmur.errors import ConfigError, MurmurError

if TYPE_CHECKING:
    from murmur.learning.trainers.base import Trainer, TrainerContext

ENTRY_POINT_GROUP = "murmur.trainers"

BUILTIN_TRAINERS: Mapping[str, str] = MappingProxyType(
    {
        "digits-mlp": "murmur.learning.trainers.digits:DigitsMLPTrainer",
        "mnist-cnn": "murmur.learning.trainers.mnist:MnistCNNTrainer",
        "fashion-mnist-cnn": "murmur.learning.trainers.fashion:FashionCNNTrainer",
        "shakespeare-lstm": "murmur.learning.trainers.shakespeare:ShakespeareLSTMTrainer",
        "shakespeare-transformer": "murmur.learning.trainers.transformer:ShakespeareTransformerTrainer",
        "fashion-resnet": "murmur.learning.trainers.resnet:FashionResNetTrainer",
    }
)


def _working_directory_importable() -> None:
    """Append the working directory to ``sys.path`` unless it is already there
    (``python -m`` puts it first; a console script does not)."""
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.append(cwd)


def _split(path: str) -> tuple[str, str]:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"{path!r} is not of the form package.module:Class")
    return module_name, attr_path


def _import_object(path: str) -> object:
    module_name, attr_path = _split(path)
    _working_directory_importable()
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} for trainer {path!r}: {exc} "
            f"(searched the Python path and the working directory {os.getcwd()})"
        ) from None
    except Exception as exc:  # the plug-in's own code failed: SyntaxError, NameError, ...
        raise ConfigError(f"importing module {module_name!r} for trainer {path!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _check_trainer(obj: object, origin: str) -> type[Trainer]:
    from murmur.learning.trainers.base import Trainer  # late: torch

    if not (isinstance(obj, type) and issubclass(obj, Trainer)):
        raise ConfigError(f"{origin} is {obj!r}, not a subclass of murmur Trainer")
    return obj


def _entry_points(spec: str) -> list[importlib.metadata.EntryPoint]:
    return [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]


def _unknown(spec: str) -> ConfigError:
    return ConfigError(
        f"unknown trainer {spec!r}: not a built-in ({', '.join(BUILTIN_TRAINERS)}), "
        f"not of the form package.module:Class, and no entry point named {spec!r} "
        f"in group {ENTRY_POINT_GROUP!r}"
    )


def load_trainer(spec: str) -> type[Trainer]:
    """The trainer class named by ``spec``; :class:`ConfigError` says what was tried."""
    if spec in BUILTIN_TRAINERS:
        return _check_trainer(_import_object(BUILTIN_TRAINERS[spec]), f"built-in {spec!r}")
    if ":" in spec:
        return _check_trainer(_import_object(spec), f"trainer {spec!r}")
    matches = _entry_points(spec)
    if matches:
        try:
            loaded = matches[0].load()
        except Exception as exc:
            raise ConfigError(f"entry point {spec!r} ({matches[0].value}) failed to load: {exc}") from None
        return _check_trainer(loaded, f"entry point {spec!r} ({matches[0].value})")
    raise _unknown(spec)


def create_trainer(spec: str, ctx: TrainerContext) -> Trainer:
    """A trainer named by ``spec`` for ``ctx``, its return values checked
    (a contract violation is a ``TrainerError`` naming the method).

    A trainer that cannot be built (its data file is missing, its model
    fails) is a :class:`ConfigError` naming the trainer, the error and the
    line of the user's code it came from: a node cannot run with it, and
    restarting it changes nothing. It used to escape the daemon as a
    57-line traceback with exit code 1, which a supervisor restarts in a
    loop. The original exception stays chained to it."""
    from murmur.learning.trainers.checked import checked  # torch: only where a trainer is built

    cls = load_trainer(spec)
    try:
        trainer = cls(ctx)
    except MurmurError:
        raise
    except Exception as exc:
        raise ConfigError(f"trainer {spec!r} could not be built: {type(exc).__name__}: {exc}{where(exc, cls)}") from exc
    return checked(trainer)


def where(exc: BaseException, trainer: type | None = None) -> str:
    """`` (at FILE:LINE in FUNCTION)`` for the innermost frame of ``exc`` in
    the code of ``trainer`` (the files of the modules, or packages, its
    classes come from, murmur's excepted), else in code of the user's, not
    murmur's, an installed package's or the standard library's (the innermost
    of all when there is none). With ``trainer``, a trainer pip-installed into
    the node's environment is named too: a shape bug of its own in a torch
    call was reported at torch/nn/modules/linear.py:134 in forward."""
    import sysconfig
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    paths = sysconfig.get_paths()
    library = tuple(os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    ours = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))) + os.sep  # murmur/
    homes = _homes(trainer) if trainer is not None else ()
    own = [f for f in frames if homes and os.path.realpath(f.filename).startswith(homes)]
    user = own or [f for f in frames if not os.path.realpath(f.filename).startswith((*library, ours))]
    frame = (user or frames)[-1]
    return f" (at {frame.filename}:{frame.lineno} in {frame.name})"


def _homes(trainer: type) -> tuple[str, ...]:
    """Where ``trainer``'s own code lives: for each class of its MRO not
    murmur's, its module's file, or the directory of the package that module
    is in (a helper module of the same package is the user's code too)."""
    homes = []
    for cls in trainer.__mro__:
        top = cls.__module__.partition(".")[0]
        if top in ("murmur", "builtins", "abc"):
            continue
        package = sys.modules.get(top)
        file = getattr(package, "__file__", None)
        if not file:
            continue
        file = os.path.realpath(file)
        is_package = hasattr(package, "__path__")
        homes.append(os.path.dirname(file) + os.sep if is_package else file)
    return tuple(dict.fromkeys(homes))


def check_trainer_name(spec: str) -> None:
    """Whether ``spec`` names a trainer that :func:`load_trainer` could find,
    without importing it (no torch): a built-in name, an entry point, or a
    ``module:Class`` whose module exists. For a node that does not learn."""
    if spec in BUILTIN_TRAINERS or _entry_points(spec):
        return
    if ":" not in spec:
        raise _unknown(spec)
    module_name, _ = _split(spec)
    _working_directory_importable()
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:  # a parent package that is missing or fails
        raise ConfigError(f"cannot find module {module_name!r} for trainer {spec!r}: {exc}") from None
    if found is None:
        raise ConfigError(f"cannot find module {module_name!r} for trainer {spec!r} "
                          f"(searched the Python path and the working directory {os.getcwd()})")
