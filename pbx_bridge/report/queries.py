"""Reading the daily report from the supervisor views."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

import asyncpg

from pbx_bridge.report.model import KPI_COLUMNS, DailyReport

# ---------------------------------------------------------------------------------------------
# Reading the views


async def build_report(conn: asyncpg.Connection, day: date, *, generated_at: datetime | None = None,
                       ring_limit_seconds: float = 15.0) -> DailyReport:
    """Read the report of local `day` of the session's PBX from the supervisor views (what role pbx_bridge may SELECT);
    `ring_limit_seconds` ([ring] period_seconds x max_rings) is the line on the ring-time chart."""
    generated_at = generated_at or datetime.now(UTC)
    async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot for every section
        timezone = await conn.fetchval("SELECT timezone FROM bridge_settings LIMIT 1") or "Asia/Shanghai"
        pbx = await conn.fetchval("SELECT session_pbx()")  # the PBX of this session: the one reported
        kpi = await conn.fetchrow(
            """SELECT day, calls, answered, answer_rate_pct, within_ring_limit_pct, avg_ring_seconds,
                      p90_ring_seconds, abandoned, missed, voicemail, unfinished, after_hours_calls,
                      after_hours_mobile_answered,
                      avg_talk_seconds, sheets, sheet_rate_pct, ring_limit_violations, unanswered_violations,
                      outbound_attempt_violations, complaint_overdue_violations
               FROM v_daily_kpi WHERE pbx = session_pbx() AND day = $1""", day)
        agents = await conn.fetch(
            """SELECT agent, duty_mobile, duty_holder, answered, avg_ring_seconds, ring_limit_breaches, talk_seconds,
                      avg_talk_seconds, sheets
               FROM v_agent_daily WHERE pbx = session_pbx() AND day = $1
               ORDER BY answered DESC, duty_mobile, agent""", day)
        violations = await conn.fetch(
            """SELECT occurred, kind, violation, caller_number, caller_name, answered_by, subject, linkedid
               FROM v_violations WHERE pbx = session_pbx() AND day = $1 ORDER BY occurred, id""", day)
        line_health = await conn.fetchrow(
            """SELECT state, state_label, evidence, last_probe_at, last_probe_trigger, last_probe_outcome,
                      last_probe_delay_ms, last_probe_reason, last_ok_probe_at, last_call_at, minutes_since_last_call,
                      probes_ok_today, probes_failed_today
               FROM v_line_health WHERE pbx = session_pbx()""")
        callbacks = await conn.fetch(
            """SELECT called_at, caller_number, caller_name, disposition, result, after_hours, waiting,
                      waiting_minutes, due_calls_from_number, linkedid
               FROM v_callbacks_due WHERE pbx = session_pbx() ORDER BY called_at, linkedid""")
        hourly = await conn.fetch(
            "SELECT hour, calls, answered FROM v_hourly_load WHERE pbx = session_pbx() AND day = $1 ORDER BY hour", day)
        rang = await conn.fetch("SELECT ring_seconds FROM v_call_log WHERE pbx = session_pbx() AND day = $1 "
                                "AND ring_seconds IS NOT NULL", day)
        week = await conn.fetch(
            """SELECT day, calls, answer_rate_pct, within_ring_limit_pct FROM v_daily_kpi
               WHERE pbx = session_pbx() AND day > $1::date - 7 AND day <= $1 ORDER BY day""", day)
    return DailyReport(
        day=day,
        kpi=dict(kpi) if kpi is not None else _no_calls(day),
        agents=tuple(dict(r) for r in agents),
        violations=tuple(dict(r) for r in violations),
        line_health=dict(line_health) if line_health is not None else None,
        callbacks=tuple(dict(r) for r in callbacks),
        generated_at=generated_at,
        timezone=str(timezone),
        pbx=str(pbx),
        hourly=tuple(dict(r) for r in hourly),
        ring_seconds=tuple(float(r["ring_seconds"]) for r in rang),
        week=tuple(dict(r) for r in week),
        ring_limit_seconds=ring_limit_seconds,
    )


def _no_calls(day: date) -> dict[str, Any]:
    """The KPI row of a day without calls or violations: counts 0, rates and averages empty."""
    return {"day": day} | {c.key: 0 if c.kind == "count" else None for c in KPI_COLUMNS}


def default_day(now: datetime, zone: tzinfo) -> date:
    """The day a report is usually about: yesterday in local time (`now` must be aware)."""
    if now.tzinfo is None:
        raise ValueError("default_day needs an aware datetime")
    return now.astimezone(zone).date() - timedelta(days=1)
