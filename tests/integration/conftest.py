"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.daemons import HTTP_TIMEOUT_S, DaemonPool, children_of


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    """Real daemon processes, all killed after the test; none may outlive it."""
    pool = DaemonPool(tmp_path)
    try:
        yield pool
    finally:
        pool.teardown()
        assert children_of(os.getpid()) == [], "a daemon outlived the test"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client for the daemons' status APIs."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
        yield session
