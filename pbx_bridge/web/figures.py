"""Today's figures for the wallboard, read from the supervisor views in one snapshot."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from pbx_bridge.web.mask import mask_number

LATEST_VIOLATIONS = 4


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, int | float):
        return value
    return None


def _local(value: datetime | date | None) -> str | None:
    """A view's local timestamp (timestamp without time zone) as text."""
    if value is None:
        return None
    return value.isoformat(sep=" ") if isinstance(value, datetime) else value.isoformat()


async def read_figures(conn: asyncpg.Connection) -> dict[str, Any]:
    """This PBX's today: KPIs (v_daily_kpi), callbacks due (v_callbacks_due), the line (v_line_health)
    and violations (v_violations), "today" in the views' time zone. Callers' numbers are masked."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        today: date = await conn.fetchval(  # as bridge_zone says (which the daemon's role may not read)
            "SELECT (now() AT TIME ZONE coalesce((SELECT timezone FROM bridge_settings LIMIT 1), "
            "'Asia/Shanghai'))::date")
        kpi = await conn.fetchrow(
            """SELECT calls, answered, answer_rate_pct, within_ring_limit_pct, avg_wait_seconds, avg_talk_seconds,
                      sheet_rate_pct
               FROM v_daily_kpi WHERE pbx = session_pbx() AND day = $1""", today)
        callbacks = await conn.fetchrow("SELECT count(*) AS due, max(waiting_minutes) AS oldest_minutes "
                                        "FROM v_callbacks_due WHERE pbx = session_pbx()")
        line = await conn.fetchrow(
            "SELECT state, state_label, last_probe_at, last_probe_trigger, last_probe_outcome, last_ok_probe_at "
            "FROM v_line_health WHERE pbx = session_pbx()")
        kinds = await conn.fetch(
            "SELECT kind, min(violation) AS label, count(*) AS n FROM v_violations "
            "WHERE pbx = session_pbx() AND day = $1 GROUP BY kind ORDER BY n DESC, kind", today)
        latest = await conn.fetch(
            "SELECT occurred, kind, violation, caller_number FROM v_violations WHERE pbx = session_pbx() AND day = $1 "
            "ORDER BY occurred DESC, id DESC LIMIT $2", today, LATEST_VIOLATIONS)
    kpi_fields = ("calls", "answered", "answer_rate_pct", "within_ring_limit_pct", "avg_wait_seconds",
                  "avg_talk_seconds", "sheet_rate_pct")
    return {
        "day": today.isoformat(),
        "kpi": {field: (_number(kpi[field]) if kpi is not None else (0 if field in ("calls", "answered") else None))
                for field in kpi_fields},
        "callbacks": {"due": int(callbacks["due"]) if callbacks else 0,
                      "oldest_minutes": _number(callbacks["oldest_minutes"]) if callbacks else None},
        "line": None if line is None else {
            "state": line["state"], "label": line["state_label"], "last_probe_at": _local(line["last_probe_at"]),
            "last_probe_trigger": line["last_probe_trigger"], "last_probe_outcome": line["last_probe_outcome"],
            "last_ok_probe_at": _local(line["last_ok_probe_at"])},
        "violations": {
            "total": sum(int(r["n"]) for r in kinds),
            "by_kind": [{"kind": r["kind"], "label": r["label"], "count": int(r["n"])} for r in kinds],
            "latest": [{"at": _local(r["occurred"]), "kind": r["kind"], "label": r["violation"],
                        "caller": mask_number(r["caller_number"])} for r in latest],
        },
    }
