"""End to end: the record the real daemon builds from AMI and the record the CEL builder builds from
Asterisk's own CEL rows of the same real call agree, for every call shape; and a call made while
pbx-bridge was stopped is rebuilt from CEL, by `pbx-bridge reconcile` and by the daemon at start.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pbx_bridge.cel.builder import CelCall, CelRow, build_call
from pbx_bridge.cel.reconcile import CEL_ROWS, tracker_settings_for
from pbx_bridge.config import load_settings
from pbx_bridge.tracker import TrackerSettings
from tests.e2e.conftest import OPEN_HOURS
from tests.support.calls import fetch, finished_calls, one_call
from tests.support.capture import set_routing_state
from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import REPO, DevEnv
from tests.support.ops import ops
from tests.support.world import BUSY, IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

NIGHT = "2026-11-24T20:00:00+08:00"  # a Tuesday evening in Shanghai: after hours
EQUAL = ("did", "caller_number", "caller_name", "disposition", "answered_by", "answered_stage", "after_hours",
         "forwarded_to", "duty_holder", "needs_call_sheet", "is_probe", "rings", "within_ring_limit",
         "hangup_cause", "transferred_to", "mobile_within_ring_limit")
TIMES = ("started_at", "ring_started_at", "answered_at", "ended_at")
SECONDS = ("ring_seconds", "talk_seconds", "wait_seconds", "mobile_ring_seconds")


class Daemons:
    """One pbx-bridge at a time (it holds the PBX's lock), at the business time a test needs."""

    def __init__(self, devenv: DevEnv) -> None:
        self.devenv = devenv
        self.current: BridgeProcess | None = None
        self.at: str | None = None

    def start(self, business_time: str) -> BridgeProcess:
        if self.current is not None and self.at == business_time:
            return self.current
        self.stop()
        self.current, self.at = BridgeProcess(self.devenv.config_path, business_time=business_time), business_time
        self.current.start()
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            process, self.current, self.at = self.current, None, None
            assert process.stop() == 0


@pytest.fixture(scope="module")
def daemons(devenv: DevEnv) -> Iterator[Daemons]:
    running = Daemons(devenv)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def cel_settings(devenv: DevEnv) -> TrackerSettings:
    return tracker_settings_for(load_settings(devenv.config_path))


async def cel_call(devenv: DevEnv, settings: TrackerSettings, linkedid: str, timeout: float = 15) -> CelCall:
    """The call built from its CEL rows, once Asterisk has written its end (LINKEDID_END)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await fetch(devenv.dsn, CEL_ROWS, [linkedid])  # as the reconcile reads them
        call = build_call([CelRow.from_mapping(row) for row in rows], settings)
        if call is not None and call.finished:
            return call
        assert time.monotonic() < deadline, f"no finished CEL call {linkedid}: {call}"
        await asyncio.sleep(0.3)


async def assert_agree(devenv: DevEnv, settings: TrackerSettings, row: asyncpg.Record) -> CelCall:
    """The daemon's AMI record `row` and the CEL builder's record of the same call agree."""
    assert row["source"] == "ami", "the daemon recorded the call from AMI"
    call = await cel_call(devenv, settings, row["linkedid"])
    record = call.record
    for field in EQUAL:
        assert getattr(record, field) == row[field], (row["caller_number"], field, getattr(record, field), row[field])
    for field in TIMES:
        ours, theirs = getattr(record, field), row[field]
        assert (ours is None) == (theirs is None), (row["caller_number"], field)
        if ours is not None:
            assert abs((ours - theirs).total_seconds()) <= 0.5, (row["caller_number"], field, ours, theirs)
    for field in SECONDS:
        ours, theirs = getattr(record, field), row[field]
        assert (ours is None) == (theirs is None), (row["caller_number"], field)
        if ours is not None:
            assert ours == pytest.approx(float(theirs), abs=0.5), (row["caller_number"], field)
    legs = await fetch(devenv.dsn, "SELECT endpoint, dial_status, stage, transfer_kind, transferred_by "
                                   "FROM call_legs WHERE linkedid = $1", row["linkedid"])
    assert sorted((leg.endpoint, leg.dial_status, leg.stage, leg.transfer_kind, leg.transferred_by)
                  for leg in call.legs) == sorted(tuple(leg.values()) for leg in legs), row["caller_number"]
    kinds = await fetch(devenv.dsn, "SELECT kind FROM policy_violations WHERE linkedid = $1 AND kind <> "
                                    "'outbound_attempt'", row["linkedid"])
    assert sorted(str(v.kind) for v in call.violations) == sorted(r["kind"] for r in kinds), row["caller_number"]
    return call


async def test_open_hours_call_shapes_agree(daemons: Daemons, devenv: DevEnv, cel_settings: TrackerSettings) -> None:
    await asyncio.to_thread(daemons.start, OPEN_HOURS)
    answered, escalated, abandoned, all_busy = (new_caller_number() for _ in range(4))
    async with connect_world(devenv) as world:
        await world.set_phone(answered, "agent101", answer(7, 4))
        await world.set_phone(answered, "agent102", IGNORE)
        await world.set_phone(escalated, "agent103", answer(2, 1))  # 15 s group, then 2 s into escalation
        for phone in ("agent101", "agent102", "agent103", devenv.duty_mobile):
            await world.set_phone(all_busy, phone, BUSY)
        await world.call(devenv.hotline_numbers[0], answered, "张三客户")
        await world.call(devenv.hotline_numbers[0], escalated, "李四")
        await world.call(devenv.hotline_numbers[1], abandoned, 'Robert "Bob" ;-- \\ O\'Brien', patience=6)
        await world.call(devenv.hotline_numbers[0], all_busy, "", talk=2)  # leaves a message
    rows = await finished_calls(devenv.dsn, [answered, escalated, abandoned, all_busy], timeout=45)
    shapes = {answered: ("answered", "group"), escalated: ("answered", "escalation"), abandoned: ("abandoned", None),
              all_busy: ("voicemail", None)}
    for number, (disposition, stage) in shapes.items():
        [row] = rows[number]
        assert (row["disposition"], row["answered_stage"]) == (disposition, stage), number
        call = await assert_agree(devenv, cel_settings, row)
        assert call.record.source == "cel"
    assert (await assert_agree(devenv, cel_settings, rows[escalated][0])).record.within_ring_limit is False


async def test_transfer_shapes_agree(daemons: Daemons, devenv: DevEnv, cel_settings: TrackerSettings) -> None:
    """A blind transfer, an unanswered one that comes back, and an attended one."""
    bridge = await asyncio.to_thread(daemons.start, OPEN_HOURS)
    blind, back, attended = (new_caller_number() for _ in range(3))
    pbx = f"{devenv.sandbox['pbx_ip']}:{devenv.sandbox['sip_port']}"
    async with connect_world(devenv) as world:
        for number in (blind, back, attended):
            await world.set_phone(number, "agent101", answer(2, 120))
            await world.set_phone(number, "agent102", IGNORE)
            await world.call(devenv.hotline_numbers[0], number, "转接")
        await world.set_phone(blind, "agent103", answer(3, 2))
        await world.set_phone("agent101", "agent102", answer(2, 120))  # agent101's consultation
        for number in (blind, back, attended):
            await asyncio.to_thread(bridge.wait_for, "call_started", 10, caller=number)
        await asyncio.sleep(3)  # all answered by agent101
        await world.set_phone(back, "agent101", answer(1, 2))
        await world.transfer("agent101", blind, f"sip:103@{pbx}")
        await world.transfer("agent101", back, f"sip:102@{pbx}")
        await world.dial_out("agent101", "102")
        await asyncio.sleep(3.5)
        await world.attended_transfer("agent101", attended, "102", pbx)
        await asyncio.sleep(2)
        await world.hang_up_caller(attended)
    rows = await finished_calls(devenv.dsn, [blind, back, attended], timeout=60)
    for number, transferred_to in ((blind, "agent103"), (back, None), (attended, "agent102")):
        [row] = rows[number]
        assert (row["answered_by"], row["transferred_to"]) == ("agent101", transferred_to), number
        await assert_agree(devenv, cel_settings, row)


async def test_twenty_concurrent_calls_agree(daemons: Daemons, devenv: DevEnv, cel_settings: TrackerSettings) -> None:
    await asyncio.to_thread(daemons.start, OPEN_HOURS)
    plans: dict[str, tuple[str, float]] = {}
    answer_after = (1.0, 2.5, 4.0, 6.5, 8.0)
    async with connect_world(devenv) as world:
        for i in range(20):
            number = new_caller_number()
            phone = "agent101" if i % 2 == 0 else "agent102"
            plans[number] = (phone, answer_after[i % len(answer_after)])
            await world.set_phone(number, phone, answer(plans[number][1], 2))
            await world.set_phone(number, "agent102" if phone == "agent101" else "agent101", IGNORE)
        await asyncio.gather(*(world.call(devenv.hotline_numbers[0], number, f"并发{n}")
                               for n, number in enumerate(plans)))
    rows = await finished_calls(devenv.dsn, list(plans), timeout=40)
    for number, (phone, _) in plans.items():
        [row] = rows[number]
        call = await assert_agree(devenv, cel_settings, row)
        assert call.record.answered_by == phone


async def test_a_line_probe_agrees(daemons: Daemons, devenv: DevEnv, cel_settings: TrackerSettings) -> None:
    await asyncio.to_thread(daemons.start, OPEN_HOURS)
    await asyncio.sleep(5.2)  # manual probes are rate limited (5 s in the sandbox config)
    status, body = await ops(devenv, "POST", "/probes", role="ops")
    assert status == 202, body
    for _ in range(100):
        status, body = await ops(devenv, "GET", f"/probes/{body['id']}", role="ops")
        if body["status"] != "running":
            break
        await asyncio.sleep(0.2)
    assert body["status"] == "ok", body
    [probe] = await fetch(devenv.dsn, "SELECT linkedid FROM line_probes WHERE probe_id = $1 ORDER BY id DESC "
                                      "LIMIT 1", body["id"])
    for _ in range(50):
        [row] = await fetch(devenv.dsn, "SELECT * FROM calls WHERE linkedid = $1", probe["linkedid"])
        if row["ended_at"] is not None:
            break
        await asyncio.sleep(0.2)
    call = await assert_agree(devenv, cel_settings, row)
    assert call.record.is_probe and call.stages == ("probe",)


async def test_after_hours_call_shapes_agree(daemons: Daemons, devenv: DevEnv, cel_settings: TrackerSettings) -> None:
    await asyncio.to_thread(daemons.start, NIGHT)
    forwarded, gave_up, voicemail = new_caller_number(), new_caller_number(), new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(forwarded, devenv.duty_mobile, answer(2, 2))
        await world.set_phone(gave_up, devenv.duty_mobile, IGNORE)
        await world.set_phone(voicemail, devenv.duty_mobile, IGNORE)
        await world.call(devenv.hotline_numbers[0], forwarded, "晚上来电")
        await world.call(devenv.hotline_numbers[0], gave_up, "不等了", patience=5)
        await world.call(devenv.hotline_numbers[0], voicemail, "留言客户", talk=3)  # mobile rings 25 s, then voicemail
    rows = await finished_calls(devenv.dsn, [forwarded, gave_up, voicemail], timeout=50)
    for number, disposition in ((forwarded, "forwarded"), (gave_up, "forward_missed"), (voicemail, "voicemail")):
        [row] = rows[number]
        assert (row["disposition"], row["after_hours"], row["forwarded_to"]) == (disposition, True,
                                                                                devenv.duty_mobile), number
        call = await assert_agree(devenv, cel_settings, row)
        assert call.stages[:2] == ("after_hours", "mobile")


async def call_while_stopped(daemons: Daemons, devenv: DevEnv) -> tuple[str, datetime]:
    """With pbx-bridge stopped, a caller rings the hotline (open) and agent101 answers after 2 s, talks
    2 s; returns the caller number and the call's start, once Asterisk has written its end."""
    await asyncio.to_thread(daemons.stop)
    await set_routing_state(devenv, open_=True)  # what pbx-bridge last published, still fresh
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", answer(2, 2))
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "无人记录")
    deadline = time.monotonic() + 20
    while True:
        found = await fetch(devenv.dsn, """
            SELECT s.linkedid, s.eventtime FROM cel s
             WHERE s.eventtype = 'CHAN_START' AND s.uniqueid = s.linkedid AND s.cid_num = $1
               AND EXISTS (SELECT 1 FROM cel e WHERE e.linkedid = s.linkedid AND e.eventtype = 'LINKEDID_END')
            """, number)
        if found:
            break
        assert time.monotonic() < deadline, "the call never ended in CEL"
        await asyncio.sleep(0.3)
    assert await fetch(devenv.dsn, "SELECT 1 FROM calls WHERE caller_number = $1", number) == []
    return number, found[0]["eventtime"].replace(tzinfo=UTC)


