"""What a node's delta transfers look like, in one place for sender and receiver.

Every streamed transfer (:mod:`murmur.protocol.delta`) has a kind, carried in
``DeltaStart.meta["kind"]``: a round message, a public model answering a
``ModelRequest``, or a whole model in gossip-learning mode. Each kind has one
decoded shape for a given model, and the receiver's memory bounds follow from
those shapes and the codecs.

Why one object: the receiver used to size its limit by hand as "one vector
plus 64 KiB" while the sender stacked two vectors into every round message,
so every fp32 round of any model above 16,384 parameters was refused as a
peer fault, and nobody noticed because fp16/bf16/int8 and the small built-in
model happened to fit. Now the sender builds every transfer through
:meth:`TransferLayout.meta` / :meth:`TransferLayout.check_outgoing` and the
receiver derives its :class:`~murmur.protocol.delta.AssemblerLimits` and
checks each ``DeltaStart`` with :meth:`TransferLayout.check_incoming`, from
the same instance: the two cannot disagree again. A refusal names what was
expected and what arrived, so a mismatch (say a peer running another model)
reads as such in the log instead of as an anonymous size fault.

A round message's payload may be compressed (top-k, random-k: the layout's
:class:`~murmur.protocol.sparse.RoundFormat`); its decoded shape is still
``(ROWS, d)``, its size is the format's, and the layout decodes it, so sender
and receiver size and read compressed transfers from the same description.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from murmur.errors import DecodeError, LimitExceeded
from murmur.protocol import codecs
from murmur.protocol.codecs import CodecParams, DeltaCodec
from murmur.protocol.sparse import RoundFormat

__all__ = ["TransferKind", "TransferLayout", "ShapeMismatch", "worst_case_nbytes"]

KIND_KEY = "kind"


class TransferKind(enum.StrEnum):
    """``DeltaStart.meta["kind"]``. A transfer without one is a round message
    (what nodes sent before the kind was written on every transfer)."""

    ROUND = "round"  # the public model's increment in one D-SGD round (Message.ROWS rows)
    MODEL = "model"  # a public model, asked for with ModelRequest
    GOSSIP = "gossip"  # a whole model, gossip-learning mode


class ShapeMismatch(DecodeError):
    """A transfer's announced shape is not the one this node's model implies:
    a peer running another model, or a malformed ``DeltaStart``. Refused
    before anything is allocated."""


def worst_case_nbytes(count: int) -> int:
    """The largest encoded payload of ``count`` values under any codec: the
    receiver does not choose the sender's codec, so its byte bound must admit
    the widest one (fp32 for large counts; int8's block scales make it wider
    for a handful of values)."""
    return max(codecs.encoded_nbytes(codec, count) for codec in DeltaCodec)


@dataclass(frozen=True)
class TransferLayout:
    """The decoded shape of each transfer kind for one model.

    Build it with :meth:`for_model`; the sender stamps ``meta()`` on what it
    sends and checks the array it is about to send, the receiver checks every
    announced start and sizes its buffers from :meth:`max_payload_bytes`.
    """

    shapes: Mapping[TransferKind, tuple[int, ...]]
    round_format: RoundFormat = RoundFormat()  # how round messages' payloads are laid out

    @classmethod
    def for_model(cls, num_params: int, round_rows: int, round_format: RoundFormat = RoundFormat()) -> TransferLayout:
        """``round_rows`` vectors of ``num_params`` in each round message (the
        round engine's message layout), single vectors for whole models;
        round payloads laid out as ``round_format`` says (a compressed
        format carries one row)."""
        if num_params < 1 or round_rows < 1:
            raise ValueError("a layout needs at least one parameter and one row")
        if round_format.sparse and round_rows != 1:
            raise ValueError("a compressed round message carries one row")
        return cls(
            MappingProxyType(
                {
                    TransferKind.ROUND: (round_rows, num_params),
                    TransferKind.MODEL: (num_params,),
                    TransferKind.GOSSIP: (num_params,),
                }
            ),
            round_format,
        )

    def shape(self, kind: TransferKind) -> tuple[int, ...]:
        return self.shapes[kind]

    def meta(self, kind: TransferKind, **extra: Any) -> dict[str, Any]:
        """The ``meta`` of an outgoing transfer of ``kind``."""
        return {KIND_KEY: kind.value, **extra}

    @staticmethod
    def kind_of(meta: Mapping[str, Any]) -> TransferKind:
        """The kind a transfer's meta names; raises :class:`DecodeError` for an unknown one."""
        raw = meta.get(KIND_KEY, TransferKind.ROUND.value)
        try:
            return TransferKind(raw)
        except ValueError:
            raise DecodeError(f"unknown transfer kind {raw!r}") from None

    def payload_bytes(self, kind: TransferKind, codec: DeltaCodec) -> int:
        """The exact payload size of a ``kind`` transfer encoded with ``codec``."""
        count = math.prod(self.shapes[kind])
        if kind is TransferKind.ROUND:
            return self.round_format.nbytes(codec, count)
        return codecs.encoded_nbytes(codec, count)

    def max_payload_bytes(self) -> int:
        """The largest payload an honest peer can send us, any kind, any codec."""
        return max(self.payload_bytes(kind, codec) for kind in self.shapes for codec in DeltaCodec)

    def sparse(self, kind: TransferKind) -> bool:
        """Whether a ``kind`` transfer's payload is a sparse round format
        (decoded as a whole by :meth:`decode`, not value by value as it lands)."""
        return kind is TransferKind.ROUND and self.round_format.sparse

    def decode(
        self, kind: TransferKind, payload: codecs.Payload, codec: DeltaCodec, round: int, sender: bytes
    ) -> np.ndarray:
        """The decoded float32 array of a completed ``kind`` transfer, in the
        kind's shape. ``round`` and ``sender`` (its raw peer id, both signed)
        name a random-k message's mask. Raises :class:`DecodeError`."""
        shape = self.shapes[kind]
        count = math.prod(shape)
        if self.sparse(kind):
            flat = self.round_format.decode_dense(payload, codec, count, round, sender)
        else:
            flat = codecs.decode(payload, CodecParams(codec, count))
        return flat.reshape(shape)

    def check_outgoing(self, kind: TransferKind, shape: tuple[int, ...]) -> None:
        """A local bug guard: what we send must be what our peers will accept."""
        if tuple(shape) != self.shapes[kind]:
            raise ValueError(f"{kind.value} transfer of shape {tuple(shape)}, the layout says {self.shapes[kind]}")

    def check_incoming(self, meta: Mapping[str, Any], shape: tuple[int, ...], nbytes: int, limit: int) -> TransferKind:
        """Check an announced transfer before anything is allocated; return its kind.

        Raises :class:`ShapeMismatch` (a different model) or
        :class:`~murmur.errors.LimitExceeded`, each naming what was expected
        and what was announced."""
        kind = self.kind_of(meta)
        expected = self.shapes[kind]
        if tuple(shape) != expected:
            raise ShapeMismatch(
                f"{kind.value} transfer of shape {tuple(shape)}, expected {expected}: the peer runs a different model"
            )
        if nbytes > limit:
            raise LimitExceeded(f"{kind.value} transfer of {nbytes} bytes, limit {limit} (shape {expected})")
        return kind
