"""Find (or, as root, install) Debian's headless Chromium for browser tests.

Why a helper: the dashboard test must load the real page in a real browser,
but CI machines and developer laptops differ. We look for an installed
binary first; when running as root on Debian we install ``chromium`` with
apt-get (running ``apt-get update`` once only if the first attempt fails);
anywhere else the caller gets a reason string to ``pytest.skip`` with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

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


DEVTOOLS_START_S = 30.0
PROFILE_REMOVE_S = 5.0  # the profile's removal retries this long after the browser's group is killed
DEVTOOLS_CALL_S = 60.0


class BrowserPage:
    """One headless Chromium tab, driven over the DevTools protocol.

    ``--dump-dom`` shows what a page contains, not how it is laid out; this
    lets a test measure the page as a person sees it (does a table overflow
    its panel, did every image load) and take a screenshot of it::

        async with BrowserPage(1280, 900) as page:
            await page.goto(url)
            assert await page.evaluate("document.images.length") == 3
            await page.screenshot(path)
    """

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        self.width, self.height = width, height
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._proc: Any = None
        self._http: Any = None
        self._ws: Any = None
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    async def __aenter__(self) -> BrowserPage:
        import aiohttp

        binary = await asyncio.to_thread(ensure_chromium)
        self._profile = tempfile.TemporaryDirectory(prefix="murmur-chromium-")
        profile = Path(self._profile.name)
        self._proc = await asyncio.create_subprocess_exec(
            str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            f"--window-size={self.width},{self.height}", "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own group: its helper processes are ended with it
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + DEVTOOLS_START_S
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise BrowserUnavailable("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)  # polling a file the browser writes, bounded by the deadline
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Emulation.setDeviceMetricsOverride",
                        width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._proc is not None:
            if self._proc.returncode is None:
                self._proc.terminate()
                await self._proc.wait()
            # Chromium's helpers (renderer, crashpad) can outlive the browser
            # process by a moment and still write into the profile: a loaded CI
            # rehearsal failed its removal with "Directory not empty".
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._profile is not None:
            await self._remove_profile(self._profile)

    @staticmethod
    async def _remove_profile(profile: tempfile.TemporaryDirectory[str]) -> None:
        deadline = time.monotonic() + PROFILE_REMOVE_S
        while True:
            try:
                profile.cleanup()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)  # a killed helper's last writes land; bounded by the deadline

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), DEVTOOLS_CALL_S)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result") or {})
            if "method" in message:
                self._events.append(message)

    async def goto(self, url: str) -> None:
        self._events.clear()
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + DEVTOOLS_CALL_S
        while not any(e["method"] == "Page.loadEventFired" for e in self._events):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{url} did not load")
            message = await asyncio.wait_for(self._ws.receive_json(), remaining)
            if "method" in message:
                self._events.append(message)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout_s: float = 20.0) -> bool:
        """Whether the JavaScript ``condition`` became true within ``timeout_s``
        (polled in the page: the dashboard renders what its own poll fetched)."""
        return bool(await self.evaluate(
            "new Promise(done => { const end = Date.now() + %d; (function tick() {"
            " let ok = false; try { ok = Boolean(%s); } catch (e) {}"
            " if (ok || Date.now() > end) done(ok); else setTimeout(tick, 50); })(); })"
            % (int(timeout_s * 1000), condition)))

    async def screenshot(self, path: Path, full_page: bool = True) -> tuple[int, int]:
        """Write a PNG of the page (all of it with ``full_page``); returns its size in pixels."""
        import base64

        params: dict[str, Any] = {"format": "png"}
        if full_page:
            width, height = await self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}
        else:
            width, height = self.width, self.height
        data = base64.b64decode((await self.call("Page.captureScreenshot", **params))["data"])
        path.write_bytes(data)
        return int(width), int(height)
