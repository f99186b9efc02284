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
                   holder: str | None = None, probe: bool = False, name: str = "", wait: float | None = None,
                   mobile_ring: float | None = None, mobile_within: bool | None = None) -> None:
    """A finished call: rings `ring` s, then (with `talk`) answered and talks `talk` s; 5 s more if unanswered.
    `wait`, `mobile_ring`, `mobile_within`: the caller's wait and the duty mobile's ring time and limit."""
    start = local(started)
    answered = start + timedelta(seconds=ring or 0) if talk is not None else None
    ended = (answered + timedelta(seconds=talk or 0)) if answered else start + timedelta(seconds=(ring or 0) + 5)
    await conn.execute(
        """INSERT INTO calls (linkedid, did, trunk, caller_number, caller_name, started_at, ring_started_at,
               answered_at, ended_at, ring_seconds, rings, within_ring_limit, answered_by, disposition, after_hours,
               talk_seconds, is_probe, source, answered_stage, forwarded_to, duty_holder, needs_call_sheet,
               wait_seconds, mobile_ring_seconds, mobile_within_ring_limit)
           VALUES ($1, '4008001234', 'carrier', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'ami',
                   $16, $17, $18, $19, $20, $21, $22)""",
        linkedid, caller, name, start, start if ring is not None else None, answered, ended, ring,
        None if ring is None else int(ring // 5) + 1, within, answered_by, disposition, after_hours, talk, probe,
        stage, "13900139000" if stage == "mobile" else None, holder, stage == "mobile", wait, mobile_ring,
        mobile_within)
    if answered is not None and not probe:  # the leg of the person who answered
        endpoint = "carrier" if stage == "mobile" else answered_by or ""
        await add_leg(conn, linkedid, f"{linkedid}.1", endpoint, start, answered, ended, stage=stage)


async def add_leg(conn: asyncpg.Connection, linkedid: str, uniqueid: str, endpoint: str, dialled: datetime,
                  answered: datetime | None, ended: datetime, *, stage: str | None = None,
                  transfer_kind: str | None = None, transferred_by: str | None = None) -> None:
    """One leg of a call: `endpoint` dialled at `dialled`, answered (or not), ended; its talk follows."""
    talk = (ended - answered).total_seconds() if answered is not None else None
    await conn.execute(
        """INSERT INTO call_legs (linkedid, uniqueid, channel, endpoint, dial_started_at, ring_started_at, answered_at,
               ended_at, dial_status, stage, transfer_kind, transferred_by, talk_seconds)
           VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, $12)""",
        linkedid, uniqueid, f"PJSIP/{endpoint}-{uniqueid}", endpoint, dialled, answered, ended,
        "ANSWER" if answered is not None else "NOANSWER", stage, transfer_kind, transferred_by, talk)


async def add_violation(conn: asyncpg.Connection, kind: str, linkedid: str | None, at: str,
                        details: str = "{}") -> None:
    """A recorded rule breach at Shanghai time `at`."""
    await conn.execute("INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ($1, $2, $3, $4)",
                       kind, linkedid, local(at), details)
