"""AutoNAT v2 on the libp2p host: the server (``/dial-request``) and the client
(``/dial-back``, :meth:`AutoNATClient.check`). Messages and the server's
choice of address are in :mod:`murmur.protocol.autonat`.

The server dials back from a dial-only host of its own, with an identity of
its own (the spec lets it: the client trusts the nonce, not the peer id), on
an ephemeral port. Why not the node's host: a second connection to the
client from the same identity is what a simultaneous dial looks like, and the
client's node would resolve it by closing one of the two; and dialing from
the listen port could punch the very hole the check must not find open.

What a client can make a server spend is bounded by :class:`AutoNATConfig`:
one request per peer every ``per_peer_interval_s`` (later ones get
``E_REQUEST_REJECTED``), ``max_concurrent`` dial-backs in flight in all
(past that, rejected at once, never queued), each request within
``request_timeout_s``, and a dial to an IP other than the requester's only
after it paid ``dial_data_bytes`` (see the spec's amplification rule); a
request over a relayed connection has no IP of its own (the remote address
is the relay's), so every address costs that. A request waiting for its
payment holds no dial-back slot: it holds one of ``max_paying`` places for
at most ``pay_timeout_s`` (see :data:`PAY_TIMEOUT_S`), and takes a slot
only once paid.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from murmur.errors import ConnectionClosed, DecodeError, PeerFault, TimeoutFault
from murmur.protocol import autonat
from murmur.protocol.autonat import (
    DialDataRequest,
    DialDataResponse,
    DialRequest,
    DialResponse,
    DialStatus,
    ResponseStatus,
)
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.libp2p.connection import Libp2pConnection, Stream
from murmur.protocol.libp2p.host import HostConfig, Libp2pHost
from murmur.protocol.libp2p.relay import read_message
from murmur.protocol.multiaddr import Multiaddr

log = logging.getLogger(__name__)

MAX_REMEMBERED_PEERS = 4096  # requesters whose last request time the server keeps (oldest forgotten)
PAY_TIMEOUT_S = 5.0
"""How long a requester has to pay its dial data once asked (40 kB: 64 kbit/s
will do). Requests used to take their dial-back slot before they were asked
to pay, and hold it to ``request_timeout_s``: four requesters that never paid
held all four slots for 20 s at a time, and an honest check of its own IP,
which costs nothing, was rejected 40 times in a row until they timed out."""
MAX_PAYING = 16
"""Requests waiting for their payment at once (all requesters together): what
non-payers can hold is these places, never a dial-back slot."""
_DATA_CHUNK = bytes(autonat.MAX_DATA_CHUNK)  # what a client pays with: zeros, serialised once


@dataclass(frozen=True)
class AutoNATConfig:
    server: bool = True  # answer other peers' dial requests
    allow_private: bool = False  # dial back private and loopback addresses (a LAN or a test network)
    max_concurrent: int = 4  # dial-backs in flight, all requesters together
    per_peer_interval_s: float = 10.0  # one request per peer this often
    request_timeout_s: float = 20.0  # a whole request, the requester's payment included
    dial_timeout_s: float = 5.0  # the dial-back's connect and upgrade
    dial_data_bytes: int = autonat.DIAL_DATA_BYTES
    max_pay_bytes: int = autonat.MAX_DIAL_DATA_BYTES  # the most this node pays a server for one request
    pay_timeout_s: float = PAY_TIMEOUT_S  # a requester asked for dial data pays it within this
    max_paying: int = MAX_PAYING  # requests waiting for their payment at once

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or not self.per_peer_interval_s >= 0 or not self.request_timeout_s > 0 \
                or not self.dial_timeout_s > 0 or self.dial_data_bytes < 0 or self.max_pay_bytes < 0 \
                or not self.pay_timeout_s > 0 or self.max_paying < 1:
            raise ValueError(f"invalid autonat config {self}")


def stat_names() -> list[str]:
    """Every counter :class:`AutoNATServer` and :class:`AutoNATClient` may count."""
    return ["served", "rejected", "refused", "timed_out", "paid_for", "dialed_ok", "dial_error", "dial_back_error",
            "checks", "reachable", "unreachable", "inconclusive", "nonce_mismatch"]


async def _read(stream: Stream, timeout_s: float) -> autonat.Message:
    return autonat.decode(await read_message(stream, timeout_s, autonat.message_length, "autonat"))


class AutoNATServer:
    """Serves ``/libp2p/autonat/2/dial-request`` on ``host`` (see the module docstring)."""

    def __init__(self, host: Libp2pHost, config: AutoNATConfig = AutoNATConfig()) -> None:
        self.host = host
        self.config = config
        self.stats: Counter[str] = Counter()
        self._last: OrderedDict[PeerId, float] = OrderedDict()
        self._in_flight = 0  # dial-back slots taken (requests paid for, or free)
        self._paying = 0  # requests waiting for their payment
        self._dialer: Libp2pHost | None = None  # made at the first dial-back
        host.set_handler(autonat.DIAL_REQUEST, self._serve)

    async def close(self) -> None:
        self.host.remove_handler(autonat.DIAL_REQUEST)
        if self._dialer is not None:
            await self._dialer.close()

    def _families(self) -> frozenset[int]:
        """The IP families this server has: those it listens on (an IPv4-only
        server refuses IPv6 addresses, as the spec asks)."""
        families = {6 if a.family == "ip6" else 4 for a in self.host.listen_addrs}
        return frozenset(families or {4})

    def _admit(self, peer: PeerId, now: float) -> bool:
        last = self._last.get(peer)
        if last is not None and now - last < self.config.per_peer_interval_s:
            return False
        if self._in_flight >= self.config.max_concurrent:
            return False
        self._last.pop(peer, None)
        self._last[peer] = now
        while len(self._last) > MAX_REMEMBERED_PEERS:
            self._last.popitem(last=False)
        return True

    async def _serve(self, stream: Stream) -> None:
        try:
            await self._request(stream)
        except TimeoutError:  # it held a request (or a place among the payers) past the bound
            self.stats["timed_out"] += 1
            raise TimeoutFault(f"autonat request not done in time ({self.config.request_timeout_s}s in all, "
                               f"{self.config.pay_timeout_s}s to pay)") from None

    async def _request(self, stream: Stream) -> None:
        async with asyncio.timeout(self.config.request_timeout_s):
            msg = await _read(stream, self.config.request_timeout_s)
            if not isinstance(msg, DialRequest):
                raise DecodeError(f"autonat stream opened with {type(msg).__name__}, not DialRequest")
            if not self._admit(stream.peer_id, time.monotonic()):
                await self._reject(stream)
                return
            await self._handle(stream, msg)

    async def _reject(self, stream: Stream) -> None:
        self.stats["rejected"] += 1
        await self._answer(stream, DialResponse(ResponseStatus.E_REQUEST_REJECTED))

    async def _handle(self, stream: Stream, msg: DialRequest) -> None:
        choice = autonat.choose(msg.addrs, stream.conn.remote[0], families=self._families(),
                                allow_private=self.config.allow_private, relayed=stream.conn.relay is not None)
        if choice is None:
            self.stats["refused"] += 1
            await self._answer(stream, DialResponse(ResponseStatus.E_DIAL_REFUSED))
            return
        if choice.needs_data and self.config.dial_data_bytes:
            if self._paying >= self.config.max_paying:
                await self._reject(stream)
                return
            self._paying += 1
            try:
                async with asyncio.timeout(self.config.pay_timeout_s):
                    await self._collect(stream, choice.index)
            finally:
                self._paying -= 1
            self.stats["paid_for"] += 1
        if self._in_flight >= self.config.max_concurrent:  # taken while it paid
            await self._reject(stream)
            return
        self._in_flight += 1
        try:
            status = await self._dial_back(choice.addr, msg.nonce)
        finally:
            self._in_flight -= 1
        self.stats["served"] += 1
        await self._answer(stream, DialResponse(ResponseStatus.OK, choice.index, status))

    async def _collect(self, stream: Stream, index: int) -> None:
        """Ask for ``dial_data_bytes`` and read them (the caller's deadline bounds it)."""
        await stream.write(autonat.encode(DialDataRequest(index, self.config.dial_data_bytes)))
        paid = 0
        while paid < self.config.dial_data_bytes:
            got = await _read(stream, self.config.pay_timeout_s)
            if not isinstance(got, DialDataResponse):
                raise DecodeError(f"{type(got).__name__} while paying for a dial, not DialDataResponse")
            paid += got.data_len

    async def _answer(self, stream: Stream, response: DialResponse) -> None:
        await stream.write(autonat.encode(response))
        await stream.close_write()

    async def _dial_back(self, addr: Multiaddr, nonce: int) -> DialStatus:
        if self._dialer is None:
            self._dialer = Libp2pHost(Identity.generate(),
                                      HostConfig(limits=self.host.config.limits, identify_on_connect=False),
                                      make_socket=self.host._make_socket)
        try:
            async with asyncio.timeout(self.config.dial_timeout_s):
                conn = await self._dialer.dial(addr)
        except (OSError, PeerFault, ConnectionClosed, TimeoutError):
            self.stats["dial_error"] += 1
            return DialStatus.E_DIAL_ERROR
        try:
            async with asyncio.timeout(self.config.dial_timeout_s):
                back = await conn.open_stream(autonat.DIAL_BACK)
                await back.write(autonat.encode_dial_back(nonce))
                body = await read_message(back, self.config.dial_timeout_s, autonat.message_length, "dial-back")
                autonat.decode_dial_back_response(body)
        except (OSError, PeerFault, ConnectionClosed, TimeoutError, asyncio.IncompleteReadError):
            self.stats["dial_back_error"] += 1
            return DialStatus.E_DIAL_BACK_ERROR
        finally:
            await conn.close()
        self.stats["dialed_ok"] += 1
        return DialStatus.OK


@dataclass(frozen=True)
class CheckResult:
    """What one server said of one of our addresses: ``reachable`` True (it
    dialled it and our nonce came back on that connection), False (it could
    not connect), or None (no verdict: refused, rejected, dial-back error,
    or a claim of success without our nonce)."""

    server: PeerId
    server_host: str
    addr: Multiaddr | None
    reachable: bool | None
    status: ResponseStatus | None = None


class AutoNATClient:
    """Asks servers to dial our addresses and answers their dial-backs."""

    def __init__(self, host: Libp2pHost, config: AutoNATConfig = AutoNATConfig()) -> None:
        self.host = host
        self.config = config
        self.stats: Counter[str] = Counter()
        self._pending: dict[int, asyncio.Future[tuple[str, int]]] = {}
        host.set_handler(autonat.DIAL_BACK, self._serve_dial_back)

    async def _serve_dial_back(self, stream: Stream) -> None:
        body = await read_message(stream, self.config.dial_timeout_s, autonat.message_length, "dial-back")
        nonce = autonat.decode_dial_back(body)
        waiting = self._pending.get(nonce)
        if waiting is None:  # not ours, or too late: discarded (the spec), no answer
            self.stats["nonce_mismatch"] += 1
            stream.reset()
            return
        if not waiting.done():
            waiting.set_result(stream.conn.local)
        await stream.write(autonat.encode_dial_back_response())
        await stream.close_write()

    async def check(self, server: Libp2pConnection, addrs: Sequence[Multiaddr]) -> CheckResult:
        """Ask ``server`` to dial one of ``addrs`` (priority order). A server
        that breaks the protocol gets its fault and no verdict is drawn;
        raises ``TimeoutError``, ``ConnectionClosed`` or ``OSError``."""
        if not addrs:
            raise ValueError("no address to check")
        addrs = [a.without_peer() for a in list(addrs)[:autonat.MAX_ADDRS]]
        self.stats["checks"] += 1
        nonce = secrets.randbits(64)
        while nonce in self._pending:
            nonce = secrets.randbits(64)
        came_back: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._pending[nonce] = came_back
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                stream = await server.open_stream(autonat.DIAL_REQUEST)
                try:
                    response = await self._exchange(stream, addrs, nonce)
                except PeerFault as fault:  # a server breaking the protocol: its penalty, no verdict
                    stream.reset()
                    server._fault_on_stream(fault)
                    response = None
                except BaseException:
                    stream.reset()
                    raise
        finally:
            del self._pending[nonce]
            came_back.cancel()
        if response is None:  # it broke the protocol, or we declined its price (the spec: reset)
            stream.reset()
            self.stats["inconclusive"] += 1
            return CheckResult(server.peer_id, server.remote[0], None, None)
        return self._verdict(server, addrs, response, came_back)

    async def _exchange(self, stream: Stream, addrs: list[Multiaddr], nonce: int) -> DialResponse | None:
        """The server's response, or None when it asked a price we do not pay."""
        await stream.write(autonat.encode(DialRequest(tuple(a.to_bytes() for a in addrs), nonce)))
        while True:
            msg = await _read(stream, self.config.request_timeout_s)
            if isinstance(msg, DialResponse):
                await stream.close_write()
                return msg
            if not isinstance(msg, DialDataRequest):
                raise DecodeError(f"autonat server sent {type(msg).__name__}")
            if not 0 <= msg.addr_idx < len(addrs) or msg.num_bytes > self.config.max_pay_bytes:
                return None
            await self._pay(stream, msg.num_bytes)

    async def _pay(self, stream: Stream, num_bytes: int) -> None:
        chunk = autonat.encode(_DATA_CHUNK)
        for _ in range(-(-num_bytes // len(_DATA_CHUNK))):
            await stream.write(chunk)

    def _verdict(self, server: Libp2pConnection, addrs: list[Multiaddr], response: DialResponse,
                 came_back: asyncio.Future[tuple[str, int]]) -> CheckResult:
        host = server.remote[0]
        if response.status is not ResponseStatus.OK or not 0 <= response.addr_idx < len(addrs):
            self.stats["inconclusive"] += 1
            return CheckResult(server.peer_id, host, None, None, response.status)
        addr = addrs[response.addr_idx]
        reachable: bool | None = None
        if response.dial_status is DialStatus.E_DIAL_ERROR:
            reachable = False
        elif response.dial_status is DialStatus.OK:
            # believed only with our nonce back, on a connection of the address's family
            local = came_back.result()[0] if came_back.done() and not came_back.cancelled() else None
            reachable = True if local is not None and (":" in local) == (addr.family == "ip6") else None
        self.stats[{True: "reachable", False: "unreachable", None: "inconclusive"}[reachable]] += 1
        return CheckResult(server.peer_id, host, addr, reachable, response.status)
