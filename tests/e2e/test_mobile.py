"""End to end: the caller's wait and the duty mobile's ring time, measured from the carrier's
ringing (180, or 183 with early media; from the dial when the carrier signals none), and the
three-ring limit applied to the mobile live ([ring] mobile_limit, seed 004: every phone)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.world import (
    answer,
    answer_after_progress,
    answer_after_silence,
    answer_without_ringing,
    connect_world,
    new_caller_number,
)

pytestmark = pytest.mark.e2e

AFTER_HOURS = "2026-11-24T20:00:00+08:00"  # a Tuesday evening: calls go to the duty mobile


@pytest.fixture
async def after_hours(devenv: DevEnv) -> AsyncIterator[BridgeProcess]:
    process = BridgeProcess(devenv.config_path, business_time=AFTER_HOURS)
    await asyncio.to_thread(process.start)
    yield process
    assert await asyncio.to_thread(process.stop) == 0


async def forwarded_call(devenv: DevEnv, plan: str) -> str:
    """A new caller rings the hotline after hours; the duty mobile follows `plan`."""
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, devenv.duty_mobile, plan)
        await world.call(devenv.hotline_numbers[0], number, "夜间来电")
    return number


@pytest.mark.parametrize(("plan", "ring", "wait"), [
    (answer(8, 1), 8.0, 8.0),                      # 180 at once, answered 8 s later
    (answer_after_silence(3, 5, 1), 5.0, 8.0),     # 180 only after 3 s of silence: the mobile rang 5 s
    (answer_after_progress(6, 1), 6.0, 6.0),       # 183 with early media, no 180
    (answer_without_ringing(4, 1), 4.0, 4.0),      # no ringing signalled: from the dial
], ids=["180", "180-late", "183", "none"])
async def test_the_callers_wait_and_the_mobiles_ring_time(after_hours: BridgeProcess, devenv: DevEnv,
                                                          plan: str, ring: float, wait: float) -> None:
    number = await forwarded_call(devenv, plan)
    row = await one_call(devenv.dsn, number, timeout=30)
    assert (row["disposition"], row["answered_by"]) == ("forwarded", devenv.duty_mobile)
    assert abs(float(row["mobile_ring_seconds"]) - ring) <= 0.5, row["mobile_ring_seconds"]
    assert abs(float(row["wait_seconds"]) - wait) <= 0.5, row["wait_seconds"]
    assert row["mobile_within_ring_limit"] is True
    [log] = await fetch(devenv.dsn, "SELECT wait_seconds, mobile_ring_seconds FROM v_call_log WHERE linkedid = $1",
                        row["linkedid"])
    assert (log["wait_seconds"], log["mobile_ring_seconds"]) == (row["wait_seconds"], row["mobile_ring_seconds"])


async def test_a_mobile_ringing_past_three_rings_is_a_breach_while_it_rings(
        after_hours: BridgeProcess, devenv: DevEnv) -> None:
    placed = time.monotonic()
    number = await forwarded_call(devenv, answer(17, 1))
    [started] = await asyncio.to_thread(after_hours.wait_for, "call_started", 10, caller=number)
    linkedid = started["linkedid"]
    [breach] = await asyncio.to_thread(after_hours.wait_for, "policy_violation", 20, linkedid=linkedid,
                                       kind="ring_limit")
    seen = time.monotonic() - placed
    assert breach["stage"] == "mobile" and breach["mobile"] == devenv.duty_mobile
    assert seen < 16.8, seen  # raised at the limit (15 s of ringing), before the answer at 17 s
    row = await one_call(devenv.dsn, number, timeout=30)
    assert row["disposition"] == "forwarded" and row["mobile_within_ring_limit"] is False
    assert abs(float(row["mobile_ring_seconds"]) - 17) <= 0.5
    violations: list[Any] = await fetch(devenv.dsn, "SELECT kind, details FROM policy_violations WHERE linkedid = $1",
                                        linkedid)
    assert [(v["kind"], v["details"]["stage"]) for v in violations] == [("ring_limit", "mobile")]
