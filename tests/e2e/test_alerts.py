"""End to end: a ring-limit breach is POSTed to the ops webhook while the call still rings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support.calls import one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.world import IGNORE, connect_world, new_caller_number

pytestmark = pytest.mark.e2e


async def test_ring_limit_alert_reaches_the_webhook_before_the_call_ends(devenv: DevEnv, tmp_path: Path) -> None:
    received: list[tuple[float, dict[str, Any]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((time.monotonic(), await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alerts", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    config = tmp_path / "pbx-bridge.toml"
    config.write_text(devenv.config_path.read_text() + f'\n[alerts]\nwebhook_url = "http://127.0.0.1:{port}/alerts"\n')
    process = BridgeProcess(config, business_time="2026-11-24T10:00:00+08:00")
    await asyncio.to_thread(process.start)
    try:
        number = new_caller_number()
        async with connect_world(devenv) as world:
            for phone in ("agent101", "agent102", "agent103"):
                await world.set_phone(number, phone, IGNORE)
            await world.call(devenv.hotline_numbers[0], number, "没人接", patience=18)
        row = await one_call(devenv.dsn, number, timeout=30)
        hung_up = time.monotonic()
    finally:
        assert await asyncio.to_thread(process.stop) == 0
        await runner.cleanup()
    alerts = [(at, a) for at, a in received if a["linkedid"] == row["linkedid"]]
    assert [a["kind"] for _, a in alerts] == ["ring_limit"]
    at, alert = alerts[0]
    assert alert["details"]["did"] == devenv.hotline_numbers[0] and alert["details"]["caller_number"] == number
    assert at < hung_up - 1  # sent while the caller was still waiting (limit 15 s, caller left at 18 s)
    assert row["disposition"] == "abandoned" and row["within_ring_limit"] is False
