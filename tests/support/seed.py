"""Seed known call records straight into a test database (integration tests of views and reports)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

SHANGHAI = timedelta(hours=8)


def local(text: str) -> datetime:
    """A Shanghai wall-clock time as an aware UTC datetime."""
    return (datetime.fromisoformat(text) - SHANGHAI).replace(tzinfo=UTC)


def utc_naive(moment: datetime) -> datetime:
    """CEL's eventtime: UTC without a zone, as cel_pgsql writes it."""
    return moment.astimezone(UTC).replace(tzinfo=None)


async def add_call(conn: asyncpg.Connection, linkedid: str, started: str, caller: str, disposition: str, *,
                   ring: float | None = None, within: bool | None = None, answered_by: str | None = None,
                   talk: float | None = None, after_hours: bool = False, stage: str | None = None,
                   holder: str | None = None, probe: bool = False, name: str = "") -> None:
    """A finished call: rings `ring` s, then (with `talk`) answered and talks `talk` s; 5 s more if unanswered."""
    start = local(started)
    answered = start + timedelta(seconds=ring or 0) if talk is not None else None
    ended = (answered + timedelta(seconds=talk or 0)) if answered else start + timedelta(seconds=(ring or 0) + 5)
    await conn.execute(
        """INSERT INTO calls (linkedid, did, trunk, caller_number, caller_name, started_at, ring_started_at,
               answered_at, ended_at, ring_seconds, rings, within_ring_limit, answered_by, disposition, after_hours,
               talk_seconds, is_probe, source, answered_stage, forwarded_to, duty_holder, needs_call_sheet)
           VALUES ($1, '4008001234', 'carrier', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'ami',
                   $16, $17, $18, $19)""",
        linkedid, caller, name, start, start if ring is not None else None, answered, ended, ring,
        None if ring is None else int(ring // 5) + 1, within, answered_by, disposition, after_hours, talk, probe,
        stage, "13900139000" if stage == "mobile" else None, holder, stage == "mobile")


async def add_violation(conn: asyncpg.Connection, kind: str, linkedid: str | None, at: str,
                        details: str = "{}") -> None:
    """A recorded rule breach at Shanghai time `at`."""
    await conn.execute("INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ($1, $2, $3, $4)",
                       kind, linkedid, local(at), details)
