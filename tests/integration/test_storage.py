"""Migrations and the call writer against a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from pbx_bridge.storage.journal import Journal
from pbx_bridge.storage.migrations import MigrationError, migrate, sql_dir
from pbx_bridge.storage.writer import (
    CallWriter,
    connect_writer,
    decision_from_json,
    decision_to_json,
    linkedid_of,
    open_private,
)
from pbx_bridge.tracker import CallEnded, CallLeg, CallRecord, CallStarted, Disposition, Violation, ViolationKind

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
NASTY = "Robert'); DROP TABLE calls; -- \"Bob\" \\ 张三客户"


def record(linkedid: str, *, ended: bool = True, **changes: object) -> CallRecord:
    base = CallRecord(
        linkedid=linkedid, did="4008001234", trunk="carrier", caller_number="13800000001",
        caller_name="张三客户", started_at=T0, ring_started_at=T0 + timedelta(seconds=0.1),
        answered_at=T0 + timedelta(seconds=7.1) if ended else None,
        ended_at=T0 + timedelta(seconds=11.1) if ended else None,
        ring_seconds=7.0 if ended else None, rings=2 if ended else None,
        within_ring_limit=True if ended else None, answered_by="agent101" if ended else None,
        disposition=Disposition.ANSWERED if ended else None, talk_seconds=4.0 if ended else None,
        hangup_cause=16 if ended else None, hangup_cause_text="Normal Clearing" if ended else None)
    return replace(base, **changes)  # type: ignore[arg-type]


def leg(linkedid: str, uniqueid: str) -> CallLeg:
    return CallLeg(linkedid=linkedid, uniqueid=uniqueid, channel=f"PJSIP/agent101-{uniqueid}",
                   endpoint="agent101", dial_started_at=T0, ring_started_at=T0, answered_at=None,
                   ended_at=T0 + timedelta(seconds=3), dial_status="CANCEL", hangup_cause=26,
                   hangup_cause_text="Answered elsewhere")


async def write_all(dsn: str, decisions: list[CallStarted | CallEnded | Violation],
                    rejected: Path | None = None) -> CallWriter:
    writer = CallWriter(connect_writer(dsn), flush_interval=0.01, rejected_path=rejected)
    for decision in decisions:
        writer.submit(decision)
    task = asyncio.create_task(writer.run())
    writer.stop()
    await asyncio.wait_for(task, 10)
    return writer


async def test_migrate_is_idempotent_and_recorded(scratch_dsn: str) -> None:
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await migrate(conn, sql_dir()) == []  # the fixture already applied everything
        versions = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert next(r["name"] for r in versions) == "0001_calls.sql"
    finally:
        await conn.close()


async def test_a_migration_changed_after_applying_is_refused(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(sql_dir(), tmp_path / "sql")
    changed = tmp_path / "sql" / "migrations" / "0001_calls.sql"
    changed.write_text(changed.read_text() + "\n-- edited\n")
    conn = await asyncpg.connect(scratch_dsn)
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, tmp_path / "sql")
    finally:
        await conn.close()


async def test_one_row_per_linkedid_whatever_the_replays(scratch_dsn: str) -> None:
    final = CallEnded(record("it-1"), (leg("it-1", "u1"), leg("it-1", "u2")))
    started = CallStarted(record("it-1", ended=False))
    await write_all(scratch_dsn, [started, final, final])
    await write_all(scratch_dsn, [final, started])  # a late, partial replay must not undo the final row
    conn = await asyncpg.connect(scratch_dsn)
    try:
        rows = await conn.fetch("SELECT * FROM calls WHERE linkedid = 'it-1'")
        legs = await conn.fetchval("SELECT count(*) FROM call_legs WHERE linkedid = 'it-1'")
    finally:
        await conn.close()
    assert len(rows) == 1 and legs == 2
    row = rows[0]
    assert row["disposition"] == "answered" and row["ended_at"] == T0 + timedelta(seconds=11.1)
    assert float(row["ring_seconds"]) == 7.0 and row["rings"] == 2 and row["within_ring_limit"] is True
    assert row["caller_name"] == "张三客户" and row["source"] == "ami"


async def test_strangers_strings_are_stored_exactly(scratch_dsn: str) -> None:
    await write_all(scratch_dsn, [CallEnded(record("it-2", caller_name=NASTY, caller_number="1'; --"), ())])
    conn = await asyncpg.connect(scratch_dsn)
    try:
        row = await conn.fetchrow("SELECT caller_name, caller_number FROM calls WHERE linkedid = 'it-2'")
        assert await conn.fetchval("SELECT count(*) FROM calls") >= 1
    finally:
        await conn.close()
    assert row is not None and row["caller_name"] == NASTY and row["caller_number"] == "1'; --"


async def test_database_down_records_stay_in_the_journal_then_are_replayed(scratch_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"

    async def unreachable() -> asyncpg.Connection:
        raise OSError("connection refused")

    writer = CallWriter(unreachable, flush_interval=0.01, journal=Journal.open(path), max_backoff=0.05)
    writer.submit(CallEnded(record("it-3"), (leg("it-3", "u1"),)))
    task = asyncio.create_task(writer.run(shutdown_timeout=0.3))
    await asyncio.sleep(0.2)
    assert writer.pending == 1 and not writer.db_up
    writer.stop()
    await asyncio.wait_for(task, 5)
    writer.close()
    assert path.stat().st_size > 0

    replaying = CallWriter(connect_writer(scratch_dsn), flush_interval=0.01, journal=Journal.open(path))
    assert replaying.recover() == 1
    task = asyncio.create_task(replaying.run())
    replaying.stop()
    await asyncio.wait_for(task, 10)
    replaying.close()
    assert path.stat().st_size == 0  # committed: the journal is emptied
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM call_legs WHERE linkedid = 'it-3'") == 1
    finally:
        await conn.close()


async def test_a_record_the_database_refuses_is_kept_and_does_not_block_others(
        scratch_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "spool.rejected.jsonl"
    bad = CallEnded(record("it-4", rings=-1), ())  # violates CHECK (rings >= 0)
    good = CallEnded(record("it-5"), ())
    await write_all(scratch_dsn, [bad, good], rejected=path)
    rejected = path.read_text().splitlines()
    assert [linkedid_of(decision_from_json(line)) for line in rejected] == ["it-4"]
    assert json.loads(rejected[0])["rejected"]["sqlstate"] == "23514"
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE linkedid IN ('it-4', 'it-5')") == 1
    finally:
        await conn.close()


def test_spool_format_round_trips() -> None:
    decisions = (CallEnded(record("x", caller_name=NASTY), (leg("x", "u"),)), CallStarted(record("y", ended=False)))
    for decision in decisions:
        assert decision_from_json(decision_to_json(decision)) == decision


async def test_violations_are_written_once_however_often_replayed(scratch_dsn: str, tmp_path: Path) -> None:
    ring = Violation(ViolationKind.RING_LIMIT, T0, "it-6", (("did", "4008001234"), ("max_rings", "3")))
    guard_1 = Violation(ViolationKind.OUTBOUND_ATTEMPT, T0, "it-7", (("channel", "PJSIP/carrier-1"),))
    guard_2 = Violation(ViolationKind.OUTBOUND_ATTEMPT, T0, "it-7", (("channel", "PJSIP/carrier-2"),))
    await write_all(scratch_dsn, [ring, ring, guard_1, guard_2])
    await write_all(scratch_dsn, [ring, guard_1], rejected=tmp_path / "s.rejected.jsonl")
    rows = await asyncpg_fetch(scratch_dsn, "SELECT kind, details FROM policy_violations "
                                            "WHERE linkedid IN ('it-6', 'it-7') ORDER BY kind, id")
    assert [r["kind"] for r in rows] == ["outbound_attempt", "outbound_attempt", "ring_limit"]
    assert decision_from_json(decision_to_json(ring)) == ring


async def asyncpg_fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_journaled_and_rejected_records_are_readable_by_the_owner_only(scratch_dsn: str, tmp_path: Path) -> None:
    """Callers' numbers and names: 0600, also when the file was left with a wider mode."""
    fresh, wide = tmp_path / "fresh" / "journal.jsonl", tmp_path / "wide.jsonl"
    wide.write_text("")
    wide.chmod(0o644)
    wide_rejected = tmp_path / "wide.rejected.jsonl"
    wide_rejected.write_text("")
    wide_rejected.chmod(0o666)
    old_umask = os.umask(0o022)
    try:
        for path in (fresh, wide):
            writer = CallWriter(connect_writer(scratch_dsn), flush_interval=0.01, journal=Journal.open(path),
                                rejected_path=path.with_suffix(".rejected.jsonl"))
            writer.submit(CallEnded(record(f"it-8-{path.stem}", rings=-1), ()))  # refused: CHECK
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            task = asyncio.create_task(writer.run())
            writer.stop()
            await asyncio.wait_for(task, 10)
            writer.close()
    finally:
        os.umask(old_umask)
    for rejected in (fresh.with_suffix(".rejected.jsonl"), wide_rejected):
        assert len(rejected.read_text().splitlines()) == 1
        assert stat.S_IMODE(rejected.stat().st_mode) == 0o600, rejected
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(OSError):
        open_private(link)
