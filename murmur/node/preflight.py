"""What a config cannot say about itself, checked before a node binds a port.

The schema (:mod:`murmur.node.config`) checks types, ranges and how options
relate. Whether the trainer a config names can be imported, whether its
options fit the trainer's ``Options``, whether the device exists, whether the
aggregator and its options are known, whether the data dir is writable and
the listen ports are free depends on the machine and the code installed on
it. Left to the daemon, each of these surfaced after the ports were bound, as
a traceback or a line on stdout with exit code 1.

Every check raises :class:`~murmur.errors.OptionError` naming the option to
change; :meth:`~murmur.node.config.ConfigSource.located` adds the file and
line. ``murmur node start`` and ``murmur config check`` run
:func:`check_node`; the testnet runs :func:`check_learner` on every scenario
before it starts a process. No data set is loaded and no model built: the
checks take milliseconds, plus importing torch and the trainer's module for a
node that learns.

``murmur config check`` also runs :func:`check_trainer_builds`: it builds the
trainer as the daemon does (:func:`build_trainer`, the one function both
call), which loads the data set and runs a ``TorchTrainer``'s fit check
(:mod:`murmur.learning.trainers.fit`). Without it a trainer whose data file
was missing or whose model did not fit its data passed ``config check`` and
was refused only by ``node start``. ``node start`` does not run it: building
the trainer is the first thing its learner does, before any port is bound,
and doing it twice would double the start of a large trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from murmur.errors import ConfigError, OptionError
from murmur.learning.privacy.schemes import PrivacyLevel
from murmur.node.config import AUTO, Attack, LearningSection, NodeConfig

if TYPE_CHECKING:
    from murmur.learning.trainers.base import Trainer

T = TypeVar("T")


def check_node(cfg: NodeConfig) -> None:
    """Everything below, cheapest first."""
    check_data_dir(cfg.node.data_dir)
    check_ports(cfg)
    check_learner(cfg)


def check_learner(cfg: NodeConfig) -> None:
    """:func:`check_learning`, then what privacy needs of the trainer's
    options: example-level privacy is one DP-SGD step per round. Left to the
    daemon, `config check` passed what `node start` then refused."""
    options = check_learning(cfg.learning)
    if options is not None and cfg.privacy.enabled and cfg.privacy.level is PrivacyLevel.EXAMPLE:
        from murmur.learning.privacy.dpsgd import one_step_problem

        problem = one_step_problem(options, cfg.learning.local_steps)
        if problem is not None:
            raise OptionError("privacy.level", f'"example" {problem}')


# ---------------------------------------------------------------- learning


def build_trainer(section: LearningSection) -> Trainer:
    """The trainer ``section`` names, built and behind the contract checks:
    what the daemon's learner trains, and what ``config check`` builds to
    refuse what ``node start`` would. ``section.node_index`` must be resolved
    (not ``"auto"``). A data set too small for ``learning.num_nodes`` is known
    only once it is loaded, and is blamed on that option."""
    from murmur.learning.partition import TooManyNodes
    from murmur.learning.trainers.registry import create_trainer

    try:
        return create_trainer(section.trainer, section.trainer_context())
    except TooManyNodes as exc:
        raise OptionError("learning.num_nodes", f"{exc}; each node needs a share of the data set") from None


def check_trainer_builds(cfg: NodeConfig) -> None:
    """Build the trainer (:func:`build_trainer`) as ``node start`` will, and
    what example-level privacy asks of it, so that ``config check`` refuses
    a trainer that fails to build or whose model does not fit its data with
    the same line and exit code as ``node start``. The data share is the
    config's ``node_index``, or share 0 for ``"auto"`` (the share is drawn
    from the peer id, which ``config check`` does not create): every share is
    cut from the same loaded pool, and the fit check is the same on each."""
    section = cfg.learning
    if not section.enabled:
        return
    if section.node_index == AUTO:
        section = dataclasses.replace(section, node_index=0)
    # The user's code may print ("loading my.csv..."): on stderr here, where
    # it cannot break the JSON `config check` prints on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = build_trainer(section)
    if cfg.privacy.enabled and cfg.privacy.level is PrivacyLevel.EXAMPLE:
        from murmur.learning.privacy.dpsgd import dp_sgd_step

        dp_sgd_step(trainer, section.local_steps)


def check_learning(section: LearningSection) -> Any:
    """Trainer and aggregator names always (a typo must not wait until
    learning is switched on); with learning on, also what resolving them
    needs: the trainer's module, its options, the attacks it supports, the
    device, and the aggregator's options. Returns the trainer's options
    (None: learning off, or a trainer without typed options)."""
    if not section.enabled:
        _check_names(section)
        return None
    trainer = _blame("learning.trainer", _load_trainer, section.trainer)
    options_cls = getattr(trainer, "Options", None)
    options = None
    if dataclasses.is_dataclass(options_cls) and isinstance(options_cls, type):
        from murmur.learning.options import parse_options

        options = _blame("learning.trainer_options", parse_options, options_cls, section.trainer_options,
                         f"trainer {section.trainer!r}")
    for key, attack in (("learning.attack", section.attack), ("learning.eval_attack", section.eval_attack)):
        if attack is not Attack.NONE and not getattr(trainer, "supports_attacks", True):
            raise OptionError(key, f"trainer {section.trainer!r} does not support the {attack.value} attack")
    from murmur.learning.trainers.base import resolve_device

    _blame("learning.device", resolve_device, section.device_or_none)
    from murmur.learning.aggregators import base as aggregators

    _blame("learning.aggregator", aggregators.aggregator_class, section.aggregator)
    _blame("learning.aggregator_options", lambda: aggregators.aggregator_options(
        section.aggregator, **dict(section.aggregator_options)))
    return options


def _check_names(section: LearningSection) -> None:
    from murmur.learning.catalog import check_aggregator_name
    from murmur.learning.trainers.registry import check_trainer_name

    _blame("learning.trainer", check_trainer_name, section.trainer)
    _blame("learning.aggregator", check_aggregator_name, section.aggregator)


def _load_trainer(spec: str) -> type:
    from murmur.learning.trainers.registry import load_trainer

    return load_trainer(spec)


def _blame(key: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, its ConfigError blamed on option ``key``."""
    try:
        return fn(*args)
    except OptionError:
        raise
    except ConfigError as exc:
        raise OptionError(key, str(exc)) from None


