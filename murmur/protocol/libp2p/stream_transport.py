"""A libp2p stream as an asyncio transport, so a relayed connection is
upgraded by the very :class:`~murmur.protocol.libp2p.wire.Wire` that upgrades
TCP (security, muxer, admission, timeouts, budgets): nothing of the upgrade is
written twice.

The stream's bytes are pushed into the protocol's ``get_buffer`` /
``buffer_updated`` as a socket's would be; what the protocol writes is queued
and sent by one writer task. Both are bounded: the queue pauses the protocol's
writing past ``high_water`` bytes (as a socket's send buffer does), and
``pause_reading`` stops the reader, so the underlying stream's window (paid
from the relay connection's budget) pushes back on the relay.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from murmur.errors import ConnectionClosed, PeerFault
from murmur.protocol.libp2p.connection import Stream
from murmur.tasks import TaskManager

READ_BYTES = 64 * 1024


class StreamTransport(asyncio.Transport):
    def __init__(self, stream: Stream, protocol: asyncio.BufferedProtocol, tasks: TaskManager, name: str,
                 peername: tuple[str, int], sockname: tuple[str, int]) -> None:
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._tasks = tasks
        self._name = name
        self._extra = {"peername": peername, "sockname": sockname}
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._readable = asyncio.Event()
        self._readable.set()
        self._has_data = asyncio.Event()
        self._closing = False
        self._lost = False

    def start(self) -> None:
        """Tell the protocol it is connected, then run the reader and writer."""
        self._protocol.connection_made(self)
        if self._lost:
            return
        self._tasks.spawn(f"{self._name}-read", self._read_loop)
        self._tasks.spawn(f"{self._name}-write", self._write_loop)

    # --- asyncio.Transport -----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else min(self._low, self._high // 4)

    def get_write_buffer_size(self) -> int:
        return self._queued

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.is_closing() or not data:
            return
        self._queue.append(bytes(data))
        self._queued += len(data)
        self._has_data.set()
        if not self._write_paused and self._queued > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def is_reading(self) -> bool:
        return self._readable.is_set()

    def close(self) -> None:
        """Flush what is queued, FIN, then report the connection lost."""
        if self.is_closing():
            return
        self._closing = True
        self._has_data.set()  # the writer finishes the queue, then closes

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._queue.clear()
        self._queued = 0
        self._stream.reset()
        self._connection_lost(None)

    # --- tasks -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        stream = self._stream
        try:
            while not self._lost:
                await self._readable.wait()
                data = await stream.read(READ_BYTES)
                if self._lost:
                    return
                if not data:
                    if not self._protocol.eof_received():
                        self.close()
                    return
                view = memoryview(data)
                while view and not self._lost:
                    buf = self._protocol.get_buffer(len(view))
                    n = min(len(buf), len(view))
                    if n == 0:
                        raise ConnectionClosed("protocol buffer full")
                    buf[:n] = view[:n]
                    view = view[n:]
                    self._protocol.buffer_updated(n)
        except (ConnectionClosed, PeerFault, OSError) as exc:
            self._stream.reset()
            self._connection_lost(exc)

    async def _write_loop(self) -> None:
        stream = self._stream
        try:
            while not self._lost:
                if not self._queue:
                    if self._closing:
                        await stream.close_write()
                        stream.close_read()
                        self._connection_lost(None)
                        return
                    self._has_data.clear()
                    await self._has_data.wait()
                    continue
                chunk = self._queue.popleft()
                await stream.write(chunk)
                self._queued -= len(chunk)
                if self._write_paused and self._queued <= self._low:
                    self._write_paused = False
                    self._protocol.resume_writing()
        except (ConnectionClosed, PeerFault, OSError) as exc:
            self._stream.reset()
            self._connection_lost(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._readable.set()
        self._has_data.set()
        self._tasks.cancel(f"{self._name}-read")
        self._tasks.cancel(f"{self._name}-write")
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)
