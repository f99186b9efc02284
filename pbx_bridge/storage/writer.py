"""The call-record writer: journals each decision on local disk, then batches them into idempotent upserts.

`submit` never blocks the event loop: it appends the decision to the journal (a `write`, no
fsync; `storage/journal.py`) and to the in-memory queue. `run` owns two tasks: one fsyncs the
journal every flush interval and catches it up after a failure; one writes batches to
PostgreSQL and acknowledges them in the journal once committed. Rows are upserted by
`linkedid`, so a replayed or duplicate decision never makes a second row, and a final record is
never overwritten by an earlier, partial one. Database errors never end the writer: connection,
shutdown and resource errors are retried with bounded backoff, data errors (SQLSTATE classes 22
and 23) send the one refused record to the rejected file (see `classify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.backoff import Backoff
from pbx_bridge.metrics import Metrics
from pbx_bridge.storage.journal import BadLines, Journal, JournalEntry
from pbx_bridge.tracker.model import (
    CallEnded,
    CallLeg,
    CallRecord,
    CallStarted,
    Disposition,
    RecordWrite,
    Violation,
    ViolationKind,
)

log = structlog.get_logger("pbx_bridge.writer")

CALL_COLUMNS = tuple(f.name for f in fields(CallRecord))
LEG_COLUMNS = tuple(f.name for f in fields(CallLeg))
STALLED_ALERT_SECONDS = 60.0
ALERT_GAP_SECONDS = 300.0


def _upsert(table: str, columns: Sequence[str], key: Sequence[str], guard: str = "") -> str:
    # Only fixed column names from the dataclasses reach the SQL text; values are parameters.
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in key)
    if table == "calls":
        updates += ", updated_at = now()"
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}{guard}")


UPSERT_CALL = _upsert("calls", CALL_COLUMNS, ("linkedid",),
                      " WHERE calls.ended_at IS NULL OR EXCLUDED.ended_at IS NOT NULL")
UPSERT_LEG = _upsert("call_legs", LEG_COLUMNS, ("linkedid", "uniqueid"))


def _call_row(record: CallRecord) -> tuple[Any, ...]:
    return tuple(str(v) if isinstance(v, Disposition) else v
                 for v in (getattr(record, c) for c in CALL_COLUMNS))


def _leg_row(leg: CallLeg) -> tuple[Any, ...]:
    return tuple(getattr(leg, c) for c in LEG_COLUMNS)


INSERT_VIOLATION = (
    "INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ($1, $2, $3, $4::jsonb) "
    "ON CONFLICT (pbx, kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', ''))) DO NOTHING")


def linkedid_of(item: RecordWrite) -> str | None:
    """The call an item belongs to (for logs)."""
    return item.linkedid if isinstance(item, Violation) else item.record.linkedid


def coalesce(batch: Sequence[RecordWrite]) -> list[RecordWrite]:
    """Keep, per call, only the last record of a batch (a final record supersedes a start);
    violations are kept as they are (the database ignores repeats)."""
    latest: dict[str, CallStarted | CallEnded] = {}
    violations: list[RecordWrite] = []
    for item in batch:
        if isinstance(item, Violation):
            violations.append(item)
            continue
        key = item.record.linkedid
        if isinstance(latest.get(key), CallEnded) and isinstance(item, CallStarted):
            continue
        latest[key] = item
    return [*latest.values(), *violations]


async def write_batch(conn: asyncpg.Connection, batch: Sequence[RecordWrite],
                      statement_timeout: float | None = None) -> None:
    """Upsert one batch in a single transaction: calls, then their legs, then violations (each
    statement bounded by `statement_timeout` seconds, else by the connection's command_timeout)."""
    items = coalesce(batch)
    records = [i for i in items if not isinstance(i, Violation)]
    violations = [i for i in items if isinstance(i, Violation)]
    legs = [leg for d in records if isinstance(d, CallEnded) for leg in d.legs]
    async with conn.transaction():
        if records:
            await conn.executemany(UPSERT_CALL, [_call_row(d.record) for d in records], timeout=statement_timeout)
        if legs:
            await conn.executemany(UPSERT_LEG, [_leg_row(leg) for leg in legs], timeout=statement_timeout)
        if violations:
            await conn.executemany(INSERT_VIOLATION, [
                (str(v.kind), v.linkedid, v.occurred_at, json.dumps(dict(v.details), ensure_ascii=False))
                for v in violations], timeout=statement_timeout)


# --- error classes ---------------------------------------------------------------------------

class ErrorKind(enum.StrEnum):
    """What a failed write means for the records in it."""

    TRANSIENT = "transient"  # the database is unreachable, shutting down or short of something: retry
    DATA = "data"  # the database refuses a record's content: find it, keep it in the rejected file
    BLOCKED = "blocked"  # anything else (login, privileges, schema, a bug): retry, alert, never reject


TRANSIENT_CLASSES = frozenset({"08", "53", "57", "58", "40"})
TRANSIENT_STATES = frozenset({"25006", "55P03", "55006"})
DATA_CLASSES = frozenset({"22", "23"})
TRANSIENT_CLIENT_ERRORS = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error (None for other errors)."""
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return state if isinstance(state, str) else None


def classify(exc: BaseException) -> ErrorKind:
    """Sort a write's failure by SQLSTATE class (and asyncpg's client-side errors).

    Transient: 08 connection exception, 53 insufficient resources, 57 operator intervention
    (shutdown, cannot connect now, statement timeout), 58 system error, 40 transaction rollback,
    25006 read-only transaction (a standby), 55P03/55006 lock or object in use; OSError,
    TimeoutError, asyncpg's InterfaceError and InternalClientError (connection closed or lost,
    protocol trouble). Data: 22 data exception and 23 integrity constraint violation (asyncpg's
    client-side "invalid input for query argument" is a DataError, 22000). Everything else is
    blocked (28 login, 3D no database, 42 missing table or privilege, unexpected exceptions):
    retried and alerted, never taken for a record's fault.
    """
    state = sqlstate_of(exc)
    if state is not None:
        if state[:2] in DATA_CLASSES:
            return ErrorKind.DATA
        if state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES:
            return ErrorKind.TRANSIENT
        return ErrorKind.BLOCKED
    if isinstance(exc, TRANSIENT_CLIENT_ERRORS):
        return ErrorKind.TRANSIENT
    return ErrorKind.BLOCKED


# --- serialisation: one JSON object per decision (journal, rejected file, legacy spool) --------

def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "$dt" in value:
        return datetime.fromisoformat(value["$dt"])
    return value


def _decision_body(decision: RecordWrite) -> dict[str, Any]:
    if isinstance(decision, Violation):
        return {"kind": "Violation", "violation": {
            "kind": str(decision.kind), "occurred_at": _encode(decision.occurred_at),
            "linkedid": decision.linkedid, "details": [list(pair) for pair in decision.details]}}
    # Field by field: dataclasses.asdict deep-copies every value (4x the cost, on the hot path).
    record = decision.record
    body: dict[str, Any] = {
        "kind": type(decision).__name__,
        "record": {f.name: _encode(getattr(record, f.name)) for f in fields(record)},
    }
    if isinstance(decision, CallEnded):
        body["legs"] = [{f.name: _encode(getattr(leg, f.name)) for f in fields(leg)} for leg in decision.legs]
    return body


def decision_to_json(decision: RecordWrite) -> str:
    """Serialise a decision (one line of JSON)."""
    return json.dumps(_decision_body(decision), ensure_ascii=False)


def decision_from_dict(body: dict[str, Any]) -> RecordWrite:
    """Read back a serialised decision's JSON object (raises KeyError, TypeError or ValueError)."""
    if body["kind"] == "Violation":
        v = body["violation"]
        return Violation(ViolationKind(v["kind"]), _decode(v["occurred_at"]), v["linkedid"],
                         tuple((key, value) for key, value in v["details"]))
    values = {k: _decode(v) for k, v in body["record"].items()}
    if values.get("disposition") is not None:
        values["disposition"] = Disposition(values["disposition"])
    record = CallRecord(**values)
    if body["kind"] == "CallEnded":
        legs = tuple(CallLeg(**{k: _decode(v) for k, v in leg.items()}) for leg in body["legs"])
        return CallEnded(record, legs)
    if body["kind"] != "CallStarted":
        raise ValueError(f"unknown kind {body['kind']!r}")
    return CallStarted(record)


