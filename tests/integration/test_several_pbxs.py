"""Several PBXs (sites) in one database (sql/migrations/0014_several_pbxs.sql), on real PostgreSQL.

Two PBXs write the same captured calls (the sandbox's CEL rows, as the CEL builder records them):
"site-a", whose Asterisk has the sandbox's systemname "pbx" (the captures as they are), and
"site-b", whose Asterisk is "site-b" (every uniqueid and linkedid rewritten). Each writes through
its own connections (`pbx_bridge.pbx`), so `pbx` on every row is the tables' default. Each PBX's
rows in the views must be what a database of that PBX alone shows; the *_all views must count
the calls of both. Then the backfill of databases made before 0014, and sessions that did not say
which PBX they write for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields, replace
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pbx_bridge.cel.builder import CEL_COLUMNS, CelRow, build_call
from pbx_bridge.storage.migrations import MigrationError, discover, migrate, sql_dir
from pbx_bridge.tracker.model import CallLeg, CallRecord
from tests.conftest import scratch_database
from tests.integration.test_views import VIEWS, add_outbound, rolled_back
from tests.support.cel import cel_calls, cel_rows
from tests.support.env import DevEnv
from tests.support.seed import add_call, local
from tests.unit.test_cel_builder import SETTINGS

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 24)  # the captures' local day in Asia/Shanghai (04:44 to 07:50)
SITE_A, SITE_B = "site-a", "site-b"
SYSTEM_NAMES = {SITE_A: "pbx", SITE_B: "site-b"}  # each PBX's Asterisk systemname
CAPTURES = {
    SITE_A: ["answered_7s_talk_4s", "answered_17s", "abandoned_6s", "all_busy_voicemail", "after_hours_forwarded",
             "mobile_17s", "transfer_blind", "transfer_attended", "concurrent_3", "probe_arrived"],
    SITE_B: ["answered_7s_talk_4s", "abandoned_6s", "after_hours_voicemail", "transfer_unanswered", "off_hook_busy",
             "probe_arrived"],
}
PER_PBX_TABLES = ["calls", "call_legs", "policy_violations", "line_probes", "agent_presence", "open_hours",
                  "report_deliveries"]
ALL_VIEWS = [*VIEWS, "v_daily_kpi_all", "v_hourly_load_all"]
NO_PBX_SETTING = {"pbx_bridge.pbx": ""}  # a session that has not said (beats a database default)
MIGRATION_0014 = sql_dir() / "migrations" / "0014_several_pbxs.sql"
CALL_COLUMNS = [f.name for f in fields(CallRecord)]
LEG_COLUMNS = [f.name for f in fields(CallLeg)]


# ---------------------------------------------------------------------------------------------
# Captured calls, written as pbx-bridge records them.

def as_written_by(row: CelRow, system_name: str) -> CelRow:
    """A captured CEL row as an Asterisk with this systemname writes it ('' = none): the sandbox's
    prefix "pbx-" replaced in the uniqueids and linkedids (an attended transfer's `extra` names one)."""
    def rename(text: str) -> str:
        return re.sub(r"\bpbx-(?=[0-9]+\.[0-9])", f"{system_name}-" if system_name else "", text)
    return replace(row, uniqueid=rename(row.uniqueid), linkedid=rename(row.linkedid), extra=rename(row.extra))


def linkedid_of(capture: str, system_name: str) -> str:
    """The linkedid of a captured scenario's (first) call at that Asterisk."""
    return as_written_by(cel_rows(capture)[0], system_name).linkedid


def db_value(value: Any) -> Any:
    return str(value) if isinstance(value, Enum) else value


async def write_captures(conn: asyncpg.Connection, captures: Sequence[str], system_name: str) -> None:
    """The CEL rows of these captured scenarios into `cel`, and of each hotline call the record, legs
    and violations the CEL builder makes of them. No statement names `pbx`: the session's is the default."""
    cel_columns = [c for c in CEL_COLUMNS if c != "id"]
    for capture in captures:
        rows = [as_written_by(row, system_name) for row in cel_rows(capture)]
        await conn.executemany(
            f"INSERT INTO cel ({', '.join(cel_columns)}) "
            f"VALUES ({', '.join(f'${i + 1}' for i in range(len(cel_columns)))})",
            [[row.eventtime.replace(tzinfo=None) if c == "eventtime" else getattr(row, c) for c in cel_columns]
             for row in rows])
        for own in cel_calls(capture).values():
            call = build_call([as_written_by(row, system_name) for row in own], SETTINGS)
            if call is None:
                continue
            await conn.execute(
                f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
                f"VALUES ({', '.join(f'${i + 1}' for i in range(len(CALL_COLUMNS)))})",
                *[db_value(getattr(call.record, c)) for c in CALL_COLUMNS])
            await conn.executemany(
                f"INSERT INTO call_legs ({', '.join(LEG_COLUMNS)}) "
                f"VALUES ({', '.join(f'${i + 1}' for i in range(len(LEG_COLUMNS)))})",
                [[db_value(getattr(leg, c)) for c in LEG_COLUMNS] for leg in call.legs])
            await conn.executemany(
                "INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ($1, $2, $3, $4::jsonb)",
                [(str(v.kind), v.linkedid, v.occurred_at, json.dumps(dict(v.details), ensure_ascii=False))
                 for v in call.violations])


async def seed_pbx(conn: asyncpg.Connection, system_name: str, captures: Sequence[str], *,
                   last_probe: str = "ok", break_minutes: int = 30) -> None:
    """One PBX's day: its captured calls, a sheet, two probes (the last one `last_probe`), the day's
    opening hours (04:00-08:00), agent101's break, agent102 signed out since 07:00, a mailed report.
    Only columns every version since 0013 has: it seeds databases from before 0014 too."""
    await write_captures(conn, captures, system_name)
    await conn.execute(
        "INSERT INTO call_notes (linkedid, category, summary, status, created_by, updated_by) "
        "VALUES ($1, '咨询', '询问课程安排', '待处理', 'agent101', 'agent101')",
        linkedid_of(captures[0], system_name))
    at = local(f"{DAY} 03:00:00"), local(f"{DAY} 08:00:00")
    await conn.execute(
        """INSERT INTO line_probes (probe_id, attempt, trigger, number, started_at, finished_at, outcome, delay_ms)
           VALUES ($1, 1, 'daily', '4008001234', $2::timestamptz, $2::timestamptz + interval '2 seconds', 'ok', 850),
                  ($3, 1, 'quiet', '4008001234', $4::timestamptz, $4::timestamptz + interval '20 seconds', $5, NULL)""",
        secrets.token_hex(8), at[0], secrets.token_hex(8), at[1], last_probe)
    await conn.execute("INSERT INTO open_hours (day, open, reason) VALUES ($1, tstzmultirange(tstzrange($2, $3)), "
                       "'每周营业时间')", DAY, local(f"{DAY} 04:00:00"), local(f"{DAY} 08:00:00"))
    out = local(f"{DAY} 05:00:00")
    await conn.execute(
        "INSERT INTO agent_presence (agent, signed_out_at, signed_in_at, set_by, signed_out_by, signed_in_by, "
        "signed_in_set_by) VALUES ('agent101', $1::timestamptz, $1::timestamptz + make_interval(mins => $2), "
        "'phone', 'agent101', 'agent101', 'phone')", out, break_minutes)
    await conn.execute("INSERT INTO agent_presence (agent, signed_out_at, reason, set_by, signed_out_by) "
                       "VALUES ('agent102', $1, '午饭', 'api', 'ops')", local(f"{DAY} 07:00:00"))
    await conn.execute("INSERT INTO report_deliveries (day, recipients) VALUES ($1, ARRAY['boss@example.com'])",
                       DAY)


async def connect(dsn: str, pbx: str) -> asyncpg.Connection:
    """A session that writes for `pbx` ('' = one that has not said), as pbx-bridge opens them."""
    return await asyncpg.connect(dsn, server_settings={"pbx_bridge.pbx": pbx})


async def rows_of(conn: asyncpg.Connection, view: str, where: str = "true", *args: Any,
                  without: Sequence[str] = ()) -> list[tuple[tuple[str, Any], ...]]:
    """A view's rows (as sorted (column, value) tuples, `without` those columns): comparable whatever the order."""
    records = await conn.fetch(f"SELECT * FROM {view} WHERE {where}", *args)
    return sorted((tuple((k, v) for k, v in r.items() if k not in without) for r in records), key=repr)


# ---------------------------------------------------------------------------------------------
# Two PBXs in one database.

async def seed_sites(dsn: str) -> None:
    """site-a and site-b, each through its own session; site-b called 13800000003 back (abandoned_6s)."""
    for pbx, last_probe, break_minutes in ((SITE_A, "ok", 30), (SITE_B, "no_arrival", 10)):
        conn = await connect(dsn, pbx)
        try:
            await seed_pbx(conn, SYSTEM_NAMES[pbx], CAPTURES[pbx], last_probe=last_probe, break_minutes=break_minutes)
            if pbx == SITE_B:
                await add_outbound(conn, "site-b-1795470000.1", "13800000003", f"{DAY} 09:00:00", answered=True)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def sites_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "pbxs") as dsn:
        asyncio.run(seed_sites(dsn))
        yield dsn


async def leave_only(conn: asyncpg.Connection, pbx: str) -> None:
    """Delete every row of the other PBXs (their CEL rows by their systemname): what is left is a
    database of `pbx` alone."""
    for table in PER_PBX_TABLES:  # a call's legs, sheet and history go with it
        await conn.execute(f"DELETE FROM {table} WHERE pbx <> $1", pbx)
    await conn.execute("DELETE FROM cel WHERE pbx_system_name(linkedid) IS DISTINCT FROM $1", SYSTEM_NAMES[pbx])


@pytest.mark.parametrize("pbx", [SITE_A, SITE_B])
async def test_each_pbx_sees_what_a_database_of_its_own_would(sites_dsn: str, pbx: str) -> None:
    async with rolled_back(sites_dsn, pbx) as conn:  # one transaction: now() is the same for both looks
        shared = {view: await rows_of(conn, view, "pbx = $1", pbx) for view in VIEWS if view != "v_call_sheet"}
        shared["v_call_sheet"] = await rows_of(conn, "v_call_sheet", '"站点" = $1', pbx)
        await leave_only(conn, pbx)
        for view in VIEWS:
            alone = await rows_of(conn, view)
            assert alone == shared[view], view
            assert alone, f"{view} has no row of {pbx}: the comparison would prove nothing"


