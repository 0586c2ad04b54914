"""Round-message payload formats: dense, top-k and random-k (numpy only).

A compressed round message is still one signed, chunked delta transfer
(:mod:`murmur.protocol.delta`); only its payload bytes differ. The format is
part of the network's wire agreement (it enters the model fingerprint, as
the codec does), so a receiver sizes and decodes what arrives from its *own*
:class:`RoundFormat`, never from what the sender announces:

* ``none``: the value codec's encoding of all d values (what murmur always sent);
* ``topk``: ``indices (uint32 LE × k, strictly increasing) || values``, the
  k coordinates the sender chose;
* ``randk``: ``values`` only: the k coordinates are drawn from a seed both
  ends know (:func:`random_mask`: the network seed, the round and, with
  :attr:`MaskScope.SENDER`, the sender's id), so indices cost no bytes, and
  with :attr:`MaskScope.NETWORK` every node sends the same coordinates in a
  round (what lets pairwise privacy noise cancel on them).

``values`` is the value codec's encoding (:mod:`murmur.protocol.codecs`) of
k float32 values. k is a pure function of (ratio, d), so the payload size is
a pure function of (format, codec, d) and a receiver checks a transfer's
announced size before allocating anything. Decoding treats the payload as
hostile: a wrong length, an index out of range, a repeated or unsorted
index, a non-finite value: each is a :class:`~murmur.errors.DecodeError`.
Raw bytes throughout: no index or value ever passes through msgpack.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import blake3
import numpy as np

from murmur.errors import DecodeError
from murmur.protocol import codecs
from murmur.protocol.codecs import CodecParams, DeltaCodec, Rounding

__all__ = [
    "MASK_DOMAIN",
    "INDEX_BYTES",
    "Sparsifier",
    "MaskScope",
    "RoundFormat",
    "SparseDecodeError",
    "random_mask",
]

MASK_DOMAIN = b"murmur-randk-v1"
INDEX_BYTES = 4  # uint32 little-endian per top-k index
MAX_INDEXED = 1 << 32  # top-k indices are uint32: models up to 2^32 parameters
_INDEX = np.dtype("<u4")
_U64 = struct.Struct(">Q")
_CANDIDATE_HEADROOM = 1.25  # random-k draws this many candidates per wanted index, then tops up
_NEVER = np.iinfo(np.int64).max  # random_mask: a coordinate not drawn (yet)
_SCATTER_FROM = 16  # random_mask scatters (O(d) memory) once k >= d / this, else sorts (O(k))
# A BLAKE3 digest and ufunc.at hold the GIL throughout: over a 10M-parameter
# model's 6M draws each was ~100 ms (300 ms on a loaded machine) in which a
# mask drawn in a worker thread stopped the event loop as surely as one drawn
# on it. Slices of this many words let the loop in between (~10 ms each); the
# result is the same (the XOF is seekable; minimum does not depend on order).
_AT_SLICE = 1 << 19


class SparseDecodeError(DecodeError):
    """A sparse payload is malformed (length, indices); a peer fault."""


class Sparsifier(enum.StrEnum):
    """Which coordinates a round message carries (the config name is the value)."""

    NONE = "none"  # all of them
    TOPK = "topk"  # the k largest in magnitude, chosen by the sender; indices on the wire
    RANDK = "randk"  # k drawn from a shared seed; no indices on the wire


class MaskScope(enum.StrEnum):
    """Whose seed a random-k mask comes from."""

    SENDER = "sender"  # (network seed, round, sender): neighbours cover different coordinates
    NETWORK = "network"  # (network seed, round): every node sends the same coordinates in a round


def random_mask(seed: int, round: int, sender: bytes, d: int, k: int) -> np.ndarray:
    """The k distinct coordinates (sorted int64) of ``sender``'s random-k
    message for ``round`` in a network seeded with ``seed``.

    Derived from BLAKE3 in XOF mode and integer arithmetic only, so every
    node computes the same mask whatever its numpy or torch version; a
    sender id of ``b""`` is the network-wide mask. Candidates are u64 words
    mod d (a bias of d/2^64, irrelevant here); the first k distinct ones in
    stream order are kept. For k > d/2 the complement is drawn instead."""
    if not 0 <= k <= d:
        raise ValueError(f"mask of {k} coordinates out of {d}")
    if 2 * k > d:
        keep = np.ones(d, dtype=bool)
        keep[random_mask(seed, round, sender, d, d - k)] = False
        return np.flatnonzero(keep)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    stream = blake3.blake3(MASK_DOMAIN + _U64.pack(seed % (1 << 64)) + _U64.pack(round) + sender)
    first_batch = int(k * _CANDIDATE_HEADROOM) + 64
    if k * _SCATTER_FROM < d:
        return _first_distinct_sorting(stream, d, k, first_batch)
    return _first_distinct_scattering(stream, d, k, first_batch)


def _words(stream: blake3.blake3, start: int, count: int, d: int) -> np.ndarray:
    """Stream words ``start .. start+count`` (u64 LE) mod d, read a slice at
    a time: one digest holds the GIL throughout (~100 ms for the 6M words of
    a 10M-parameter mask), the event loop's included."""
    words = np.empty(count, dtype="<u8")
    for at in range(0, count, _AT_SLICE):
        n = min(_AT_SLICE, count - at)
        words[at : at + n] = np.frombuffer(stream.digest(length=8 * n, seek=8 * (start + at)), dtype="<u8")
    words %= np.uint64(d)
    return words


