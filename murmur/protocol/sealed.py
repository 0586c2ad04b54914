"""A message tail that arrives still sealed, for its reader to open where it wants it.

``/murmur/mux/2.0.0`` sends a message with a large tail (a delta chunk's
payload) as a *split* frame: one record with the frame header and the
message's envelope, then the tail alone in the next record, sealed with the
next nonce (see :mod:`murmur.protocol.framing`). The frame decoder opens the
head, which names the stream, and leaves the tail sealed. Its reader opens it
straight into its final place: a delta chunk into the landing buffer of its
transfer. Opened on arrival instead, each payload byte was written once by
the AEAD into a buffer of its own and once more by the copy into the landing
buffer (the largest cost on the receiving side that "crypto alone" does not
have).

A tail is opened at most once. A failed tag is the record layer's failure,
not the message's: ``on_fault`` drops the connection as a failed record
would, and the reader gets :class:`~murmur.errors.ConnectionClosed`. Until
then the bytes it wrote hold unauthenticated data, which the reader must
treat as garbage (the delta assembler's transfer never completes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag

from murmur.errors import ConnectionClosed, DecryptError, PeerFault
from murmur.protocol.noise import TAG_LEN, CipherState

class SealedTail:
    """``nbytes`` of message tail, sealed with nonce ``nonce`` of ``cipher``.

    ``ciphertext`` is a view of ``backing``, a buffer that belongs to the tail
    from now on (the frame reader gave it up), freed once the tail is opened
    or discarded."""

    __slots__ = ("_backing", "_cipher", "_ciphertext", "_nonce", "_on_fault", "nbytes")

    def __init__(self, ciphertext: memoryview, backing: object, cipher: CipherState, nonce: int,
                 on_fault: Callable[[PeerFault], None]) -> None:
        self._ciphertext: memoryview | None = ciphertext
        self._backing = backing
        self._cipher = cipher
        self._nonce = nonce
        self._on_fault = on_fault
        self.nbytes = len(ciphertext) - TAG_LEN

    def __len__(self) -> int:
        return self.nbytes

    @property
    def opened(self) -> bool:
        """Opened or discarded: nothing left to open."""
        return self._ciphertext is None

    def open_into(self, out: memoryview) -> None:
        """Authenticate and decrypt into ``out`` (exactly ``nbytes``). After a
        failed tag the connection is dropped and ``out`` holds garbage."""
        ciphertext = self._ciphertext
        if ciphertext is None:
            raise RuntimeError("a sealed tail is opened once")
        if memoryview(out).nbytes != self.nbytes:
            raise ValueError(f"a tail of {self.nbytes} bytes does not open into {memoryview(out).nbytes}")
        try:
            self._cipher.open_at(self._nonce, ciphertext, out)
        except InvalidTag:
            self._on_fault(DecryptError("split frame's tail failed authentication"))
            raise ConnectionClosed("a message tail failed authentication; the connection is dropped") from None
        finally:
            self.discard()

    def discard(self) -> None:
        """Free the buffer, opened or not (the stream was reset, nobody reads it)."""
        if self._ciphertext is not None:
            self._ciphertext.release()
        self._ciphertext = self._backing = None


@dataclass(frozen=True, slots=True)
class Split:
    """A received message whose tail is still sealed: what a muxed stream
    queues for a split frame. ``len`` is the whole message's."""

    head: memoryview
    tail: SealedTail

    def __len__(self) -> int:
        return len(self.head) + self.tail.nbytes

    def join(self) -> memoryview:
        """The whole message in one buffer (head copied, tail opened behind it)."""
        size = len(self.head)
        out = np.empty(size + self.tail.nbytes, dtype=np.uint8)
        view = memoryview(out)
        view[:size] = self.head
        self.tail.open_into(view[size:])
        return view.toreadonly()
