"""Emulated link rates: a node-wide pace for what a node sends and reads.

``[link] upload_bytes_s`` / ``download_bytes_s`` make one machine's loopback
behave, for the learning's purposes, like a home link of 10-50 Mbit/s: every
message a session sends first waits for the node's upload bucket, and every
message it receives holds that connection's reader until the node's
download bucket has paid for it (TCP then pushes back on the sender, as a
slow link would). Both buckets are the transport's own
:class:`~murmur.protocol.transport.TokenBucket`, shared by all of the node's
connections, so the rate is per node, not per peer.

This is an emulation and is labelled so wherever it is reported: it paces
application messages, with no queueing delay, jitter or loss, and it does
not see the transport's own pings or the Noise handshake.
"""

from __future__ import annotations

import asyncio

from murmur.protocol.transport import TokenBucket

BURST_S = 0.05  # a bucket holds this many seconds of its rate ...
MIN_BURST_BYTES = 16 * 1024  # ... and at least this much


class LinkPacer:
    """The upload and download buckets of one node (a rate of 0: unlimited)."""

    def __init__(self, upload_bytes_s: float = 0.0, download_bytes_s: float = 0.0) -> None:
        self.upload_bytes_s = upload_bytes_s
        self.download_bytes_s = download_bytes_s
        self._up = _bucket(upload_bytes_s)
        self._down = _bucket(download_bytes_s)

    @property
    def limited(self) -> bool:
        return self._up is not None or self._down is not None

    async def before_send(self, nbytes: int) -> None:
        """Wait until the upload link has carried ``nbytes`` more."""
        await _pay(self._up, nbytes)

    async def after_receive(self, nbytes: int) -> None:
        """Wait until the download link has carried ``nbytes`` more."""
        await _pay(self._down, nbytes)

    def describe(self) -> str | None:
        if not self.limited:
            return None
        def rate(r: float) -> str:
            return f"{r * 8 / 1e6:g} Mbit/s" if r > 0 else "unlimited"
        return f"emulated (token buckets): upload {rate(self.upload_bytes_s)}, download {rate(self.download_bytes_s)}"


def _bucket(rate: float) -> TokenBucket | None:
    if rate <= 0:
        return None
    return TokenBucket(rate, max(MIN_BURST_BYTES, rate * BURST_S))


async def _pay(bucket: TokenBucket | None, nbytes: int) -> None:
    if bucket is None or nbytes <= 0:
        return
    wait = bucket.consume(nbytes)
    if wait > 0:
        await asyncio.sleep(wait)
