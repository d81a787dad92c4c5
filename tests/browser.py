"""A minimal Chrome DevTools Protocol driver for tests: headless Chromium over one WebSocket.

Only aiohttp and the system ``chromium`` binary (find it with
``tests.support.require_binary("chromium")``). `Browser` starts Chromium with a throwaway
profile on a DevTools port it picks itself (``--remote-debugging-port=0``; the port is read from
``<profile>/DevToolsActivePort``), attaches to its one page target and offers what the page tests
need: `navigate`, `evaluate`, `wait_for`, `screenshot` and `set_javascript_enabled`. Every step
has a deadline. `close` (also the end of ``async with``) kills Chromium's whole process group
and removes the profile.

    async with Browser(require_binary("chromium")) as browser:
        await browser.navigate(url)
        await browser.wait_for("document.querySelector('#x') !== null")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp

# --headless=new: the real browser without a window (the old headless shell is gone).
# --no-sandbox: Chromium refuses to start as root with its sandbox on (tests here run as root).
# --disable-gpu: no GPU in a container; software rendering is what screenshots use anyway.
# The rest keep a test run quiet and alone: no first-run UI, no background network, no crash
# reporter writing to $HOME, no password store or dbus keyring lookups.
CHROMIUM_FLAGS: Final = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    "--hide-scrollbars",
)
START_TIMEOUT_S: Final = 30.0
COMMAND_TIMEOUT_S: Final = 15.0
_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024  # a full-page screenshot, base64


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools command failed, or a page script threw."""


class Browser:
    """One headless Chromium and its one page, driven over the DevTools protocol.

    Use as an async context manager (or call `start` and `close`). Not reentrant: one test
    drives it from one task. `js_errors` collects the page's uncaught exceptions (their text),
    so a test can assert the page's script ran cleanly.
    """

    def __init__(
        self,
        binary: str,
        *,
        window: tuple[int, int] = (1280, 900),
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self.binary = binary
        self.window = window
        self.timeout_s = timeout_s
        self.js_errors: list[str] = []
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []

    async def __aenter__(self) -> Browser:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- Lifecycle.

    async def start(self) -> None:
        """Start Chromium and attach to its page; raises `BrowserError` (after cleaning up)
        if it is not up within `START_TIMEOUT_S`."""
        try:
            await asyncio.wait_for(self._start(), START_TIMEOUT_S)
        except (TimeoutError, OSError, aiohttp.ClientError, BrowserError) as exc:
            log = self._log_tail()
            await self.close()
            raise BrowserError(f"chromium did not start: {exc!r}\n{log}") from exc
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="gw-chromium-"))
        profile = self._root / "profile"
        profile.mkdir()
        width, height = self.window
        with (self._root / "chromium.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    *CHROMIUM_FLAGS,
                    f"--window-size={width},{height}",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group: close() kills the wrapper script, the browser and
                # every renderer/helper it forked in one signal.
                start_new_session=True,
                env={**os.environ, "HOME": str(self._root)},
            )
        port = await self._devtools_port(profile / "DevToolsActivePort")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        ws_url = await self._page_ws_url(port)
        self._ws = await self._session.ws_connect(
            ws_url, max_msg_size=_MAX_MESSAGE_BYTES, timeout=aiohttp.ClientWSTimeout(ws_close=2)
        )
        self._reader = asyncio.create_task(self._read(self._ws), name="cdp-reader")
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _devtools_port(self, path: Path) -> int:
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                # Line 1: the port; line 2: the browser target's path. Written once, but
                # possibly read half-written: retry until the port line is complete.
                lines = path.read_text().splitlines()
                if len(lines) >= 2:
                    return int(lines[0])
            await asyncio.sleep(0.05)

    async def _page_ws_url(self, port: int) -> str:
        assert self._session is not None
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json(content_type=None)
                for target in targets:
                    if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                        return str(target["webSocketDebuggerUrl"])
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop everything; idempotent, never raises."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._fail_all(BrowserError("browser closed"))
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _log_tail(self, limit: int = 4000) -> str:
        if self._root is None:
            return ""
        try:
            return (self._root / "chromium.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    # --- The protocol: numbered commands answered by id, events by method.

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                message: dict[str, Any] = msg.json()
                if "id" in message:
                    future = self._pending.pop(int(message["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                self._on_event(str(message.get("method", "")), message.get("params") or {})
        finally:
            self._fail_all(BrowserError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            exception = details.get("exception") or {}
            self.js_errors.append(str(exception.get("description") or details.get("text")))
        for waiter in list(self._waiters):
            name, future = waiter
            if name == method and not future.done():
                future.set_result(params)
                self._waiters.remove(waiter)

    def _fail_all(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        self._waiters.clear()

    def _expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event; register it before the command causing it."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, future))
        return future

    def _drop(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._waiters[:] = [w for w in self._waiters if w[1] is not future]
        if not future.done():
            future.cancel()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result; `BrowserError` on a protocol
        error, `TimeoutError` past the deadline (default: the browser's `timeout_s`)."""
        if self._ws is None:
            raise BrowserError("browser not started")
        self._next_id += 1
        command_id = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._ws.send_json({"id": command_id, "method": method, "params": params or {}})
            reply = await asyncio.wait_for(future, timeout_s or self.timeout_s)
        finally:
            self._pending.pop(command_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result") or {}
        return result

    # --- What tests use.

    async def navigate(self, url: str, *, timeout_s: float | None = None) -> None:
        """Load `url` and wait for its load event; `BrowserError` if navigation failed
        (e.g. connection refused), `TimeoutError` if the page does not load in time."""
        loaded = self._expect("Page.loadEventFired")
        try:
            result = await self.send("Page.navigate", {"url": url}, timeout_s=timeout_s)
            if result.get("errorText"):
                raise BrowserError(f"navigate {url}: {result['errorText']}")
            await asyncio.wait_for(loaded, timeout_s or self.timeout_s)
        finally:
            self._drop(loaded)

    async def evaluate(self, expression: str, *, timeout_s: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values by value;
        promises awaited); `BrowserError` if it throws. Works with page scripts disabled."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout_s=timeout_s,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exception = details.get("exception") or {}
            raise BrowserError(
                f"{expression!r} threw: {exception.get('description') or details.get('text')}"
            )
        return result.get("result", {}).get("value")

    async def wait_for(
        self, expression: str, timeout_s: float = 10.0, interval_s: float = 0.1
    ) -> Any:
        """Evaluate `expression` until it is truthy and return that value; `TimeoutError`
        (naming the expression and its last value) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            last = await self.evaluate(expression, timeout_s=min(self.timeout_s, timeout_s))
            if last:
                return last
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expression!r} still {last!r} after {timeout_s} s")
            await asyncio.sleep(interval_s)

    async def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Write a PNG of the page (the whole page by default) to `path` and return it."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
            if size.get("width") and size.get("height"):
                params["clip"] = {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                }
        result = await self.send("Page.captureScreenshot", params)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def set_javascript_enabled(self, enabled: bool) -> None:
        """Turn the page's own scripts on or off (for the next navigation on; `evaluate`
        keeps working either way)."""
        await self.send("Emulation.setScriptExecutionDisabled", {"value": not enabled})
