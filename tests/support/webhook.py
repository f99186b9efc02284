"""The ops webhook in a test: a local HTTP receiver that keeps every alert pbx-bridge POSTs to it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web


class Webhook:
    """The ops webhook: a local HTTP receiver that keeps every alert POSTed to it."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Webhook:
        async def receive(request: web.Request) -> web.Response:
            self.alerts.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/alerts", receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/alerts"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := [a for a in self.alerts if a.get("kind") == kind]:
                return found[-1]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {kind!r} alert; got {[a.get('kind') for a in self.alerts]}")

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        """The alerts of one kind received so far."""
        return [a for a in self.alerts if a.get("kind") == kind]
