"""End to end: business hours, holidays and 调休 decide where a hotline call rings, through
pbx-bridge's routing state, and through the static fallback when pbx-bridge is down.

pbx-bridge's business clock is injected (PBX_BRIDGE_FAKE_NOW); the static fallback's clock
is faked with the sandbox-only HOTLINE_TEST_TIME global (TESTTIME for GotoIfTime).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.ops import api_token, ops
from tests.support.world import IGNORE, answer, connect_pbx_admin, connect_world, new_caller_number

pytestmark = pytest.mark.e2e


@pytest.fixture
def bridge_at(devenv: DevEnv) -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for process in started:
        assert process.stop() == 0


async def call_with_agents_and_mobile_answering(devenv: DevEnv, number: str) -> None:
    """agent101 and the duty mobile both answer after 1 s: where the call went decides who."""
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", answer(1, 1))
        await world.set_phone(number, devenv.duty_mobile, answer(1, 1))
        await world.call(devenv.hotline_numbers[0], number, "路由测试")


@pytest.mark.parametrize(("business_time", "goes_to"), [
    ("2026-11-24T09:30:00+08:00", "agents"),   # Tuesday morning
    ("2026-11-24T12:30:00+08:00", "mobile"),   # lunch gap
    ("2026-11-24T17:29:00+08:00", "agents"),
    ("2026-11-24T17:31:00+08:00", "mobile"),
    ("2026-10-01T10:00:00+08:00", "mobile"),   # National Day, a Thursday
    ("2026-10-10T10:00:00+08:00", "agents"),   # Saturday made a working day (调休)
])
async def test_where_a_call_rings(bridge_at: list[BridgeProcess], devenv: DevEnv, business_time: str,
                                  goes_to: str) -> None:
    process = BridgeProcess(devenv.config_path, business_time=business_time)
    bridge_at.append(process)
    await asyncio.to_thread(process.start)
    number = new_caller_number()
    await call_with_agents_and_mobile_answering(devenv, number)
    row = await one_call(devenv.dsn, number, timeout=20)
    if goes_to == "agents":
        assert (row["disposition"], row["answered_by"], row["answered_stage"]) == ("answered", "agent101", "group")
        assert row["after_hours"] is False and row["needs_call_sheet"] is False
    else:
        assert (row["disposition"], row["answered_by"], row["answered_stage"]) == (
            "forwarded", devenv.duty_mobile, "mobile")
        assert row["after_hours"] is True
        assert row["forwarded_to"] == devenv.duty_mobile
        assert row["duty_holder"] == devenv.duty_holder
        assert row["needs_call_sheet"] is True
        assert row["ring_seconds"] is None and row["within_ring_limit"] is None  # no agent phone rang


async def test_mobile_does_not_answer_caller_reaches_voicemail(bridge_at: list[BridgeProcess],
                                                              devenv: DevEnv) -> None:
    process = BridgeProcess(devenv.config_path, business_time="2026-11-24T20:00:00+08:00")
    bridge_at.append(process)
    await asyncio.to_thread(process.start)
    voicemail, hung_up = new_caller_number(), new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(voicemail, devenv.duty_mobile, IGNORE)
        await world.set_phone(hung_up, devenv.duty_mobile, IGNORE)
        await world.call(devenv.hotline_numbers[0], voicemail, "留言客户", talk=3)  # leaves a 3 s message
        await world.call(devenv.hotline_numbers[0], hung_up, "不等了", patience=5)  # gives up while it rings
    gave_up = await one_call(devenv.dsn, hung_up, timeout=20)
    assert gave_up["disposition"] == "forward_missed"
    assert gave_up["forwarded_to"] == devenv.duty_mobile
    row = await one_call(devenv.dsn, voicemail, timeout=45)
    assert row["disposition"] == "voicemail"
    assert row["forwarded_to"] == devenv.duty_mobile and row["duty_holder"] == devenv.duty_holder
    assert row["after_hours"] is True and row["answered_by"] is None


async def legs_of(devenv: DevEnv, number: str, timeout: float = 20) -> set[str]:
    """Which endpoints the PBX dialled out to for this caller (not the caller's own inbound
    channel), from Asterisk's own CEL rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await fetch(devenv.dsn, """
            SELECT DISTINCT split_part(split_part(c.channame, '/', 2), '-', 1) AS endpoint
              FROM cel c JOIN cel start ON start.linkedid = c.linkedid
             WHERE start.cid_num = $1 AND start.eventtype = 'CHAN_START' AND c.eventtype = 'CHAN_START'
               AND c.uniqueid <> c.linkedid
               AND EXISTS (SELECT 1 FROM cel e WHERE e.linkedid = c.linkedid AND e.eventtype = 'LINKEDID_END')
            """, number)
        if rows:
            return {r["endpoint"] for r in rows}
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished call from {number} in CEL")
        await asyncio.sleep(0.3)


@pytest.mark.parametrize(("asterisk_time", "state", "goes_to"), [
    ("2026/11/24 09:30:00 Asia/Shanghai", "missing", "agent101"),
    ("2026/11/24 20:00:00 Asia/Shanghai", "missing", "carrier"),
    ("2026/11/24 20:00:00 Asia/Shanghai", "stale", "carrier"),  # an old "open" must not be trusted
])
async def test_pbx_bridge_down_static_fallback(devenv: DevEnv, asterisk_time: str, state: str,
                                               goes_to: str) -> None:
    number = new_caller_number()
    async with connect_pbx_admin(devenv) as pbx:
        await pbx.delete_routing_state()
        if state == "stale":
            await pbx.set_routing_state(open="1", updated=str(int(time.time()) - 3600))
        await pbx.set_global("HOTLINE_TEST_TIME", asterisk_time)
        try:
            await call_with_agents_and_mobile_answering(devenv, number)
            legs = await legs_of(devenv, number)
        finally:
            await pbx.set_global("HOTLINE_TEST_TIME", "")
    assert goes_to in legs, legs
    if goes_to == "carrier":
        assert not {"agent101", "agent102"} & legs  # after hours: the agents' phones never rang


async def call_answered_on(devenv: DevEnv, phone: str, caller_name: str) -> asyncpg.Record:
    """A new caller rings the hotline; `phone` (a mobile, say) answers after 1 s; the call's row."""
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, phone, answer(1, 1))
        await world.call(devenv.hotline_numbers[0], number, caller_name)
    return await one_call(devenv.dsn, number, timeout=20)


