"""The libp2p-noise wire format, sans-IO: ``u16 big-endian length | Noise message``.

Both the handshake messages and, after it, the transport messages travel this
way (libp2p-noise spec, "Wire Format"). A Noise message is at most 65535
bytes, so a transport message carries at most 65519 plaintext bytes behind
its 16-byte tag; larger writes are split. This is the standard ``/noise``
channel any libp2p peer speaks; murmur's fast path between murmur nodes uses
:mod:`murmur.protocol.framing` instead (4 MiB frames, negotiated cipher).

One :class:`~murmur.protocol.framing.LengthPrefixedReader` splits the
messages of both phases, so bytes that follow handshake message 3 in the same
segment stay where they are and become the first transport messages. It is
shaped like :class:`asyncio.BufferedProtocol` (``get_buffer`` /
``buffer_updated``): the socket writes straight into it and messages are
opened in place.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.exceptions import InvalidTag

from murmur.errors import DecryptError, FrameError, HandshakeError
from murmur.protocol.framing import HANDSHAKE_LENGTH, LengthPrefixedReader
from murmur.protocol.noise import TAG_LEN, CipherState, StandardNoiseHandshake

NOISE_LENGTH = HANDSHAKE_LENGTH  # u16 big-endian
MAX_NOISE_MESSAGE = 65535
MAX_PLAINTEXT = MAX_NOISE_MESSAGE - TAG_LEN
READ_SCRATCH_BYTES = 256 * 1024


def frame(message: bytes) -> bytes:
    """One handshake message with its length prefix."""
    if len(message) > MAX_NOISE_MESSAGE:
        raise ValueError("Noise message over 65535 bytes")
    return NOISE_LENGTH.pack(len(message)) + message


class NoiseReader:
    """Length-prefixed Noise messages in, one at a time (handshake, then transport)."""

    def __init__(self, scratch_bytes: int = READ_SCRATCH_BYTES) -> None:
        self._reader = LengthPrefixedReader(NOISE_LENGTH, MAX_NOISE_MESSAGE, 0, scratch_bytes)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.buffer_updated(nbytes)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            if n == 0:
                raise FrameError("Noise read buffer full")  # cannot happen: a message fits the scratch
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def next_message(self) -> memoryview | None:
        """The next whole message, valid until the next ``get_buffer``/``feed``."""
        return self._reader.next_body()

    @property
    def pending(self) -> int:
        return self._reader.pending

    def at_eof(self) -> None:
        self._reader.at_eof()

    def close(self) -> None:
        self._reader.close()


class NoiseHandshakeDriver:
    """Runs a :class:`StandardNoiseHandshake` over a :class:`NoiseReader`:
    ``start()`` and ``advance()`` return the framed bytes to send."""

    def __init__(self, handshake: StandardNoiseHandshake, reader: NoiseReader) -> None:
        self.handshake = handshake
        self.reader = reader

    def start(self) -> bytes:
        message = self.handshake.start()
        return frame(message) if message is not None else b""

    def advance(self) -> bytes:
        out = bytearray()
        while not self.handshake.complete:
            message = self.reader.next_message()
            if message is None:
                break
            reply = self.handshake.receive(bytes(message))
            if reply is not None:
                out += frame(reply)
        return bytes(out)

    @property
    def complete(self) -> bool:
        return self.handshake.complete

    def channel(self) -> NoiseChannel:
        send, receive = self.handshake.split()
        return NoiseChannel(send, receive, self.reader)


class NoiseChannel:
    """Encrypts writes into framed transport messages and opens the ones read.

    :meth:`decrypt_ready` yields the plaintext of every whole message in the
    reader, each a view of one reused scratch buffer, so the consumer copies
    what it keeps (the muxer does, into its stream buffers). Raises :class:`~murmur.errors.DecryptError` on a forged
    or replayed message and :class:`~murmur.errors.FrameError` on one too
    short to hold a tag; after either the channel is dead.
    """

    def __init__(self, send: CipherState, receive: CipherState, reader: NoiseReader) -> None:
        self._send = send
        self._receive = receive
        self.reader = reader
        self._plain = bytearray(MAX_PLAINTEXT)
        self._plain_view = memoryview(self._plain)
        self.bytes_sealed = 0
        self.bytes_opened = 0

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytearray:
        """``data`` as consecutive transport messages, in one buffer for one write."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        messages = max(1, -(-size // MAX_PLAINTEXT))
        out = bytearray(size + messages * (NOISE_LENGTH.size + TAG_LEN))
        out_view = memoryview(out)
        pos = 0
        for i in range(messages):
            chunk = view[i * MAX_PLAINTEXT : (i + 1) * MAX_PLAINTEXT]
            NOISE_LENGTH.pack_into(out, pos, len(chunk) + TAG_LEN)
            pos += NOISE_LENGTH.size
            self._send.seal_into(chunk, out_view[pos : pos + len(chunk) + TAG_LEN])
            pos += len(chunk) + TAG_LEN
        self.bytes_sealed += size
        return out

    def decrypt_ready(self) -> Iterator[memoryview]:
        """The plaintext of each whole message read so far, one at a time, as
        a view of one reused scratch buffer: valid until the next item, so
        the consumer handles (or copies) each before asking for the next."""
        while (message := self.reader.next_message()) is not None:
            if len(message) < TAG_LEN:
                raise FrameError(f"Noise transport message of {len(message)} bytes has no tag")
            size = len(message) - TAG_LEN
            target = self._plain_view[:size]
            try:
                self._receive.open_into(message, target)
            except InvalidTag:
                raise DecryptError("Noise transport message failed authentication") from None
            except HandshakeError as exc:  # nonce space exhausted: the spec says terminate
                raise DecryptError(str(exc)) from None
            self.bytes_opened += size
            yield target
