"""Reconcile: complete or create, from CEL, the records of hotline calls AMI did not see end.

A call gets its record from CEL (`source = 'cel'`) when it ended (LINKEDID_END) and its row in
`calls` is missing (the daemon was down, or the call began in an AMI gap) or has no end (its end
fell in a gap, or the tracker left it to CEL), or when the daemon asks for it (`rebuild`). A call
whose channels vanished without an end (Asterisk crashed) is closed at its last CEL row once
Asterisk no longer lists its channels. A final AMI record is never overwritten: each call is
written by one statement whose upsert only replaces a row without an end (or one the daemon
asked to rebuild), so an AMI write racing it cannot be lost.

`Reconciler` runs this continuously in the daemon (at start, after every AMI login, and every
`[reconcile] interval_seconds`); `pbx-bridge reconcile` runs it once for a range.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.cel.builder import CelCall, CelRow, build_call
from pbx_bridge.config import Settings
from pbx_bridge.metrics import Metrics
from pbx_bridge.pbx import cel_scope
from pbx_bridge.tracker.model import CallLeg, CallRecord, Disposition, Violation
from pbx_bridge.tracker.tracker import TrackerSettings

log = structlog.get_logger("pbx_bridge.reconcile")

CALL_COLUMNS = tuple(f.name for f in fields(CallRecord))
LEG_COLUMNS = tuple(f.name for f in fields(CallLeg) if f.name != "linkedid")
LEG_TYPES = {"uniqueid": "text", "channel": "text", "endpoint": "text", "dial_started_at": "timestamptz",
             "ring_started_at": "timestamptz", "answered_at": "timestamptz", "ended_at": "timestamptz",
             "dial_status": "text", "hangup_cause": "smallint", "hangup_cause_text": "text", "stage": "text",
             "transfer_kind": "text", "transferred_by": "text", "talk_seconds": "numeric",
             "transferred_at": "timestamptz"}

# The hotline calls of this PBX (its systemname: $4) that started in [$1, $2): the inbound trunk
# channel's CHAN_START at a hotline DID, or the dialplan's HotlineRefused; with their end
# (LINKEDID_END) and what `calls` holds.
FIND_CALLS = f"""
WITH starts AS (
    SELECT linkedid, min(eventtime) AS started
      FROM cel
     WHERE eventtime >= $1 AND eventtime < $2 AND uniqueid = linkedid
       AND ((eventtype = 'CHAN_START' AND exten = ANY($3::text[]))
            OR (eventtype = 'USER_DEFINED' AND userdeftype = 'HotlineRefused'))
       AND {cel_scope("linkedid", "$4::text")}
     GROUP BY linkedid
)
SELECT s.linkedid, s.started,
       (SELECT max(e.eventtime) FROM cel e WHERE e.linkedid = s.linkedid AND e.eventtype = 'LINKEDID_END') AS ended,
       c.source, c.ended_at IS NOT NULL AS final, c.linkedid IS NOT NULL AS recorded
  FROM starts s LEFT JOIN calls c ON c.linkedid = s.linkedid
 ORDER BY s.started, s.linkedid
"""  # noqa: S608
# The rows of these calls (column `call`), and of the colleagues their attended transfers handed
# the caller to: those channels' rows before the transfer are under the consultation's linkedid.
CEL_ROWS = r"""
WITH mine AS (SELECT * FROM cel WHERE linkedid = ANY($1::text[])),
targets AS (
    SELECT DISTINCT linkedid AS call,
           substring(extra FROM '"transfer_target_channel_uniqueid"\s*:\s*"([^"]*)"') AS uniqueid
      FROM mine WHERE eventtype = 'ATTENDEDTRANSFER'
)
SELECT m.*, m.linkedid AS call FROM mine m
UNION ALL
SELECT c.*, t.call FROM cel c JOIN targets t ON c.uniqueid = t.uniqueid AND c.linkedid <> t.call
ORDER BY eventtime, id
"""
CHUNK = 500  # calls whose rows are read at once


def _write_statement() -> str:
    """One statement per call: the record (only over a row without an end, or when forced), then its
    legs and violations only if the record was written. Only fixed column names reach the text."""
    n = len(CALL_COLUMNS)
    values = ", ".join(f"${i}" for i in range(1, n + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in CALL_COLUMNS if c != "linkedid")
    force = f"${n + 1}"
    leg_params = {c: f"${n + 2 + i}::{LEG_TYPES[c]}[]" for i, c in enumerate(LEG_COLUMNS)}
    v = n + 2 + len(LEG_COLUMNS)
    leg_updates = ", ".join(f"{c} = coalesce(EXCLUDED.{c}, call_legs.{c})" for c in LEG_COLUMNS if c != "uniqueid")
    return f"""
