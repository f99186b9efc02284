"""The call-record writer: batches tracker decisions into idempotent upserts.

One owned task drains an in-memory queue; `submit` never blocks the event loop. Rows are
upserted by `linkedid`, so a replayed or duplicate decision never makes a second row, and a
final record is never overwritten by an earlier, partial one. While PostgreSQL is
unreachable the writer retries with bounded backoff; what is still unwritten at shutdown
goes to a spool file that the next start replays first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.backoff import Backoff
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
RETRYABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
             asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


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
    "ON CONFLICT (kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', ''))) DO NOTHING")


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


async def write_batch(conn: asyncpg.Connection, batch: Sequence[RecordWrite]) -> None:
    """Upsert one batch in a single transaction: calls, then their legs, then violations."""
    items = coalesce(batch)
    records = [i for i in items if not isinstance(i, Violation)]
    violations = [i for i in items if isinstance(i, Violation)]
    legs = [leg for d in records if isinstance(d, CallEnded) for leg in d.legs]
    async with conn.transaction():
        if records:
            await conn.executemany(UPSERT_CALL, [_call_row(d.record) for d in records])
        if legs:
            await conn.executemany(UPSERT_LEG, [_leg_row(leg) for leg in legs])
        if violations:
            await conn.executemany(INSERT_VIOLATION, [
                (str(v.kind), v.linkedid, v.occurred_at, json.dumps(dict(v.details), ensure_ascii=False))
                for v in violations])


# --- spool: JSON lines, one decision each --------------------------------------------------

def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "$dt" in value:
        return datetime.fromisoformat(value["$dt"])
    return value


def decision_to_json(decision: RecordWrite) -> str:
    """Serialise a decision for the spool."""
    if isinstance(decision, Violation):
        return json.dumps({"kind": "Violation", "violation": {
            "kind": str(decision.kind), "occurred_at": _encode(decision.occurred_at),
            "linkedid": decision.linkedid, "details": [list(pair) for pair in decision.details]}},
            ensure_ascii=False)
    body: dict[str, Any] = {
        "kind": type(decision).__name__,
        "record": {k: _encode(v) for k, v in asdict(decision.record).items()},
    }
    if isinstance(decision, CallEnded):
        body["legs"] = [{k: _encode(v) for k, v in asdict(leg).items()} for leg in decision.legs]
    return json.dumps(body, ensure_ascii=False)


def decision_from_json(line: str) -> RecordWrite:
    """Read back a spooled decision."""
    body = json.loads(line)
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
    return CallStarted(record)


def open_private(path: Path) -> TextIO:
    """Open `path` for appending, readable and writable by its owner only (0600), also when it
    already existed with a wider mode; a symbolic link in its place is refused. Spooled and
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


class CallWriter:
    """Owns the queue of decisions and the task that writes them to PostgreSQL."""

    def __init__(self, connect: Connect, *, batch_size: int = 200, flush_interval: float = 0.2,
                 queue_limit: int = 100_000, spool_path: Path | None = None,
                 max_backoff: float = 10.0) -> None:
        self._connect = connect
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue_limit = queue_limit
        self._spool_path = spool_path
        self._max_backoff = max_backoff
        self._pending: list[RecordWrite] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._conn: asyncpg.Connection | None = None
        self.written = 0
        self.dropped = 0
        self.db_up = False
        self.oldest_pending_since: float | None = None

    @property
    def pending(self) -> int:
        """Decisions accepted but not yet in PostgreSQL."""
        return len(self._pending)

    def submit(self, decision: RecordWrite) -> None:
        """Accept a decision for writing; never blocks."""
        if len(self._pending) >= self._queue_limit:
            self.dropped += 1
            log.error("writer_queue_full", linkedid=linkedid_of(decision), limit=self._queue_limit)
            return
        if not self._pending:
            self.oldest_pending_since = time.monotonic()
        self._pending.append(decision)
        if len(self._pending) >= self._batch_size:
            self._wakeup.set()

    def stop(self) -> None:
        """Ask `run` to write what is pending and return."""
        self._stopping = True
        self._wakeup.set()

    def replay_spool(self) -> int:
        """Queue the decisions a previous run spooled; return how many."""
        if self._spool_path is None or not self._spool_path.exists():
            return 0
        lines = self._spool_path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            if line.strip():
                self.submit(decision_from_json(line))
        self._spool_path.unlink()
        log.info("spool_replayed", count=len(lines), path=str(self._spool_path))
        return len(lines)

    async def run(self, shutdown_timeout: float = 10.0) -> None:
        """Write batches until stopped; then flush, spooling whatever could not be written."""
        backoff = Backoff(min(0.2, self._max_backoff), self._max_backoff)
        deadline: float | None = None
        while True:
            if self._stopping and deadline is None:
                deadline = time.monotonic() + shutdown_timeout
            if not self._pending:
                if self._stopping:
                    break
                self._wakeup.clear()
                await wait_set(self._wakeup, self._flush_interval)
                continue
            batch = self._pending[: self._batch_size]
            try:
                conn = await self._connection()
                await write_batch(conn, batch)
            except RETRYABLE as exc:
                await self._drop_connection()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                delay = backoff.next_delay()
                log.warning("database_write_failed", error=str(exc) or type(exc).__name__,
                            pending=len(self._pending), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            except asyncpg.PostgresError:
                # Not a connectivity problem: find the decisions the database refuses,
                # keep them in the rejected file, and write the rest.
                await self._write_one_by_one(batch)
            del self._pending[: len(batch)]
            self.written += len(batch)
            self.oldest_pending_since = time.monotonic() if self._pending else None
            backoff.reset()
        self._spool_remaining()
        await self._drop_connection(failed=False)

    async def _write_one_by_one(self, batch: Sequence[RecordWrite]) -> None:
        conn = await self._connection()
        for decision in batch:
            try:
                await write_batch(conn, [decision])
            except asyncpg.PostgresError as exc:
                log.error("record_rejected", linkedid=linkedid_of(decision), error=str(exc))
                if self._spool_path is not None:
                    with open_private(self._spool_path.with_suffix(".rejected.jsonl")) as out:
                        out.write(decision_to_json(decision) + "\n")

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await within(self._connect(), 10)
            if not self.db_up:
                log.info("database_connected")
            self.db_up = True
        return self._conn

    async def _drop_connection(self, failed: bool = True) -> None:
        if self.db_up and failed:
            log.warning("database_unavailable")
        self.db_up = False
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await within(conn.close(), 2)

    def _spool_remaining(self) -> None:
        if not self._pending:
            return
        if self._spool_path is None:
            log.error("records_lost_at_shutdown", count=len(self._pending))
            return
        with open_private(self._spool_path) as spool:
            for decision in self._pending:
                spool.write(decision_to_json(decision) + "\n")
        log.warning("records_spooled", count=len(self._pending), path=str(self._spool_path))
        self._pending.clear()
