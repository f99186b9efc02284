"""The call sheet (接听记录单): validation, storage with change history, overdue complaints."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pbx_bridge.aio import wait_set

log = structlog.get_logger("pbx_bridge.notes")

Category = Literal["咨询", "投诉", "建议", "业务办理"]  # enquiry, complaint, suggestion, service request
Status = Literal["待处理", "处理中", "已完成"]  # open, in progress, done
COMPLAINT_OVERDUE = "complaint_overdue"
SHEET_FIELDS = ("caller_name", "contact", "category", "summary", "resolution", "owner", "status")
LINKEDID = re.compile(r"\A[0-9A-Za-z._-]{1,64}\Z")  # whole string: no final newline
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_EXCEPT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class CallSheet(BaseModel):
    """PUT /calls/{linkedid}/note: the whole sheet as it should now read.

    Who makes the change is never taken from here: the API records the name of the token used.
    `author` is still accepted (clients written for the first version send it) and ignored.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    author: str | None = Field(default=None, max_length=100)  # ignored: who acted comes from the token
    caller_name: str = Field(default="", max_length=100)
    contact: str = Field(default="", max_length=100)
    category: Category
    summary: str = Field(min_length=1, max_length=2000)
    resolution: str = Field(default="", max_length=4000)
    owner: str = Field(default="", max_length=100)
    status: Status = "待处理"

    @field_validator("caller_name", "contact", "owner")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must be one line of text without control characters")
        return value

    @field_validator("summary", "resolution")
    @classmethod
    def _text(cls, value: str) -> str:
        if _CONTROL_EXCEPT_LINES.search(value):
            raise ValueError("must be text without control characters (line breaks and tabs are fine)")
        return value

    def fields(self) -> dict[str, str]:
        """The sheet's fields (without the ignored author)."""
        return {name: getattr(self, name) for name in SHEET_FIELDS}


class UnknownCallError(Exception):
    """No call with this linkedid is recorded."""


class ProbeCallError(Exception):
    """The call is a line probe: it has no customer and takes no sheet."""


