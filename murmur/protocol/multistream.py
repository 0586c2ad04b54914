"""multistream-select 1.0 (``/multistream/1.0.0``), both roles, sans-IO.

libp2p negotiates everything with it: the security protocol on a raw TCP
connection, the muxer inside the secure channel, and the protocol of every
stream. Each message is a multiformats uvarint length (the newline
included), the UTF-8 text, and ``\\n``. The dialer sends the header and its
first proposal in one write; the listener echoes a protocol it speaks or
answers ``na``; ``ls`` asks for the listener's protocols.

Everything a peer can make us spend is bounded here:

* one message is at most :data:`MAX_MESSAGE` bytes (a protocol id of 1 KiB
  is already absurd); the length prefix is checked before the body is
  waited for, and a malformed varint is refused as soon as it is seen;
* a listener answers at most ``max_attempts`` proposals (``ls`` included)
  before it gives up with :class:`~murmur.errors.NegotiationError`, so an
  endless ``na`` loop ends; a dialer proposes each of its protocols once;
* no plaintext protocol is ever accepted: :data:`PLAINTEXT_PROTOCOLS` are
  refused with ``na`` even if someone registers them;
* the first message must be the ``/multistream/1.0.0`` header, so its length
  is known: anything else (an HTTP request, random bytes) is refused as soon
  as its first varint is read, not after waiting for the body it announces.

After a protocol is selected, the bytes that came behind the final message
belong to that protocol: :attr:`leftover` hands them on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from murmur.errors import NegotiationError, NoCommonProtocol
from murmur.protocol import uvarint

PROTOCOL_ID = "/multistream/1.0.0"
NA = "na"
LS = "ls"
MAX_MESSAGE = 1024  # bytes of one message, newline included
MAX_LISTING = 64 * 1024  # bytes of an ls answer
MAX_LISTED = 512  # protocols in an ls answer
DEFAULT_MAX_ATTEMPTS = 16  # proposals (and ls requests) a listener answers on one channel
PLAINTEXT_PROTOCOLS = frozenset({"/plaintext/1.0.0", "/plaintext/2.0.0"})
HEADER_BODY = len(PROTOCOL_ID) + 1  # the header's length prefix: the first varint of every channel


def encode_message(text: str) -> bytes:
    """One multistream message: uvarint length, text, newline."""
    body = text.encode() + b"\n"
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"multistream message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return uvarint.encode(len(body)) + body


def check_protocol_id(protocol: str) -> str:
    """A protocol id we may send: UTF-8, non-empty, one line, within the bound, not a keyword."""
    try:
        size = len(protocol.encode())
    except UnicodeEncodeError:
        raise ValueError(f"protocol id {protocol!r} is not encodable as UTF-8") from None
    if not protocol or "\n" in protocol or protocol in (NA, LS) or size + 1 > MAX_MESSAGE:
        raise ValueError(f"invalid protocol id {protocol!r}")
    return protocol


def encode_listing(protocols: Sequence[str]) -> bytes:
    """The ``ls`` answer: one message holding each protocol as a message, then ``\\n``."""
    inner = b"".join(encode_message(p) for p in protocols) + b"\n"
    if len(inner) > MAX_LISTING:
        raise ValueError("protocol listing too long")
    return uvarint.encode(len(inner)) + inner


class MessageReader:
    """Splits uvarint-length-prefixed messages; holds at most one partial message."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next(self, expected: int | None = None) -> bytes | None:
        """The next message body (newline included), or ``None`` until it is
        complete. With ``expected``, a message of any other length is a
        :class:`NegotiationError` as soon as its length is read."""
        got = uvarint.decode_partial(self._buf, 0, NegotiationError)
        if got is None:
            return None
        length, start = got
        if expected is not None and length != expected:
            raise NegotiationError(f"expected the {PROTOCOL_ID} header, got a message of {length} bytes")
        if length > self.max_message:
            raise NegotiationError(f"multistream message of {length} bytes exceeds {self.max_message}")
        if len(self._buf) - start < length:
            return None
        body = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        return body

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _line(body: bytes) -> str:
    """The text of one message; a message must end in its single newline and be UTF-8."""
    if not body.endswith(b"\n"):
        raise NegotiationError("multistream message does not end in a newline")
    try:
        text = body[:-1].decode()
    except UnicodeDecodeError:
        raise NegotiationError("multistream message is not UTF-8") from None
    if "\n" in text:
        raise NegotiationError("multistream message holds more than one line")
    return text