def decision_from_json(line: str) -> RecordWrite:
    """Read back a serialised decision."""
    return decision_from_dict(json.loads(line))


def open_private(path: Path) -> TextIO:
    """Open `path` for appending, readable and writable by its owner only (0600), also when it
    already existed with a wider mode; a symbolic link in its place is refused. Journaled and
    rejected records hold callers' numbers and names."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


Connect = Callable[[], Awaitable[asyncpg.Connection]]
Alert = Callable[[dict[str, Any]], None]


def connect_writer(dsn: str | Callable[[], str], statement_timeout: float = 5.0,
                   connect_timeout: float = 5.0) -> Connect:
    """Connections for the writer: bounded connect, a client-side timeout on every command and a
    server-side statement_timeout (and idle-in-transaction timeout), named pbx-bridge-writer.
    `dsn` may be a function, asked at every connect (the PBX's name may come later)."""
    millis = str(int(statement_timeout * 1000))

    async def connect() -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn() if callable(dsn) else dsn, timeout=connect_timeout, command_timeout=statement_timeout + 1,
            server_settings={"application_name": "pbx-bridge-writer", "statement_timeout": millis,
                             "idle_in_transaction_session_timeout": str(int(statement_timeout * 2000))})
        return conn
    return connect


@dataclass(frozen=True, slots=True)
class _Pending:
    seq: int
    decision: RecordWrite


