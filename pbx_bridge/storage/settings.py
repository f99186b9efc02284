"""The values the SQL views read (`bridge_settings`, shared; `open_hours`, per PBX), kept equal to the TOML file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import date, datetime, time, timedelta

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.backoff import Backoff
from pbx_bridge.config import Settings
from pbx_bridge.schedule import DaySchedule, Schedule
from pbx_bridge.storage.migrations import MigrationError

log = structlog.get_logger("pbx_bridge.storage")


async def publish_settings(conn: asyncpg.Connection, settings: Settings) -> None:
    """Write the time zone and the complaint deadline the views and reports use."""
    if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_timezone_names WHERE name = $1)", settings.timezone):
        raise MigrationError(f"timezone: PostgreSQL does not know the time zone {settings.timezone!r}")
    await conn.execute(
        """INSERT INTO bridge_settings (singleton, timezone, complaint_reply_minutes, updated_at)
           VALUES (true, $1, $2, now())
           ON CONFLICT (singleton) DO UPDATE SET timezone = EXCLUDED.timezone,
               complaint_reply_minutes = EXCLUDED.complaint_reply_minutes, updated_at = now()
           WHERE (bridge_settings.timezone, bridge_settings.complaint_reply_minutes)
                 IS DISTINCT FROM (EXCLUDED.timezone, EXCLUDED.complaint_reply_minutes)""",
        settings.timezone, settings.call_sheet.complaint_reply_minutes)


async def keep_settings_published(connect: Callable[[], Awaitable[asyncpg.Connection]], settings: Settings,
                                  stop: asyncio.Event, max_backoff: float = 30.0) -> None:
    """Publish the settings once, retrying while the database is unreachable (the daemon's start)."""
    backoff = Backoff(0.5, max_backoff)
    while not stop.is_set():
        try:
            conn = await connect()
            try:
                await publish_settings(conn, settings)
            finally:
                await conn.close()
            return
        except (OSError, asyncpg.PostgresError) as exc:
            delay = backoff.next_delay()
            log.warning("settings_publish_failed", error=str(exc) or type(exc).__name__, retry_in=round(delay, 1))
            await wait_set(stop, delay)


OPEN_HOURS_UPSERT = """
INSERT INTO open_hours (day, open, reason)
SELECT $1::date,
       coalesce((SELECT range_agg(tstzrange(s, e)) FROM unnest($2::timestamptz[], $3::timestamptz[]) AS u(s, e)),
                '{}'::tstzmultirange),
       $4
ON CONFLICT (pbx, day) DO UPDATE SET open = EXCLUDED.open, reason = EXCLUDED.reason, published_at = now()
 WHERE $5 AND (open_hours.open, open_hours.reason) IS DISTINCT FROM (EXCLUDED.open, EXCLUDED.reason)"""


def open_periods(hours: DaySchedule, schedule: Schedule) -> list[tuple[datetime, datetime]]:
    """A day's open intervals as aware (start, end) moments in the schedule's zone."""
    def at(day: date, moment: time | None) -> datetime:
        return (datetime.combine(day + timedelta(days=1), time(0), schedule.zone) if moment is None
                else datetime.combine(day, moment, schedule.zone))
    return [(at(hours.day, i.start), at(hours.day, i.end)) for i in hours.intervals]


async def publish_open_hours(conn: asyncpg.Connection, schedule: Schedule, today: date,
                             past_days: Iterable[int] = range(1, 8)) -> None:
    """Record the effective opening hours of today and tomorrow (kept current), and of the past
    days given (written only if missing: a past day's hours are history)."""
    days = [(today - timedelta(days=n), False) for n in past_days] + [(today, True), (today + timedelta(days=1), True)]
    for day, replace in days:
        hours = schedule.day(day)
        periods = open_periods(hours, schedule)
        await conn.execute(OPEN_HOURS_UPSERT, day, [s for s, _ in periods], [e for _, e in periods],
                           hours.reason[:200], replace)
