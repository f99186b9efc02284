"""The daily and quiet probe triggers, with the clock driven by the test."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from pbx_bridge.probes import ProbeScheduler

SH = ZoneInfo("Asia/Shanghai")


class FakeRunner:
    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.requests: list[str] = []

    def request(self, trigger: str) -> None:
        self.requests.append(trigger)


async def run_for(scheduler: ProbeScheduler, seconds: float, clock: list[datetime] | None = None,
                  advance: timedelta = timedelta(0)) -> None:
    """Run the scheduler; once it has started, move the clock by `advance`."""
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.1)
    if clock is not None:
        clock[0] += advance
    await asyncio.sleep(seconds)
    scheduler.stop()
    await asyncio.wait_for(task, 3)


def make(runner: FakeRunner, clock: list[datetime], quiet_minutes: float = 60) -> ProbeScheduler:
    return ProbeScheduler(runner, lambda: clock[0], "08:00", timedelta(minutes=quiet_minutes),  # type: ignore[arg-type]
                          lambda now: 9 <= now.astimezone(SH).hour < 17, SH, lambda: None)


async def test_daily_fires_at_eight_local_but_not_while_a_probe_is_in_flight() -> None:
    clock = [datetime(2026, 11, 24, 7, 59, 59, tzinfo=SH).astimezone(UTC)]
    busy = FakeRunner(busy=True)
    scheduler = make(busy, clock)
    await run_for(scheduler, 1.3, clock, timedelta(seconds=2))  # to 08:00:01
    assert busy.requests == []
    idle = FakeRunner(busy=False)
    clock[0] = datetime(2026, 11, 24, 7, 59, 59, tzinfo=SH).astimezone(UTC)
    scheduler = make(idle, clock)
    await run_for(scheduler, 1.3, clock, timedelta(seconds=2))
    assert idle.requests == ["daily"]


async def test_quiet_fires_after_the_quiet_time_in_open_hours_unless_busy() -> None:
    clock = [datetime(2026, 11, 24, 10, 0, tzinfo=SH).astimezone(UTC)]
    runner = FakeRunner(busy=True)
    scheduler = make(runner, clock, quiet_minutes=1)
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.1)
    clock[0] += timedelta(minutes=2)
    await asyncio.sleep(1.3)
    assert runner.requests == []  # a probe in flight: no second one
    runner.busy = False
    await asyncio.sleep(1.3)
    scheduler.stop()
    await asyncio.wait_for(task, 3)
    assert runner.requests == ["quiet"]
    night = [datetime(2026, 11, 24, 20, 0, tzinfo=SH).astimezone(UTC)]
    at_night = FakeRunner(busy=False)
    scheduler = make(at_night, night, quiet_minutes=1)
    await run_for(scheduler, 1.3, night, timedelta(minutes=5))
    assert at_night.requests == []  # quiet at night is normal: no probe
