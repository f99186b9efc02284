"""The configuration values the SQL views read (`bridge_settings`), kept equal to the TOML file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.backoff import Backoff
from pbx_bridge.config import Settings
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
