"""Webhook alerts against a real HTTP server on loopback: retried, bounded, never blocking."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from pbx_bridge.alerts import Alerter
from pbx_bridge.metrics import Metrics


class Hook:
    """A webhook receiver answering with the scripted statuses, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def hook_factory() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def make(statuses: list[int]) -> Hook:
        hook = Hook(statuses)
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        hook.url = f"http://127.0.0.1:{port}/hook"
        runners.append(runner)
        return hook

    yield make
    for runner in runners:
        await runner.cleanup()


async def deliver(alerter: Alerter, *alerts: dict[str, Any]) -> None:
    task = asyncio.create_task(alerter.run())
    for alert in alerts:
        alerter.submit(alert)
    await asyncio.sleep(0)
    for _ in range(200):
        if not alerter._queue:
            break
        await asyncio.sleep(0.02)
    alerter.stop()
    await asyncio.wait_for(task, 5)


def count(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("pbx_bridge_alerts_total", {"result": result}) or 0.0


async def test_server_errors_are_retried_until_delivered(hook_factory: Any) -> None:
    hook, metrics = await hook_factory([500, 503]), Metrics()
    await deliver(Alerter(hook.url, metrics, max_backoff=0.05), {"kind": "ring_limit", "linkedid": "x"})
    assert [a["kind"] for a in hook.received] == ["ring_limit"] * 3
    assert count(metrics, "sent") == 1 and count(metrics, "failed") == 0


async def test_a_refusal_is_not_retried(hook_factory: Any) -> None:
    hook, metrics = await hook_factory([400]), Metrics()
    await deliver(Alerter(hook.url, metrics, max_backoff=0.05), {"kind": "ring_limit"}, {"kind": "unanswered"})
    assert [a["kind"] for a in hook.received] == ["ring_limit", "unanswered"]  # the next one still goes
    assert count(metrics, "failed") == 1 and count(metrics, "sent") == 1


async def test_an_unreachable_webhook_gives_up_after_the_configured_attempts() -> None:
    metrics = Metrics()
    alerter = Alerter("http://127.0.0.1:9/hook", metrics, attempts=3, max_backoff=0.05, timeout=1)
    await deliver(alerter, {"kind": "outbound_attempt"})
    assert count(metrics, "failed") == 1


def test_submit_never_blocks_and_drops_the_oldest_when_full() -> None:
    metrics = Metrics()
    alerter = Alerter("http://127.0.0.1:9/hook", metrics, queue_limit=2)
    for n in range(3):
        alerter.submit({"kind": "ring_limit", "n": n})
    assert [a["n"] for a in alerter._queue] == [1, 2]
    assert count(metrics, "dropped") == 1


async def test_without_a_webhook_nothing_is_queued() -> None:
    alerter = Alerter(None, Metrics())
    alerter.submit({"kind": "ring_limit"})
    await asyncio.wait_for(alerter.run(), 1)
