"""Emulated link rates (node/links.py): the node-wide buckets pace what all
of a node's sessions send and read together."""

from __future__ import annotations

import asyncio
import time

from murmur.node.links import MIN_BURST_BYTES, LinkPacer

RATE = 2_000_000.0  # bytes per second
CHUNK = 100_000


async def _spend(pay, n: int) -> float:  # noqa: ANN001 - one of the pacer's coroutines
    start = time.monotonic()
    await asyncio.gather(*(pay(CHUNK) for _ in range(n)))  # concurrent senders share the one link
    return time.monotonic() - start


async def test_upload_is_paced_at_the_node_rate_across_concurrent_senders() -> None:
    pacer = LinkPacer(upload_bytes_s=RATE)
    elapsed = await _spend(pacer.before_send, 6)
    burst = max(MIN_BURST_BYTES, RATE * 0.05)
    assert elapsed >= (6 * CHUNK - burst) / RATE * 0.95


async def test_download_is_paced_and_unlimited_directions_are_free() -> None:
    pacer = LinkPacer(download_bytes_s=RATE)
    assert await _spend(pacer.after_receive, 4) >= (4 * CHUNK - RATE * 0.05) / RATE * 0.95
    assert await _spend(pacer.before_send, 50) < 0.5  # no upload limit: nothing waits
    assert "emulated" in (pacer.describe() or "") and "16 Mbit/s" in (pacer.describe() or "")
    assert LinkPacer().describe() is None and not LinkPacer().limited
