"""Which model-sized tensors an object graph holds: the round engine's
memory, counted in models rather than bytes.

At real model sizes every model copy a node keeps is a model's worth of its
memory (a user's 3.6 M-parameter model ran at 1.05-1.23 GB a daemon before
the copies were counted). A copy kept by mistake shows up as a count here,
not as a slow drift in a benchmark: the memory tests and bench/memory.py
both count with it.
"""

from __future__ import annotations

import torch


def model_sized(root: object, model_bytes: int, skip: set[int] = frozenset()) -> set[int]:  # type: ignore[assignment]
    """Data pointers of the distinct storages of at least half a model
    (``model_bytes``) reachable from ``root`` through murmur's and the tests'
    objects, dicts and sequences; objects whose ``id`` is in ``skip`` (a
    trainer, whose model is its own) are not entered."""
    found: set[int] = set()
    seen = set(skip)
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes() >= model_bytes // 2:
                found.add(storage.data_ptr())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(("murmur.", "tests.")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found