def _first_distinct_sorting(stream: blake3.blake3, d: int, k: int, want: int) -> np.ndarray:
    """:func:`random_mask`'s coordinates by sorting what was drawn: memory
    and time of the order of k, for k small against d."""
    drawn = np.empty(0, dtype=np.uint64)
    while True:
        drawn = np.concatenate([drawn, _words(stream, drawn.size, want, d)])
        unique, first = np.unique(drawn, return_index=True)
        if unique.size >= k:
            chosen = unique[np.argsort(first, kind="stable")[:k]]
            return np.sort(chosen.astype(np.int64))
        want = k


def _first_distinct_scattering(stream: blake3.blake3, d: int, k: int, want: int) -> np.ndarray:
    """The same coordinates as :func:`_first_distinct_sorting`, without a
    sort: for k a sizeable fraction of d, sorting everything drawn took
    14.6 s for a 10M-parameter model at ratio 0.5 (2.7 s at 0.3), once per
    neighbour per round. ``first[c]`` is the stream position of coordinate
    c's first draw; the k wanted are those first drawn no later than the k-th
    new coordinate. Linear time, 8 bytes a coordinate."""
    first = np.full(d, _NEVER, dtype=np.int64)
    drawn = found = 0
    while True:
        coords = _words(stream, drawn, want, d).astype(np.int64)
        positions = np.arange(drawn, drawn + want, dtype=np.int64)
        for at in range(0, want, _AT_SLICE):  # earlier positions are smaller: they keep theirs
            np.minimum.at(first, coords[at : at + _AT_SLICE], positions[at : at + _AT_SLICE])
        new = np.flatnonzero(first[coords] == positions)  # this batch's first draws, in stream order
        drawn += want
        if found + new.size >= k:
            last = positions[new[k - found - 1]]
            return np.flatnonzero(first <= last)  # sorted, k of them
        found += new.size
        want = k


def _exact(ratio: float) -> str:
    """``ratio`` as short as it reads back exactly: ``:g`` (what networks
    already agree on, "0.01", "1") unless that rounds it. Rounded, 1/3 and
    0.333333 both read "0.333333" and their fingerprints matched, yet at 10M
    parameters one sends k = 3333333 values and the other expects 3333330:
    every round message between the two honest nodes was refused as a
    malformed transfer, a peer fault, instead of the link being refused once,
    saying why."""
    text = f"{ratio:g}"
    return text if float(text) == ratio else repr(ratio)


