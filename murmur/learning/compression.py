"""Compressing a round message: which coordinates, at what precision.

Compressed gossip as in CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019).

The round engine (:mod:`murmur.learning.rounds`) sends one vector a round,
its public model's increment. With compression it sends q = C(v) of
v = e + c + Δ̃ (residual, consensus step, privatised update) and keeps
e ← v − q: what was not sent is carried to the next round (error feedback,
CHOCO-SGD's x − x̂ kept explicitly). Sender and receivers both advance the
public model by exactly the decoded q, so replicas stay bit-exact.

C is a :class:`Compressor`: a sparsifier (none, top-k by magnitude, random-k
on a mask drawn from a shared seed) composed with a value codec (fp32, fp16,
bf16, int8, int4, int2; the integer ones with nearest or stochastic
rounding). The byte layout is the protocol's
:class:`~murmur.protocol.sparse.RoundFormat`: the compressor encodes the
payload once, and the node sends exactly those bytes, so what a receiver
decodes is what the sender applied, by construction.

Privacy (see :meth:`Compressor.mask`): random-k's coordinates are known
before any data is looked at, so the privacy stage can clip and noise just
those (what is actually sent); top-k's depend on the data, which is refused
with privacy on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from murmur.protocol.codecs import DeltaCodec, Rounding
from murmur.protocol.sparse import MaskScope, RoundFormat, Sparsifier

__all__ = ["Compressed", "Compressor", "top_k_indices"]


def top_k_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """The k coordinates of ``v`` largest in magnitude, as increasing int64
    indices (on ``v``'s device); among magnitudes tied at the k-th largest,
    the lowest indices.

    Why not ``torch.topk``: its O(d log k) selection and the sort of the k
    indices after it cost a 10M-parameter model ~0.8 s at ratio 0.5 (on one
    thread), once a round, on the event loop. The k-th largest magnitude is
    a linear-time selection (numpy's introselect on the CPU: torch's
    ``kthvalue`` and ``nonzero`` took several times as long there), and the
    coordinates above it come out already in order (bench/topk.py prints the
    ratio). topk's choice among ties is unspecified, this one is fixed. Only
    the sender chooses (the indices are on the wire), so nodes need not
    agree on it for replicas to stay bit-exact."""
    magnitude = v.detach().abs()
    d = magnitude.numel()
    if k >= d:
        return torch.arange(d, device=v.device)
    if magnitude.device.type != "cpu":  # the same rule with the device's own selection
        threshold = torch.kthvalue(magnitude, d - k + 1).values
        chosen = magnitude > threshold
        short = k - int(chosen.sum())
        if short > 0:
            chosen[torch.nonzero(magnitude == threshold).squeeze(1)[:short]] = True
        return torch.nonzero(chosen).squeeze(1)
    host = magnitude.numpy()
    threshold = np.partition(host, d - k)[d - k]  # the k-th largest
    chosen_host = host > threshold
    short = k - int(np.count_nonzero(chosen_host))
    if short > 0:  # the rest of the k among the coordinates tied at the threshold, lowest first
        chosen_host[np.flatnonzero(host == threshold)[:short]] = True
    return torch.from_numpy(np.flatnonzero(chosen_host))


@dataclass(frozen=True)
class Compressed:
    """One compressed round message: ``dense`` is the decoded vector (what
    sender and receivers add to the public model), ``payload`` its wire
    bytes under ``codec`` and the compressor's format."""

    dense: torch.Tensor
    payload: memoryview
    codec: DeltaCodec


class Compressor:
    """C(v) for one node: ``sender`` is its raw peer id (random-k masks with
    the sender's scope derive from it; receivers derive the same mask from
    the authenticated sender of the transfer)."""

    def __init__(
        self,
        fmt: RoundFormat,
        codec: DeltaCodec,
        sender: bytes,
        rounding: Rounding = Rounding.NEAREST,
        rng_seed: int | None = None,
    ) -> None:
        self.format = fmt
        self.codec = DeltaCodec(codec)
        self.rounding = rounding
        self.sender = sender
        seed = np.random.SeedSequence(rng_seed) if rng_seed is not None else np.random.SeedSequence()
        self._rng = np.random.default_rng(seed.spawn(1)[0])
        self._drawn: tuple[int, int, np.ndarray] | None = None  # (round, d, mask): see prepare_mask

    @property
    def data_dependent(self) -> bool:
        """Whether which coordinates are sent depends on the values (top-k):
        with privacy on, that choice itself reveals which coordinates moved."""
        return self.format.sparsifier is Sparsifier.TOPK

    @property
    def lossy(self) -> bool:
        return self.format.sparse or self.codec is not DeltaCodec.FP32

    def describe(self) -> str:
        """The wire format in one line (enters the model fingerprint; the
        rounding is the sender's business and not part of it)."""
        return self.codec.name.lower() + ("" if not self.format.sparse else f"+{self.format.describe()}")

    @property
    def per_sender(self) -> bool:
        """Whether a payload is tied to its sender (random-k with per-sender masks)."""
        return self.format.sparsifier is Sparsifier.RANDK and self.format.scope is MaskScope.SENDER

    def payload_as(self, dense: torch.Tensor, round: int, sender: bytes) -> memoryview:
        """A message's payload as ``sender`` would send it: for per-sender
        masks, ``dense`` (a message this compressor made) gathered at that
        sender's mask and encoded again (an attacker sends one model under
        several identities; what each receiver decodes is what it gets)."""
        d = dense.numel()
        indices = self.format.mask(d, round, sender)
        values = dense.detach().to("cpu", torch.float32, copy=True).numpy()[indices]
        payload, _ = self.format.encode(indices, values, self.codec, d, self.rounding, self._rng)
        return payload

    def prepare_mask(self, round: int, d: int) -> None:
        """Draw this round's random-k mask now, for :meth:`mask` to return.

        Why: drawing it is the costly part of a random-k message (~0.6 s for
        a 10M-parameter model at ratio 0.5, more on a loaded machine), and
        :meth:`mask` runs inside the round engine's ``open_round`` on the
        node's event loop. The mask depends on nothing but (round, d), so the
        node draws it in a worker thread first. One mask is kept (the
        round's), replaced by the next."""
        if self.format.sparsifier is Sparsifier.RANDK:
            self._drawn = (round, d, self.format.mask(d, round, self.sender))

    def mask(self, round: int, d: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The coordinates of this round's message when they are known before
        the data (random-k), else None (all of them, or top-k's choice)."""
        if self.format.sparsifier is not Sparsifier.RANDK:
            return None
        drawn = self._drawn
        if drawn is None or drawn[:2] != (round, d):
            self.prepare_mask(round, d)
            drawn = self._drawn
            assert drawn is not None
        return torch.from_numpy(drawn[2]).to(device)

    def compress(self, v: torch.Tensor, round: int, mask: torch.Tensor | None = None) -> Compressed:
        """C(v): ``mask`` is :meth:`mask`'s for this round, if already drawn."""
        d = v.numel()
        sparsifier = self.format.sparsifier
        if sparsifier is Sparsifier.NONE:
            indices = None
            values = v
        elif sparsifier is Sparsifier.TOPK:
            k = self.format.count(d)
            indices = top_k_indices(v, k)
            values = v[indices]
        else:
            indices = mask if mask is not None else self.mask(round, d, v.device)
            assert indices is not None
            values = v[indices]
        # Copies: the payload (an fp32 one is a view of these values) must not
        # change when the engine later updates v, and the decoded values must
        # not alias the payload the node is still sending.
        host_values = values.detach().to("cpu", torch.float32, copy=True).contiguous().numpy()
        host_indices = None if indices is None else indices.detach().to("cpu").numpy()
        payload, decoded = self.format.encode(host_indices, host_values, self.codec, d, self.rounding, self._rng)
        decoded_t = torch.from_numpy(np.array(decoded)).to(v.device)
        if indices is None:
            return Compressed(decoded_t, payload, self.codec)
        dense = torch.zeros_like(v)
        dense[indices] = decoded_t
        return Compressed(dense, payload, self.codec)
