"""AutoNAT v2 messages and the server's rules (``/libp2p/autonat/2/dial-request``
and ``/dial-back``), sans-IO.

Why a node asks: an address peers *observed* for us (identify) shows a NAT's
public side but proves nothing: an outbound connection's mapping looks the
same. Only a peer that dials the address and reaches us proves it. A client
sends a ``DialRequest`` (addresses in priority order and a random 64-bit
nonce); the server dials exactly one of them, the first it is willing to,
opens ``/dial-back`` on that new connection and sends the nonce; the client
answers ``DialBackResponse`` OK and the server reports the outcome in a
``DialResponse``. The client believes a success only if the nonce came back
(a server cannot claim a dial it did not make).

Why the server may ask for bytes first: a server that dials any address a
client names is an amplifier (the client sends a few bytes, the server and a
victim do a handshake). When the chosen address's IP is not the one the
request came from, the server first asks for ``DIAL_DATA_BYTES`` (the spec's
30-100 kB) in ``DialDataResponse`` messages of at most ``MAX_DATA_CHUNK``
bytes each: the attack then costs the attacker more bandwidth than the victim.

Everything off the wire is checked here, once: a message over
:data:`MAX_MESSAGE` bytes, one that does not parse, a ``Message`` that is not
exactly one of its four kinds, the wrong kind at a step, more than
:data:`MAX_ADDRS` addresses, a data chunk over :data:`MAX_DATA_CHUNK` is a
:class:`~murmur.errors.DecodeError`. A status this version does not know is
:class:`UnknownStatus` (the spec: discard the response).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from murmur.errors import DecodeError
from murmur.protocol import pb, uvarint
from murmur.protocol.addresses import Scope, scope
from murmur.protocol.multiaddr import Multiaddr

DIAL_REQUEST = "/libp2p/autonat/2/dial-request"
DIAL_BACK = "/libp2p/autonat/2/dial-back"
MAX_MESSAGE = 8192  # bytes of one message: a 4096-byte data chunk and its framing fit
MAX_ADDRS = 16  # addresses one request may list; the server considers the first dialable one only
MAX_DATA_CHUNK = 4096  # the spec's bound on one DialDataResponse's data
DIAL_DATA_BYTES = 40_000  # what a server asks before dialing another IP than the requester's (spec: 30k-100k)
MAX_DIAL_DATA_BYTES = 100_000  # the most a client pays for one request (the spec's upper figure)


class ResponseStatus(enum.IntEnum):
    E_INTERNAL_ERROR = 0
    E_REQUEST_REJECTED = 100
    E_DIAL_REFUSED = 101
    OK = 200


class DialStatus(enum.IntEnum):
    UNUSED = 0
    E_DIAL_ERROR = 100
    E_DIAL_BACK_ERROR = 101
    OK = 200


class UnknownStatus(DecodeError):
    """A response whose status this version does not know: discarded."""


@dataclass(frozen=True)
class DialRequest:
    addrs: tuple[bytes, ...]  # raw multiaddrs, in the client's priority order
    nonce: int


@dataclass(frozen=True)
class DialResponse:
    status: ResponseStatus
    addr_idx: int = 0
    dial_status: DialStatus = DialStatus.UNUSED


@dataclass(frozen=True)
class DialDataRequest:
    addr_idx: int
    num_bytes: int


@dataclass(frozen=True)
class DialDataResponse:
    data_len: int  # only its size counts; the bytes are discarded on arrival


Message = DialRequest | DialResponse | DialDataRequest | DialDataResponse

_KINDS = ("dialRequest", "dialResponse", "dialDataRequest", "dialDataResponse")


# --- encoding ----------------------------------------------------------------------------


def encode(msg: Message | bytes) -> bytes:
    """One uvarint-length-prefixed ``Message``; ``bytes`` is a DialDataResponse's data."""
    out = pb.AutonatMessage()
    if isinstance(msg, bytes):
        if len(msg) > MAX_DATA_CHUNK:
            raise ValueError(f"dial data chunk of {len(msg)} bytes exceeds {MAX_DATA_CHUNK}")
        out.dialDataResponse.data = msg
    elif isinstance(msg, DialRequest):
        out.dialRequest.addrs.extend(msg.addrs)
        out.dialRequest.nonce = msg.nonce
    elif isinstance(msg, DialResponse):
        out.dialResponse.status = int(msg.status)
        out.dialResponse.addrIdx = msg.addr_idx
        out.dialResponse.dialStatus = int(msg.dial_status)
    elif isinstance(msg, DialDataRequest):
        out.dialDataRequest.addrIdx = msg.addr_idx
        out.dialDataRequest.numBytes = msg.num_bytes
    else:  # DialDataResponse carries no bytes of its own here: send them with encode(bytes)
        raise TypeError(f"encode the data of {msg!r} as bytes")
    return _framed(out)


def encode_dial_back(nonce: int) -> bytes:
    msg = pb.DialBack()
    msg.nonce = nonce
    return _framed(msg)


