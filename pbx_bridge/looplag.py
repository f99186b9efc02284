"""Event-loop lag: how late a due timer runs, exported as `pbx_bridge_event_loop_lag_seconds`."""

from __future__ import annotations

import asyncio

import structlog

from pbx_bridge.metrics import Metrics

log = structlog.get_logger("pbx_bridge.looplag")

INTERVAL_SECONDS = 0.05
STALL_WARNING_SECONDS = 0.5  # a stall this long delays every timer: the guard, ticks, pings


class LoopLag:
    """A lifecycle Service: sleeps `interval` seconds at a time and records how much later than
    due it woke (a histogram and the maximum), and logs a stall of `warn_after` seconds or more.
    Anything that blocks the event loop (a synchronous call, a long computation) shows here."""

    name = "loop-lag"  # its task's name (lifecycle.Service)

    def __init__(self, metrics: Metrics, interval: float = INTERVAL_SECONDS,
                 warn_after: float = STALL_WARNING_SECONDS) -> None:
        self._metrics = metrics
        self._interval = interval
        self._warn_after = warn_after
        self._stopping = False
        self.max_seconds = 0.0

    async def run(self) -> None:
        """Measure until stopped (returns within one interval of `stop`)."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            due = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self.observe(max(0.0, loop.time() - due))

    def observe(self, lag: float) -> None:
        """Record one measured lag."""
        self._metrics.loop_lag.observe(lag)
        if lag > self.max_seconds:
            self.max_seconds = lag
            self._metrics.loop_lag_max.set(lag)
        if lag >= self._warn_after:
            log.warning("event_loop_stalled", seconds=round(lag, 3),
                        effect="timers (guard, ring-limit ticks, AMI pings) ran this much late")

    def stop(self) -> None:
        """Ask `run` to return after its current sleep."""
        self._stopping = True
