"""A model's sketch: what a SybilWall history record carries instead of the
model (:data:`model_sketch`), and what SybilWall keeps of models past their
round (:data:`local_sketch`, a larger one that never travels).

A record lets a node compare a peer it does not observe with the peers it
does (a lone Sybil among our neighbours meets its twins). It used to carry
the subject's whole fp32 model, one per neighbour per round: at 1M
parameters 4 MB a record, which wiped out compressed gossip's savings.
Comparing needs only distances between models, and a linear sketch keeps
them: a CountSketch (each coordinate added, with a random sign, into one of
``SKETCH_ELEMENTS`` buckets) preserves squared distances in expectation
(relative error about ``sqrt(2 / SKETCH_ELEMENTS)``, ~9% on squared
distance, ~4% on distance), and clones stay at distance 0. Linear, so
``sketch(model) - sketch(reference) == sketch(model - reference)`` up to
rounding: a record's offset from our reference is computed from sketches
alone. A model with at most ``SKETCH_ELEMENTS`` parameters is embedded
exactly (distinct buckets), so distances are kept exactly.

Buckets and signs derive from a fixed seed and the model size, the same on
every node; no node chooses them. The sums run in float64 and the result is
float32: two nodes sketching bit-identical models (a replica and its
original) agree to rounding, and the observer of a record checks the
subject's stated sketch against its own within :data:`SKETCH_RTOL`.

The local sketch is the same construction with ``LOCAL_SKETCH_ELEMENTS``
buckets and a seed of its own: SybilWall compares steps and moving averages
of its neighbours' models on it, which needs no agreement between nodes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from murmur.protocol.messages import SKETCH_ELEMENTS

SKETCH_SEED = 0x5EC7C4
SKETCH_RTOL = 1e-4
"""Relative tolerance (to the sketch's largest entry) within which an
observer's sketch of its replica must match the subject's statement."""

LOCAL_SKETCH_ELEMENTS = 1 << 15
"""Entries of the sketch SybilWall keeps of each model past its round (steps,
moving averages, persistent pulls), which never travels: 128 KB however big
the model, instead of a whole copy per neighbour and view. Models of up to
this many parameters (digits-mlp, the bench's narrow mnist-cnn) are embedded
exactly; above, squared distances are off by about ``sqrt(2 / 32768)``, 0.8%."""
LOCAL_SKETCH_SEED = 0x10CA15


CHUNK = 1 << 20
"""Coordinates sketched at a time: buckets and signs are drawn per chunk
from a seed of their own (never held for the whole model: a 10M-parameter
model's would take more memory than the model), and the float64 sums touch
one chunk's copy at a time."""

CACHED_CHUNKS = 4


@functools.lru_cache(maxsize=4 * CACHED_CHUNKS)
def _cached_projection(elements: int, seed: int, num_params: int, start: int,
                       length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first chunks' projections, kept (5 bytes a coordinate: int32
    buckets, int8 signs; CACHED_CHUNKS chunks at most per sketch and model
    size): drawing them is most of a sketch's time, and a node sketches its
    model, its neighbours' and its references every round, twice (the record
    sketch and the local one)."""
    buckets, signs = _draw_projection(elements, seed, num_params, start, length)
    return buckets.to(torch.int32), signs.to(torch.int8)


def _draw_projection(elements: int, seed: int, num_params: int, start: int,
                     length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket, sign) of coordinates ``start .. start+length`` of a model of
    ``num_params``: a pure function of the sketch, the size and the chunk."""
    g = torch.Generator().manual_seed(seed + 7919 * num_params + start // CHUNK)
    if num_params <= elements:  # distinct buckets: distances kept exactly
        buckets = torch.randperm(elements, generator=g)[:length]
    else:
        buckets = torch.randint(0, elements, (length,), generator=g)
    signs = torch.randint(0, 2, (length,), generator=g).to(torch.float64).mul_(2.0).sub_(1.0)
    return buckets, signs


@dataclass(frozen=True)
class CountSketch:
    """A CountSketch of ``elements`` buckets drawn from ``seed``: linear, so
    sketches of offsets, steps and moving averages are the offsets, steps and
    averages of sketches."""

    elements: int
    seed: int

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """The float32 sketch (``elements`` entries) of a flat model or offset."""
        if flat.dim() != 1:
            raise ValueError("model_sketch: a flat (1-D) tensor expected")
        n = flat.numel()
        out = torch.zeros(self.elements, dtype=torch.float64)
        for start in range(0, n, CHUNK):
            length = min(CHUNK, n - start)
            draw = _cached_projection if start // CHUNK < CACHED_CHUNKS else _draw_projection
            buckets, signs = draw(self.elements, self.seed, n, start, length)
            out.index_add_(0, buckets, flat[start:start + length].detach().to("cpu", torch.float64) * signs)
        return out.to(torch.float32)


model_sketch = CountSketch(SKETCH_ELEMENTS, SKETCH_SEED)
"""The sketch a history record carries and a subject states (the same on every node)."""
local_sketch = CountSketch(LOCAL_SKETCH_ELEMENTS, LOCAL_SKETCH_SEED)
"""The sketch a node keeps of models past their round (LOCAL_SKETCH_ELEMENTS)."""


def sketches_agree(stated: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether a stated sketch is the one of the model we hold (to rounding)."""
    if stated.shape != ours.shape or not bool(torch.isfinite(stated).all()):
        return False
    scale = float(ours.abs().max()) if ours.numel() else 0.0
    return bool(((stated - ours).abs() <= SKETCH_RTOL * max(scale, 1e-30)).all())
