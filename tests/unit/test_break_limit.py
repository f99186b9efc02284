"""The daily break limit ([presence] break_minutes_per_day): when a day's signed-out time reaches it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from pbx_bridge.presence import break_limit_reached_at, lunch_windows

DAY = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)  # local midnight in Shanghai
END = DAY + timedelta(days=1)
LIMIT = timedelta(minutes=30)


def at(minutes: float) -> datetime:
    return DAY + timedelta(hours=2, minutes=minutes)


def test_a_31_minute_break_passes_the_limit_at_its_30th_minute() -> None:
    assert break_limit_reached_at([(at(0), at(31))], DAY, END, LIMIT) == at(30)


def test_breaks_add_up_over_the_day() -> None:
    periods = [(at(0), at(20)), (at(60), at(75))]  # 20 min, then 15 min: the limit 10 min into the second
    assert break_limit_reached_at(periods, DAY, END, LIMIT) == at(70)
    assert break_limit_reached_at([(at(0), at(20)), (at(60), at(69))], DAY, END, LIMIT) is None


def test_an_open_break_runs_on() -> None:
    assert break_limit_reached_at([(at(0), at(25)), (at(40), None)], DAY, END, LIMIT) == at(45)


def test_only_the_days_part_of_a_break_counts() -> None:
    before_midnight = DAY - timedelta(minutes=50)
    assert break_limit_reached_at([(before_midnight, DAY + timedelta(minutes=20))], DAY, END, LIMIT) is None
    assert break_limit_reached_at([(before_midnight, DAY + timedelta(minutes=40))], DAY, END, LIMIT) == (
        DAY + timedelta(minutes=30))


def test_time_inside_the_lunch_windows_does_not_count() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    lunch = lunch_windows(["11:30-12:30", "12:30-13:30"], date(2026, 11, 25), zone)
    assert lunch[0] == (datetime(2026, 11, 25, 3, 30, tzinfo=UTC), datetime(2026, 11, 25, 4, 30, tzinfo=UTC))
    # out 11:00-13:00 local: 30 minutes before lunch count, the hour of lunch does not
    out, back = datetime(2026, 11, 25, 3, 0, tzinfo=UTC), datetime(2026, 11, 25, 5, 0, tzinfo=UTC)
    assert break_limit_reached_at([(out, back)], DAY, END, LIMIT, lunch) == out + LIMIT  # at 11:30 exactly
    # out 11:15-13:50: 15 minutes before lunch, 20 after it: the limit 15 minutes after lunch ends
    out, back = datetime(2026, 11, 25, 3, 15, tzinfo=UTC), datetime(2026, 11, 25, 5, 50, tzinfo=UTC)
    assert break_limit_reached_at([(out, back)], DAY, END, LIMIT, lunch) == datetime(2026, 11, 25, 5, 45, tzinfo=UTC)
    assert break_limit_reached_at([(lunch[0][0], lunch[1][1])], DAY, END, LIMIT, lunch) is None  # all lunch
