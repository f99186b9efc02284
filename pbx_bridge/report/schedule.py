"""The daemon's daily mailing of yesterday's report, recorded in report_deliveries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import date, datetime, time, tzinfo

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.config import ReportSettings, SmtpSettings
from pbx_bridge.report.mail import compose_email, send_email
from pbx_bridge.report.model import ReportError
from pbx_bridge.report.queries import build_report, default_day
from pbx_bridge.routing import Clock

log = structlog.get_logger("pbx_bridge.report")

# ---------------------------------------------------------------------------------------------
# The daemon's daily mailing

RETRIED = (ReportError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class DailyReportScheduler:
    """Mails yesterday's report once a day from [report] daily_at (local time), recorded in report_deliveries.

    A day with a row in report_deliveries is never mailed again (a restart does not resend); a
    daemon that was down at daily_at mails when it comes back, the same day. A failure is logged
    and retried at the next check. Without recipients it does nothing.
    """

    name = "daily-report"  # its task's name (lifecycle.Service)

    def __init__(self, report: ReportSettings, smtp: SmtpSettings, zone: tzinfo, clock: Clock,
                 connect: Callable[[], Awaitable[asyncpg.Connection]], check_interval: float = 60.0,
                 ring_limit_seconds: float = 15.0) -> None:
        self._report = report
        self._smtp = smtp
        self._ring_limit = ring_limit_seconds
        self._zone = zone
        self._clock = clock
        self._connect = connect
        self._interval = check_interval
        hour, minute = (int(part) for part in report.daily_at.split(":"))
        self._due = time(hour, minute)
        self._stop = asyncio.Event()
        self._last_sent_day: date | None = None
        self._last_error: str | None = None
        self._unrecorded: tuple[date, datetime, list[str]] | None = None  # mailed, not yet in report_deliveries

    @property
    def last_sent_day(self) -> date | None:
        """The latest day whose report this process mailed or found already mailed."""
        return self._last_sent_day

    @property
    def last_error(self) -> str | None:
        """Why the latest attempt failed; None once a report went out."""
        return self._last_error

    def stop(self) -> None:
        """Make `run` return at its next wait."""
        self._stop.set()

    async def run(self) -> None:
        """Check every `check_interval` seconds until stopped."""
        if not self._report.recipients:
            log.info("daily_report_off", reason="no [report] recipients")
            return
        while not self._stop.is_set():
            try:
                await self.check()
            except Exception as exc:  # a report bug must not stop call recording: seen, retried
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("daily_report_crashed", retry_in_seconds=self._interval)
            await wait_set(self._stop, self._interval)

    async def check(self) -> date | None:
        """One check: mail yesterday's report if it is due and not mailed yet; the day mailed, or None."""
        now = self._clock.now()
        if not self._report.recipients or now.astimezone(self._zone).time() < self._due:
            return None
        day = default_day(now, self._zone)
        if self._unrecorded is not None:
            await self._record_pending()
        if self._last_sent_day == day:
            return None
        recipients = list(self._report.recipients)
        try:
            conn = await self._connect()
            try:
                if await conn.fetchval(
                        "SELECT EXISTS (SELECT FROM report_deliveries WHERE pbx = session_pbx() AND day = $1)", day):
                    self._last_sent_day = day
                    return None
                report = await build_report(conn, day, generated_at=now, ring_limit_seconds=self._ring_limit)
            finally:
                await conn.close()
            message = await asyncio.to_thread(compose_email, report, self._smtp, recipients, self._report.format)
            await send_email(self._smtp, message)
        except RETRIED as exc:
            self._last_error = str(exc) or type(exc).__name__
            log.error("daily_report_failed", day=day.isoformat(), error=self._last_error,
                      retry_in_seconds=self._interval)
            return None
        self._last_sent_day = day
        self._last_error = None
        log.info("daily_report_sent", day=day.isoformat(), recipients=len(recipients))
        self._unrecorded = (day, now, recipients)
        await self._record_pending()
        return day

    async def _record_pending(self) -> None:
        """Write the mailed day to report_deliveries; kept for the next check if the database fails."""
        assert self._unrecorded is not None
        day, sent_at, recipients = self._unrecorded
        try:
            conn = await self._connect()
            try:
                await conn.execute(
                    "INSERT INTO report_deliveries (day, sent_at, recipients) VALUES ($1, $2, $3) "
                    "ON CONFLICT (pbx, day) DO NOTHING", day, sent_at, recipients)
            finally:
                await conn.close()
        except RETRIED as exc:
            log.error("daily_report_not_recorded", day=day.isoformat(), error=str(exc) or type(exc).__name__)
            return
        self._unrecorded = None