class CallWriter:
    """Owns the journal, the in-memory queue of decisions, and the tasks that write them.

    Memory holds at most `queue_limit` decisions. Beyond that they wait in the journal only and
    are read back as memory frees. While the journal cannot be written (disk full, I/O error,
    its size limit) decisions wait in memory only and are journaled as soon as it can be again.
    A decision that finds both full is dropped: logged whole at error level, counted and alerted.
    """

    name = "writer"  # its task's name (lifecycle.Service)

    def __init__(self, connect: Connect, *, batch_size: int = 200, flush_interval: float = 0.2,
                 queue_limit: int = 100_000, journal: Journal | None = None, rejected_path: Path | None = None,
                 max_backoff: float = 10.0, statement_timeout: float = 5.0, metrics: Metrics | None = None,
                 alert: Alert | None = None) -> None:
        self._connect = connect
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue_limit = queue_limit
        self._journal = journal
        self._rejected_path = rejected_path
        self._max_backoff = max_backoff
        self._statement_timeout = statement_timeout
        self._metrics: Metrics | None = None
        self._alert: Alert | None = None
        self._memory: deque[_Pending] = deque()
        self._next_seq = 1
        self._loaded_seq = 0  # the highest sequence number placed in memory
        self._unjournaled_from: int | None = None  # memory holds records from here on the journal lacks
        self._overflow_offset: int | None = None  # where in the journal the records memory lacks begin
        self._overflow_count = 0
        self._wakeup = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._shutdown_timeout = 7.0
        self._deadline: float | None = None
        self._attempt: asyncio.Timeout | None = None
        self._conn: asyncpg.Connection | None = None
        self._failing_since: float | None = None
        self._stall_alerted = False
        self._last_alert: dict[str, float] = {}
        self._recovered_bad = BadLines()
        self._finished = False
        self.written = 0
        self.rejected = 0
        self.dropped = 0
        self.db_up = False
        self.oldest_pending_since: float | None = None
        if metrics is not None or alert is not None:
            self.report_to(metrics, alert)

    def report_to(self, metrics: Metrics | None, alert: Alert | None) -> None:
        """Count in `metrics` and raise alerts through `alert` (the daemon's Alerter.submit)."""
        self._metrics = metrics
        self._alert = alert
        if metrics is not None:
            metrics.journal_writable.set_function(
                lambda: 1.0 if self._journal is not None and self._journal.writable else 0.0)
            metrics.journal_bytes.set_function(lambda: float(self._journal.size if self._journal else 0))
            metrics.writer_on_disk_only.set_function(lambda: float(self._overflow_count))
            metrics.writer_not_journaled.set_function(lambda: float(self.not_journaled))
        if self._recovered_bad:
            self._count_bad(self._recovered_bad)
            self._recovered_bad = BadLines()

    # --- state ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Decisions accepted but not yet in PostgreSQL (in memory and on disk only)."""
        return len(self._memory) + self._overflow_count

    @property
    def not_journaled(self) -> int:
        """Decisions held in memory only, because the journal could not take them."""
        if self._unjournaled_from is None:
            return 0 if self._journal is not None else len(self._memory)
        return sum(1 for p in self._memory if p.seq >= self._unjournaled_from)

    def status(self) -> dict[str, Any]:
        """The writer's state for /healthz (public: no file paths, no error text, only errno names)."""
        journal = self._journal
        return {
            "pending": self.pending, "in_memory": len(self._memory), "on_disk_only": self._overflow_count,
            "not_journaled": self.not_journaled, "written": self.written, "rejected": self.rejected,
            "dropped": self.dropped,
            "journal": None if journal is None else {
                "bytes": journal.size, "writable": journal.writable,
                "error": None if journal.failure is None else errno.errorcode.get(journal.failure_errno or 0, "error"),
                "bad_lines": {"torn": journal.bad.torn, "corrupt": journal.bad.corrupt}},
        }

    @property
    def healthy(self) -> bool:
        """Nothing waits in memory only and the journal takes records."""
        return self._journal is not None and self._journal.writable and self._unjournaled_from is None

    # --- accepting decisions ---------------------------------------------------------------------

    def submit(self, decision: RecordWrite) -> None:
        """Accept a decision for writing; never blocks. It is in the journal (written, fsynced
        within a flush interval) before this returns, unless the journal is failing."""
        seq = self._next_seq
        self._next_seq += 1
        journal = self._journal
        body = decision_to_json(decision) if journal is not None else ""
        if self._finished:
            self._late(seq, decision, body)
            return
        if self._overflow_offset is not None or len(self._memory) >= self._queue_limit:
            # Memory is full: the journal alone keeps it, until memory frees.
            if journal is not None and self._unjournaled_from is None:
                offset = journal.size
                if journal.append(seq, body):
                    if self._overflow_offset is None:
                        self._overflow_offset = offset
                        log.warning("writer_memory_full", limit=self._queue_limit,
                                    effect="new records wait in the journal only, read back as memory frees")
                        self._raise("writer_memory_full", limit=self._queue_limit)
                    self._overflow_count += 1
                    return
                self._journal_failed()
            self._drop(seq, decision, body or decision_to_json(decision))
            return
        if journal is not None and self._unjournaled_from is None and not journal.append(seq, body):
            self._unjournaled_from = seq
            self._journal_failed()
        if not self._memory:
            self.oldest_pending_since = time.monotonic()
        self._memory.append(_Pending(seq, decision))
        self._loaded_seq = seq
        if len(self._memory) >= self._batch_size:
            self._wakeup.set()

    def _late(self, seq: int, decision: RecordWrite, body: str) -> None:
        """A decision submitted after `run` ended (the tracker's last events at shutdown): it is in
        the journal, fsynced now, and written at the next start."""
        journal = self._journal
        if (journal is not None and self._unjournaled_from is None and journal.append(seq, body)
                and journal.sync_now()):
            log.info("record_journaled_after_stop", linkedid=linkedid_of(decision), seq=seq)
            return
        log.error("record_not_kept_at_shutdown", linkedid=linkedid_of(decision), seq=seq,
                  record=body or decision_to_json(decision))

    def _drop(self, seq: int, decision: RecordWrite, body: str) -> None:
        self.dropped += 1
        if self._metrics is not None:
            self._metrics.records_dropped.inc()
        # Not silent: the whole record goes to the log (the system journal), the last place left.
        log.error("record_dropped", linkedid=linkedid_of(decision), seq=seq, record=body,
                  reason="the in-memory queue is full and the journal cannot take more",
                  memory_limit=self._queue_limit,
                  journal_error=self._journal.failure if self._journal is not None else "no journal")
        self._raise("record_dropped", linkedid=linkedid_of(decision), dropped_total=self.dropped)

    def _journal_failed(self) -> None:
        journal = self._journal
        assert journal is not None
        self._raise("journal_unwritable", path=str(journal.path), error=journal.failure,
                    effect="records are kept in memory until the journal takes them again")

    def _raise(self, kind: str, *, gap: float = ALERT_GAP_SECONDS, **details: Any) -> None:
        """Alert `kind` (at most once per `gap` seconds for each kind)."""
        now = time.monotonic()
        if self._alert is None or now - self._last_alert.get(kind, -gap - 1) < gap:
            return
        self._last_alert[kind] = now
        self._alert({"service": "pbx-bridge", "kind": kind, **details})

    def stop(self) -> None:
        """Ask `run` to write what it can within its shutdown bound and return; the rest stays
        in the journal. An attempt in flight is cut short at that bound."""
        self._stopping = True
        if self._deadline is None:
            self._deadline = time.monotonic() + self._shutdown_timeout
        self._wakeup.set()
        self._stop_event.set()
        attempt = self._attempt
        if attempt is not None:
            with contextlib.suppress(RuntimeError):
                bound = asyncio.get_running_loop().time() + self._shutdown_timeout
                when = attempt.when()
                if when is None or when > bound:
                    attempt.reschedule(bound)

    # --- recovery at start -----------------------------------------------------------------------

    def recover(self, legacy_spool: Path | None = None) -> int:
        """Queue what the journal holds unacknowledged (a previous run's, after a crash or an
        outage), then import a spool file left by an earlier version; return how many."""
        journal = self._journal
        if journal is None:
            return 0
        found = journal.recover(self._queue_limit)
        self._next_seq = journal.last_seq + 1
        for entry in found.entries:
            self._load(entry)
        if found.rest_offset is not None:
            self._overflow_offset = found.rest_offset
            self._overflow_count = found.rest_count
        if self._memory:
            self.oldest_pending_since = time.monotonic()
        count = len(self._memory) + self._overflow_count
        log.info("journal_replayed", path=str(journal.path), records=count, in_memory=len(self._memory),
                 on_disk_only=self._overflow_count, acked_up_to=found.acked,
                 torn_lines=found.bad.torn, corrupt_lines=found.bad.corrupt)
        if found.bad:
            if self._metrics is not None:
                self._count_bad(found.bad)
            else:
                self._recovered_bad = found.bad
        if legacy_spool is not None:
            count += self._import_spool(legacy_spool)
        return count

    def _load(self, entry: JournalEntry) -> None:
        try:
            decision = decision_from_dict(entry.record)
        except (KeyError, TypeError, ValueError) as exc:
            assert self._journal is not None
            log.error("journal_record_unreadable", seq=entry.seq, error=str(exc),
                      effect="skipped; its JSON is kept in the .corrupt file")
            self._journal.keep_aside(json.dumps(entry.record, ensure_ascii=False).encode("utf-8"))
            self._count_bad(BadLines(corrupt=1))
            return
        self._memory.append(_Pending(entry.seq, decision))
        self._loaded_seq = max(self._loaded_seq, entry.seq)

    def _count_bad(self, bad: BadLines) -> None:
        if self._metrics is not None:
            if bad.torn:
                self._metrics.journal_bad_lines.labels("torn").inc(bad.torn)
            if bad.corrupt:
                self._metrics.journal_bad_lines.labels("corrupt").inc(bad.corrupt)
        if bad.corrupt:  # a torn last line is what a crash leaves: logged and counted, no alert
            self._raise("journal_corrupt_lines", corrupt=bad.corrupt)

    def _import_spool(self, spool: Path) -> int:
        """Journal the records of a spool file an earlier version left at shutdown, then remove it."""
        try:
            lines = spool.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        count = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                decision = decision_from_json(line)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("spool_line_unreadable", path=str(spool), line=number, error=str(exc))
                continue
            self.submit(decision)
            count += 1
        assert self._journal is not None
        if self._unjournaled_from is None and self._journal.sync_now():
            spool.unlink()
        log.info("spool_imported", count=count, path=str(spool), removed=not spool.exists())
        return count

    # --- running -----------------------------------------------------------------------------------

    async def run(self, shutdown_timeout: float = 7.0) -> None:
        """Write batches until stopped; then write what it can within `shutdown_timeout` seconds.
        What remains unwritten stays in the journal for the next start."""
        self._shutdown_timeout = shutdown_timeout
        if self._stopping:  # stopped before it started
            self._deadline = time.monotonic() + shutdown_timeout
        try:
            async with asyncio.TaskGroup() as tasks:
                journal = tasks.create_task(self._journal_loop(), name="writer-journal")
                try:
                    await self._write_loop()
                finally:
                    journal.cancel()  # never waits on an fsync in flight: `_finish` syncs last
        finally:
            self._finish()
            await self._drop_connection(failed=False)

    async def _write_loop(self) -> None:
        backoff = Backoff(min(0.2, self._max_backoff), self._max_backoff)
        while True:
            if self._stopping and self._deadline is None:
                self._deadline = time.monotonic() + self._shutdown_timeout
            self._refill()
            if not self._memory:
                if self._stopping:
                    return
                self._wakeup.clear()
                await wait_set(self._wakeup, self._flush_interval)
                continue
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return
            batch = list(islice(self._memory, self._batch_size))
            done = await self._write(batch)
            if done:
                self._resolved(batch[:done])
            if done == len(batch):
                backoff.reset()
                continue
            if self._stopping:
                return  # the database fails while stopping: what is left waits in the journal
            await wait_set(self._stop_event, backoff.next_delay())

    async def _write(self, batch: Sequence[_Pending]) -> int:
        """Write `batch`; return how many of its first records are settled (committed, or kept
        in the rejected file)."""
        try:
            async with self._bounded():
                conn = await self._connection()
                await write_batch(conn, [p.decision for p in batch], self._statement_timeout)
        except Exception as exc:  # every failure is classified: the writer never dies of the database
            kind = classify(exc)
            if kind is ErrorKind.DATA:
                return await self._isolate(batch)
            await self._failed(kind, exc)
            return 0
        self._succeeded()
        self.written += len(batch)
        return len(batch)

    async def _isolate(self, batch: Sequence[_Pending]) -> int:
        """Write one record at a time, keeping the ones the database refuses in the rejected file."""
        for index, item in enumerate(batch):
            try:
                async with self._bounded():
                    conn = await self._connection()
                    await write_batch(conn, [item.decision], self._statement_timeout)
            except Exception as exc:  # classified as above
                kind = classify(exc)
                if kind is not ErrorKind.DATA:
                    await self._failed(kind, exc)
                    return index
                if not self._reject(item, exc):
                    return index
                continue
            self.written += 1
        self._succeeded()
        return len(batch)

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """One attempt's time bound: a statement timeout and a connect, or what is left of the
        shutdown bound (`stop` shortens an attempt in flight)."""
        seconds = 2 * self._statement_timeout + 1
        if self._deadline is not None:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        async with asyncio.timeout(seconds) as attempt:
            self._attempt = attempt
            try:
                yield
            finally:
                self._attempt = None

    def _resolved(self, done: Sequence[_Pending]) -> None:
        for _ in done:
            self._memory.popleft()
        if self._journal is not None:
            self._journal.ack(done[-1].seq)
        self.oldest_pending_since = time.monotonic() if self._memory or self._overflow_count else None

    def _reject(self, item: _Pending, exc: Exception) -> bool:
        """Keep a refused record in the rejected file (fsynced); False if that file cannot be written."""
        linkedid = linkedid_of(item.decision)
        state = sqlstate_of(exc)
        log.error("record_rejected", linkedid=linkedid, sqlstate=state, error=str(exc))
        if self._rejected_path is None:
            log.error("record_rejected_not_kept", linkedid=linkedid, record=decision_to_json(item.decision))
        else:
            body = _decision_body(item.decision)
            body["rejected"] = {"at": datetime.now(UTC).isoformat(), "sqlstate": state, "error": str(exc)[:500]}
            try:
                with open_private(self._rejected_path) as out:
                    out.write(json.dumps(body, ensure_ascii=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as error:
                log.error("rejected_file_unwritable", path=str(self._rejected_path), error=str(error),
                          effect="the record stays in the journal and is tried again")
                return False
        self.rejected += 1
        if self._metrics is not None:
            self._metrics.records_rejected.inc()
        self._raise("record_rejected", gap=0, linkedid=linkedid, sqlstate=state, error=str(exc)[:200],
                    kept_in=str(self._rejected_path) if self._rejected_path else None)
        return True

    async def _failed(self, kind: ErrorKind, exc: Exception) -> None:
        await self._drop_connection()
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        state = sqlstate_of(exc)
        if self._metrics is not None:
            self._metrics.writer_errors.labels(str(kind)).inc()
        error = str(exc) or type(exc).__name__
        if kind is ErrorKind.BLOCKED:
            log.error("database_write_blocked", error=error, error_type=type(exc).__name__, sqlstate=state,
                      pending=self.pending, effect="records stay in the journal; retrying")
            self._raise("database_write_blocked", sqlstate=state, error=error[:200])
        else:
            log.warning("database_write_failed", error=error, error_type=type(exc).__name__, sqlstate=state,
                        pending=self.pending)
        if not self._stall_alerted and now - self._failing_since >= STALLED_ALERT_SECONDS:
            self._stall_alerted = True
            self._raise("writer_stalled", gap=0, seconds=round(now - self._failing_since), pending=self.pending,
                        error=error[:200])

    def _succeeded(self) -> None:
        if self._stall_alerted:
            self._raise("writer_recovered", gap=0, pending=self.pending)
        self._failing_since = None
        self._stall_alerted = False

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            if not self.db_up:
                log.info("database_connected")
            self.db_up = True
        return self._conn

    async def _drop_connection(self, failed: bool = True) -> None:
        if self.db_up and failed:
            log.warning("database_unavailable")
        self.db_up = False
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        if failed:
            conn.terminate()  # its state is unknown; never wait on a server that may hang
            return
        try:
            async with asyncio.timeout(1.0):
                await conn.close()
        except Exception:  # closing is best effort; the socket goes either way
            conn.terminate()

    # --- the journal's side --------------------------------------------------------------------------

    def _refill(self) -> None:
        """Read records that wait in the journal only back into memory, when memory has room."""
        journal = self._journal
        if journal is None or self._overflow_offset is None:
            return
        room = self._queue_limit - len(self._memory)
        chunk = min(room, 5 * self._batch_size)
        if len(self._memory) >= self._batch_size or chunk <= 0:
            return
        entries, next_offset, bad = journal.read_from(self._overflow_offset, chunk, self._loaded_seq)
        for entry in entries:
            self._load(entry)
        if bad:
            self._count_bad(bad)
        self._overflow_count = max(0, self._overflow_count - len(entries))
        self._overflow_offset = next_offset
        if next_offset >= journal.size:
            self._overflow_offset = None
            self._overflow_count = 0
            log.info("writer_memory_available", in_memory=len(self._memory))
        if self._memory and self.oldest_pending_since is None:
            self.oldest_pending_since = time.monotonic()

    async def _journal_loop(self) -> None:
        """fsync the journal every flush interval; after a failure, journal what memory holds.
        Runs until `run` cancels it."""
        journal = self._journal
        if journal is None:
            return
        retry = Backoff(self._flush_interval, max(self._flush_interval, 5.0))
        next_try = 0.0
        while True:
            await asyncio.sleep(self._flush_interval)
            if not await journal.sync():
                self._journal_failed()
                self._mark_unjournaled(journal.synced_seq + 1)
            if (self._unjournaled_from is not None or not journal.writable) and time.monotonic() >= next_try:
                if self._catch_up(limit=5 * self._batch_size):
                    retry.reset()
                    next_try = 0.0
                else:
                    next_try = time.monotonic() + retry.next_delay()

    def _mark_unjournaled(self, seq: int) -> None:
        """Records from `seq` on may not be on disk (a failed fsync): journal them again."""
        if self._unjournaled_from is None or seq < self._unjournaled_from:
            self._unjournaled_from = seq

    def _catch_up(self, limit: int | None = None) -> bool:
        """Journal (up to `limit` of) the records memory holds that the journal lacks; when none
        are left, let the journal take appends again. False if the journal still fails."""
        journal = self._journal
        if journal is None:
            return False
        start = self._unjournaled_from
        if start is not None:
            todo = [p for p in self._memory if p.seq >= start]
            step = todo if limit is None else todo[:limit]
            if step and not journal.write_many([(p.seq, decision_to_json(p.decision)) for p in step]):
                return False
            if len(step) < len(todo):
                self._unjournaled_from = todo[len(step)].seq
                return True
            log.info("journal_caught_up", records=len(todo), path=str(journal.path))
        self._unjournaled_from = None
        if not journal.writable:
            if not journal.resume():
                return False  # still no room: memory keeps holding what the journal cannot take
            self._raise("journal_writable_again", gap=0, path=str(journal.path))
        return True

    def _finish(self) -> None:
        """At the end of `run`: journal what memory alone holds, fsync, close; say what is left."""
        journal = self._journal
        if journal is not None:
            if self._unjournaled_from is not None or not journal.writable:
                self._catch_up()
            journal.sync_now()
        lost = [p for p in self._memory if journal is None or
                (self._unjournaled_from is not None and p.seq >= self._unjournaled_from)]
        for item in lost:
            # The disk refused them to the end: the log (the system journal) is the last copy.
            log.error("record_not_kept_at_shutdown", linkedid=linkedid_of(item.decision), seq=item.seq,
                      record=decision_to_json(item.decision))
        if lost:
            log.error("records_lost_at_shutdown", count=len(lost))
        kept = self.pending - len(lost)
        if kept:
            log.warning("records_left_in_journal", count=kept,
                        path=str(journal.path) if journal else None, effect="written first at the next start")
        self._finished = True  # the journal stays open: a late decision is still journaled
        log.info("writer_stopped", written=self.written, rejected=self.rejected, dropped=self.dropped,
                 left_in_journal=kept)

    def close(self) -> None:
        """Close the journal (releasing its lock); the daemon leaves that to the process's exit."""
        self._finished = True
        if self._journal is not None:
            self._journal.close()
