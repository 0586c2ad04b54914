"""Find (or, as root, install) Debian's headless Chromium for browser tests.

Why a helper: the dashboard test must load the real page in a real browser,
but CI machines and developer laptops differ. We look for an installed
binary first; when running as root on Debian we install ``chromium`` with
apt-get (running ``apt-get update`` once only if the first attempt fails);
anywhere else the caller gets a reason string to ``pytest.skip`` with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_TIMEOUT_S = 900
DUMP_TIMEOUT_S = 90
VIRTUAL_TIME_BUDGET_MS = 5000


class BrowserUnavailable(RuntimeError):
    """No Chromium could be found or installed; the message says why."""


def find_chromium() -> Path | None:
    """An installed Chromium-compatible binary, or None."""
    fixed = Path("/usr/bin/chromium")
    if fixed.is_file() and os.access(fixed, os.X_OK):
        return fixed
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env)


def ensure_chromium() -> Path:
    """Return a Chromium binary, installing Debian's package if we may.

    Raises :class:`BrowserUnavailable` with a human-readable reason otherwise.
    """
    found = find_chromium()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BrowserUnavailable("chromium is not installed and we are not root (apt-get install -y chromium)")
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable("chromium is not installed and apt-get is not available")
    try:
        result = _apt("install", "-y", "--no-install-recommends", "chromium")
        if result.returncode != 0:  # stale or empty package lists: refresh once
            _apt("update")
            result = _apt("install", "-y", "--no-install-recommends", "chromium")
    except subprocess.TimeoutExpired:
        raise BrowserUnavailable(f"apt-get install chromium took longer than {APT_TIMEOUT_S}s") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        raise BrowserUnavailable(f"apt-get install chromium failed: {tail[0]}")
    found = find_chromium()
    if found is None:
        raise BrowserUnavailable("apt-get installed chromium but no binary was found on PATH")
    return found


def dump_dom(url: str, *, budget_ms: int = VIRTUAL_TIME_BUDGET_MS) -> str:
    """Load ``url`` in headless Chromium and return the DOM after scripts ran.

    ``--virtual-time-budget`` lets timers (our 1 s poll) fire without real
    waiting; a fresh ``--user-data-dir`` keeps runs independent.
    """
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="murmur-chromium-") as profile:
        cmd = [
            str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            "--dump-dom", url,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout
