"""The reconcile against real PostgreSQL: CEL rows captured from the sandbox in table `cel`, the
records it creates or completes, and the records it must leave alone (as the daemon's role)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pbx_bridge.cel.builder import CEL_COLUMNS, CelRow, build_call
from pbx_bridge.cel.reconcile import WRITE_CALL, LiveChannels, Reconciler, _call_row, _write_args, reconcile
from pbx_bridge.tracker import Disposition
from tests.conftest import scratch_database
from tests.support.cel import cel_rows
from tests.support.env import DevEnv
from tests.unit.test_cel_builder import SETTINGS

pytestmark = pytest.mark.integration

SINCE = datetime(2000, 1, 1, tzinfo=UTC)
UNTIL = datetime(2100, 1, 1, tzinfo=UTC)
PBX = "pbx"  # the sandbox's systemname: the captured linkedids are pbx-<epoch>.<n>


@pytest.fixture
def dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "reconcile") as name:
        yield name


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the daemon's role (pbx_bridge): its grants are what the reconcile may use."""
    connection = await asyncpg.connect(dsn)
    await connection.execute("SET ROLE pbx_bridge")
    yield connection
    await connection.close()


async def seed(dsn: str, rows: list[CelRow]) -> None:
    """Write captured rows into `cel` as cel_pgsql does (UTC without a zone)."""
    admin = await asyncpg.connect(dsn)
    try:
        columns = [c for c in CEL_COLUMNS if c != "id"]
        await admin.executemany(
            f"INSERT INTO cel ({', '.join(columns)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})",
            [[row.eventtime.replace(tzinfo=None) if c == "eventtime" else getattr(row, c) for c in columns]
             for row in rows])
    finally:
        await admin.close()


def linkedid_of(name: str) -> str:
    [linkedid] = {r.linkedid for r in cel_rows(name) if r.uniqueid == r.linkedid and r.eventtype == "CHAN_START"}
    return linkedid


async def call_row(conn: asyncpg.Connection, linkedid: str) -> Any:
    return await conn.fetchrow("SELECT * FROM calls WHERE linkedid = $1", linkedid)


async def test_calls_pbx_bridge_never_saw_are_created_once(conn: asyncpg.Connection, dsn: str) -> None:
    await seed(dsn, [*cel_rows("answered_7s_talk_4s"), *cel_rows("after_hours_voicemail"),
                     *cel_rows("other_did"), *cel_rows("site_member_voicemail")])
    outcomes = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX)
    assert sorted(o.action for o in outcomes) == ["created"] * 3  # the other DID is no candidate
    answered = await call_row(conn, linkedid_of("answered_7s_talk_4s"))
    assert (answered["source"], answered["disposition"], answered["answered_by"]) == ("cel", "answered", "agent101")
    assert float(answered["ring_seconds"]) == pytest.approx(7, abs=0.5) and answered["caller_name"] == "张三客户"
    legs = await conn.fetch("SELECT endpoint, dial_status FROM call_legs WHERE linkedid = $1 ORDER BY endpoint",
                            answered["linkedid"])
    assert [(r["endpoint"], r["dial_status"]) for r in legs] == [("agent101", "ANSWER"), ("agent102", "CANCEL")]
    voicemail = linkedid_of("after_hours_voicemail")
    [outcome] = [o for o in outcomes if o.linkedid == voicemail]
    # unanswered, and the duty mobile rang its 25 s past the three-ring limit (every phone, seed 004)
    assert sorted(v.kind for v in outcome.new_violations) == ["ring_limit", "unanswered"]
    kinds = await conn.fetch("SELECT kind, details ->> 'stage' AS stage FROM policy_violations WHERE linkedid = $1",
                             voicemail)
    assert sorted((r["kind"], r["stage"]) for r in kinds) == [("ring_limit", "mobile"), ("unanswered", None)]

    again = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX)
    assert {(o.action, o.reason) for o in again} == {("left alone", "it has a final record from CEL")}
    assert await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, only_open=True) == []


async def test_only_the_cel_rows_of_this_pbx_are_reconciled(conn: asyncpg.Connection, dsn: str) -> None:
    """Several PBXs write CEL into one table; the systemname before a linkedid says whose it is,
    and an Asterisk without a systemname writes bare linkedids."""
    rows = cel_rows("answered_7s_talk_4s")
    bare = [replace(r, linkedid=r.linkedid.removeprefix("pbx-"), uniqueid=r.uniqueid.removeprefix("pbx-"))
            for r in rows]
    await seed(dsn, [*rows, *bare])
    assert await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name="site-b") == []
    assert [o.linkedid for o in await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name="", dry_run=True)] == [
        bare[0].linkedid]
    assert [o.linkedid for o in await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, dry_run=True)] == [
        rows[0].linkedid]


async def test_a_final_ami_record_is_never_overwritten(conn: asyncpg.Connection, dsn: str) -> None:
    rows = cel_rows("answered_17s")
    await seed(dsn, rows)
    call = build_call(rows, SETTINGS)
    assert call is not None
    ami = replace(call.record, source="ami", answered_by="agent103-as-ami-saw-it")
    await conn.execute(f"INSERT INTO calls ({', '.join(ami.__dataclass_fields__)}) VALUES "
                       f"({', '.join(f'${i + 1}' for i in range(len(ami.__dataclass_fields__)))})", *_call_row(ami))
    [outcome] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX)
    assert (outcome.action, outcome.reason) == ("left alone", "it has a final record from AMI")
    # The statement's own guard, for a final record written between the reconcile's read and write:
    result = await conn.fetchrow(WRITE_CALL, *_write_args(call, False))
    assert result["inserted"] is None and list(result["new_violations"]) == []
    row = await call_row(conn, call.record.linkedid)
    assert (row["source"], row["answered_by"]) == ("ami", "agent103-as-ami-saw-it")
    assert await conn.fetch("SELECT 1 FROM policy_violations") == []
    # ... unless the daemon says AMI missed some of its events (an AMI gap):
    [forced] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, forced=frozenset({call.record.linkedid}))
    assert forced.action == "replaced"
    row = await call_row(conn, call.record.linkedid)
    assert (row["source"], row["answered_by"], row["within_ring_limit"]) == ("cel", "agent103", False)


async def test_a_record_without_an_end_is_completed(conn: asyncpg.Connection, dsn: str) -> None:
    rows = cel_rows("abandoned_6s")
    await seed(dsn, rows)
    call = build_call(rows, SETTINGS)
    assert call is not None
    started = replace(call.record, source="ami", ended_at=None, disposition=None, ring_seconds=None, rings=None,
                      hangup_cause=None, hangup_cause_text=None)
    await conn.execute(f"INSERT INTO calls ({', '.join(started.__dataclass_fields__)}) VALUES "
                       f"({', '.join(f'${i + 1}' for i in range(len(started.__dataclass_fields__)))})",
                       *_call_row(started))
    [dry] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, dry_run=True)
    assert dry.action == "completed" and (await call_row(conn, call.record.linkedid))["ended_at"] is None
    [outcome] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX)
    assert outcome.action == "completed"
    row = await call_row(conn, call.record.linkedid)
    assert (row["source"], row["disposition"], row["hangup_cause"]) == ("cel", "abandoned", 127)
    assert row["ended_at"] == call.record.ended_at


async def test_a_call_that_vanished_in_a_crash_is_closed_at_its_last_event(conn: asyncpg.Connection,
                                                                          dsn: str) -> None:
    rows = cel_rows("answered_7s_talk_4s")
    bridged = next(i for i, r in enumerate(rows) if r.eventtype == "BRIDGE_ENTER")
    cut = rows[: bridged + 1]  # Asterisk killed mid-call: no HANGUP, no LINKEDID_END
    await seed(dsn, cut)
    [unknown] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX)
    assert unknown.action == "left alone" and "no LINKEDID_END" in unknown.reason
    after = cut[-1].eventtime + timedelta(seconds=30)
    [live] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX,
                             live=LiveChannels(frozenset({cut[0].uniqueid}), after))
    assert (live.action, live.reason) == ("left alone", "still in progress (Asterisk lists its channels)")
    [early] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX,
                              live=LiveChannels(frozenset(), cut[-1].eventtime))
    assert early.action == "left alone"
    [closed] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, live=LiveChannels(frozenset(), after))
    assert closed.action == "created" and "vanished" in closed.reason
    row = await call_row(conn, cut[0].linkedid)
    assert (row["disposition"], row["ended_at"], row["answered_by"]) == ("answered", cut[-1].eventtime, "agent101")


async def test_a_call_that_just_ended_is_left_to_its_ami_record(conn: asyncpg.Connection, dsn: str) -> None:
    rows = cel_rows("answered_7s_talk_4s")
    await seed(dsn, rows)
    end = rows[-1].eventtime
    [waiting] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX,
                                settled_before=end - timedelta(seconds=1))
    assert (waiting.action, waiting.reason) == ("left alone", "ended moments ago: its AMI record is on its way")
    [done] = await reconcile(conn, SETTINGS, SINCE, UNTIL, system_name=PBX, settled_before=end + timedelta(seconds=1))
    assert done.action == "created"
    assert (await call_row(conn, rows[0].linkedid))["disposition"] == Disposition.ANSWERED


async def test_the_range_is_the_calls_start(conn: asyncpg.Connection, dsn: str) -> None:
    rows = cel_rows("answered_7s_talk_4s")
    await seed(dsn, rows)
    start = rows[0].eventtime
    assert await reconcile(conn, SETTINGS, start + timedelta(seconds=1), UNTIL, system_name=PBX) == []
    assert await reconcile(conn, SETTINGS, SINCE, start, system_name=PBX) == []
    assert len(await reconcile(conn, SETTINGS, start, start + timedelta(seconds=1), system_name=PBX, dry_run=True)) == 1


async def test_the_daemons_reconciler_sweeps_at_start_and_reports_new_violations(dsn: str) -> None:
    rows = cel_rows("all_busy_voicemail")
    await seed(dsn, rows)
    end = rows[-1].eventtime

    async def connect() -> asyncpg.Connection:
        connection = await asyncpg.connect(dsn)
        await connection.execute("SET ROLE pbx_bridge")
        return connection

    reported: list[str] = []
    reconciler = Reconciler(connect, SETTINGS, interval=0.1, lookback=timedelta(days=36500),
                            settle=timedelta(seconds=1), clock=lambda: end + timedelta(seconds=5),
                            on_violation=lambda v: reported.append(str(v.kind)), system_name=PBX)
    task = asyncio.create_task(reconciler.run())
    try:
        for _ in range(100):
            if reconciler.rebuilt:
                break
            await asyncio.sleep(0.05)
        reconciler.after_login(frozenset(), end + timedelta(seconds=5), PBX)  # a login: swept again at once
        await asyncio.sleep(0.3)
    finally:
        reconciler.stop()
        await asyncio.wait_for(task, 5)
    assert reconciler.rebuilt == 1 and reconciler.passes >= 2 and reconciler.last_error is None
    assert reported == ["unanswered"]
    connection = await connect()
    try:
        row = await call_row(connection, rows[0].linkedid)
    finally:
        await connection.close()
    assert (row["source"], row["disposition"]) == ("cel", "voicemail")
