"""The call writer with a fake database: error classes, never dying, journal, memory limits, bounded stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import structlog
from prometheus_client import generate_latest

from pbx_bridge.metrics import Metrics
from pbx_bridge.storage.journal import Journal, record_line
from pbx_bridge.storage.writer import (
    UPSERT_CALL,
    CallWriter,
    ErrorKind,
    classify,
    connect_writer,
    decision_from_dict,
    decision_to_json,
)
from pbx_bridge.tracker import CallEnded, CallRecord, CallStarted, Disposition, Violation, ViolationKind

T0 = datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
exc = asyncpg.exceptions


def record(linkedid: str, ended: bool = True) -> CallRecord:
    return CallRecord(
        linkedid=linkedid, did="4008001234", trunk="carrier", caller_number="13800000001", caller_name="张三客户",
        started_at=T0, ring_started_at=T0, answered_at=T0 + timedelta(seconds=7) if ended else None,
        ended_at=T0 + timedelta(seconds=11) if ended else None, ring_seconds=7.0 if ended else None,
        rings=2 if ended else None, within_ring_limit=True if ended else None,
        answered_by="agent101" if ended else None, disposition=Disposition.ANSWERED if ended else None,
        talk_seconds=4.0 if ended else None, hangup_cause=16 if ended else None,
        hangup_cause_text="Normal Clearing" if ended else None)


def ended(n: int | str) -> CallEnded:
    return CallEnded(record(f"u-{n}"), ())


@dataclass
class FakeDatabase:
    """Committed rows by linkedid; failures injected per connect and per statement."""

    calls: dict[str, int] = field(default_factory=dict)  # linkedid -> times committed
    connect_errors: list[BaseException] = field(default_factory=list)
    write_errors: list[BaseException] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    hang: bool = False
    connects: int = 0
    terminated: int = 0

    async def connect(self) -> asyncpg.Connection:
        self.connects += 1
        if self.connect_errors:
            raise self.connect_errors.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        return cast(asyncpg.Connection, FakeConnection(self))

    @property
    def written(self) -> set[str]:
        return set(self.calls)


class FakeConnection:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.closed = False
        self.staged: list[str] = []

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True
        self.db.terminated += 1

    async def close(self) -> None:
        self.closed = True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.staged = []
        yield
        for linkedid in self.staged:
            self.db.calls[linkedid] = self.db.calls.get(linkedid, 0) + 1

    async def executemany(self, query: str, rows: Sequence[tuple[Any, ...]], timeout: float | None = None) -> None:
        if self.closed:
            raise asyncpg.InterfaceError("connection is closed")
        if self.db.hang:
            await asyncio.Event().wait()
        if self.db.write_errors:
            error = self.db.write_errors.pop(0)
            if isinstance(error, OSError | asyncpg.InterfaceError | exc.PostgresConnectionError):
                self.closed = True
            raise error
        if query == UPSERT_CALL:
            for row in rows:
                if row[0] in self.db.refuse:
                    raise exc.CheckViolationError('new row for relation "calls" violates check constraint')
                self.staged.append(row[0])


async def drain(writer: CallWriter, timeout: float = 5.0) -> None:
    """Run the writer until nothing is pending, then stop it."""
    task = asyncio.create_task(writer.run(shutdown_timeout=2.0))
    deadline = time.monotonic() + timeout
    while writer.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    writer.stop()
    await task


def new_writer(db: FakeDatabase, tmp_path: Path | None = None, **options: Any) -> CallWriter:
    journal = Journal.open(tmp_path / "journal.jsonl") if tmp_path is not None else None
    options.setdefault("flush_interval", 0.01)
    options.setdefault("max_backoff", 0.02)
    return CallWriter(db.connect, journal=journal,
                      rejected_path=tmp_path / "rejected.jsonl" if tmp_path else None, **options)


@pytest.mark.parametrize(("error", "kind"), [
    (exc.ConnectionDoesNotExistError("connection was closed in the middle of operation"), ErrorKind.TRANSIENT),
    (exc.ConnectionFailureError("08006"), ErrorKind.TRANSIENT),
    (exc.AdminShutdownError("terminating connection due to administrator command"), ErrorKind.TRANSIENT),
    (exc.CrashShutdownError("57P02"), ErrorKind.TRANSIENT),
    (asyncpg.CannotConnectNowError("the database system is starting up"), ErrorKind.TRANSIENT),
    (exc.QueryCanceledError("canceling statement due to statement timeout"), ErrorKind.TRANSIENT),
    (exc.TooManyConnectionsError("53300"), ErrorKind.TRANSIENT),
    (exc.DiskFullError("53100"), ErrorKind.TRANSIENT),
    (exc.OutOfMemoryError("53200"), ErrorKind.TRANSIENT),
    (exc.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"), ErrorKind.TRANSIENT),
    (exc.SerializationError("40001"), ErrorKind.TRANSIENT),
    (exc.DeadlockDetectedError("40P01"), ErrorKind.TRANSIENT),
    (exc.LockNotAvailableError("55P03"), ErrorKind.TRANSIENT),
    (asyncpg.InternalClientError("protocol trouble"), ErrorKind.TRANSIENT),
    (asyncpg.InterfaceError("connection is closed"), ErrorKind.TRANSIENT),
    (ConnectionRefusedError(111, "Connection refused"), ErrorKind.TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), ErrorKind.TRANSIENT),
    (TimeoutError(), ErrorKind.TRANSIENT),
    (exc.CheckViolationError("23514"), ErrorKind.DATA),
    (exc.NotNullViolationError("23502"), ErrorKind.DATA),
    (exc.InvalidTextRepresentationError("22P02"), ErrorKind.DATA),
    (exc.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00"), ErrorKind.DATA),
    (asyncpg.DataError("invalid input for query argument $3"), ErrorKind.DATA),
    (exc.InsufficientPrivilegeError("permission denied for table calls"), ErrorKind.BLOCKED),
    (exc.UndefinedTableError('relation "calls" does not exist'), ErrorKind.BLOCKED),
    (exc.UndefinedColumnError("42703"), ErrorKind.BLOCKED),
    (exc.InvalidPasswordError("password authentication failed"), ErrorKind.BLOCKED),
    (exc.InvalidCatalogNameError('database "x" does not exist'), ErrorKind.BLOCKED),
    (RuntimeError("a bug"), ErrorKind.BLOCKED),
])
def test_errors_are_classified_by_sqlstate(error: BaseException, kind: ErrorKind) -> None:
    assert classify(error) is kind


async def test_the_writer_survives_every_kind_of_database_failure_and_writes_everything(tmp_path: Path) -> None:
    db = FakeDatabase(
        connect_errors=[ConnectionRefusedError(111, "refused"), asyncpg.CannotConnectNowError("starting up"),
                        exc.InvalidPasswordError("password authentication failed"), TimeoutError()],
        write_errors=[exc.AdminShutdownError("shutdown"), asyncpg.InternalClientError("x"),
                      exc.ConnectionDoesNotExistError("closed mid-operation"), OSError(104, "reset"),
                      exc.ReadOnlySQLTransactionError("read-only"), exc.InsufficientPrivilegeError("denied"),
                      exc.UndefinedTableError("no calls"), exc.QueryCanceledError("statement timeout"),
                      RuntimeError("unexpected")])
    metrics = Metrics()
    alerts: list[dict[str, Any]] = []
    writer = new_writer(db, tmp_path, metrics=metrics, alert=alerts.append)
    for n in range(30):
        writer.submit(ended(n))
    await drain(writer)
    assert db.written == {f"u-{n}" for n in range(30)}
    assert writer.rejected == 0 and writer.dropped == 0 and writer.written == 30
    assert not (tmp_path / "rejected.jsonl").exists()
    text = generate_latest(metrics.registry).decode()
    assert 'pbx_bridge_writer_errors_total{kind="transient"} 9.0' in text
    assert 'pbx_bridge_writer_errors_total{kind="blocked"} 4.0' in text
    assert [a["kind"] for a in alerts] == ["database_write_blocked"]  # once per 5 minutes
    assert (tmp_path / "journal.jsonl").stat().st_size == 0  # all committed: emptied


async def test_a_refused_record_goes_to_the_rejected_file_and_the_rest_commits(tmp_path: Path) -> None:
    db = FakeDatabase(refuse={"u-bad"})
    metrics = Metrics()
    alerts: list[dict[str, Any]] = []
    writer = new_writer(db, tmp_path, metrics=metrics, alert=alerts.append)
    for n in (1, "bad", 2, 3):
        writer.submit(ended(n))
    await drain(writer)
    assert db.written == {"u-1", "u-2", "u-3"}
    rejected = (tmp_path / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1
    body = json.loads(rejected[0])
    assert body["rejected"]["sqlstate"] == "23514" and "check constraint" in body["rejected"]["error"]
    assert decision_from_dict(body) == ended("bad")
    assert stat.S_IMODE((tmp_path / "rejected.jsonl").stat().st_mode) == 0o600
    assert [a["kind"] for a in alerts] == ["record_rejected"] and alerts[0]["linkedid"] == "u-bad"
    assert "pbx_bridge_records_rejected_total 1.0" in generate_latest(metrics.registry).decode()
    assert writer.rejected == 1 and writer.written == 3


async def test_a_connection_lost_while_isolating_a_bad_record_is_retried(tmp_path: Path) -> None:
    db = FakeDatabase(refuse={"u-bad"})
    writer = new_writer(db, tmp_path)
    for n in (1, "bad", 2):
        writer.submit(ended(n))
    original = FakeConnection.executemany
    calls = 0

    async def flaky(self: FakeConnection, query: str, rows: Sequence[tuple[Any, ...]],
                    timeout: float | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the batch failed on the bad record; the one-by-one pass loses its connection
            self.closed = True
            raise exc.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        await original(self, query, rows, timeout)

    FakeConnection.executemany = flaky  # type: ignore[method-assign]
    try:
        await drain(writer)
    finally:
        FakeConnection.executemany = original  # type: ignore[method-assign]
    assert db.written == {"u-1", "u-2"} and writer.rejected == 1


async def test_a_decision_is_in_the_journal_when_submit_returns(tmp_path: Path) -> None:
    writer = new_writer(FakeDatabase(), tmp_path)
    writer.submit(ended(1))
    writer.submit(Violation(ViolationKind.RING_LIMIT, T0, "u-1", (("max_rings", "3"),)))
    lines = (tmp_path / "journal.jsonl").read_bytes()
    assert lines == record_line(1, decision_to_json(ended(1))) + record_line(
        2, decision_to_json(Violation(ViolationKind.RING_LIMIT, T0, "u-1", (("max_rings", "3"),))))
    writer.close()


async def test_what_was_not_written_is_replayed_from_the_journal_and_only_once(tmp_path: Path) -> None:
    down = FakeDatabase(connect_errors=[ConnectionRefusedError(111, "refused")] * 1000)
    writer = new_writer(down, tmp_path)
    for n in range(5):
        writer.submit(ended(n))
    task = asyncio.create_task(writer.run(shutdown_timeout=0.1))
    await asyncio.sleep(0.1)
    writer.stop()
    await task
    writer.close()
    db = FakeDatabase()
    again = new_writer(db, tmp_path)
    assert again.recover() == 5
    again.submit(ended(5))
    await drain(again)
    again.close()
    assert db.calls == {f"u-{n}": 1 for n in range(6)}
    third = new_writer(FakeDatabase(), tmp_path)
    assert third.recover() == 0
    third.close()


async def test_more_than_memory_holds_waits_in_the_journal_and_nothing_is_dropped(tmp_path: Path) -> None:
    db = FakeDatabase(connect_errors=[ConnectionRefusedError(111, "refused")] * 20)
    alerts: list[dict[str, Any]] = []
    writer = new_writer(db, tmp_path, queue_limit=100, batch_size=30, alert=alerts.append)
    for n in range(250):
        writer.submit(ended(n))
    assert writer.status()["in_memory"] == 100 and writer.status()["on_disk_only"] == 150 and writer.pending == 250
    assert [a["kind"] for a in alerts] == ["writer_memory_full"]
    await drain(writer)
    assert db.written == {f"u-{n}" for n in range(250)} and writer.dropped == 0
    writer.close()


async def test_a_journal_larger_than_memory_is_replayed_whole(tmp_path: Path) -> None:
    down = FakeDatabase(connect_errors=[ConnectionRefusedError(111, "refused")] * 1000)
    writer = new_writer(down, tmp_path, queue_limit=1000)
    for n in range(400):
        writer.submit(ended(n))
    task = asyncio.create_task(writer.run(shutdown_timeout=0.05))
    writer.stop()
    await task
    writer.close()
    db = FakeDatabase()
    again = new_writer(db, tmp_path, queue_limit=100, batch_size=50)
    assert again.recover() == 400
    assert again.status()["in_memory"] == 100 and again.status()["on_disk_only"] == 300
    await drain(again)
    again.close()
    assert len(db.written) == 400


async def test_a_full_journal_keeps_records_in_memory_alerts_and_catches_up(tmp_path: Path) -> None:
    db = FakeDatabase(connect_errors=[ConnectionRefusedError(111, "refused")] * 10_000)
    alerts: list[dict[str, Any]] = []
    metrics = Metrics()
    path = tmp_path / "journal.jsonl"
    journal = Journal.open(path, max_bytes=2000)
    writer = CallWriter(db.connect, journal=journal, flush_interval=0.01, max_backoff=0.05,
                        metrics=metrics, alert=alerts.append)
    for n in range(10):
        writer.submit(ended(n))
    held = writer.not_journaled
    assert 0 < held < 10 and writer.pending == 10
    assert [a["kind"] for a in alerts] == ["journal_unwritable"]
    assert "pbx_bridge_journal_writable 0.0" in generate_latest(metrics.registry).decode()
    task = asyncio.create_task(writer.run(shutdown_timeout=0.1))
    await asyncio.sleep(0.1)
    assert writer.not_journaled == held  # still full
    journal._max_bytes = 1 << 20  # space returns
    for _ in range(100):
        await asyncio.sleep(0.01)
        if writer.not_journaled == 0:
            break
    assert writer.not_journaled == 0 and writer.healthy
    assert alerts[-1]["kind"] == "journal_writable_again"
    writer.submit(ended(10))
    writer.stop()
    await task
    writer.close()
    again = Journal.open(path)
    assert len(again.recover(limit=100).entries) == 11
    again.close()


async def test_memory_and_journal_both_full_drops_loudly(tmp_path: Path) -> None:
    metrics = Metrics()
    alerts: list[dict[str, Any]] = []
    journal = Journal.open(tmp_path / "journal.jsonl", max_bytes=1500)
    writer = CallWriter(FakeDatabase().connect, journal=journal, queue_limit=3, metrics=metrics,
                        alert=alerts.append)
    with structlog.testing.capture_logs() as logs:
        for n in range(8):
            writer.submit(ended(n))
    assert writer.pending == 3 and writer.dropped == 5
    assert "pbx_bridge_records_dropped_total 5.0" in generate_latest(metrics.registry).decode()
    assert {a["kind"] for a in alerts} == {"journal_unwritable", "record_dropped"}
    dropped = [e for e in logs if e["event"] == "record_dropped"]
    assert len(dropped) == 5 and decision_from_dict(json.loads(dropped[-1]["record"])) == ended(7)  # whole
    writer.close()


async def test_stop_is_bounded_when_the_database_hangs(tmp_path: Path) -> None:
    db = FakeDatabase(hang=True)
    writer = new_writer(db, tmp_path, statement_timeout=30.0)
    writer.submit(ended(1))
    task = asyncio.create_task(writer.run(shutdown_timeout=0.5))
    await asyncio.sleep(0.2)  # connecting, forever
    started = time.monotonic()
    writer.stop()
    await task
    assert time.monotonic() - started < 1.0
    writer.close()
    again = Journal.open(tmp_path / "journal.jsonl")
    assert [e.seq for e in again.recover(limit=10).entries] == [1]
    again.close()


async def test_stop_is_bounded_against_a_server_that_accepts_and_never_answers(tmp_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    journal = Journal.open(tmp_path / "journal.jsonl")
    writer = CallWriter(connect_writer(f"postgresql://postgres@127.0.0.1:{port}/x", statement_timeout=30.0,
                                       connect_timeout=30.0),
                        journal=journal, flush_interval=0.01)
    writer.submit(ended(1))
    task = asyncio.create_task(writer.run(shutdown_timeout=1.0))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    writer.stop()
    await task
    elapsed = time.monotonic() - started
    server.close()
    for client in accepted:
        client.close()
    assert accepted and elapsed < 1.5
    writer.close()


async def test_a_decision_submitted_after_the_writer_stopped_is_journaled(tmp_path: Path) -> None:
    writer = new_writer(FakeDatabase(), tmp_path)
    task = asyncio.create_task(writer.run())
    writer.stop()
    await task
    writer.submit(ended("late"))
    writer.close()
    journal = Journal.open(tmp_path / "journal.jsonl")
    assert [decision_from_dict(e.record) for e in journal.recover(limit=10).entries] == [ended("late")]
    journal.close()


async def test_an_old_spool_file_is_imported_into_the_journal(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_text(decision_to_json(ended(1)) + "\n" + decision_to_json(CallStarted(record("u-2", False))) + "\n")
    db = FakeDatabase()
    writer = new_writer(db, tmp_path)
    assert writer.recover(legacy_spool=spool) == 2
    assert not spool.exists()
    await drain(writer)
    writer.close()
    assert db.written == {"u-1", "u-2"}


async def test_a_record_the_current_code_cannot_read_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    good = decision_to_json(ended(1))
    path.write_bytes(record_line(1, '{"kind": "CallEnded", "record": {"no_such_field": 1}, "legs": []}')
                     + record_line(2, good))
    writer = new_writer(FakeDatabase(), tmp_path)
    assert writer.recover() == 1
    assert b"no_such_field" in (tmp_path / "journal.jsonl.corrupt").read_bytes()
    writer.close()


def test_the_serialised_form_round_trips() -> None:
    items: list[Callable[[], Any]] = [lambda: ended(1), lambda: CallStarted(record("x", False)),
                                      lambda: Violation(ViolationKind.OUTBOUND_ATTEMPT, T0, None, (("a", "b"),)),
                                      lambda: CallEnded(replace(record("y"), caller_name="Robert'); --"), ())]
    for make in items:
        decision = make()
        assert decision_from_dict(json.loads(decision_to_json(decision))) == decision
