"""Alerts to an ops webhook: queued, retried with bounded backoff, never blocking the call pipeline."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.backoff import Backoff
from pbx_bridge.metrics import Metrics

log = structlog.get_logger("pbx_bridge.alerts")


class Alerter:
    """Owns the alert queue and the task that POSTs each alert as JSON to the webhook."""

    name = "alerts"  # its task's name (lifecycle.Service)

    def __init__(self, url: str | None, metrics: Metrics, *, timeout: float = 5.0, attempts: int = 5,
                 max_backoff: float = 30.0, queue_limit: int = 1000) -> None:
        self._url = url
        self._metrics = metrics
        self._timeout = timeout
        self._attempts = attempts
        self._max_backoff = max_backoff
        self._queue: deque[dict[str, Any]] = deque(maxlen=queue_limit)
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._acting: Callable[[], bool] = lambda: True

    def only_while(self, acting: Callable[[], bool]) -> None:
        """Send alerts only while `acting()` (the leader of a standby pair): the standby's are the leader's to send."""
        self._acting = acting

    def submit(self, alert: dict[str, Any]) -> None:
        """Queue an alert; never blocks. When the queue is full the oldest alert is dropped."""
        if self._url is None:
            return
        if not self._acting():
            log.info("alert_left_to_the_leader", kind=alert.get("kind"))
            return
        if len(self._queue) == self._queue.maxlen:
            self._metrics.alerts.labels("dropped").inc()
            log.error("alert_dropped_queue_full", dropped=self._queue[0].get("kind"))
        self._queue.append(alert)
        self._wakeup.set()

    def stop(self) -> None:
        """Make `run` return (after a last attempt at what is queued)."""
        self._stop.set()
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver queued alerts in order until stopped."""
        if self._url is None:
            return
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if not self._queue:
                    if self._stop.is_set():
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                alert = self._queue[0]
                await self._deliver(session, alert)
                if self._queue and self._queue[0] is alert:
                    self._queue.popleft()

    async def _deliver(self, session: aiohttp.ClientSession, alert: dict[str, Any]) -> None:
        assert self._url is not None
        backoff = Backoff(min(0.5, self._max_backoff), self._max_backoff)
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(self._url, json=alert) as response:
                    if response.status < 300:
                        self._metrics.alerts.labels("sent").inc()
                        return
                    if 400 <= response.status < 500 and response.status != 429:
                        self._metrics.alerts.labels("failed").inc()
                        log.error("alert_refused", status=response.status, kind=alert.get("kind"))
                        return
                    error = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            if attempt == self._attempts or self._stop.is_set():
                break
            delay = backoff.next_delay()
            log.warning("alert_retry", error=error, attempt=attempt, retry_in=round(delay, 2))
            await wait_set(self._stop, delay)
        self._metrics.alerts.labels("failed").inc()
        log.error("alert_failed", kind=alert.get("kind"), attempts=attempt)