class Dialer:
    """Proposes ``protocols`` in order until the listener echoes one.

    ``start()`` gives the header and the first proposal; feed what arrives to
    :meth:`feed`, which returns what to send next. When :attr:`selected` is
    set, :attr:`leftover` holds the bytes that followed the listener's echo.
    Raises :class:`NoCommonProtocol` when every proposal got ``na`` and
    :class:`NegotiationError` for anything the listener should not have sent.
    """

    def __init__(self, protocols: Sequence[str]) -> None:
        if not protocols:
            raise ValueError("a dialer needs at least one protocol to propose")
        self.protocols = [check_protocol_id(p) for p in protocols]
        self._next = 0
        self._reader = MessageReader()
        self._got_header = False
        self.selected: str | None = None
        self.leftover = b""
        self.rejected: list[str] = []

    @property
    def done(self) -> bool:
        return self.selected is not None

    def start(self) -> bytes:
        return encode_message(PROTOCOL_ID) + self._propose()

    def _header_length(self) -> int | None:
        return None if self._got_header else HEADER_BODY

    def _propose(self) -> bytes:
        protocol = self.protocols[self._next]
        self._next += 1
        return encode_message(protocol)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.done:
            raise NegotiationError("negotiation already finished")
        self._reader.feed(data)
        out = bytearray()
        while not self.done and (body := self._reader.next(self._header_length())) is not None:
            text = _line(body)
            if not self._got_header:
                if text != PROTOCOL_ID:
                    raise NegotiationError(f"expected the {PROTOCOL_ID} header, got {text[:64]!r}")
                self._got_header = True
                continue
            proposed = self.protocols[self._next - 1]
            if text == proposed:
                self.selected = proposed
                self.leftover = self._reader.take_rest()
            elif text == NA:
                self.rejected.append(proposed)
                if self._next >= len(self.protocols):
                    raise NoCommonProtocol(f"peer refused every protocol offered: {self.rejected}")
                out += self._propose()
            else:
                raise NegotiationError(f"proposed {proposed!r}, peer answered {text[:64]!r}")
        return bytes(out)


class Lister:
    """Asks a listener for its protocols (``ls``); :attr:`protocols` once answered."""

    def __init__(self) -> None:
        self._reader = MessageReader(MAX_LISTING)
        self._got_header = False
        self.protocols: list[str] | None = None

    def start(self) -> bytes:
        return encode_message(PROTOCOL_ID) + encode_message(LS)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.feed(data)
        while self.protocols is None and (body := self._reader.next(None if self._got_header else HEADER_BODY)) is not None:
            if not self._got_header:
                if _line(body) != PROTOCOL_ID:
                    raise NegotiationError("expected the multistream header")
                self._got_header = True
                continue
            self.protocols = _parse_listing(body)


def _parse_listing(body: bytes) -> list[str]:
    """Entries (each a message) up to the bare newline that must end the body."""
    out: list[str] = []
    pos = 0
    while body[pos:] != b"\n":
        if len(out) >= MAX_LISTED:
            raise NegotiationError(f"protocol listing longer than {MAX_LISTED} entries")
        length, start = uvarint.decode(body, pos, NegotiationError)
        if length > MAX_MESSAGE or start + length > len(body):
            raise NegotiationError("malformed protocol listing")
        out.append(_line(body[start : start + length]))
        pos = start + length
    return out


class Listener:
    """Answers proposals: echoes the first one ``supported`` accepts, ``na`` otherwise.

    ``supported`` is a collection of protocol ids or a predicate. At most
    ``max_attempts`` proposals and ``ls`` requests are answered; one more is
    a :class:`NegotiationError`. ``listing`` gives the ``ls`` answer (by
    default the collection itself; a predicate lists nothing).
    """

    def __init__(
        self,
        supported: Collection[str] | Callable[[str], bool],
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        listing: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        if callable(supported):
            self._accepts: Callable[[str], bool] = supported
            self._listing = listing or (lambda: [])
        else:
            protocols = list(supported)
            self._accepts = set(protocols).__contains__
            self._listing = listing or (lambda: protocols)
        self.max_attempts = max_attempts
        self.attempts = 0
        self._reader = MessageReader()
        self._got_header = False
        self.selected: str | None = None
        self.leftover = b""

    @property
    def done(self) -> bool:
        return self.selected is not None

    def start(self) -> bytes:
        """Our header, sent without waiting for the dialer's."""
        return encode_message(PROTOCOL_ID)

    def _accept(self, protocol: str) -> bool:
        return protocol not in PLAINTEXT_PROTOCOLS and protocol != PROTOCOL_ID and self._accepts(protocol)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.done:
            raise NegotiationError("negotiation already finished")
        self._reader.feed(data)
        out = bytearray()
        while not self.done and (body := self._reader.next(None if self._got_header else HEADER_BODY)) is not None:
            text = _line(body)
            if not self._got_header:
                if text != PROTOCOL_ID:
                    raise NegotiationError(f"expected the {PROTOCOL_ID} header, got {text[:64]!r}")
                self._got_header = True
                continue
            self.attempts += 1
            if self.attempts > self.max_attempts:
                raise NegotiationError(f"more than {self.max_attempts} proposals without agreement")
            if text == LS:
                out += encode_listing([p for p in self._listing() if self._accept(p)])
            elif text and text != NA and self._accept(text):
                self.selected = text
                self.leftover = self._reader.take_rest()
                out += encode_message(text)
            else:
                out += encode_message(NA)
        return bytes(out)