WITH call AS (
    INSERT INTO calls ({", ".join(CALL_COLUMNS)}) VALUES ({values})
    ON CONFLICT (linkedid) DO UPDATE SET {updates}, updated_at = now()
     WHERE calls.ended_at IS NULL OR {force}
    RETURNING (xmax = 0) AS inserted
), legs AS (
    INSERT INTO call_legs (linkedid, {", ".join(LEG_COLUMNS)})
    SELECT $1, {", ".join(f"l.{c}" for c in LEG_COLUMNS)}
      FROM unnest({", ".join(leg_params.values())}) AS l({", ".join(LEG_COLUMNS)})
     WHERE EXISTS (SELECT 1 FROM call)
    ON CONFLICT (linkedid, uniqueid) DO UPDATE SET {leg_updates}
), violations AS (
    INSERT INTO policy_violations (kind, linkedid, occurred_at, details)
    SELECT v.kind, $1, v.occurred_at, v.details::jsonb
      FROM unnest(${v}::text[], ${v + 1}::timestamptz[], ${v + 2}::text[]) AS v(kind, occurred_at, details)
     WHERE EXISTS (SELECT 1 FROM call)
    ON CONFLICT (pbx, kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', ''))) DO NOTHING
    RETURNING kind
)
SELECT (SELECT inserted FROM call) AS inserted, ARRAY(SELECT kind FROM violations) AS new_violations
"""  # noqa: S608


WRITE_CALL = _write_statement()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A hotline call CEL knows of, and what `calls` holds of it."""

    linkedid: str
    started: datetime
    ended: datetime | None  # its LINKEDID_END
    source: str | None  # of its row in `calls`, if any
    final: bool  # that row has an end
    recorded: bool  # there is a row


@dataclass(frozen=True, slots=True)
class LiveChannels:
    """The channels Asterisk listed (CoreShowChannels after a login) and when (Asterisk's time)."""

    uniqueids: frozenset[str]
    at: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the reconcile did with one call, and why."""

    linkedid: str
    action: str  # created | completed | replaced | left alone
    reason: str
    call: CelCall | None = None
    new_violations: tuple[Violation, ...] = ()

    @property
    def changed(self) -> bool:
        """A record was (or, in a dry run, would be) written."""
        return self.action != "left alone"


def tracker_settings_for(settings: Settings) -> TrackerSettings:
    """The builder's view of the configuration (no event key: CEL rows carry none)."""
    return TrackerSettings(hotline_numbers=frozenset(settings.hotline.numbers), trunk=settings.hotline.trunk,
                           ring_period_seconds=settings.ring.period_seconds, max_rings=settings.ring.max_rings,
                           probe_caller=settings.probe.caller_id, mobile_ring_limit=settings.ring.mobile_limit)


def decide(candidate: Candidate, call: CelCall | None, *, forced: bool = False, live: LiveChannels | None = None,
           settled_before: datetime | None = None) -> tuple[str, str]:
    """What to do with one call: (action, reason). Pure.

    `live`: the channel list of the last login (calls without an end are closed only if none of
    their channels is on it and it was taken after their last row). `settled_before`: leave calls
    that ended after this alone for now (their AMI record is on its way).
    """
    if call is None:
        return "left alone", "not a hotline call on the hotline trunk"
    if candidate.final and not forced:
        where = "AMI" if candidate.source == "ami" else "CEL"
        return "left alone", f"it has a final record from {where}"
    if not call.finished:
        if candidate.final:
            return "left alone", "its CEL rows have no end (LINKEDID_END): the final record stays"
        if live is None:
            return "left alone", "not finished (no LINKEDID_END): still in progress, or Asterisk stopped during it"
        if call.channels & live.uniqueids:
            return "left alone", "still in progress (Asterisk lists its channels)"
        if call.last_event_at >= live.at:
            return "left alone", "not finished (no LINKEDID_END) and newer than Asterisk's channel list"
        action = "completed" if candidate.recorded else "created"
        return action, "its channels vanished without an end (Asterisk stopped): closed at its last CEL event"
    if settled_before is not None and candidate.ended is not None and candidate.ended > settled_before:
        return "left alone", "ended moments ago: its AMI record is on its way"
    if not candidate.recorded:
        return "created", "no record: pbx-bridge did not see the call (down, or an AMI gap)"
    if forced:
        return "replaced", "its record was made while AMI events were missed"
    return "completed", "its record had no end (the end fell in an AMI gap, or pbx-bridge stopped)"


def _call_row(record: CallRecord) -> list[Any]:
    return [str(v) if isinstance(v, Disposition) else v for v in (getattr(record, c) for c in CALL_COLUMNS)]


def _write_args(call: CelCall, forced: bool) -> list[Any]:
    legs = [[getattr(leg, c) for leg in call.legs] for c in LEG_COLUMNS]
    violations = call.violations
    return [*_call_row(call.record), forced, *legs, [str(v.kind) for v in violations],
            [v.occurred_at for v in violations],
            [json.dumps(dict(v.details), ensure_ascii=False) for v in violations]]


async def find_candidates(conn: asyncpg.Connection, since: datetime, until: datetime,
                          numbers: Sequence[str], system_name: str) -> list[Candidate]:
    """The hotline calls of the PBX with this systemname whose inbound channel started in [since, until)."""
    rows = await conn.fetch(FIND_CALLS, _cel_time(since), _cel_time(until), list(numbers), system_name)
    return [Candidate(r["linkedid"], r["started"].replace(tzinfo=UTC),
                      r["ended"].replace(tzinfo=UTC) if r["ended"] is not None else None,
                      r["source"], bool(r["final"]), bool(r["recorded"])) for r in rows]


def _cel_time(when: datetime) -> datetime:
    """cel.eventtime is UTC without a zone (cel_pgsql, usegmtime = yes)."""
    return when.astimezone(UTC).replace(tzinfo=None)


async def reconcile(conn: asyncpg.Connection, settings: TrackerSettings, since: datetime, until: datetime, *,
                    system_name: str, dry_run: bool = False, live: LiveChannels | None = None,
                    settled_before: datetime | None = None,
                    forced: frozenset[str] = frozenset(), only_open: bool = False) -> list[Outcome]:
    """Rebuild, from CEL, the hotline calls that started in [since, until) and lack a final record.

    Only the CEL rows of the PBX with this `system_name` (Asterisk's; '' when it has none) are
    read: several PBXs may write CEL into one database. Returns what happened to each (with
    `only_open`, calls with a final record are not even looked at: the daemon's sweep). With
    `dry_run` nothing is written.
    """
    candidates = await find_candidates(conn, since, until, sorted(settings.hotline_numbers), system_name)
    if only_open:
        candidates = [c for c in candidates if not c.final or c.linkedid in forced]
    outcomes: list[Outcome] = []
    for first in range(0, len(candidates), CHUNK):  # bounded memory however long the range
        chunk = candidates[first:first + CHUNK]
        rows: dict[str, list[CelRow]] = {}
        for row in await conn.fetch(CEL_ROWS, [c.linkedid for c in chunk]):
            rows.setdefault(row["call"], []).append(CelRow.from_mapping(row))
        for candidate in chunk:
            outcomes.append(await _settle(conn, settings, candidate, rows.get(candidate.linkedid, []),
                                          dry_run=dry_run, live=live, settled_before=settled_before,
                                          forced=candidate.linkedid in forced))
    return outcomes


async def _settle(conn: asyncpg.Connection, settings: TrackerSettings, candidate: Candidate, rows: list[CelRow], *,
                  dry_run: bool, live: LiveChannels | None, settled_before: datetime | None,
                  forced: bool) -> Outcome:
    """Decide one call and, unless left alone (or a dry run), write it in one statement."""
    call = build_call(rows, settings, close_at_last_event=live is not None)
    action, reason = decide(candidate, call, forced=forced, live=live, settled_before=settled_before)
    if action == "left alone" or call is None or dry_run:
        return Outcome(candidate.linkedid, action, reason, call)
    result = await conn.fetchrow(WRITE_CALL, *_write_args(call, forced))
    if result is None or result["inserted"] is None:  # the upsert's WHERE refused: a final record came
        return Outcome(candidate.linkedid, "left alone", "a final record arrived meanwhile", call)
    if action == "created" and not result["inserted"]:
        action, reason = "completed", "its record, written meanwhile, had no end"
    kinds = set(result["new_violations"])
    return Outcome(candidate.linkedid, action, reason, call, tuple(v for v in call.violations if str(v.kind) in kinds))


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Reconciler:
    """The daemon's reconcile: one owned task (`run`) that rebuilds from CEL, at start, after every
    AMI login (`after_login`), on request (`rebuild`) and every `interval` seconds, the records
    of the hotline calls of the last `lookback` that AMI did not see end."""

    name = "reconcile"  # its task's name (lifecycle.Service)

    def __init__(self, connect: Connect, settings: TrackerSettings, *, interval: float, lookback: timedelta,
                 settle: timedelta, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_violation: Callable[[Violation], None] | None = None, metrics: Metrics | None = None,
                 system_name: str | None = None) -> None:
        self._connect = connect
        self.system_name = system_name  # Asterisk's: which CEL rows are this PBX's; None: not known yet
        self._metrics = metrics
        self._settings = settings
        self._interval = interval
        self._lookback = lookback
        self._settle = settle
        self._clock = clock
        self._on_violation = on_violation
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._live: LiveChannels | None = None
        self._forced: dict[str, datetime] = {}
        self.passes = 0
        self.rebuilt = 0
        self.last_error: str | None = None
        self.last_pass_at: float | None = None  # time.monotonic() of the last pass that completed

    def after_login(self, uniqueids: frozenset[str], at: datetime, system_name: str) -> None:
        """Asterisk's channels and systemname after a login (an AMI gap or a restart may have
        hidden ends): reconcile now."""
        self.system_name = system_name
        self._live = LiveChannels(uniqueids, at)
        self._wake.set()

    def rebuild(self, linkedid: str) -> None:
        """Rebuild this call from CEL once it has ended, even over a final record (AMI missed some
        of its events). Passes then come every `settle` (not every `interval`) until it is done."""
        self._forced[linkedid] = self._clock()
        self._wake.set()

    def stop(self) -> None:
        """Make `run` return."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Reconcile at once (covering the time the daemon was down), then on every wake-up or interval."""
        while not self._stopping.is_set():
            self._wake.clear()
            await self.sweep()
            # A call waiting for its rebuild is settled as soon as its CEL end is `settle` old.
            soon = self._settle.total_seconds() + 1 if self._forced else self._interval
            await wait_set(self._wake, min(self._interval, soon))

    async def sweep(self) -> list[Outcome]:
        """One pass over the lookback; failures are logged and retried at the next pass. None
        before the first AMI login told Asterisk's systemname (which CEL rows are this PBX's)."""
        if self.system_name is None:
            return []
        now = self._clock()
        horizon = now - self._lookback
        self._forced = {k: at for k, at in self._forced.items() if at > horizon}
        try:
            conn = await within(self._connect(), 10)
            try:
                outcomes = await within(reconcile(
                    conn, self._settings, horizon, now, system_name=self.system_name, live=self._live,
                    settled_before=now - self._settle,
                    forced=frozenset(self._forced), only_open=True), 120)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            self.last_error = type(exc).__name__
            if self._metrics is not None:
                self._metrics.reconcile_failures.inc()
            log.warning("reconcile_failed", error=str(exc) or type(exc).__name__)
            return []
        self.last_error = None
        self.passes += 1
        self.last_pass_at = time.monotonic()
        for outcome in outcomes:
            if outcome.changed:
                self._forced.pop(outcome.linkedid, None)
                self.rebuilt += 1
                if self._metrics is not None:
                    self._metrics.reconciled.labels(outcome.action).inc()
                _log_outcome(outcome)
                for violation in outcome.new_violations:
                    if self._on_violation is not None:
                        self._on_violation(violation)
        return outcomes


def _log_outcome(outcome: Outcome) -> None:
    record = outcome.call.record if outcome.call is not None else None
    log.warning("call_reconciled_from_cel", linkedid=outcome.linkedid, action=outcome.action, reason=outcome.reason,
                disposition=str(record.disposition) if record is not None else None,
                caller=record.caller_number if record is not None else None,
                started_at=record.started_at.isoformat() if record is not None else None)
