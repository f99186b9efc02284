"""The routing state the dialplan reads: open or closed now, the duty mobile and who holds it,
and a heartbeat so the dialplan can tell when it is stale.

pbx-bridge publishes it as dialplan globals (AMI Setvar, which needs only the `call` class;
AstDB's DBPut would need `system`, which also lets Originate run shell commands) at start,
after every AMI login, at every open/closed boundary, and every `state_refresh_seconds`. If
pbx-bridge stops, the heartbeat ages and the dialplan falls back to the static schedule
generated from the same configuration (`pbx-bridge dialplan`); after an Asterisk restart the
globals are unset, which the dialplan treats the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta, tzinfo

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.ami.client import AmiClient, AmiError, set_global
from pbx_bridge.config import DutySettings
from pbx_bridge.dialplan import b64
from pbx_bridge.metrics import Metrics
from pbx_bridge.schedule import DaySchedule, Override, Schedule, parse_hours
from pbx_bridge.storage.presence import current_presence
from pbx_bridge.storage.settings import publish_open_hours

log = structlog.get_logger("pbx_bridge.routing")

STATE_GLOBALS = {"open": "HOTLINE_STATE_OPEN", "mobile": "HOTLINE_STATE_MOBILE",
                 "holder_b64": "HOTLINE_STATE_HOLDER_B64", "phones": "HOTLINE_STATE_PHONES",
                 "first": "HOTLINE_STATE_FIRST", "updated": "HOTLINE_STATE_UPDATED"}
FAKE_NOW_ENV = "PBX_BRIDGE_FAKE_NOW"


class Clock:
    """Business time: the wall clock, or (for tests only) a clock started at $PBX_BRIDGE_FAKE_NOW."""

    def __init__(self, start: datetime | None = None) -> None:
        self._offset = (start - datetime.now(UTC)) if start is not None else timedelta(0)
        self.faked = start is not None

    @classmethod
    def from_environment(cls) -> Clock:
        """Honour PBX_BRIDGE_FAKE_NOW (ISO 8601 with offset), loudly."""
        raw = os.environ.get(FAKE_NOW_ENV)
        if not raw:
            return cls()
        start = datetime.fromisoformat(raw)
        if start.tzinfo is None:
            raise ValueError(f"{FAKE_NOW_ENV} needs a UTC offset, e.g. 2026-11-24T09:30:00+08:00")
        log.warning("clock_faked_for_testing", starts_at=start.isoformat(), variable=FAKE_NOW_ENV)
        return cls(start)

    def now(self) -> datetime:
        """The current business time (aware, UTC)."""
        return datetime.now(UTC) + self._offset

    def business(self, real: datetime) -> datetime:
        """A real moment (e.g. an event's timestamp) on the business clock."""
        return real + self._offset


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Where hotline calls go right now."""

    open: bool
    mobile: str | None
    holder: str
    reason: str
    signed_in: tuple[str, ...] = ()  # [presence] agents signed in, in ring order (none: presence off)
    first: str | None = None  # [ring] strategy fair: the agent who rings alone for the first ring period


def routing_state(schedule: Schedule, now: datetime, duty: DutySettings,
                  rostered: tuple[str, str] | None) -> RoutingState:
    """Open or closed at `now`, and the duty mobile: the roster's, else the configured one."""
    holder, mobile = rostered if rostered is not None else (duty.holder, duty.mobile)
    if mobile is not None and not duty.mobile_allowed(mobile):
        # The roster table is also written outside the API: a bad number is never published.
        log.error("duty_mobile_invalid", mobile=repr(mobile), pattern=duty.mobile_pattern,
                  fallback=duty.mobile, holder=holder)
        holder, mobile = duty.holder, duty.mobile
    day = schedule.day(now.astimezone(schedule.zone).date())
    return RoutingState(open=schedule.is_open(now), mobile=mobile, holder=holder or "", reason=day.reason)


async def rostered_duty(conn: asyncpg.Connection, now: datetime) -> tuple[str, str] | None:
    """(holder, mobile) of the roster entry covering `now`, the latest-starting one if several."""
    row = await conn.fetchrow(
        "SELECT holder, mobile FROM duty_roster WHERE starts_at <= $1 AND ends_at > $1 "
        "ORDER BY starts_at DESC, id DESC LIMIT 1", now)
    return (row["holder"], row["mobile"]) if row is not None else None


async def database_overrides(conn: asyncpg.Connection, around: date) -> list[Override]:
    """Schedule overrides stored in the database from a week before `around` on; bad rows are
    logged and skipped, never fatal."""
    rows = await conn.fetch("SELECT day, hours, reason FROM schedule_overrides WHERE day >= $1 ORDER BY day",
                            around - timedelta(days=7))
    overrides = []
    for row in rows:
        try:
            overrides.append(Override(row["day"], parse_hours(list(row["hours"])), f"{row['reason']} (database)"))
        except ValueError as exc:
            log.error("schedule_override_invalid", day=row["day"].isoformat(), error=str(exc))
    return overrides


def fairest(available: Sequence[str], answered: dict[str, tuple[int, datetime]]) -> str:
    """The available agent who answered the fewest calls today; ties: the one idle longest (whose
    last answered call ended first; never answered: first of all), then the configured order. Pure."""
    never = datetime.min.replace(tzinfo=UTC)
    return min(available, key=lambda agent: (answered.get(agent, (0, never))[0],
                                             answered.get(agent, (0, never))[1], available.index(agent)))


async def answered_today(conn: asyncpg.Connection, agents: Sequence[str], day: date,
                         zone: tzinfo) -> dict[str, tuple[int, datetime]]:
    """Calls each agent answered on local `day` (customer calls of this PBX), and when the last one ended."""
    start = datetime.combine(day, datetime.min.time(), zone).astimezone(UTC)
    rows = await conn.fetch(
        "SELECT answered_by, count(*) AS calls, max(ended_at) AS last FROM calls WHERE pbx = session_pbx() "
        "AND answered_by = ANY($1::text[]) AND started_at >= $2 AND started_at < $3 AND NOT is_probe "
        "AND ended_at IS NOT NULL GROUP BY answered_by",
        list(agents), start, start + timedelta(days=1))
    return {row["answered_by"]: (int(row["calls"]), row["last"]) for row in rows}


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class RoutingPublisher:
    """Keeps the AstDB routing state fresh; one owned task (`run`), plus `publish` on AMI login."""

    name = "routing"  # its task's name (lifecycle.Service)

    def __init__(self, ami: AmiClient, schedule: Schedule, duty: DutySettings, clock: Clock, connect: Connect,
                 refresh_seconds: float, metrics: Metrics, presence_agents: Sequence[str] = (),
                 fair: bool = False) -> None:
        self._ami = ami
        self._fair = fair and len(presence_agents) > 1
        self._answered: dict[str, tuple[int, datetime]] = {}  # agent: (calls answered today, last answer's end)
        self._answered_day: date | None = None
        self._nudge = asyncio.Event()
        self._agents = tuple(presence_agents)
        self._signed_out: frozenset[str] = frozenset()  # last known (the database may be down)
        self._schedule = schedule
        self._duty = duty
        self._clock = clock
        self._connect = connect
        self._refresh = refresh_seconds
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._warned_calendar_on: str | None = None
        self._db_overrides: list[Override] = []
        self._open_hours_published: tuple[date, tuple[DaySchedule, ...]] | None = None
        self._effective = schedule
        self.current: RoutingState | None = None
        self.published_at: float | None = None

    @property
    def effective(self) -> Schedule:
        """The schedule as last published: configuration plus the database's overrides."""
        return self._effective

    def stop(self) -> None:
        """Make `run` return."""
        self._stopping.set()
        self._nudge.set()

    def note_answered(self, agent: str, ended_at: datetime) -> None:
        """A call `agent` answered has ended ([ring] strategy fair): count it and publish soon, so
        the next call rings the fairest agent first."""
        if not self._fair or agent not in self._agents:
            return
        count, _ = self._answered.get(agent, (0, ended_at))
        self._answered[agent] = (count + 1, ended_at)
        log.info("answer_counted", agent=agent, answered_today=count + 1)
        self._nudge.set()

    async def run(self) -> None:
        """Publish whenever connected: at each boundary and every refresh interval."""
        while not self._stopping.is_set():
            if not self._ami.connected.is_set():
                await self._wait(1.0)
                continue
            try:
                await self.publish()
            except AmiError as exc:
                log.warning("routing_state_not_published", error=str(exc))
                await self._wait(2.0)
                continue
            now = self._clock.now()
            boundary = self._effective.next_boundary(now)
            until_boundary = (boundary - now).total_seconds() + 0.05 if boundary else self._refresh
            await self._wait(max(0.05, min(self._refresh, until_boundary)))

    async def publish(self, announce: bool = False) -> RoutingState:
        """Compute the state now and write it as dialplan globals (open, mobile, holder, heartbeat).

        Logs `routing_state_published` when the state changed, or always with `announce` (after a
        login: Asterisk may have restarted and forgotten it)."""
        now = self._clock.now()
        rostered, overrides = await self._from_database(now)
        self._effective = self._schedule.with_overrides(overrides)
        state = routing_state(self._effective, now, self._duty, rostered)
        state = replace(state, signed_in=tuple(a for a in self._agents if a not in self._signed_out))
        if self._fair and len(state.signed_in) > 1:
            state = replace(state, first=fairest(state.signed_in, self._answered))
        self._warn_if_calendar_missing(now)
        # The heartbeat last: the dialplan trusts the other values only once it is fresh.
        # Nobody signed in (presence off, or all out while closed): "" makes the dialplan ring the
        # site's whole group, so the line is never left uncovered.
        phones = "&".join(f"PJSIP/{agent}" for agent in state.signed_in)
        for key, value in (("open", "1" if state.open else "0"), ("mobile", state.mobile or ""),
                           ("holder_b64", b64(state.holder)), ("phones", phones), ("first", state.first or ""),
                           ("updated", str(int(time.time())))):
            await set_global(self._ami, STATE_GLOBALS[key], value)
        if announce or state != self.current:
            log.info("routing_state_published", after_login=announce, open=state.open, mobile=state.mobile,
                     signed_in=list(state.signed_in) if self._agents else None, first=state.first,
                     holder=state.holder, reason=state.reason,
                     business_time=now.astimezone(self._schedule.zone).isoformat())
        self.current = state
        self.published_at = time.monotonic()
        self._metrics.hotline_open.set(1 if state.open else 0)
        return state

    async def _from_database(self, now: datetime) -> tuple[tuple[str, str] | None, list[Override]]:
        """The roster entry and the schedule overrides; (None, last known) if the database is down."""
        try:
            conn = await within(self._connect(), 5)
            try:
                rostered = await rostered_duty(conn, now)
                self._db_overrides = await database_overrides(conn, now.astimezone(self._schedule.zone).date())
                if self._agents:
                    self._signed_out = frozenset(
                        p.agent for p in await current_presence(conn, self._agents) if p.signed_out_at is not None)
                today = now.astimezone(self._schedule.zone).date()
                await self._publish_open_hours(conn, today)
                if self._fair and self._answered_day != today:  # at start and each new day; then counted live
                    self._answered = await answered_today(conn, self._agents, today, self._schedule.zone)
                    self._answered_day = today
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("routing_database_unavailable", error=str(exc) or type(exc).__name__,
                        fallback_mobile=self._duty.mobile, overrides="last known")
            return None, self._db_overrides
        return rostered, self._db_overrides

    async def _publish_open_hours(self, conn: asyncpg.Connection, today: date) -> None:
        """Record the days' effective hours for the views (signed-in time) when they may have changed."""
        schedule = self._schedule.with_overrides(self._db_overrides)
        seen = (today, tuple(schedule.day(today + timedelta(days=n)) for n in range(-7, 2)))
        if seen != self._open_hours_published:
            await publish_open_hours(conn, schedule, today)
            self._open_hours_published = seen

    def _warn_if_calendar_missing(self, now: datetime) -> None:
        today = now.astimezone(self._schedule.zone).date()
        self._metrics.calendar_known.set(1 if self._effective.day(today).calendar_known else 0)
        if not self._effective.day(today).calendar_known and self._warned_calendar_on != today.isoformat():
            self._warned_calendar_on = today.isoformat()
            log.error("holiday_calendar_missing_year", year=today.year,
                      effect="weekly hours only: statutory holidays and 调休 are not applied",
                      fix="upgrade the chinesecalendar package")

    async def _wait(self, seconds: float) -> None:
        await wait_set(self._nudge, seconds)
        self._nudge.clear()