async def execute(dsn: str, query: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def test_roster_decides_who_holds_the_mobile(bridge_at: list[BridgeProcess], devenv: DevEnv) -> None:
    night = "2026-11-24T20:00:00+08:00"
    await execute(devenv.dsn, "INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) "
                              "VALUES ('李雷', '13700137000', $1, $2)",
                  datetime.fromisoformat("2026-11-24T17:30:00+08:00"), datetime.fromisoformat(
                      "2026-11-25T09:00:00+08:00"))
    try:
        process = BridgeProcess(devenv.config_path, business_time=night)
        bridge_at.append(process)
        await asyncio.to_thread(process.start)
        row = await call_answered_on(devenv, "13700137000", "找值班")
    finally:
        await execute(devenv.dsn, "DELETE FROM duty_roster WHERE holder = '李雷'")
    assert (row["disposition"], row["forwarded_to"], row["duty_holder"]) == ("forwarded", "13700137000", "李雷")


async def test_a_database_override_closes_a_working_day(bridge_at: list[BridgeProcess], devenv: DevEnv) -> None:
    await execute(devenv.dsn, "INSERT INTO schedule_overrides (day, hours, reason) VALUES ($1, '{}', '年会')",
                  date(2026, 11, 25))
    try:
        process = BridgeProcess(devenv.config_path, business_time="2026-11-25T10:00:00+08:00")  # Wednesday
        bridge_at.append(process)
        await asyncio.to_thread(process.start)
        published = process.events("routing_state_published")[-1]
        number = new_caller_number()
        await call_with_agents_and_mobile_answering(devenv, number)
        row = await one_call(devenv.dsn, number, timeout=20)
    finally:
        await execute(devenv.dsn, "DELETE FROM schedule_overrides WHERE day = $1", date(2026, 11, 25))
    assert published["open"] is False and "年会 (database)" in published["reason"]
    assert row["disposition"] == "forwarded" and row["after_hours"] is True


async def test_put_duty_reroutes_after_hours_calls_at_once(bridge_at: list[BridgeProcess], devenv: DevEnv) -> None:
    process = BridgeProcess(devenv.config_path, business_time="2026-11-24T21:00:00+08:00")
    bridge_at.append(process)
    await asyncio.to_thread(process.start)
    now = datetime.now(UTC)  # the roster is kept in real time; the business clock only routes
    entry = {"holder": "韩梅梅", "mobile": "13600136000", "starts_at": (now - timedelta(days=400)).isoformat(),
             "ends_at": (now + timedelta(days=400)).isoformat()}
    assert (await ops(devenv, "PUT", "/duty", {"entries": [entry]}))[0] == 401  # no token
    status, _ = await ops(devenv, "PUT", "/duty", {"entries": [entry]}, token=api_token())
    try:
        assert status == 200
        row = await call_answered_on(devenv, "13600136000", "新值班")
    finally:
        await execute(devenv.dsn, "DELETE FROM duty_roster WHERE holder = '韩梅梅'")
    assert (row["forwarded_to"], row["duty_holder"]) == ("13600136000", "韩梅梅")
