"""Business hours: weekly hours, China's statutory holidays and adjusted working days (调休),
and local overrides, resolved per local business day. Pure: the caller supplies the time."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
SEARCH_DAYS = 400  # how far next_boundary looks ahead


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    """Open from `start` (inclusive) to `end` (exclusive), local wall-clock time; end may be 24:00."""

    start: time
    end: time | None  # None = midnight at the end of the day

    @classmethod
    def parse(cls, text: str) -> Interval:
        """'09:00-12:00' -> Interval; raises ValueError with the reason."""
        match = HOURS.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not HH:MM-HH:MM")
        sh, sm, eh, em = (int(g) for g in match.groups())
        if eh == 24 and em != 0:
            raise ValueError(f"{text!r}: the end can be at most 24:00")
        start, end = time(sh, sm), (None if eh == 24 else time(eh, em))
        if end is not None and end <= start:
            raise ValueError(f"{text!r} ends before it starts")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{'24:00' if self.end is None else format(self.end, '%H:%M')}"


@dataclass(frozen=True, slots=True)
class DayVerdict:
    """What the holiday calendar says about a date: a working day or not, and why."""

    workday: bool
    name: str | None = None  # e.g. the holiday's name


class HolidayCalendar(Protocol):
    """Statutory holidays and adjusted working days; None when the year has no data."""

    def verdict(self, day: date) -> DayVerdict | None: ...


class NoHolidays:
    """A calendar without holidays (weekly hours only)."""

    def verdict(self, day: date) -> DayVerdict | None:
        return None


class ChinaCalendar:
    """China's statutory holidays and 调休 working days, from the `chinesecalendar` package."""

    def verdict(self, day: date) -> DayVerdict | None:
        import chinese_calendar  # type: ignore[import-untyped]

        try:
            workday = bool(chinese_calendar.is_workday(day))
            _, name = chinese_calendar.get_holiday_detail(day)
        except NotImplementedError:  # no data for that year yet
            return None
        return DayVerdict(workday=workday, name=name)

    def covers(self, year: int) -> bool:
        """Whether the package has data for `year` (new years arrive with package updates)."""
        return self.verdict(date(year, 6, 1)) is not None


@dataclass(frozen=True, slots=True)
class DaySchedule:
    """The effective opening hours of one local day, and the reason for them."""

    day: date
    intervals: tuple[Interval, ...]
    reason: str
    calendar_known: bool

    def describe(self) -> str:
        hours = ", ".join(map(str, self.intervals)) or "closed all day"
        return f"{self.day:%Y-%m-%d %a}: {hours} ({self.reason})"


def parse_hours(items: Sequence[str]) -> tuple[Interval, ...]:
    """Parse and check a list of 'HH:MM-HH:MM'; they must not overlap."""
    intervals = tuple(sorted(Interval.parse(item) for item in items))
    for before, after in itertools.pairwise(intervals):
        if before.end is None or after.start < before.end:
            raise ValueError(f"{before} and {after} overlap")
    return intervals


@dataclass(frozen=True, slots=True)
class Override:
    """A local exception for one date: other hours (empty = closed)."""

    day: date
    intervals: tuple[Interval, ...]
    reason: str


class Schedule:
    """The effective business-hours schedule in one time zone."""

    def __init__(self, weekly: Mapping[str, tuple[Interval, ...]], adjusted_workday: tuple[Interval, ...],
                 calendar: HolidayCalendar, overrides: Sequence[Override], zone: ZoneInfo) -> None:
        self._weekly = {day: weekly.get(day, ()) for day in WEEKDAYS}
        self._adjusted = adjusted_workday
        self._calendar = calendar
        self._overrides = {o.day: o for o in overrides}
        self.zone = zone

    def with_overrides(self, overrides: Sequence[Override]) -> Schedule:
        """The same schedule with more overrides (later ones win for the same date)."""
        merged = {**self._overrides, **{o.day: o for o in overrides}}
        return Schedule(self._weekly, self._adjusted, self._calendar, list(merged.values()), self.zone)

    def day(self, day: date) -> DaySchedule:
        """The hours that apply on `day`, and why."""
        override = self._overrides.get(day)
        verdict = self._calendar.verdict(day)
        known = verdict is not None or isinstance(self._calendar, NoHolidays)
        if override is not None:
            return DaySchedule(day, override.intervals, f"override: {override.reason}", known)
        weekly = self._weekly[WEEKDAYS[day.weekday()]]
        if verdict is None:
            reason = "weekly hours" if known else f"weekly hours (no holiday data for {day.year})"
            return DaySchedule(day, weekly, reason, known)
        if verdict.workday and not weekly:
            return DaySchedule(day, self._adjusted, f"adjusted working day (调休{_named(verdict)})", True)
        if not verdict.workday and weekly:
            return DaySchedule(day, (), f"statutory holiday{_named(verdict)}", True)
        return DaySchedule(day, weekly, "weekly hours", True)

    def is_open(self, at: datetime) -> bool:
        """Whether the hotline is in business hours at the moment `at` (aware datetime)."""
        local = at.astimezone(self.zone)
        now = local.time()
        return any(i.start <= now and (i.end is None or now < i.end) for i in self.day(local.date()).intervals)

    def next_boundary(self, at: datetime) -> datetime | None:
        """The next moment after `at` when the open/closed state changes (None if never within a year)."""
        local = at.astimezone(self.zone)
        state = self.is_open(at)
        for offset in range(SEARCH_DAYS):
            day = local.date() + timedelta(days=offset)
            for moment in self._edges(day):
                if moment > at and self.is_open(moment) != state:
                    return moment
        return None

    def _edges(self, day: date) -> list[datetime]:
        edges = {datetime.combine(day, time(0), self.zone)}
        for interval in self.day(day).intervals:
            edges.add(datetime.combine(day, interval.start, self.zone))
            end = (datetime.combine(day + timedelta(days=1), time(0), self.zone) if interval.end is None
                   else datetime.combine(day, interval.end, self.zone))
            edges.add(end)
        return sorted(edges)


def _named(verdict: DayVerdict) -> str:
    return f": {verdict.name}" if verdict.name else ""