def encode_dial_back_response() -> bytes:
    msg = pb.DialBackResponse()
    msg.status = 0  # OK, the only status the spec defines
    return _framed(msg)


def _framed(msg: object) -> bytes:
    return pb.framed(msg, MAX_MESSAGE, "autonat message")  # type: ignore[arg-type]


# --- decoding ----------------------------------------------------------------------------


def message_length(prefix: bytes | bytearray) -> tuple[int, int] | None:
    """``(length, prefix_bytes)`` once ``prefix`` holds the whole uvarint, else ``None``.
    A length over :data:`MAX_MESSAGE` is a :class:`DecodeError` before its body is read."""
    return uvarint.bounded_length(prefix, MAX_MESSAGE, "autonat message")


def decode(body: bytes | bytearray | memoryview) -> Message:
    if len(body) > MAX_MESSAGE:
        raise DecodeError(f"autonat message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    msg = pb.parse(pb.AutonatMessage, body, DecodeError, "autonat Message")
    kinds = [k for k in _KINDS if msg.HasField(k)]
    if len(kinds) != 1:
        raise DecodeError(f"autonat Message with {len(kinds)} kinds set, not one")
    kind = kinds[0]
    if kind == "dialRequest":
        req = msg.dialRequest
        if len(req.addrs) > MAX_ADDRS:
            raise DecodeError(f"dial request with {len(req.addrs)} addresses, more than {MAX_ADDRS}")
        if not req.HasField("nonce"):
            raise DecodeError("dial request without a nonce")
        return DialRequest(tuple(bytes(a) for a in req.addrs), int(req.nonce))
    if kind == "dialResponse":
        res = msg.dialResponse
        try:
            status = ResponseStatus(res.status)
            dial_status = DialStatus(res.dialStatus)
        except ValueError:
            raise UnknownStatus(f"dial response status {res.status}/{res.dialStatus} unknown") from None
        return DialResponse(status, int(res.addrIdx), dial_status)
    if kind == "dialDataRequest":
        return DialDataRequest(int(msg.dialDataRequest.addrIdx), int(msg.dialDataRequest.numBytes))
    size = len(msg.dialDataResponse.data)
    if size > MAX_DATA_CHUNK:
        raise DecodeError(f"dial data chunk of {size} bytes exceeds {MAX_DATA_CHUNK}")
    return DialDataResponse(size)


def decode_dial_back(body: bytes | bytearray | memoryview) -> int:
    """A DialBack's nonce."""
    if len(body) > MAX_MESSAGE:
        raise DecodeError(f"dial-back of {len(body)} bytes exceeds {MAX_MESSAGE}")
    msg = pb.parse(pb.DialBack, body, DecodeError, "DialBack")
    if not msg.HasField("nonce"):
        raise DecodeError("dial-back without a nonce")
    return int(msg.nonce)


def decode_dial_back_response(body: bytes | bytearray | memoryview) -> None:
    if len(body) > MAX_MESSAGE:
        raise DecodeError(f"dial-back response of {len(body)} bytes exceeds {MAX_MESSAGE}")
    msg = pb.parse(pb.DialBackResponse, body, DecodeError, "DialBackResponse")
    if msg.status != 0:
        raise UnknownStatus(f"dial-back response status {msg.status} unknown")


# --- the server's choice -----------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The one address a server dials: its index in the request, the address,
    and whether the client must pay ``DIAL_DATA_BYTES`` first (another IP
    than the one the request came from)."""

    index: int
    addr: Multiaddr
    needs_data: bool


def choose(addrs: Sequence[bytes], requester_host: str, *, families: frozenset[int] = frozenset({4, 6}),
           allow_private: bool = False, relayed: bool = False) -> Choice | None:
    """The first address of ``addrs`` this server will dial, or None (E_DIAL_REFUSED).

    Willing means: a plain TCP address (``/ip4|ip6/.../tcp/...``, an optional
    ``/p2p`` suffix; circuits and names are not dialled back), of an IP family
    the server has (``families``), with a port, and public unless
    ``allow_private`` (the spec: a server SHOULD NOT dial private addresses;
    a LAN or loopback test network allows them). Never loopback or
    unspecified addresses of another machine: a request naming 127.0.0.1 would
    make the server dial itself.

    ``relayed``: the request came over a circuit, so ``requester_host`` is the
    relay's address, not the requester's: every address then costs the price
    (taken as the requester's IP, any port of the relay's would be dialled
    for free)."""
    requester = _ip(requester_host)
    for index, raw in enumerate(addrs[:MAX_ADDRS]):
        try:
            addr = Multiaddr.from_bytes(raw)
        except ValueError:
            continue
        if addr.port <= 0:
            continue
        ip = _ip(addr.host)
        if ip is None or ip.version not in families:
            continue
        where = scope(addr.host)
        local_ok = allow_private and where is Scope.LOOPBACK and requester is not None and requester.is_loopback
        if where is Scope.PUBLIC or (allow_private and where in (Scope.SHARED, Scope.PRIVATE)) or local_ok:
            return Choice(index, addr, needs_data=relayed or requester is None or ip != requester)
    return None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