class VersionConflictError(Exception):
    """The sheet changed since the version the writer last read."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the sheet is at version {current}")
        self.current = current


@dataclass(frozen=True)
class SavedSheet:
    """A sheet as stored, and whether this request changed it."""

    row: dict[str, Any]
    changed: bool

    def as_json(self) -> dict[str, Any]:
        """JSON-ready form (timestamps as ISO 8601)."""
        return json_ready(self.row)


def json_ready(row: dict[str, Any]) -> dict[str, Any]:
    """A stored sheet with its timestamps as ISO 8601 strings."""
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}


_SELECT_SHEET = """SELECT linkedid, caller_name, contact, category, summary, resolution, owner, status, version,
                          created_at, created_by, updated_at, updated_by, completed_at
                   FROM call_notes WHERE linkedid = $1"""
_INSERT_SHEET = """INSERT INTO call_notes (linkedid, caller_name, contact, category, summary, resolution, owner,
                       status, created_by, updated_by, completed_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, CASE WHEN $8 = '已完成' THEN now() END)
                   RETURNING linkedid, caller_name, contact, category, summary, resolution, owner, status, version,
                             created_at, created_by, updated_at, updated_by, completed_at"""
_UPDATE_SHEET = """UPDATE call_notes SET caller_name = $2, contact = $3, category = $4, summary = $5,
                       resolution = $6, owner = $7, status = $8, updated_by = $9, updated_at = now(),
                       version = version + 1,
                       completed_at = CASE WHEN $8 <> '已完成' THEN NULL ELSE coalesce(completed_at, now()) END
                   WHERE linkedid = $1
                   RETURNING linkedid, caller_name, contact, category, summary, resolution, owner, status, version,
                             created_at, created_by, updated_at, updated_by, completed_at"""
# This PBX's complaints (投诉) not done (已完成) by their deadline, each recorded once (the unique index).
_RECORD_OVERDUE = """
    INSERT INTO policy_violations (kind, linkedid, occurred_at, details)
    SELECT 'complaint_overdue', n.linkedid, d.deadline,
           jsonb_build_object('owner', n.owner, 'status', n.status, 'reply_minutes', $1::float8,
                              'completed_at', n.completed_at)
    FROM call_notes n
    JOIN calls c ON c.linkedid = n.linkedid
    CROSS JOIN LATERAL (SELECT coalesce(c.ended_at, c.started_at) + $1::float8 * interval '1 minute' AS deadline) d
    WHERE c.pbx = session_pbx() AND n.category = '投诉' AND NOT c.is_probe
      AND ((n.completed_at IS NULL AND d.deadline <= $2) OR n.completed_at > d.deadline)
    ON CONFLICT DO NOTHING
    RETURNING linkedid, occurred_at, details"""


def first_answerer(answered_by: str | None, stage: str | None, duty_holder: str | None) -> str:
    """Who owns a call's case by default: the person who answered first (the duty mobile's holder
    when the mobile answered); '' when nobody answered."""
    if stage == "mobile" and duty_holder:
        return duty_holder[:100]
    return (answered_by or "")[:100]


async def save_sheet(conn: asyncpg.Connection, linkedid: str, sheet: CallSheet, actor: str,
                     expected_version: int | None = None) -> SavedSheet:
    """Create or update the sheet of a call, recording who (`actor`: the API token's name, never
    anything from the request body) changed which field from what to what.

    Raises UnknownCallError, ProbeCallError, or VersionConflictError (when `expected_version`
    is given and the stored sheet is at another version). A PUT that changes nothing writes nothing.
    """
    new = sheet.fields()
    async with conn.transaction():
        # Lock the call so concurrent writers of one sheet take turns.
        call = await conn.fetchrow("SELECT is_probe, answered_by, answered_stage, duty_holder FROM calls "
                                   "WHERE linkedid = $1 AND pbx = session_pbx() FOR NO KEY UPDATE", linkedid)
        if call is None:
            raise UnknownCallError(linkedid)
        if call["is_probe"]:
            raise ProbeCallError(linkedid)
        current = await conn.fetchrow(_SELECT_SHEET, linkedid)
        current_version = current["version"] if current is not None else 0
        if expected_version is not None and expected_version != current_version:
            raise VersionConflictError(current_version)
        if not new["owner"]:  # 首问负责制: the first person who answered follows the case up, transfers or not
            new["owner"] = (current["owner"] if current is not None and current["owner"]
                            else first_answerer(call["answered_by"], call["answered_stage"], call["duty_holder"]))
        if current is None:
            changes = {name: {"old": None, "new": value} for name, value in new.items()}
            row = await conn.fetchrow(
                _INSERT_SHEET,
                linkedid, *new.values(), actor)
        else:
            changes = {name: {"old": current[name], "new": value}
                       for name, value in new.items() if current[name] != value}
            if not changes:
                return SavedSheet(dict(current), changed=False)
            row = await conn.fetchrow(
                _UPDATE_SHEET,
                linkedid, *new.values(), actor)
        assert row is not None
        await conn.execute(
            "INSERT INTO call_note_history (linkedid, version, changed_at, changed_by, changes) "
            "VALUES ($1, $2, $3, $4, $5::jsonb)",
            linkedid, row["version"], row["updated_at"], actor, json.dumps(changes, ensure_ascii=False))
    log.info("call_sheet_saved", linkedid=linkedid, version=row["version"], fields=sorted(changes), by=actor)
    return SavedSheet(dict(row), changed=True)


async def read_sheet(conn: asyncpg.Connection, linkedid: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The current sheet of a call (None if not yet filled) and its history, oldest change first."""
    if await conn.fetchval("SELECT 1 FROM calls WHERE linkedid = $1 AND pbx = session_pbx()", linkedid) is None:
        raise UnknownCallError(linkedid)
    current = await conn.fetchrow(_SELECT_SHEET, linkedid)
    history = await conn.fetch(
        "SELECT version, changed_at, changed_by, changes FROM call_note_history WHERE linkedid = $1 ORDER BY version",
        linkedid)
    return (dict(current) if current is not None else None,
            [{"version": h["version"], "changed_at": h["changed_at"].isoformat(), "changed_by": h["changed_by"],
              "changes": json.loads(h["changes"])} for h in history])


async def record_overdue_complaints(conn: asyncpg.Connection, reply_minutes: float,
                                    now: datetime) -> list[asyncpg.Record]:
    """Record a complaint_overdue violation (once) for every complaint not 已完成 within
    `reply_minutes` of its call's end; return the ones recorded by this call."""
    return list(await conn.fetch(_RECORD_OVERDUE, reply_minutes, now))


class ComplaintWatch:
    """Periodically records complaints that missed their reply deadline, and alerts on each."""

    name = "complaints"  # its task's name (lifecycle.Service)

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], reply_minutes: float,
                 interval: float, now: Callable[[], datetime],
                 on_overdue: Callable[[dict[str, Any]], None]) -> None:
        self._connect = connect
        self._reply_minutes = reply_minutes
        self._interval = interval
        self._now = now
        self._on_overdue = on_overdue
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Make `run` return."""
        self._stop.set()

    async def sweep(self) -> int:
        """One pass; returns how many complaints became overdue."""
        conn = await self._connect()
        try:
            rows = await record_overdue_complaints(conn, self._reply_minutes, self._now())
        finally:
            await conn.close()
        for row in rows:
            details = json.loads(row["details"])
            log.error("policy_violation", kind=COMPLAINT_OVERDUE, linkedid=row["linkedid"],
                      deadline=row["occurred_at"].isoformat(), owner=details.get("owner"))
            self._on_overdue({"service": "pbx-bridge", "kind": COMPLAINT_OVERDUE, "linkedid": row["linkedid"],
                              "occurred_at": row["occurred_at"].isoformat(), "details": details})
        return len(rows)

    async def run(self) -> None:
        """Sweep every `interval` seconds until stopped; a failed sweep is logged and retried."""
        while not self._stop.is_set():
            try:
                await self.sweep()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("complaint_sweep_failed", error=str(exc) or type(exc).__name__)
            await wait_set(self._stop, self._interval)