def cli_reconcile(config: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "pbx-bridge"), "reconcile", "--config", str(config),
                             *args], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def expect_rebuilt(row: Any, number: str) -> None:
    assert (row["source"], row["disposition"], row["answered_by"], row["answered_stage"]) == (
        "cel", "answered", "agent101", "group"), number
    assert float(row["ring_seconds"]) == pytest.approx(2, abs=0.5)
    assert float(row["talk_seconds"]) == pytest.approx(2, abs=0.5)
    assert row["caller_name"] == "无人记录" and row["ended_at"] is not None


async def test_reconcile_rebuilds_a_call_made_while_the_daemon_was_stopped(daemons: Daemons,
                                                                          devenv: DevEnv) -> None:
    number, started = await call_while_stopped(daemons, devenv)
    span = ["--since", (started - timedelta(seconds=1)).isoformat(), "--until",
            (started + timedelta(seconds=1)).isoformat()]
    code, output = await asyncio.to_thread(cli_reconcile, devenv.config_path, *span, "--dry-run")
    assert code == 0, output
    assert "would create" in output and "nothing written" in output and number in output, output
    assert await fetch(devenv.dsn, "SELECT 1 FROM calls WHERE caller_number = $1", number) == []

    code, output = await asyncio.to_thread(cli_reconcile, devenv.config_path, *span)
    assert code == 0 and "  created " in output and "summary: created 1" in output, output
    row = await one_call(devenv.dsn, number, timeout=1)
    expect_rebuilt(row, number)
    legs = await fetch(devenv.dsn, "SELECT endpoint, dial_status FROM call_legs WHERE linkedid = $1",
                       row["linkedid"])
    assert sorted((r["endpoint"], r["dial_status"]) for r in legs) == [("agent101", "ANSWER"), ("agent102", "CANCEL")]

    code, output = await asyncio.to_thread(cli_reconcile, devenv.config_path, *span)
    assert code == 0 and "left alone" in output and "final record from CEL" in output, output


async def test_the_daemon_rebuilds_at_start_a_call_it_did_not_see(daemons: Daemons, devenv: DevEnv,
                                                                  tmp_path: Path) -> None:
    number, _ = await call_while_stopped(daemons, devenv)
    config = derived_config(devenv.config_path, tmp_path / "pbx-bridge.toml", 18400,
                            "[reconcile]\ninterval_seconds = 2\nsettle_seconds = 1\n")
    process = BridgeProcess(config, business_time=OPEN_HOURS)
    await asyncio.to_thread(process.start)
    try:
        rebuilt = await asyncio.to_thread(process.wait_for, "call_reconciled_from_cel", 20, caller=number)
        assert rebuilt[0]["action"] == "created"
        expect_rebuilt(await one_call(devenv.dsn, number, timeout=5), number)
    finally:
        assert process.stop() == 0
