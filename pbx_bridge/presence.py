"""The presence desk: answers agents' feature codes (sign out for a break, back in, state) from the database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Final

import asyncpg
import structlog

from pbx_bridge.aio import within
from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.schedule import parse_hours
from pbx_bridge.storage.presence import (
    AlreadyInStateError,
    LastAgentError,
    PresenceError,
    UnknownAgentError,
    current_presence,
    periods_since,
    record_break_over_limit,
    sign_in,
    sign_out,
)
from pbx_bridge.tracker import PresenceRequest

log = structlog.get_logger("pbx_bridge.presence")

Connect = Callable[[], Awaitable[asyncpg.Connection]]
MAX_WAITING: Final = 1_000  # requests queued at most (each is a phone waiting up to 3 s)
BREAK_CHECK_SECONDS: Final = 60.0  # the break limits are looked at least this often (and at each crossing)


def break_limit_reached_at(periods: Sequence[tuple[datetime, datetime | None]], day_start: datetime,
                           day_end: datetime, limit: timedelta,
                           free: Sequence[tuple[datetime, datetime]] = ()) -> datetime | None:
    """When a day's signed-out time (periods clipped to [day_start, day_end); an open period runs
    on; time inside the `free` windows, e.g. lunch, not counted) reaches `limit`; None if it does
    not that day. Pure."""
    spent = timedelta(0)
    for signed_out, signed_in in sorted(periods, key=lambda p: p[0]):
        for start, end in _counted(max(signed_out, day_start), min(signed_in or day_end, day_end), free):
            if spent + (end - start) >= limit:
                return start + (limit - spent)
            spent += end - start
    return None


def _counted(start: datetime, end: datetime,
             free: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """[start, end) without the free windows, in order."""
    pieces = [(start, end)] if end > start else []
    for free_start, free_end in sorted(free):
        pieces = [part for a, b in pieces
                  for part in ((a, min(b, free_start)), (max(a, free_end), b)) if part[1] > part[0]]
    return sorted(pieces)


def lunch_windows(windows: Sequence[str], day: date, zone: tzinfo) -> list[tuple[datetime, datetime]]:
    """The configured local lunch windows ('HH:MM-HH:MM') of `day`, as UTC moments."""
    out = []
    for interval in parse_hours(windows):
        start = datetime.combine(day, interval.start, zone)
        end = datetime.combine(day, interval.end, zone) if interval.end else datetime.combine(
            day + timedelta(days=1), time(0), zone)
        out.append((start.astimezone(UTC), end.astimezone(UTC)))
    return out


class PresenceDesk:
    """One owned task (`run`): each agent's feature code is decided in the database (the last
    agent signed in during open hours may not sign out), answered on the waiting channel
    (Setvar PRESENCE_RESULT), and a change republishes the group the dialplan rings."""

    name = "presence"  # its task's name (lifecycle.Service)

    def __init__(self, ami: AmiClient, connect: Connect, agents: Sequence[str], is_open: Callable[[], bool],
                 republish: Callable[[], Awaitable[object]], alert: Callable[[dict[str, Any]], None], *,
                 zone: tzinfo = UTC, break_minutes: float = 30.0, lunch: Sequence[str] = (),
                 on_break_over: Callable[[str], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._ami = ami
        self._zone = zone
        self._break_limit = timedelta(minutes=break_minutes)
        self._lunch = tuple(lunch)
        self._on_break_over = on_break_over
        self._clock = clock
        self._reported: set[tuple[str, str]] = set()  # (agent, local day) breaches recorded
        self._connect = connect
        self._agents = tuple(agents)
        self._is_open = is_open
        self._republish = republish
        self._alert = alert
        self._queue: asyncio.Queue[PresenceRequest | None] = asyncio.Queue()

    def submit(self, request: PresenceRequest) -> None:
        """Take a request from the tracker; never blocks (beyond MAX_WAITING the phone hears
        "unavailable" when its 3 s pass)."""
        if self._queue.qsize() >= MAX_WAITING:
            log.warning("presence_request_dropped", agent=request.agent, reason="too many waiting")
            return
        self._queue.put_nowait(request)

    def stop(self) -> None:
        """Make `run` return after the requests already queued."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        """Answer requests in order until stopped; between them, watch the day's break limits."""
        while True:
            wait = await self.check_breaks()
            try:
                async with asyncio.timeout(wait):
                    request = await self._queue.get()
            except TimeoutError:
                continue
            if request is None:
                return
            await self.handle(request)

    async def check_breaks(self) -> float:
        """Record a `break_over_limit` for each agent whose signed-out time today has reached
        [presence] break_minutes_per_day (once per agent and local day, at the moment it passed);
        return the seconds until the next check (the next crossing, at most a minute)."""
        now = self._clock()
        local = now.astimezone(self._zone)
        day_start = datetime.combine(local.date(), time(0), self._zone).astimezone(UTC)
        day_end = day_start + timedelta(days=1)
        day = local.date().isoformat()
        try:
            conn = await within(self._connect(), 2)
            try:
                periods = await periods_since(conn, self._agents, day_start)
                wait = BREAK_CHECK_SECONDS
                for agent, agent_periods in periods.items():
                    crossing = break_limit_reached_at(agent_periods, day_start, day_end, self._break_limit,
                                                      lunch_windows(self._lunch, local.date(), self._zone))
                    if crossing is None or (agent, day) in self._reported:
                        continue
                    if crossing > now:
                        wait = min(wait, (crossing - now).total_seconds() + 0.05)
                        continue
                    self._reported.add((agent, day))
                    limit_minutes = self._break_limit.total_seconds() / 60
                    if await record_break_over_limit(conn, agent, day, crossing, limit_minutes):
                        self._break_over(agent, day, crossing)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("break_limits_not_checked", error=str(exc) or type(exc).__name__)
            return 30.0
        self._reported = {(a, d) for a, d in self._reported if d == day}
        return max(0.05, wait)

    def _break_over(self, agent: str, day: str, at: datetime) -> None:
        minutes = self._break_limit.total_seconds() / 60
        log.error("policy_violation", kind="break_over_limit", agent=agent, day=day, occurred_at=at.isoformat(),
                  limit_minutes=minutes)
        if self._on_break_over is not None:
            self._on_break_over(agent)
        self._alert({"service": "pbx-bridge", "kind": "break_over_limit", "agent": agent, "day": day,
                     "occurred_at": at.isoformat(), "limit_minutes": minutes})

    async def handle(self, request: PresenceRequest) -> str | None:
        """Decide one request and answer it; returns what the phone was told, one of the extensions
        of [hotline-presence-said] in dialplan/extensions.conf (None: nothing, the database failed,
        and the phone hears "unavailable")."""
        try:
            result, changed = await within(self._decide(request), 2.5)
        except (OSError, TimeoutError, asyncpg.PostgresError, PresenceError) as exc:
            log.warning("presence_not_decided", agent=request.agent, action=request.action,
                        error=str(exc) or type(exc).__name__)
            return None
        try:
            await self._ami.send_action({"Action": "Setvar", "Channel": request.channel,
                                         "Variable": "PRESENCE_RESULT", "Value": result})
        except AmiError as exc:
            log.warning("presence_not_answered", agent=request.agent, error=str(exc))
        if changed:
            try:
                await self._republish()
            except AmiError as exc:  # the routing loop publishes again within its refresh
                log.warning("presence_not_republished", error=str(exc))
        return result

    async def _decide(self, request: PresenceRequest) -> tuple[str, bool]:
        conn = await self._connect()
        try:
            agent = request.agent
            if request.action == "status":
                state = {p.agent: p for p in await current_presence(conn, self._agents)}.get(agent)
                if state is None:
                    return "unknown_agent", False
                return ("is_out" if state.signed_out_at is not None else "is_in"), False
            try:
                if request.action == "out":
                    await sign_out(conn, agent, request.at, reason="", set_by="phone", actor=agent,
                                   agents=self._agents, open_now=self._is_open())
                    log.info("agent_signed_out", agent=agent, set_by="phone")
                    return "signed_out", True
                await sign_in(conn, agent, request.at, set_by="phone", actor=agent, agents=self._agents)
                log.info("agent_signed_in", agent=agent, set_by="phone")
                return "signed_in", True
            except UnknownAgentError:
                return "unknown_agent", False
            except AlreadyInStateError:
                return "already", False
            except LastAgentError:
                log.error("last_agent_sign_out_refused", agent=agent,
                          effect="refused: the hotline would be left with nobody to answer")
                self._alert({"service": "pbx-bridge", "kind": "last_agent_sign_out_refused", "agent": agent,
                             "at": request.at.isoformat()})
                return "last_agent", False
        finally:
            await conn.close()
