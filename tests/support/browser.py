"""Headless Chromium from Debian's package, driven through the DevTools protocol (nothing downloaded)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

CHROMIUM = "/usr/bin/chromium"
# The network is closed: nothing may call home, update itself or sync.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=zh-CN",
         "--remote-debugging-port=0", "--window-size=1920,1080")


class BrowserError(Exception):
    """Chromium failed, or a page did not reach the state waited for."""


class Page:
    """One tab, over its DevTools WebSocket: commands, and the events it sent (kept in order)."""

    def __init__(self, socket: ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def read(self) -> None:
        async for message in self._socket:
            if message.type != WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif "method" in data:
                self.events.append((data["method"], data.get("params", {})))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """A DevTools command's result (BrowserError if it failed)."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._socket.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(30):
            reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, interval: float = 0.05) -> Any:
        """Wait until the expression is truthy in the page; its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(BrowserError):  # e.g. during a navigation
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(interval)
        raise BrowserError(f"not within {timeout} s: {expression} (last value {last!r})")

    async def goto(self, url: str, timeout: float = 15) -> None:
        """Navigate and wait for the document to be loaded."""
        await self.send("Page.navigate", url=url)
        await asyncio.sleep(0.1)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    async def screenshot(self, path: Path) -> Path:
        """The viewport as PNG."""
        result = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def fonts_of(self, selector: str) -> list[dict[str, Any]]:
        """The platform fonts Chromium used to draw the text of the first node matching `selector`."""
        document = await self.send("DOM.getDocument", depth=0)
        node = await self.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector=selector)
        if not node.get("nodeId"):
            raise BrowserError(f"no node {selector}")
        fonts: list[dict[str, Any]] = (await self.send("CSS.getPlatformFontsForNode", nodeId=node["nodeId"]))["fonts"]
        return fonts


@contextlib.asynccontextmanager
async def chromium(width: int = 1920, height: int = 1080) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile, removed afterwards) and its one tab."""
    if not Path(CHROMIUM).exists():
        raise BrowserError(f"{CHROMIUM} is missing: `make env` installs Debian's chromium")
    profile = Path(tempfile.mkdtemp(prefix="pbx-bridge-chromium-"))
    process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"chromium did not start (exit {process.poll()})")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            [target] = [t for t in targets if t.get("type") == "page"][:1]
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as socket:
                page = Page(socket)
                reader = asyncio.create_task(page.read())
                try:
                    for domain in ("Page", "Runtime", "Network", "DOM", "CSS"):
                        await page.send(f"{domain}.enable")
                    await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                    deviceScaleFactor=1, mobile=False)
                    yield page
                finally:
                    await socket.close()
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, BrowserError):
                        await reader
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
