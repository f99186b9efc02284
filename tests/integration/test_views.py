"""The supervisor views, the call sheet, overdue complaints and the database roles, on real PostgreSQL.

A database of this module's own is seeded with known calls around a local midnight in
Asia/Shanghai, a probe call, violations, a sheet, CEL rows of callbacks; every KPI is an exact
number worked out by hand in the comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from pbx_bridge.notes import CallSheet, record_overdue_complaints, save_sheet
from pbx_bridge.storage.presence import sign_in, sign_out
from tests.conftest import scratch_database
from tests.support.env import DevEnv
from tests.support.seed import add_call, add_leg, add_violation, local, utc_naive

pytestmark = pytest.mark.integration

VIEWS = ["v_call_log", "v_daily_kpi", "v_agent_daily", "v_callbacks_due", "v_violations", "v_line_health",
         "v_unrecorded_calls", "v_hourly_load", "v_call_sheet", "v_agent_presence"]
TABLES = ["calls", "call_legs", "cel", "policy_violations", "line_probes", "call_notes", "call_note_history",
          "duty_roster", "duty_roster_changes", "schedule_overrides", "bridge_settings", "report_deliveries",
          "schema_migrations", "agent_presence"]


async def add_outbound(conn: asyncpg.Connection, linkedid: str, dialled: str, at: str, answered: bool) -> None:
    """CEL rows of a call placed from an office phone, as Asterisk writes them."""
    start = utc_naive(local(at))
    rows = [("CHAN_START", start, f"PJSIP/office201-{linkedid}", linkedid, dialled),
            ("CHAN_START", start, f"PJSIP/pstn-{linkedid}", f"{linkedid}.2", "s")]
    if answered:
        rows.append(("ANSWER", start + timedelta(seconds=3), f"PJSIP/pstn-{linkedid}", f"{linkedid}.2", dialled))
        rows.append(("ANSWER", start + timedelta(seconds=3), f"PJSIP/office201-{linkedid}", linkedid, dialled))
    else:  # the office phone's own channel answered (e.g. a Playback) is not the customer answering
        rows.append(("ANSWER", start, f"PJSIP/office201-{linkedid}", linkedid, dialled))
    await conn.executemany(
        "INSERT INTO cel (eventtype, eventtime, channame, uniqueid, linkedid, exten, context) "
        "VALUES ($1, $2, $3, $4, $5, $6, 'office-phones')",
        [(kind, when, channel, uniqueid, linkedid, exten) for kind, when, channel, uniqueid, exten in rows])


def sheet(**fields: Any) -> CallSheet:
    return CallSheet.model_validate({"category": "咨询", "summary": "询问课程安排"} | fields)


async def seed(conn: asyncpg.Connection) -> None:
    # Monday 2030-06-10, Asia/Shanghai.
    await add_call(conn, "A", "2030-06-10 09:00:00", caller="13800000001", disposition="answered", ring=7.0,
                   within=True, answered_by="agent101", talk=60, stage="group", name="张三客户", wait=7.0)
    await add_call(conn, "B", "2030-06-10 10:00:00", caller="13800000002", disposition="answered", ring=17.0,
                   within=False, answered_by="agent102", talk=120, stage="escalation", wait=17.0)
    await add_call(conn, "C", "2030-06-10 11:00:00", caller="13800000003", disposition="abandoned", ring=6.0,
                   wait=6.0)  # waited 6 s, nobody answered: not in the answered callers' wait
    await add_call(conn, "D", "2030-06-10 14:00:00", caller="13800000004", disposition="voicemail", ring=35.0,
                   within=False)
    await add_call(conn, "E", "2030-06-10 19:00:00", caller="13800000005", disposition="forwarded",
                   answered_by="13900139000", talk=30, after_hours=True, stage="mobile", holder="值班员小王",
                   wait=9.0, mobile_ring=8.0, mobile_within=True)
    await add_call(conn, "F", "2030-06-10 23:59:30", caller="13800000006", disposition="forward_missed",
                   after_hours=True, wait=25.5, mobile_ring=25.0, mobile_within=False)
    await add_call(conn, "G", "2030-06-10 08:00:00", caller="02566660000", disposition="answered", ring=0.5,
                   within=True, answered_by="pbx-bridge-probe", talk=1, probe=True)
    await add_call(conn, "W", "2030-06-10 12:10:00", caller="anonymous", disposition="missed", ring=20.0,
                   within=False)
    # Tuesday 2030-06-11: H is 16:00:30 UTC on the 10th, but the 11th in Shanghai.
    await add_call(conn, "H", "2030-06-11 00:00:30", caller="13800000008", disposition="forwarded",
                   answered_by="13900139000", talk=20, after_hours=True, stage="mobile", holder="值班员小王")
    await add_call(conn, "I", "2030-06-11 09:30:00", caller="13800000003", disposition="answered", ring=3.0,
                   within=True, answered_by="agent101", talk=10, stage="group")
    await add_call(conn, "J", "2030-06-11 10:00:00", caller="+86 138-0000-0006", disposition="missed", ring=16.0,
                   within=False)

    await add_violation(conn, "ring_limit", "B", "2030-06-10 10:00:15")
    await add_violation(conn, "ring_limit", "D", "2030-06-10 14:00:15")
    await add_violation(conn, "unanswered", "D", "2030-06-10 14:00:40")
    await add_violation(conn, "unanswered", "F", "2030-06-10 23:59:55")
    await add_violation(conn, "ring_limit", "W", "2030-06-10 12:10:15")
    await add_violation(conn, "outbound_attempt", None, "2030-06-10 12:30:00",
                        details='{"channel": "PJSIP/agent101-01"}')
    await add_violation(conn, "ring_limit", "G", "2030-06-10 08:00:15")  # a probe's: never counted
    await add_violation(conn, "ring_limit", "J", "2030-06-11 10:00:15")

    await add_outbound(conn, "cb-D", "913800000004", "2030-06-10 15:00:00", answered=True)  # clears D
    await add_outbound(conn, "cb-F-early", "13800000006", "2030-06-10 12:00:00", answered=True)  # before F
    await add_outbound(conn, "cb-F-busy", "13800000006", "2030-06-11 08:00:00", answered=False)  # not answered

    await conn.execute(
        """INSERT INTO line_probes (probe_id, attempt, trigger, number, started_at, finished_at, outcome, delay_ms)
           VALUES ('p1', 1, 'daily', '4008001234', $1, $2, 'ok', 850),
                  ('p2', 1, 'quiet', '4008001234', $3, $4, 'no_arrival', NULL)""",
        local("2030-06-10 08:00:00"), local("2030-06-10 08:00:02"), local("2030-06-11 03:00:00"),
        local("2030-06-11 03:00:20"))

    await save_sheet(conn, "A", sheet(status="已完成"), "组长李雪莲")
    await save_sheet(conn, "E", sheet(category="投诉", summary="快递延误", owner="杨雪峰", status="处理中",
                                      contact="13800000005 王女士"), "组长李雪莲")


@contextlib.asynccontextmanager
async def rolled_back(dsn: str, pbx: str | None = None) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction that is always rolled back (the module's data stays as
    seeded); with `pbx`, a session that writes for that PBX ('' = one that has not said)."""
    conn = await asyncpg.connect(dsn, server_settings=None if pbx is None else {"pbx_bridge.pbx": pbx})
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield conn
    finally:
        await transaction.rollback()
        await conn.close()


