"""End to end: what supervisors see follows real calls through the sandbox.

A missed call waits in v_callbacks_due until an office phone (not the hotline) calls the
customer back through the ordinary outside line and the customer answers; an answered call
waits in v_unrecorded_calls until its call sheet is filled through the ops API; a complaint
left open past its deadline becomes a violation the daemon alerts on.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import DevEnv
from tests.support.mail import MailServer, free_port
from tests.support.ops import api_token, ops
from tests.support.world import BUSY, IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

OFFICE_PHONE = "office201"  # an ordinary office phone on the pbx, dialling out through the line "pstn"


async def due_linkedids(dsn: str) -> set[str]:
    return {r["linkedid"] for r in await fetch(dsn, "SELECT linkedid FROM v_callbacks_due")}


async def eventually(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.25)


async def cel_call_ended(dsn: str, dialled: str, count: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM cel WHERE eventtype = 'LINKEDID_END' AND linkedid IN "
                            "(SELECT linkedid FROM cel WHERE eventtype = 'CHAN_START' AND exten = $1)", dialled)
    return bool(rows[0]["n"] >= count)


async def test_a_missed_call_is_due_until_an_office_phone_calls_the_customer_back(
        bridge: BridgeProcess, devenv: DevEnv) -> None:
    customer = new_caller_number()
    async with connect_world(devenv) as world:
        for phone in ("agent101", "agent102", "agent103"):
            await world.set_phone(customer, phone, IGNORE)
        await world.call(devenv.hotline_numbers[0], customer, "回拨测试", patience=4)  # gives up: abandoned
        missed = await one_call(devenv.dsn, customer, timeout=20)
        assert missed["disposition"] == "abandoned"
        await eventually(lambda: _contains(devenv.dsn, missed["linkedid"]), 5, "the call appearing as due")
        due = await fetch(devenv.dsn, "SELECT caller_number, result, due_calls_from_number FROM v_callbacks_due "
                                      "WHERE linkedid = $1", missed["linkedid"])
        assert [tuple(r.values()) for r in due] == [(customer, "来电方挂断", 1)]

        # The customer's line is busy: a callback attempt that nobody answered clears nothing.
        await world.set_phone(OFFICE_PHONE, customer, BUSY)
        await world.dial_out(OFFICE_PHONE, customer)
        await eventually(lambda: cel_call_ended(devenv.dsn, customer, 1), 15, "the busy callback ending")
        assert missed["linkedid"] in await due_linkedids(devenv.dsn)

        # Now the customer answers: the call is no longer due.
        await world.set_phone(OFFICE_PHONE, customer, answer(1, 2))
        await world.dial_out(OFFICE_PHONE, customer)
        await eventually(lambda: _gone(devenv.dsn, missed["linkedid"]), 20, "the callback clearing the due call")
    # The office call was not a hotline call: no call row, no outbound violation for it.
    assert len(await fetch(devenv.dsn, "SELECT 1 FROM calls WHERE caller_number = $1", customer)) == 1
    leaks = await fetch(devenv.dsn, "SELECT 1 FROM policy_violations WHERE kind = 'outbound_attempt' "
                                    "AND details ->> 'digits' = $1", customer)
    assert leaks == []


async def _contains(dsn: str, linkedid: str) -> bool:
    return linkedid in await due_linkedids(dsn)


async def _gone(dsn: str, linkedid: str) -> bool:
    return linkedid not in await due_linkedids(dsn)


async def unrecorded(dsn: str) -> set[str]:
    return {r["linkedid"] for r in await fetch(dsn, "SELECT linkedid FROM v_unrecorded_calls")}


async def test_filling_the_call_sheet_through_the_api_records_the_call(bridge: BridgeProcess,
                                                                       devenv: DevEnv) -> None:
    customer = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(customer, "agent101", answer(2, 2))
        await world.set_phone(customer, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], customer, "记录单测试")
    call = await one_call(devenv.dsn, customer, timeout=25)
    assert call["linkedid"] in await unrecorded(devenv.dsn)
    sheet = {"caller_name": "陈先生", "contact": customer, "category": "业务办理",
             "summary": "办理续费", "resolution": "已办理", "owner": "agent101", "status": "已完成"}
    assert (await ops(devenv, "PUT", f"/calls/{call['linkedid']}/note", sheet, role="ops"))[0] == 403
    status, body = await ops(devenv, "PUT", f"/calls/{call['linkedid']}/note", sheet, role="agent")
    assert status == 201 and body["note"]["version"] == 1 and body["note"]["created_by"] == "agent"
    assert call["linkedid"] not in await unrecorded(devenv.dsn)
    row = await fetch(devenv.dsn, 'SELECT "客户姓名", "问题类型", "跟进状态", "接听人" FROM v_call_sheet '
                                  'WHERE "通话编号" = $1', call["linkedid"])
    assert [tuple(r.values()) for r in row] == [("陈先生", "业务办理", "已完成", "agent101")]


async def test_a_complaint_left_open_past_its_deadline_is_a_violation(bridge: BridgeProcess, devenv: DevEnv,
                                                                     tmp_path: Path) -> None:
    # A daemon of its own whose complaint deadline is 3 s (the rule's 60 minutes, shortened). The
    # module's daemon pauses meanwhile: one pbx-bridge writes a PBX's calls, and the call sheet API
    # knows only the calls of its own PBX (the test daemon's [pbx] name is its own).
    config = derived_config(devenv.config_path, tmp_path / "complaints.toml", 18414,
                            "[call_sheet]\ncomplaint_reply_minutes = 0.05\nsweep_interval_seconds = 0.5\n")
    process = BridgeProcess(config, business_time="2026-11-24T10:00:00+08:00")
    assert await asyncio.to_thread(bridge.stop) == 0
    await asyncio.to_thread(process.start)
    try:
        customer = new_caller_number()
        async with connect_world(devenv) as world:
            await world.set_phone(customer, "agent101", answer(1, 1))
            await world.call(devenv.hotline_numbers[0], customer, "投诉客户")
        call = await one_call(devenv.dsn, customer, timeout=25)
        sheet = {"category": "投诉", "summary": "服务态度", "owner": "组长杨",
                 "status": "处理中"}
        async with ClientSession(timeout=ClientTimeout(total=10)) as http, http.put(
                f"http://127.0.0.1:18414/calls/{call['linkedid']}/note", json=sheet,
                headers={"Authorization": f"Bearer {api_token('agent')}"}) as response:
            assert response.status == 201
        events = await asyncio.to_thread(process.wait_for, "policy_violation", 15, kind="complaint_overdue",
                                         linkedid=call["linkedid"])
        assert events[0]["owner"] == "组长杨"
        rows = await fetch(devenv.dsn, "SELECT violation, subject, caller_number FROM v_violations "
                                       "WHERE linkedid = $1", call["linkedid"])
        assert [tuple(r.values()) for r in rows] == [("投诉超时未处理", "组长杨", customer)]
    finally:
        assert await asyncio.to_thread(process.stop) == 0
        await asyncio.to_thread(bridge.start)


async def test_the_daemon_mails_yesterdays_report_once_in_the_morning(devenv: DevEnv, tmp_path: Path) -> None:
    # Business time Tuesday 2041-03-05 10:00 (open hours, so the routing it publishes matches the
    # module's daemon); the report is due from 09:00, so it is mailed at start, for 2041-03-04.
    day = "2041-03-04"
    await fetch(devenv.dsn, "DELETE FROM report_deliveries WHERE day = $1::text::date", day)  # a rerun's
    with MailServer(free_port()) as mail:
        config = derived_config(devenv.config_path, tmp_path / "report.toml", 18415, (
            '[report]\nrecipients = ["manager@example.com", "ops@example.com"]\ndaily_at = "09:00"\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {mail.port}\nsecurity = "none"\nsender = "hotline@example.com"\n'))
        process = BridgeProcess(config, business_time="2041-03-05T10:00:00+08:00")
        process.start()
        try:
            sent = await asyncio.to_thread(process.wait_for, "daily_report_sent", 20, day=day)
            assert sent[0]["recipients"] == 2
            health = await report_health(18415)
            assert health["ok"] is True and health["last_sent_day"] == day
        finally:
            assert process.stop() == 0
        process = BridgeProcess(config, business_time="2041-03-05T10:05:00+08:00")  # a restart: no second mail
        process.start()
        try:  # the restarted daemon has checked, found the day already mailed, and sent nothing
            await eventually(lambda: _reported(day), 10, "the restarted daemon checking the report")
        finally:
            assert process.stop() == 0
        messages = mail.inbox.messages()
    assert len(messages) == 1
    assert messages[0]["To"] == "manager@example.com, ops@example.com"
    assert day in str(messages[0]["Subject"]) and "400热线日报" in str(messages[0]["Subject"])
    attachments = [part.get_filename() for part in messages[0].iter_attachments()]
    assert attachments == [f"hotline-report-{day}.csv"]
    delivered = await fetch(devenv.dsn, "SELECT recipients FROM report_deliveries WHERE day = $1::text::date "
                            "AND pbx = $2", day, process.pbx)
    assert [r["recipients"] for r in delivered] == [["manager@example.com", "ops@example.com"]]


async def report_health(port: int) -> dict[str, Any]:
    async with ClientSession(timeout=ClientTimeout(total=10)) as http, http.get(
            f"http://127.0.0.1:{port}/healthz") as response:
        health: dict[str, Any] = (await response.json())["components"]["daily_report"]
        return health


async def _reported(day: str) -> bool:
    return bool((await report_health(18415))["last_sent_day"] == day)