async def test_aggregates_are_per_pbx(sites_dsn: str) -> None:
    conn = await connect(sites_dsn, "")
    try:
        kpi = {r["pbx"]: r for r in await conn.fetch("SELECT * FROM v_daily_kpi WHERE day = $1", DAY)}
        # A: 10 captures, 12 calls (concurrent_3 has three) minus the probe; B: 6 captures, 7 minus the probe
        assert {p: (r["calls"], r["answered"], r["abandoned"], r["missed"]) for p, r in kpi.items()} == {
            SITE_A: (11, 9, 1, 1), SITE_B: (6, 4, 1, 1)}
        hours = await conn.fetch("SELECT pbx, hour, calls FROM v_hourly_load WHERE day = $1 ORDER BY pbx, hour", DAY)
        assert [tuple(r.values()) for r in hours] == [
            (SITE_A, 4, 8), (SITE_A, 6, 3), (SITE_B, 4, 3), (SITE_B, 6, 1), (SITE_B, 7, 2)]
        # agent101 at site-a and agent101 at site-b are two people, each with their own break and hours
        agents = await conn.fetch("SELECT pbx, answered, calls_offered, break_minutes, signed_in_minutes "
                                  "FROM v_agent_daily WHERE day = $1 AND agent = 'agent101' ORDER BY pbx", DAY)
        assert [tuple(r.values()) for r in agents] == [
            (SITE_A, 4, 9, Decimal("30.0"), Decimal("210.0")),  # open 04:00-08:00 = 240 min, 30 out
            (SITE_B, 4, 5, Decimal("10.0"), Decimal("230.0"))]
        line = await conn.fetch("SELECT pbx, state, evidence, last_probe_outcome, last_call_at::text, "
                                "probes_failed_today FROM v_line_health ORDER BY pbx")
        # the captures' day may be today in Shanghai (the views' time zone)
        failed_today = int(await conn.fetchval("SELECT (now() AT TIME ZONE 'Asia/Shanghai')::date") == DAY)
        assert [tuple(r.values()) for r in line] == [
            (SITE_A, "ok", "probe", "ok", "2026-11-24 06:55:34", 0),
            (SITE_B, "failing", "probe", "no_arrival", "2026-11-24 07:50:13", failed_today)]
    finally:
        await conn.close()


async def test_line_health_has_a_row_for_the_sessions_own_pbx(sites_dsn: str) -> None:
    """A pbx-bridge that has recorded nothing yet still reads its line's row (unknown)."""
    conn = await connect(sites_dsn, "site-c")
    try:
        rows = await conn.fetch("SELECT pbx, state, evidence, last_call_at FROM v_line_health ORDER BY pbx")
        assert [(r["pbx"], r["state"]) for r in rows] == [(SITE_A, "ok"), (SITE_B, "failing"), ("site-c", "unknown")]
        assert (rows[2]["evidence"], rows[2]["last_call_at"]) == (None, None)
    finally:
        await conn.close()


COUNTS = ["calls", "answered", "abandoned", "missed", "voicemail", "unfinished", "after_hours_calls",
          "after_hours_mobile_answered", "sheets", "ring_limit_violations", "unanswered_violations",
          "outbound_attempt_violations", "complaint_overdue_violations"]


def percent(part: int, whole: int) -> Decimal:
    return (Decimal(100 * part) / whole).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


async def test_all_pbx_views_count_the_calls_of_both(sites_dsn: str) -> None:
    async with rolled_back(sites_dsn, SITE_A) as conn:
        kpi = {r["pbx"]: r for r in await conn.fetch("SELECT * FROM v_daily_kpi WHERE day = $1", DAY)}
        everything = await conn.fetchrow("SELECT * FROM v_daily_kpi_all WHERE day = $1", DAY)
        a, b = kpi[SITE_A], kpi[SITE_B]
        assert [*everything.keys(), "pbx"] == list(a.keys())  # v_daily_kpi's columns but pbx
        for column in COUNTS:
            assert everything[column] == a[column] + b[column], column
        answer_rate = percent(a["answered"] + b["answered"], a["calls"] + b["calls"])
        assert everything["answer_rate_pct"] == answer_rate == Decimal("76.5")  # 13 / 17
        assert answer_rate != ((a["answer_rate_pct"] + b["answer_rate_pct"]) / 2).quantize(Decimal("0.1"))
        assert everything["sheet_rate_pct"] == percent(a["sheets"] + b["sheets"], a["calls"] + b["calls"])
        hourly = await conn.fetch("SELECT hour, calls, answered, unanswered, ring_limit_breaches "
                                  "FROM v_hourly_load_all WHERE day = $1 ORDER BY hour", DAY)
        added = await conn.fetch("SELECT hour, sum(calls)::bigint, sum(answered)::bigint, sum(unanswered)::bigint, "
                                 "sum(ring_limit_breaches)::bigint FROM v_hourly_load WHERE day = $1 "
                                 "GROUP BY hour ORDER BY hour", DAY)
        assert [tuple(r.values()) for r in hourly] == [tuple(r.values()) for r in added]
        assert [r["calls"] for r in hourly] == [11, 4, 2]  # 04:00 8 + 3, 06:00 3 + 1, 07:00 site-b's 2

        # The averages, percentiles and rates are those of one PBX that took all these calls.
        hourly_all = await rows_of(conn, "v_hourly_load_all")
        kpi_all = await rows_of(conn, "v_daily_kpi_all")
        await conn.execute("UPDATE calls SET pbx = $1 WHERE pbx <> $1", SITE_A)
        await conn.execute("UPDATE policy_violations SET pbx = $1 WHERE pbx <> $1", SITE_A)
        assert await rows_of(conn, "v_daily_kpi", without=["pbx"]) == kpi_all
        assert await rows_of(conn, "v_hourly_load", without=["pbx"]) == hourly_all


async def test_row_views_carry_the_pbx_of_their_rows(sites_dsn: str) -> None:
    conn = await connect(sites_dsn, "")
    try:
        for view, pbx_column in [("v_call_log", "pbx"), ("v_violations", "pbx"), ("v_unrecorded_calls", "pbx"),
                                 ("v_callbacks_due", "pbx"), ("v_call_sheet", '"站点"')]:
            linkedid = '"通话编号"' if view == "v_call_sheet" else "linkedid"
            pairs = await conn.fetch(f"SELECT DISTINCT {pbx_column} AS pbx, pbx_system_name({linkedid}) AS system "
                                     f"FROM {view} ORDER BY 1")
            assert [tuple(r.values()) for r in pairs] == [(SITE_A, "pbx"), (SITE_B, "site-b")], view
        assert await conn.fetchval("SELECT count(*) FROM v_call_log WHERE pbx = $1", SITE_B) == 6
        presence = await conn.fetch("SELECT pbx, agent, state FROM v_agent_presence ORDER BY pbx, agent")
        assert [tuple(r.values()) for r in presence] == [
            (SITE_A, "agent101", "in"), (SITE_A, "agent102", "out"), (SITE_B, "agent101", "in"),
            (SITE_B, "agent102", "out")]
    finally:
        await conn.close()


async def test_callbacks_are_per_pbx(sites_dsn: str) -> None:
    """Both PBXs missed 13800000003 (abandoned_6s); site-b's Asterisk called it back: only site-a's is due."""
    due = ("SELECT pbx, linkedid, due_calls_from_number FROM v_callbacks_due WHERE caller_number = '13800000003' "
           "ORDER BY pbx")
    missed = {pbx: linkedid_of("abandoned_6s", SYSTEM_NAMES[pbx]) for pbx in (SITE_A, SITE_B)}
    async with rolled_back(sites_dsn, SITE_A) as conn:
        assert [tuple(r.values()) for r in await conn.fetch(due)] == [(SITE_A, missed[SITE_A], 1)]
        await conn.execute("DELETE FROM cel WHERE linkedid = 'site-b-1795470000.1'")  # without that callback
        assert [tuple(r.values()) for r in await conn.fetch(due)] == [
            (SITE_A, missed[SITE_A], 1), (SITE_B, missed[SITE_B], 1)]  # each PBX counts its own
    async with rolled_back(sites_dsn, SITE_B) as conn:  # the number called site-b again and was answered there
        await add_call(conn, "site-b-1795471000.1", f"{DAY} 10:00:00", caller="13800000003", disposition="answered",
                       ring=3.0, within=True, answered_by="agent101", talk=20, stage="group")
        assert [tuple(r.values()) for r in await conn.fetch(due)] == [(SITE_A, missed[SITE_A], 1)]
    async with rolled_back(sites_dsn, SITE_A) as conn:
        # an Asterisk that never recorded a hotline call here belongs to no known PBX: it clears nothing
        await add_outbound(conn, "elsewhere-1795470000.2", "13800000003", f"{DAY} 09:30:00", answered=True)
        assert len(await conn.fetch(due)) == 1
        # site-a's Asterisk, under a new systemname once its calls are recorded for site-a
        await write_captures(conn, ["answered_17s"], "pbx2")
        await add_outbound(conn, "pbx2-1795470000.3", "13800000003", f"{DAY} 09:40:00", answered=True)
        assert await conn.fetch(due) == []
    async with rolled_back(sites_dsn, SITE_A) as conn:  # site-a's Asterisk as it always was
        await add_outbound(conn, "pbx-1795470000.4", "13800000003", f"{DAY} 09:40:00", answered=True)
        assert await conn.fetch(due) == []


async def test_a_session_that_has_not_said_its_pbx_cannot_write(sites_dsn: str) -> None:
    conn = await connect(sites_dsn, "")
    try:
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as refused:
            await write_captures(conn, ["answered_7s_talk_4s"], "site-c")
        assert refused.value.message == ("this session has not said which PBX it writes for: set pbx_bridge.pbx "
                                      "(pbx-bridge does it on every connection)")
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
            await conn.fetchval("SELECT session_pbx()")
    finally:
        await conn.close()
    async with rolled_back(sites_dsn, "site c") as conn:  # not a PBX name
        with pytest.raises(asyncpg.CheckViolationError):
            await write_captures(conn, ["answered_7s_talk_4s"], "site-c")
    async with rolled_back(sites_dsn, "site-c") as conn:
        assert await conn.fetchval("SELECT session_pbx()") == "site-c"


INDEXES = {
    "policy_violations_once": "CREATE UNIQUE INDEX policy_violations_once ON public.policy_violations USING btree "
                              "(pbx, kind, COALESCE(linkedid, ''::text), "
                              "COALESCE((details ->> 'channel'::text), ''::text))",
    "policy_violations_break_once": "CREATE UNIQUE INDEX policy_violations_break_once ON public.policy_violations "
                                    "USING btree (pbx, ((details ->> 'agent'::text)), ((details ->> 'day'::text))) "
                                    "WHERE (kind = 'break_over_limit'::text)",
    "agent_presence_one_open": "CREATE UNIQUE INDEX agent_presence_one_open ON public.agent_presence USING btree "
                               "(pbx, agent) WHERE (signed_in_at IS NULL)",
    "open_hours_pkey": "CREATE UNIQUE INDEX open_hours_pkey ON public.open_hours USING btree (pbx, day)",
    "report_deliveries_pkey": "CREATE UNIQUE INDEX report_deliveries_pkey ON public.report_deliveries "
                              "USING btree (pbx, day)",
    "calls_pbx_started_at": "CREATE INDEX calls_pbx_started_at ON public.calls USING btree (pbx, started_at)",
}
ONCE = ("INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ($1, NULL, now(), $2::jsonb) "
        "ON CONFLICT (pbx, kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', ''))) DO NOTHING "
        "RETURNING id")
BREAK_ONCE = ("INSERT INTO policy_violations (kind, occurred_at, details) "
              "VALUES ('break_over_limit', now(), $1::jsonb) "
              "ON CONFLICT (pbx, (details ->> 'agent'), (details ->> 'day')) WHERE kind = 'break_over_limit' "
              "DO NOTHING RETURNING id")


async def test_the_keys_are_per_pbx(sites_dsn: str) -> None:
    async with rolled_back(sites_dsn, SITE_A) as conn:
        for name, definition in INDEXES.items():
            assert await conn.fetchval("SELECT pg_get_indexdef($1::regclass)", name) == definition
        # both PBXs have 2026-11-24's hours and report, and agent102 out: a second one at site-a is refused
        for statement, args in [
                ("INSERT INTO open_hours (day, open, reason) VALUES ($1, '{}', '停业')", [DAY]),
                ("INSERT INTO report_deliveries (day, recipients) VALUES ($1, '{}')", [DAY]),
                ("INSERT INTO agent_presence (agent, signed_out_at, set_by) VALUES ('agent102', now(), 'auto')", [])]:
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(statement, *args)
        # the same channel's outbound attempt and the same agent's break breach, once per PBX
        channel, breach = '{"channel": "PJSIP/agent101-00000001"}', '{"agent": "agent101", "day": "2026-11-24"}'
        for pbx in (SITE_A, SITE_B):
            await conn.execute("SELECT set_config('pbx_bridge.pbx', $1, true)", pbx)
            assert await conn.fetchval(ONCE, "outbound_attempt", channel) is not None
            assert await conn.fetchval(ONCE, "outbound_attempt", channel) is None
            assert await conn.fetchval(BREAK_ONCE, breach) is not None
            assert await conn.fetchval(BREAK_ONCE, breach) is None
        assert await conn.fetchval("SELECT count(DISTINCT pbx) FROM policy_violations WHERE kind = 'break_over_limit'"
                                   ) == 2


async def test_supervisors_read_the_all_pbx_views(sites_dsn: str) -> None:
    conn = await connect(sites_dsn, "")
    try:
        for role in ("pbx_supervisor", "pbx_bridge"):
            assert await conn.fetchval(
                "SELECT bool_and(has_table_privilege($1, v, 'SELECT')) FROM unnest($2::text[]) AS v",
                role, ALL_VIEWS)
        missing = await conn.fetch(
            """SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
               WHERE c.relname = ANY($1::text[])
                 AND (col_description(c.oid, a.attnum) IS NULL OR obj_description(c.oid, 'pg_class') IS NULL)""",
            ALL_VIEWS)
        assert missing == []
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# Databases made before 0014.

@contextlib.asynccontextmanager
async def database_before_0014(devenv: DevEnv, tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own with the migrations before 0014 applied (copies of 0001..0013), dropped afterwards."""
    base = devenv.dsn.rsplit("/", 1)[0]
    name = f"pbx_bridge_pbxs_{secrets.token_hex(4)}"
    older = tmp_path / "sql"
    (older / "migrations").mkdir(parents=True)
    for migration in discover(sql_dir()):
        if migration.version < "0014":
            shutil.copy(migration.path, older / "migrations" / migration.path.name)
    admin = await asyncpg.connect(f"{base}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(f"{base}/{name}")
        try:
            assert (await migrate(conn, older))[-1] == "0013_open_hours.sql"
        finally:
            await conn.close()
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize(("setting", "system_names", "expected"), [
    ("container-test", ["pbx"], "container-test"),  # pbx-bridge migrate with [pbx] name
    ("", ["pbx", "other"], "pbx"),  # the most common systemname (12 calls to 2)
    ("", [""], "default"),  # an Asterisk without a systemname, and no name configured
], ids=["setting", "systemname", "default"])
async def test_rows_stored_before_0014_get_one_name(devenv: DevEnv, tmp_path: Path, setting: str,
                                                     system_names: list[str], expected: str) -> None:
    async with database_before_0014(devenv, tmp_path) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await seed_pbx(conn, system_names[0], CAPTURES[SITE_A])
            for system_name in system_names[1:]:
                await write_captures(conn, ["mobile_17s", "after_hours_voicemail"], system_name)
        finally:
            await conn.close()
        conn = await connect(dsn, setting)
        try:
            assert await migrate(conn, sql_dir()) == ["0014_several_pbxs.sql"]
            for table in PER_PBX_TABLES:  # open_hours, report_deliveries, probes, presence have no linkedid
                names = await conn.fetch(f"SELECT pbx, count(*) FROM {table} GROUP BY pbx")
                assert [r["pbx"] for r in names] == [expected] and names[0]["count"] > 0, table
            assert await conn.fetchval("SELECT column_default FROM information_schema.columns "
                                       "WHERE table_name = 'calls' AND column_name = 'pbx'") == "session_pbx()"
        finally:
            await conn.close()


async def test_a_name_that_is_no_pbx_name_stops_the_migration(devenv: DevEnv, tmp_path: Path) -> None:
    async with database_before_0014(devenv, tmp_path) as dsn:
        conn = await connect(dsn, "")
        try:
            await seed_pbx(conn, "Site B", ["answered_7s_talk_4s"])  # a systemname with a space
            with pytest.raises(MigrationError, match="cannot be named 'Site B'"):
                await migrate(conn, sql_dir())
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == "0013"
        finally:
            await conn.close()


async def test_one_pbx_keeps_every_figure_it_had(devenv: DevEnv, tmp_path: Path) -> None:
    """A database of one PBX shows, after 0014, exactly what it showed before, plus the pbx column;
    v_daily_kpi_all and v_hourly_load_all are what v_daily_kpi and v_hourly_load were."""
    async with database_before_0014(devenv, tmp_path) as dsn:
        # no statement cache: the same SELECT * reads a view before and after it gains a column
        conn = await asyncpg.connect(dsn, server_settings=NO_PBX_SETTING, statement_cache_size=0)
        try:
            await seed_pbx(conn, "pbx", [*CAPTURES[SITE_A], "after_hours_voicemail", "transfer_unanswered",
                                         "off_hook_busy"])
            await add_outbound(conn, "pbx-1795470000.1", "13800000004", f"{DAY} 09:00:00", answered=True)
            async with conn.transaction():  # one transaction: now() is the same before and after
                before = {view: await rows_of(conn, view) for view in VIEWS}
                await conn.execute(MIGRATION_0014.read_text(encoding="utf-8"))
                for view in VIEWS:
                    assert await rows_of(conn, view, without=["pbx", "站点"]) == before[view], view
                    assert await conn.fetchval(f"SELECT count(*) FROM {view}") > 0, view
                assert await rows_of(conn, "v_daily_kpi_all") == before["v_daily_kpi"]
                assert await rows_of(conn, "v_hourly_load_all") == before["v_hourly_load"]
                assert {r["pbx"] for r in await conn.fetch("SELECT pbx FROM v_call_log")} == {"pbx"}
        finally:
            await conn.close()
