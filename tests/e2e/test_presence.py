"""End to end: agents sign out for a break and back in from their phone (feature codes *21, *22,
*23 dialled on the world's phones), the agent group rings only those signed in, the last agent
signed in during open hours may not sign out, and stale state makes every phone ring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout

from pbx_bridge.config import load_settings
from pbx_bridge.storage.settings import open_periods
from tests.e2e.conftest import OPEN_HOURS
from tests.e2e.test_routing import legs_of
from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import DevEnv
from tests.support.webhook import Webhook
from tests.support.world import BUSY, IGNORE, answer, connect_pbx_admin, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

API_PORT = 18433


async def everyone_signed_in(devenv: DevEnv) -> None:
    """No presence history and no break breach today (the tests own these rows)."""
    await fetch(devenv.dsn, "DELETE FROM agent_presence RETURNING agent")
    await fetch(devenv.dsn, "DELETE FROM policy_violations WHERE kind = 'break_over_limit' RETURNING id")


@pytest.fixture(autouse=True)
async def clean_presence(devenv: DevEnv) -> AsyncIterator[None]:
    """Each test starts with every agent signed in, whatever an earlier one left."""
    await everyone_signed_in(devenv)
    yield
    await everyone_signed_in(devenv)


@pytest.fixture
async def alerts() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    async with Webhook() as webhook:
        yield webhook.url, webhook.alerts


BREAK_MINUTES = 0.1  # 6 s: a real break from the phone, on a short limit


@pytest.fixture
async def bridge(devenv: DevEnv, tmp_path: Path,
                 alerts: tuple[str, list[dict[str, Any]]]) -> AsyncIterator[BridgeProcess]:
    config = derived_config(devenv.config_path, tmp_path / "pbx-bridge.toml", API_PORT,
                            f'[alerts]\nwebhook_url = "{alerts[0]}"\n')
    short_times = (f"[presence]\nbreak_minutes_per_day = {BREAK_MINUTES}\nphone_unreachable_minutes = 0.05\n"
                   "off_hook_minutes = 0.1\n")  # 6 s, 3 s, 6 s
    config.write_text(config.read_text().replace("[presence]\n", short_times))
    process = BridgeProcess(config, business_time=OPEN_HOURS)
    await asyncio.to_thread(process.start)
    yield process
    assert await asyncio.to_thread(process.stop) == 0


async def dial_code(devenv: DevEnv, bridge: BridgeProcess, phone: str, code: str, answer_event: str,
                    count: int = 1) -> None:
    """`phone` dials a feature code; wait until pbx-bridge has answered it (`answer_event` logged)."""
    async with connect_world(devenv) as world:
        await world.dial_out(phone, code)
    await asyncio.to_thread(bridge.wait_for, answer_event, 10, count, agent=phone)


async def hotline_call(devenv: DevEnv, plans: dict[str, str]) -> Any:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        for phone, plan in plans.items():
            await world.set_phone(number, phone, plan)
        await world.call(devenv.hotline_numbers[0], number, "签出测试")
    return await one_call(devenv.dsn, number, timeout=30), number


async def test_a_signed_out_agent_is_not_rung_until_it_signs_back_in(bridge: BridgeProcess,
                                                                     devenv: DevEnv) -> None:
    await dial_code(devenv, bridge, "agent102", "*21", "agent_signed_out")
    try:
        await asyncio.to_thread(bridge.wait_for, "routing_state_published", 5, signed_in=["agent101"])
        # agent102 would answer first (1 s) if it rang
        row, number = await hotline_call(devenv, {"agent101": answer(2, 1), "agent102": answer(1, 1)})
        assert row["answered_by"] == "agent101"
        assert "agent102" not in await legs_of(devenv, number)
        [period] = await fetch(devenv.dsn, "SELECT set_by, signed_out_by, signed_in_at FROM agent_presence "
                                           "WHERE agent = 'agent102' ORDER BY id DESC LIMIT 1")
        assert (period["set_by"], period["signed_out_by"], period["signed_in_at"]) == ("phone", "agent102", None)
    finally:
        await dial_code(devenv, bridge, "agent102", "*22", "agent_signed_in")
    row, number = await hotline_call(devenv, {"agent101": answer(2, 1), "agent102": answer(1, 1)})
    assert row["answered_by"] == "agent102"


async def test_the_days_opening_hours_are_recorded_for_signed_in_time(bridge: BridgeProcess,
                                                                      devenv: DevEnv) -> None:
    """v_agent_daily's signed-in time needs each day's effective hours: the running daemon records
    its business day's hours as it applies them (the view's arithmetic: tests/integration)."""
    settings = load_settings(devenv.config_path)
    day = datetime.fromisoformat(OPEN_HOURS).date()
    expected = settings.hours.schedule(settings.zone).day(day)
    await asyncio.to_thread(bridge.wait_for, "routing_state_published", 5)
    rows = await fetch(devenv.dsn, "SELECT open, reason FROM open_hours WHERE day = $1 AND pbx = $2", day, bridge.pbx)
    assert [([(r.lower, r.upper) for r in row["open"]], row["reason"]) for row in rows] == [
        (open_periods(expected, settings.hours.schedule(settings.zone)), expected.reason)]
    assert expected.intervals  # a working day in the sandbox's hours


async def test_the_last_agent_signed_in_cannot_sign_out_during_open_hours(
        bridge: BridgeProcess, devenv: DevEnv, alerts: tuple[str, list[dict[str, Any]]]) -> None:
    await dial_code(devenv, bridge, "agent102", "*21", "agent_signed_out")
    try:
        await dial_code(devenv, bridge, "agent101", "*21", "last_agent_sign_out_refused")
        deadline = time.monotonic() + 10
        while not [a for a in alerts[1] if a.get("kind") == "last_agent_sign_out_refused"]:
            assert time.monotonic() < deadline, alerts[1]
            await asyncio.sleep(0.2)
        open_periods = await fetch(devenv.dsn, "SELECT agent FROM agent_presence WHERE signed_in_at IS NULL")
        assert [r["agent"] for r in open_periods] == ["agent102"]  # agent101 is still in
    finally:
        await dial_code(devenv, bridge, "agent102", "*22", "agent_signed_in")


async def test_with_pbx_bridge_stopped_and_its_state_stale_every_phone_rings(
        bridge: BridgeProcess, devenv: DevEnv) -> None:
    await dial_code(devenv, bridge, "agent102", "*21", "agent_signed_out")
    assert await asyncio.to_thread(bridge.stop) == 0  # agent102 stays signed out in the database
    async with connect_pbx_admin(devenv) as pbx:
        await pbx.set_routing_state(updated=str(int(time.time()) - 3600))  # stale
        await pbx.set_global("HOTLINE_TEST_TIME", "2026/11/24 10:00:00 Asia/Shanghai")
        try:
            number = new_caller_number()
            async with connect_world(devenv) as world:
                await world.set_phone(number, "agent101", IGNORE)
                await world.set_phone(number, "agent102", answer(1, 1))
                await world.call(devenv.hotline_numbers[0], number, "状态过期")
            rung = await legs_of(devenv, number)  # from CEL: no pbx-bridge is running
        finally:
            await pbx.set_global("HOTLINE_TEST_TIME", "")
    assert {"agent101", "agent102"} <= rung  # the static group: everyone, the signed-out agent too
    await asyncio.to_thread(bridge.start)
    await dial_code(devenv, bridge, "agent102", "*22", "agent_signed_in")


async def test_an_unknown_feature_code_is_refused_without_a_dial_out(bridge: BridgeProcess, devenv: DevEnv) -> None:
    since = await fetch(devenv.dsn, "SELECT coalesce(max(id), 0) AS id FROM cel")
    async with connect_world(devenv) as world:
        await world.dial_out("agent101", "*29")
    deadline = time.monotonic() + 10
    while not (rows := await fetch(devenv.dsn, "SELECT extra FROM cel WHERE id > $1 AND eventtype = 'USER_DEFINED' "
                                               "AND userdeftype = 'FeatureCodeUnknown'", since[0]["id"])):
        assert time.monotonic() < deadline, "no FeatureCodeUnknown in CEL"
        await asyncio.sleep(0.3)
    assert "code=*29" in rows[0]["extra"]
    attempts = await fetch(devenv.dsn, "SELECT details FROM policy_violations WHERE kind = 'outbound_attempt' "
                                       "AND details ->> 'digits' = '*29'")
    assert attempts == []  # a wrong code is not a dial-out


async def test_a_break_over_the_daily_limit_is_a_breach_once_the_moment_it_passes(
        bridge: BridgeProcess, devenv: DevEnv, alerts: tuple[str, list[dict[str, Any]]]) -> None:
    await dial_code(devenv, bridge, "agent102", "*21", "agent_signed_out")
    [breach] = await asyncio.to_thread(bridge.wait_for, "policy_violation", 20, kind="break_over_limit")
    assert breach["agent"] == "agent102"
    await asyncio.sleep(3)  # still out: no second breach
    await dial_code(devenv, bridge, "agent102", "*22", "agent_signed_in")
    rows = await fetch(devenv.dsn, "SELECT occurred_at, details FROM policy_violations WHERE kind = 'break_over_limit'")
    [period] = await fetch(devenv.dsn, "SELECT signed_out_at FROM agent_presence WHERE agent = 'agent102'")
    assert len(rows) == 1 and rows[0]["details"]["agent"] == "agent102"
    late = (rows[0]["occurred_at"] - period["signed_out_at"]).total_seconds()
    assert abs(late - BREAK_MINUTES * 60) < 0.01  # at the moment the limit passed
    assert [a["agent"] for a in alerts[1] if a.get("kind") == "break_over_limit"] == ["agent102"]


async def test_fair_strategy_shares_twelve_calls_between_three_agents(devenv: DevEnv, tmp_path: Path) -> None:
    """[ring] strategy fair with three agents who always answer at once: 4, 4 and 4 (within one)."""
    config = derived_config(devenv.config_path, tmp_path / "pbx-bridge.toml", API_PORT)
    text = config.read_text()
    assert 'agents = ["agent101", "agent102"]' in text and "[ring]\n" in text
    text = text.replace('agents = ["agent101", "agent102"]', 'agents = ["agent101", "agent102", "agent103"]')
    config.write_text(text.replace("[ring]\n", '[ring]\nstrategy = "fair"\n'))
    # A business day on which the database holds no answered call (today's, from the other tests, would
    # count): the three start even.
    process = BridgeProcess(config, business_time="2026-12-01T10:00:00+08:00")
    await asyncio.to_thread(process.start)
    try:
        answered: list[str] = []
        for n in range(12):
            row, _ = await hotline_call(devenv, {agent: answer(1, 1) for agent in ("agent101", "agent102",
                                                                                   "agent103")})
            answered.append(row["answered_by"])
            # the call's end is counted and the next first agent published before the next call
            await asyncio.to_thread(process.wait_for, "answer_counted", 10, n + 1)
            await asyncio.sleep(0.3)
    finally:
        assert await asyncio.to_thread(process.stop) == 0
    counts = {agent: answered.count(agent) for agent in ("agent101", "agent102", "agent103")}
    assert max(counts.values()) - min(counts.values()) <= 1, (counts, answered)


async def health(path: str = "/healthz") -> Any:
    async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.get(
            f"http://127.0.0.1:{API_PORT}{path}") as response:
        return await response.json()


async def alert_of(alerts: list[dict[str, Any]], kind: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (found := [a for a in alerts if a.get("kind") == kind]):
        assert time.monotonic() < deadline, (kind, alerts)
        await asyncio.sleep(0.2)
    return found[-1]


async def test_a_phone_off_the_network_during_open_hours_is_alerted_and_cleared(
        bridge: BridgeProcess, devenv: DevEnv, alerts: tuple[str, list[dict[str, Any]]]) -> None:
    async with connect_world(devenv) as world:
        await world.action({"Action": "PJSIPUnregister", "Registration": "reg-agent102"})
        try:
            alert = await alert_of(alerts[1], "phone_unreachable", 15)
            assert alert["phone"] == "agent102"
            body = await health()
            assert body["components"]["phones"]["ok"] is False
            assert body["components"]["phones"]["phones"]["agent102"]["reachable"] is False
            assert "pbx_bridge_phone_reachable{phone=\"agent102\"} 0.0" in await metrics_text()
        finally:
            await world.action({"Action": "PJSIPRegister", "Registration": "reg-agent102"})
        assert (await alert_of(alerts[1], "phone_reachable_again", 15))["phone"] == "agent102"
    assert (await health())["components"]["phones"]["ok"] is True


async def metrics_text() -> str:
    async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.get(
            f"http://127.0.0.1:{API_PORT}/metrics") as response:
        return await response.text()


async def test_a_phone_left_off_the_hook_is_alerted(bridge: BridgeProcess, devenv: DevEnv,
                                                    alerts: tuple[str, list[dict[str, Any]]]) -> None:
    """agent102 answers BUSY to every call for 6 s (two calls) while signed in: off the hook."""
    for _ in range(2):
        row, _ = await hotline_call(devenv, {"agent101": answer(1, 1), "agent102": BUSY})
        assert row["answered_by"] == "agent101"
        await asyncio.sleep(4)
    alert = await alert_of(alerts[1], "phone_off_hook", 10)
    assert alert["phone"] == "agent102" and alert["busy_calls"] >= 2
    row, _ = await hotline_call(devenv, {"agent101": IGNORE, "agent102": answer(1, 1)})  # back on the hook
    assert row["answered_by"] == "agent102"
    await alert_of(alerts[1], "phone_answering_again", 10)