@dataclass(frozen=True)
class RoundFormat:
    """The payload layout of one network's round messages (see the module
    docstring). ``ratio`` is the fraction of the d coordinates sent (top-k,
    random-k); ``seed`` the network seed random-k masks derive from."""

    sparsifier: Sparsifier = Sparsifier.NONE
    ratio: float = 1.0
    scope: MaskScope = MaskScope.SENDER
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 < self.ratio <= 1.0 and math.isfinite(self.ratio)):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    @property
    def sparse(self) -> bool:
        return self.sparsifier is not Sparsifier.NONE

    def count(self, d: int) -> int:
        """k: how many of ``d`` coordinates a message carries (at least one)."""
        if not self.sparse:
            return d
        return max(1, min(d, round(self.ratio * d)))

    def nbytes(self, codec: DeltaCodec, d: int) -> int:
        """Exact payload size of a round message of a ``d``-parameter model."""
        k = self.count(d)
        values = codecs.encoded_nbytes(codec, k)
        if self.sparsifier is Sparsifier.TOPK:
            return INDEX_BYTES * k + values
        return values

    def mask(self, d: int, round: int, sender: bytes) -> np.ndarray:
        """The random-k coordinates of ``sender``'s message for ``round``."""
        if self.sparsifier is not Sparsifier.RANDK:
            raise ValueError(f"a {self.sparsifier.value} message has no shared mask")
        who = sender if self.scope is MaskScope.SENDER else b""
        return random_mask(self.seed, round, who, d, self.count(d))

    def describe(self) -> str:
        """One short text for the model fingerprint: equal exactly when two
        nodes lay out and read round messages the same way."""
        if not self.sparse:
            return "dense"
        scope = f",{self.scope.value}" if self.sparsifier is Sparsifier.RANDK else ""
        return f"{self.sparsifier.value}({_exact(self.ratio)}{scope})"

    # -- sender

    def encode(
        self,
        indices: np.ndarray | None,
        values: np.ndarray,
        codec: DeltaCodec,
        d: int,
        rounding: Rounding = Rounding.NEAREST,
        rng: np.random.Generator | None = None,
    ) -> tuple[memoryview, np.ndarray]:
        """The payload of a message carrying ``values`` (float32) at
        ``indices`` (top-k: sorted, distinct; random-k: the mask, not sent;
        dense: None, ``values`` has all d), and the values receivers will
        decode (what the sender must apply to its own public model)."""
        k = self.count(d)
        if values.shape != (k,):
            raise ValueError(f"{self.describe()} message of {d} parameters carries {k} values, got {values.shape}")
        value_bytes, params = codecs.encode(values, codec, rounding, rng)
        decoded = codecs.decode(value_bytes, params)
        if self.sparsifier is not Sparsifier.TOPK:
            return value_bytes, decoded
        if indices is None or indices.shape != (k,):
            raise ValueError("a top-k message needs its k indices")
        if k and (int(indices[0]) < 0 or int(indices[-1]) >= d or not bool((np.diff(indices) > 0).all())):
            raise ValueError("top-k indices must be distinct, sorted and below d")
        out = np.empty(self.nbytes(codec, d), dtype=np.uint8)
        out[: INDEX_BYTES * k].view(_INDEX)[:] = indices
        out[INDEX_BYTES * k :] = np.frombuffer(value_bytes, dtype=np.uint8)
        return memoryview(out).cast("B"), decoded

    # -- receiver

    def decode(
        self, payload: codecs.Payload, codec: DeltaCodec, d: int, round: int, sender: bytes
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(indices, values) of a received payload; indices None for dense.
        Raises :class:`SparseDecodeError` / :class:`DecodeError`."""
        size = memoryview(payload).nbytes
        expected = self.nbytes(codec, d)
        k = self.count(d)
        if size != expected:
            raise SparseDecodeError(
                f"{self.describe()} {codec.name} payload of {size} bytes, expected {expected} ({k} of {d} values)"
            )
        if self.sparsifier is Sparsifier.NONE:
            return None, codecs.decode(payload, CodecParams(codec, d))
        if self.sparsifier is Sparsifier.RANDK:
            return self.mask(d, round, sender), codecs.decode(payload, CodecParams(codec, k))
        indices = np.frombuffer(payload, dtype=_INDEX, count=k).astype(np.int64)
        if k and int(indices.max()) >= d:
            raise SparseDecodeError(f"top-k index {int(indices.max())} out of range for {d} parameters")
        steps = np.diff(indices)
        if steps.size and int(steps.min()) <= 0:
            at = int(np.argmax(steps <= 0))
            what = "repeated" if steps[at] == 0 else "out of order"
            raise SparseDecodeError(f"top-k index {int(indices[at + 1])} {what} (indices must strictly increase)")
        values = codecs.decode(memoryview(payload)[INDEX_BYTES * k :], CodecParams(codec, k))
        return indices, values

    def decode_dense(
        self, payload: codecs.Payload, codec: DeltaCodec, d: int, round: int, sender: bytes
    ) -> np.ndarray:
        """:meth:`decode` scattered into a dense float32 vector of ``d``."""
        indices, values = self.decode(payload, codec, d, round, sender)
        if indices is None:
            return values
        dense = np.zeros(d, dtype=np.float32)
        dense[indices] = values
        return dense