@pytest.fixture(scope="module")
def views_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "views", seed) as dsn:
        yield dsn


@pytest.fixture
async def db(views_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(views_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def kpi(conn: asyncpg.Connection, day: str) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM v_daily_kpi WHERE day = $1::text::date", day)
    assert row is not None
    return dict(row)


async def test_daily_kpi_exact_figures_with_the_local_day_and_probes_excluded(db: asyncpg.Connection) -> None:
    # Before any complaint is overdue.
    assert await kpi(db, "2030-06-10") == {
        "day": datetime(2030, 6, 10).date(),
        "calls": 7,  # A B C D E F W; the probe G is not a call; H is the 11th locally
        "answered": 3,  # A B E
        "answer_rate_pct": Decimal("42.9"),  # 3 / 7
        "within_ring_limit_pct": Decimal("25.0"),  # A of A B D W (C left before the limit; E F never rang agents)
        "avg_ring_seconds": Decimal("12.0"),  # (7 + 17) / 2, agents' answers only
        "p90_ring_seconds": Decimal("17.0"),  # the smallest observed time covering 90 % of answers
        "abandoned": 1,  # C
        "missed": 3,  # D (voicemail), F (forward_missed), W (missed)
        "voicemail": 1,
        "unfinished": 0,
        "after_hours_calls": 2,  # E F
        "after_hours_mobile_answered": 1,  # E
        "avg_talk_seconds": Decimal("70.0"),  # (60 + 120 + 30) / 3
        "sheets": 2,  # A E
        "sheet_rate_pct": Decimal("28.6"),  # 2 / 7
        "ring_limit_violations": 3,  # B D W (G is a probe's)
        "unanswered_violations": 2,  # D F
        "outbound_attempt_violations": 1,
        "complaint_overdue_violations": 0,
        "avg_wait_seconds": Decimal("11.0"),  # (7 + 17 + 9) / 3: A B E, the callers a person answered
        "p90_wait_seconds": Decimal("17.0"),  # the smallest observed wait covering 90 % of them
        "mobile_within_ring_limit_pct": Decimal("50.0"),  # E within, F rang its 25 s past the limit
        "pbx": "pbx",  # the scratch database's one PBX
    }
    day2 = await kpi(db, "2030-06-11")
    assert (day2["calls"], day2["answered"], day2["missed"], day2["after_hours_calls"],
            day2["after_hours_mobile_answered"], day2["ring_limit_violations"]) == (3, 2, 1, 1, 1, 1)
    assert day2["avg_ring_seconds"] == Decimal("3.0") and day2["sheet_rate_pct"] == Decimal("0.0")


async def test_agent_daily(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT agent, duty_mobile, duty_holder, answered, avg_ring_seconds, ring_limit_breaches, "
                          "talk_seconds, sheets FROM v_agent_daily WHERE day = '2030-06-10' ORDER BY agent")
    assert [tuple(r.values()) for r in rows] == [
        ("13900139000", True, "值班员小王", 1, None, 0, Decimal("30.0"), 1),
        ("agent101", False, None, 1, Decimal("7.0"), 0, Decimal("60.0"), 1),
        ("agent102", False, None, 1, Decimal("17.0"), 1, Decimal("120.0"), 0),
    ]
    assert "pbx-bridge-probe" not in {r["agent"] for r in await db.fetch("SELECT agent FROM v_agent_daily")}


async def test_a_transferred_call_in_the_call_log_and_per_person(views_dsn: str) -> None:
    """agent101 answers after 4 s, talks 3 s, transfers to agent103 (rings 6 s, talks 5 s); a
    second call's transfer to agent102 is not answered and goes back to agent101."""
    async with rolled_back(views_dsn) as conn:
        await add_call(conn, "T", "2030-06-13 10:00:00", caller="13800000009", disposition="answered", ring=4.0,
                       within=True, answered_by="agent101", talk=3, stage="group", wait=4.0)
        start = local("2030-06-13 10:00:00")
        await conn.execute("UPDATE calls SET ended_at = $2, talk_seconds = 8, transferred_to = 'agent103' "
                           "WHERE linkedid = $1", "T", start + timedelta(seconds=18))
        await add_leg(conn, "T", "T.2", "agent103", start + timedelta(seconds=7), start + timedelta(seconds=13),
                      start + timedelta(seconds=18), stage="transfer", transfer_kind="blind", transferred_by="agent101")
        await add_call(conn, "U", "2030-06-13 11:00:00", caller="13800000010", disposition="answered", ring=2.0,
                       within=True, answered_by="agent101", talk=2, stage="group", wait=2.0)
        start = local("2030-06-13 11:00:00")
        await add_leg(conn, "U", "U.2", "agent102", start + timedelta(seconds=4), None, start + timedelta(seconds=24),
                      stage="transfer", transfer_kind="blind", transferred_by="agent101")
        await add_leg(conn, "U", "U.3", "agent101", start + timedelta(seconds=24), start + timedelta(seconds=26),
                      start + timedelta(seconds=30), stage="transfer_return", transferred_by="agent102")
        await conn.execute("UPDATE calls SET ended_at = $1, talk_seconds = 6 WHERE linkedid = 'U'",
                           start + timedelta(seconds=30))
        log = {r["linkedid"]: r for r in await conn.fetch(
            "SELECT linkedid, answered_by, transferred_to, transfers, talk_seconds FROM v_call_log "
            "WHERE day = '2030-06-13'")}
        assert (log["T"]["answered_by"], log["T"]["transferred_to"], log["T"]["transfers"]) == (
            "agent101", "agent103", "agent101 → agent103")
        assert (log["U"]["transferred_to"], log["U"]["transfers"]) == (
            None, "agent101 → agent102 (未接), agent102 → agent101")
        await conn.execute("INSERT INTO agent_presence (agent, signed_out_at, signed_in_at, set_by, signed_out_by, "
                           "signed_in_by, signed_in_set_by) VALUES ('agent102', $1, $2, 'phone', 'agent102', "
                           "'agent102', 'phone')", local("2030-06-13 10:30:00"), local("2030-06-13 10:45:30"))
        rows = await conn.fetch("SELECT agent, answered, talk_seconds, transfers_made, transfers_received, "
                                "calls_offered, answer_share_pct, break_minutes "
                                "FROM v_agent_daily WHERE day = '2030-06-13' ORDER BY agent")
        assert [tuple(r.values()) for r in rows] == [
            # answered T and U first; talked 3 + 2 + 4 (back on U); rang for both, took both
            ("agent101", 2, Decimal("9.0"), 2, 0, 2, Decimal("100.0"), Decimal("0.0")),
            # rang for U's transfer, did not answer; on a 15.5-minute break
            ("agent102", 0, Decimal("0.0"), 0, 0, 1, Decimal("0.0"), Decimal("15.5")),
            ("agent103", 0, Decimal("5.0"), 0, 1, 1, Decimal("100.0"), Decimal("0.0")),  # T after the transfer
        ]


async def test_a_sheet_is_owned_by_the_first_answerer_unless_set(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        await add_call(conn, "O1", "2030-06-14 10:00:00", caller="13800000011", disposition="answered", ring=2.0,
                       within=True, answered_by="agent101", talk=5, stage="group")
        await conn.execute("UPDATE calls SET transferred_to = 'agent103' WHERE linkedid = 'O1'")
        await add_call(conn, "O2", "2030-06-14 20:00:00", caller="13800000012", disposition="forwarded",
                       answered_by="13900139000", talk=5, after_hours=True, stage="mobile", holder="值班员小王")
        first = await save_sheet(conn, "O1", sheet(), "组长李雪莲")
        mobile = await save_sheet(conn, "O2", sheet(), "组长李雪莲")
        chosen = await save_sheet(conn, "A", sheet(owner="杨雪峰"), "组长李雪莲")
    # 首问负责制: transferred to agent103, the case stays agent101's; the mobile's holder owns hers
    assert (first.row["owner"], mobile.row["owner"], chosen.row["owner"]) == ("agent101", "值班员小王", "杨雪峰")


async def test_callbacks_due_are_cleared_by_answered_callbacks_and_later_answered_calls(
        db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT linkedid, caller_number, due_calls_from_number, waiting_minutes, result "
                          "FROM v_callbacks_due")
    # C: the same number called again and was answered (I). D: called back from an office phone with an
    # outside-line prefix 9 (cb-D). F: the office's answered call was before F, the later one not answered.
    # J: the same number as F written +86 138-0000-0006. W: withheld number, nobody can call it back.
    assert [(r["linkedid"], r["caller_number"], r["due_calls_from_number"], r["result"]) for r in rows] == [
        ("F", "13800000006", 2, "转客服手机未接"), ("J", "+86 138-0000-0006", 2, "未接")]
    assert rows[0]["waiting_minutes"] > rows[1]["waiting_minutes"]  # oldest first (this data is in 2030)


async def test_callback_outbound_clears_a_due_call(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        await add_outbound(conn, "cb-F", "0013800000006", "2030-06-11 11:00:00", answered=True)
        assert await conn.fetchval("SELECT count(*) FROM v_callbacks_due") == 0


async def test_call_log_unrecorded_and_call_sheet(db: asyncpg.Connection) -> None:
    log = await db.fetch("SELECT linkedid, started, day, result, has_sheet FROM v_call_log")
    assert [r["linkedid"] for r in log] == ["J", "I", "H", "F", "E", "D", "W", "C", "B", "A"]  # newest first
    h = next(r for r in log if r["linkedid"] == "H")
    assert str(h["started"]) == "2030-06-11 00:00:30" and str(h["day"]) == "2030-06-11"

    unrecorded = [r["linkedid"] for r in await db.fetch("SELECT linkedid FROM v_unrecorded_calls")]
    assert unrecorded == ["B", "H", "I"]  # answered without a sheet, H taken on the mobile
    assert await db.fetchval("SELECT answered_on_mobile FROM v_unrecorded_calls WHERE linkedid = 'H'") is True

    sheets = [dict(r) for r in await db.fetch('SELECT * FROM v_call_sheet ORDER BY "来电时间"')]
    columns = ["通话编号", "客户姓名", "联系方式", "问题类型", "跟进状态", "跟进人"]
    assert [tuple(s[c] for c in columns) for s in sheets] == [
        ("A", "张三客户", "13800000001", "咨询", "已完成", "agent101"),  # owner: the first answerer
        ("E", "", "13800000005 王女士", "投诉", "处理中", "杨雪峰")]
    assert str(sheets[0]["来电时间"]) == "2030-06-10 09:00:00"


async def test_filling_a_sheet_removes_the_call_from_unrecorded_and_keeps_history(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        first = await save_sheet(conn, "B", sheet(status="待处理"), "agent102 王")
        assert first.changed and first.row["version"] == 1
        assert "B" not in [r["linkedid"] for r in await conn.fetch("SELECT linkedid FROM v_unrecorded_calls")]
        same = await save_sheet(conn, "B", sheet(status="待处理"), "agent102 王")
        assert not same.changed and same.row["version"] == 1
        done = await save_sheet(conn, "B", sheet(status="已完成", resolution="已回复"), "组长")
        assert done.row["version"] == 2 and done.row["completed_at"] is not None
        history = await conn.fetch("SELECT version, changed_by, changes FROM call_note_history "
                                   "WHERE linkedid = 'B' ORDER BY version")
        assert [(h["version"], h["changed_by"]) for h in history] == [(1, "agent102 王"), (2, "组长")]
        assert history[1]["changes"] == ('{"status": {"new": "已完成", "old": "待处理"}, '
                                         '"resolution": {"new": "已回复", "old": ""}}')
        reopened = await save_sheet(conn, "B", sheet(status="处理中", resolution="已回复"), "组长")
        assert reopened.row["completed_at"] is None


async def test_overdue_complaints_become_violations_once(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        e_ended = await conn.fetchval("SELECT ended_at FROM calls WHERE linkedid = 'E'")
        assert await record_overdue_complaints(conn, 60, e_ended + timedelta(minutes=59)) == []
        recorded = await record_overdue_complaints(conn, 60, e_ended + timedelta(minutes=61))
        assert [(r["linkedid"], r["occurred_at"]) for r in recorded] == [("E", e_ended + timedelta(minutes=60))]
        assert await record_overdue_complaints(conn, 60, e_ended + timedelta(hours=5)) == []  # once
        assert (await kpi(conn, "2030-06-10"))["complaint_overdue_violations"] == 1
        row = await conn.fetchrow("SELECT violation, subject FROM v_violations WHERE kind = 'complaint_overdue'")
        assert tuple(row.values()) == ("投诉超时未处理", "杨雪峰")


async def test_a_complaint_resolved_late_is_still_a_violation(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        await conn.execute("UPDATE call_notes SET status = '已完成', completed_at = c.ended_at + interval '2 hours' "
                           "FROM calls c WHERE c.linkedid = call_notes.linkedid AND c.linkedid = 'E'")
        assert len(await record_overdue_complaints(conn, 60, datetime(2031, 1, 1, tzinfo=UTC))) == 1
        await conn.execute("DELETE FROM policy_violations WHERE kind = 'complaint_overdue'")
        await conn.execute("UPDATE call_notes SET completed_at = c.ended_at + interval '30 minutes' "
                           "FROM calls c WHERE c.linkedid = call_notes.linkedid AND c.linkedid = 'E'")
        assert await record_overdue_complaints(conn, 60, datetime(2031, 1, 1, tzinfo=UTC)) == []


async def test_violations_view_excludes_probes_and_uses_local_time(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT occurred, kind, linkedid, violation FROM v_violations WHERE day = '2030-06-10'")
    assert [(str(r["occurred"]), r["kind"], r["linkedid"]) for r in rows] == [
        ("2030-06-10 23:59:55", "unanswered", "F"), ("2030-06-10 14:00:40", "unanswered", "D"),
        ("2030-06-10 14:00:15", "ring_limit", "D"), ("2030-06-10 12:30:00", "outbound_attempt", None),
        ("2030-06-10 12:10:15", "ring_limit", "W"), ("2030-06-10 10:00:15", "ring_limit", "B")]


async def test_hourly_load(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT day, hour, weekday, calls, answered, unanswered FROM v_hourly_load "
                          "WHERE day = '2030-06-10' ORDER BY hour")
    assert [(r["hour"], r["calls"], r["answered"], r["unanswered"]) for r in rows] == [
        (9, 1, 1, 0), (10, 1, 1, 0), (11, 1, 0, 1), (12, 1, 0, 1), (14, 1, 0, 1), (19, 1, 1, 0), (23, 1, 0, 1)]
    assert {r["weekday"] for r in rows} == {1}  # Monday
    midnight = await db.fetchrow("SELECT hour, calls FROM v_hourly_load WHERE day = '2030-06-11' AND hour = 0")
    assert tuple(midnight.values()) == (0, 1)  # H


async def test_line_health_follows_the_latest_evidence(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        health = await conn.fetchrow("SELECT * FROM v_line_health")
        # The last probe (03:00 on the 11th) failed, but real calls arrived after it (J at 10:00).
        assert (health["state"], health["state_label"], health["evidence"]) == ("ok", "正常", "call")
        assert (health["last_probe_outcome"], str(health["last_probe_at"]), str(health["last_call_at"]),
                str(health["last_ok_probe_at"])) == (
            "no_arrival", "2030-06-11 03:00:00", "2030-06-11 10:00:00", "2030-06-10 08:00:00")
        await conn.execute(
            """INSERT INTO line_probes (probe_id, attempt, trigger, number, started_at, finished_at, outcome,
                   reason) VALUES ('p3', 1, 'manual', '4008001234', $1, $2, 'timeout', 'no answer')""",
            local("2030-06-11 11:00:00"), local("2030-06-11 11:00:20"))
        health = await conn.fetchrow("SELECT state, state_label, evidence, last_probe_trigger FROM v_line_health")
        assert tuple(health.values()) == ("failing", "故障", "probe", "manual")


async def test_every_view_and_column_has_a_bilingual_comment(db: asyncpg.Connection) -> None:
    missing = await db.fetch(
        """SELECT c.relname, a.attname, col_description(c.oid, a.attnum) AS column_comment,
                  obj_description(c.oid, 'pg_class') AS view_comment
           FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
           WHERE c.relkind = 'v' AND c.relname = ANY($1::text[])""", VIEWS)
    assert {r["relname"] for r in missing} == set(VIEWS)
    for row in missing:
        for comment in (row["column_comment"], row["view_comment"]):
            assert comment and "/" in comment and any("\u4e00" <= ch <= "\u9fff" for ch in comment), (
                row["relname"], row["attname"], comment)


@pytest.fixture(scope="module")
def login_roles(views_dsn: str) -> Iterator[dict[str, str]]:
    """A login user in each group role, with DSNs; dropped afterwards."""
    suffix = secrets.token_hex(3)
    users = {"pbx_supervisor": f"sup_{suffix}", "pbx_bridge": f"app_{suffix}", "pbx_cel_writer": f"cel_{suffix}"}
    password = secrets.token_hex(12)

    async def run(statements: list[str]) -> None:
        conn = await asyncpg.connect(views_dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run([f"CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE {group}"
                     for group, user in users.items()]))
    scheme, rest = views_dsn.split("://", 1)
    host_db = rest.split("@", 1)[-1]
    yield {group: f"{scheme}://{user}:{password}@{host_db}" for group, user in users.items()}
    asyncio.run(run([f"DROP ROLE {user}" for user in users.values()]))


async def test_supervisor_reads_every_view_and_no_table(login_roles: dict[str, str]) -> None:
    conn = await asyncpg.connect(login_roles["pbx_supervisor"])
    try:
        for view in VIEWS:
            await conn.fetch(f"SELECT * FROM {view} LIMIT 5")
        assert await conn.fetchval("SELECT calls FROM v_daily_kpi WHERE day = '2030-06-10'") == 7
        denied = [f"SELECT * FROM {table}" for table in TABLES] + [
            "SELECT * FROM call_facts", "SELECT * FROM outbound_answered",
            "INSERT INTO calls (linkedid, did, trunk, started_at, source) VALUES ('x', '1', 't', now(), 'ami')",
            "UPDATE calls SET caller_name = 'x'", "DELETE FROM call_notes",
            "CREATE TABLE mine (x int)", "CREATE VIEW mine AS SELECT 1"]
        for statement in denied:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        assert not await conn.fetchval(
            "SELECT bool_or(has_table_privilege(v, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')) "
            "FROM unnest($1::text[]) AS v", VIEWS)
    finally:
        await conn.close()


async def test_daemon_role_can_do_its_work_and_nothing_else(login_roles: dict[str, str]) -> None:
    async with rolled_back(login_roles["pbx_bridge"]) as conn:
        await save_sheet(conn, "I", sheet(), "agent101")
        await record_overdue_complaints(conn, 60, datetime(2031, 1, 1, tzinfo=UTC))
        await conn.execute("UPDATE bridge_settings SET timezone = 'Asia/Shanghai'")
        await conn.execute("INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) "
                           "VALUES ('x', '13900000000', now(), now() + interval '1 hour')")
        await conn.execute("DELETE FROM duty_roster WHERE holder = 'x'")
        await conn.execute("INSERT INTO duty_roster_changes (changed_by, old_entries, new_entries) "
                           "VALUES ('ops', '[]', '[]')")
        await conn.fetch("SELECT * FROM v_daily_kpi")
        await conn.fetch("SELECT linkedid FROM cel LIMIT 1")  # the reconcile and v_callbacks_due read CEL
        at = datetime(2030, 6, 12, 2, 0, tzinfo=UTC)
        await sign_out(conn, "agent101", at, agents=["agent101", "agent102"], open_now=True, reason="午饭",
                       set_by="phone", actor="agent101")
        await sign_in(conn, "agent101", at + timedelta(minutes=30), agents=["agent101"], set_by="api", actor="ops")
        await conn.fetch("SELECT * FROM v_agent_presence")
    conn = await asyncpg.connect(login_roles["pbx_bridge"])
    try:
        for statement in ["DELETE FROM calls", "DELETE FROM policy_violations", "TRUNCATE call_note_history",
                          "UPDATE call_note_history SET changed_by = 'x'", "INSERT INTO cel (eventtype, eventtime) "
                          "VALUES ('X', now())", "DROP TABLE calls", "CREATE TABLE mine (x int)",
                          "DELETE FROM call_notes", "INSERT INTO schedule_overrides (day, reason) VALUES "
                          "('2030-01-01', 'x')", "SELECT * FROM duty_roster_changes",
                          "UPDATE duty_roster_changes SET changed_by = 'x'", "DELETE FROM duty_roster_changes",
                          "DELETE FROM agent_presence", "TRUNCATE agent_presence"]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_cel_writer_role_inserts_cel_rows_and_nothing_else(login_roles: dict[str, str]) -> None:
    """Asterisk's cel_pgsql logs in with a user in pbx_cel_writer: it can add CEL rows, not read them back."""
    async with rolled_back(login_roles["pbx_cel_writer"]) as conn:
        await conn.execute("INSERT INTO cel (eventtype, eventtime, channame, uniqueid, linkedid) "
                           "VALUES ('CHAN_START', now(), 'PJSIP/carrier-1', 'u1', 'u1')")
    conn = await asyncpg.connect(login_roles["pbx_cel_writer"])
    try:
        denied = [f"SELECT * FROM {table}" for table in TABLES] + [f"SELECT * FROM {view}" for view in VIEWS] + [
            "INSERT INTO cel (eventtype, eventtime) VALUES ('X', now()) RETURNING id",  # RETURNING reads
            "UPDATE cel SET extra = 'x'", "DELETE FROM cel", "TRUNCATE cel",
            "INSERT INTO calls (linkedid, did, trunk, started_at, source) VALUES ('x', '1', 't', now(), 'cel')",
            "INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) "
            "VALUES ('x', '13900000000', now(), now() + interval '1 hour')",
            "CREATE TABLE mine (x int)"]
        for statement in denied:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_nobody_but_the_owner_creates_objects_in_public(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT has_schema_privilege('public', 'public', 'CREATE')") is False


async def test_the_roster_refuses_a_mobile_with_a_final_newline(views_dsn: str) -> None:
    """PostgreSQL's `$` is the very end of the text (Python's would accept the newline)."""
    async with rolled_back(views_dsn) as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) "
                               "VALUES ('x', $1, now(), now() + interval '1 hour')", "13800138000\n")


async def test_a_breach_after_midnight_counts_on_its_calls_day_in_both_views(views_dsn: str) -> None:
    async with rolled_back(views_dsn) as conn:
        await add_call(conn, "K", "2030-06-11 23:59:55", caller="13800000011", disposition="missed", ring=20.0,
                       within=False)
        await add_violation(conn, "ring_limit", "K", "2030-06-12 00:00:10")
        await conn.execute(  # a call whose end was lost (AMI gap): counted, but in no outcome
            "INSERT INTO calls (linkedid, did, trunk, caller_number, started_at, source) "
            "VALUES ('L', '4008001234', 'carrier', '13800000012', $1, 'ami')", local("2030-06-11 15:00:00"))
        day = await kpi(conn, "2030-06-11")
        assert (day["calls"], day["ring_limit_violations"], day["unfinished"]) == (5, 2, 1)
        assert day["calls"] == day["answered"] + day["abandoned"] + day["missed"] + day["unfinished"]
        listed = await conn.fetch("SELECT linkedid, occurred FROM v_violations WHERE day = '2030-06-11' "
                                  "AND kind = 'ring_limit'")
        assert [(r["linkedid"], str(r["occurred"])) for r in listed] == [("K", "2030-06-12 00:00:10"),
                                                                          ("J", "2030-06-11 10:00:15")]
        assert await conn.fetchval("SELECT count(*) FROM v_daily_kpi WHERE day = '2030-06-12'") == 0