# ---------------------------------------------------------------- machine


def check_data_dir(path: Path) -> None:
    """The state dir is a writable directory, or can be created as one.
    Looks only: ``config check`` creates nothing."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is not a directory" if existing == path else f"cannot be created: {existing} is not a directory"
        raise OptionError("node.data_dir", f"{path} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(existing) else "permission denied"
        where = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise OptionError("node.data_dir", f"{path} {where} ({why})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_identity_dir(cfg: NodeConfig) -> None:
    """What ``murmur id`` needs: an identity to read, or a dir to create one in."""
    from murmur.protocol.identity import KEY_FILE_NAME

    if not (cfg.node.data_dir / KEY_FILE_NAME).is_file():
        check_data_dir(cfg.node.data_dir)


def check_ports(cfg: NodeConfig) -> None:
    """Every address the node will listen on (the peer listeners and the
    API) is this machine's, and every fixed port on it is free now (port 0
    is bound too: /ip4/10.99.99.99/tcp/0 passed, then start refused it)."""
    for addr in cfg.node.listen:
        _check_bindable("node.listen", addr.host, addr.port, str(addr))
    _check_bindable("api.port", cfg.api.host, cfg.api.port, f"{cfg.api.host}:{cfg.api.port}")


def _check_bindable(key: str, host: str, port: int, shown: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node's own listeners,
            if family == socket.AF_INET6:  # which asyncio makes IPv6-only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise OptionError(key, f"cannot listen on {shown}: {bind_problem(exc, port)}") from None


def bind_problem(exc: OSError, port: int) -> str:
    """What a failed bind means to the person who chose the address."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (another murmur node?); stop it or choose another port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no such address on this machine"
    if exc.errno == errno.EACCES:
        return f"permission denied (port {port} needs privileges)"
    return exc.strerror or str(exc)
