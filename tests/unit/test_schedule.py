"""Business hours in Asia/Shanghai: weekly hours, lunch gap, holidays, 调休, overrides, edges."""

from __future__ import annotations

from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from pbx_bridge.config import ConfigError, DutySettings, HoursSettings, OverrideSettings, load_settings
from pbx_bridge.routing import routing_state
from pbx_bridge.schedule import ChinaCalendar, Interval, NoHolidays, Override, parse_hours

SH = ZoneInfo("Asia/Shanghai")
SCHEDULE = HoursSettings().schedule(SH)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=SH)


@pytest.mark.parametrize(("moment", "open_"), [
    ("2026-11-24 08:59:59", False),  # Tuesday before opening
    ("2026-11-24 09:00:00", True),
    ("2026-11-24 09:30:00", True),
    ("2026-11-24 11:59:59", True),
    ("2026-11-24 12:00:00", False),  # lunch gap is closed
    ("2026-11-24 12:30:00", False),
    ("2026-11-24 13:00:00", True),
    ("2026-11-24 17:29:00", True),
    ("2026-11-24 17:30:00", False),
    ("2026-11-24 17:31:00", False),
    ("2026-11-24 23:59:59", False),
    ("2026-11-28 10:00:00", False),  # Saturday
    ("2026-10-01 10:00:00", False),  # National Day, a Thursday
    ("2026-10-08 10:00:00", True),   # back to work
    ("2026-10-10 10:00:00", True),   # Saturday made a working day (调休)
    ("2026-02-14 10:00:00", True),   # Saturday 调休 before Spring Festival
    ("2026-02-16 10:00:00", False),  # Spring Festival, a Monday
])
def test_is_open(moment: str, open_: bool) -> None:
    assert SCHEDULE.is_open(at(moment)) is open_


def test_the_time_zone_is_shanghai_not_utc() -> None:
    # 01:30 UTC is 09:30 in Shanghai (no DST there, ever)
    assert SCHEDULE.is_open(datetime(2026, 11, 24, 1, 30, tzinfo=ZoneInfo("UTC")))
    assert not SCHEDULE.is_open(datetime(2026, 11, 24, 9, 30, tzinfo=ZoneInfo("UTC")))  # 17:30 local


def test_reasons_name_the_holiday_and_the_adjusted_day() -> None:
    assert "statutory holiday: National Day" in SCHEDULE.day(date(2026, 10, 1)).reason
    assert "adjusted working day (调休: National Day)" in SCHEDULE.day(date(2026, 10, 10)).reason
    assert SCHEDULE.day(date(2026, 11, 24)).reason == "weekly hours"


def test_next_boundary_across_lunch_evening_weekend_and_holiday() -> None:
    assert SCHEDULE.next_boundary(at("2026-11-24 09:30:00")) == at("2026-11-24 12:00:00")
    assert SCHEDULE.next_boundary(at("2026-11-24 12:30:00")) == at("2026-11-24 13:00:00")
    assert SCHEDULE.next_boundary(at("2026-11-27 17:30:00")) == at("2026-11-30 09:00:00")  # Fri -> Mon
    assert SCHEDULE.next_boundary(at("2026-09-30 17:30:00")) == at("2026-10-08 09:00:00")  # National Day week


def test_midnight_and_round_the_clock_hours() -> None:
    settings = HoursSettings.model_validate({"calendar": "none", "weekly": {"sat": ["00:00-24:00"]}})
    schedule = settings.schedule(SH)
    assert schedule.is_open(at("2026-11-28 00:00:00")) and schedule.is_open(at("2026-11-28 23:59:59"))
    assert not schedule.is_open(at("2026-11-29 00:00:00"))
    assert schedule.next_boundary(at("2026-11-28 12:00:00")) == at("2026-11-29 00:00:00")


def test_overrides_beat_weekly_hours_and_the_calendar() -> None:
    schedule = HoursSettings(overrides=[
        OverrideSettings(date=date(2026, 12, 31), hours=[], reason="年会"),
        OverrideSettings(date=date(2026, 10, 2), hours=["09:00-12:00"], reason="holiday duty"),
    ]).schedule(SH)
    assert not schedule.is_open(at("2026-12-31 10:00:00"))
    assert schedule.day(date(2026, 12, 31)).reason == "override: 年会"
    assert schedule.is_open(at("2026-10-02 10:00:00")) and not schedule.is_open(at("2026-10-02 14:00:00"))
    later = schedule.with_overrides([Override(date(2026, 11, 29), parse_hours(["09:00-12:00"]), "open day")])
    assert later.is_open(at("2026-11-29 10:00:00"))
    assert not later.is_open(at("2026-12-31 10:00:00"))  # the earlier overrides are kept


def test_a_year_without_holiday_data_falls_back_to_weekly_hours_and_says_so() -> None:
    day = SCHEDULE.day(date(2027, 1, 4))
    assert not ChinaCalendar().covers(2027)
    assert day.calendar_known is False
    assert "no holiday data for 2027" in day.reason
    assert day.intervals == parse_hours(["09:00-12:00", "13:00-17:30"])
    assert HoursSettings(calendar="none").schedule(SH).day(date(2027, 1, 4)).calendar_known
    assert NoHolidays().verdict(date(2026, 10, 1)) is None


@pytest.mark.parametrize(("hours", "message"), [
    (["9:00-12:00"], "is not HH:MM-HH:MM"),
    (["12:00-09:00"], "ends before it starts"),
    (["09:00-12:00", "11:00-13:00"], "overlap"),
    (["24:30-25:00"], "is not HH:MM-HH:MM"),
])
def test_bad_hours_are_refused_with_the_reason(hours: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(hours)


def test_bad_hours_in_the_file_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[ami]\nusername="u"\nsecret="s"\n[database]\ndsn="postgresql://h/d"\n'
                    '[hotline]\nnumbers=["4008001234"]\n[hours.weekly]\ntue=["13:00-12:00"]\n')
    with pytest.raises(ConfigError, match=r"hours\.weekly\.tue: '13:00-12:00' ends before it starts"):
        load_settings(path, environ={})


def test_interval_text_round_trips() -> None:
    assert str(Interval.parse("13:00-17:30")) == "13:00-17:30"
    assert str(Interval.parse("00:00-24:00")) == "00:00-24:00"
    assert Interval.parse("09:00-12:00").start == time(9)


@pytest.mark.parametrize("bad", ["13800138000\n", "1380013800", "+8613800138000", "13800138000;1",
                                 "１３８００１３８０００"])
def test_a_roster_mobile_that_does_not_match_the_pattern_is_never_published(bad: str) -> None:
    """The roster table can be written outside the API: the mobile is checked again at publish time."""
    duty = DutySettings(mobile="13900139000", holder="值班员小王")
    state = routing_state(SCHEDULE, at("2026-11-24 20:00:00"), duty, ("坏人", bad))
    assert (state.mobile, state.holder) == ("13900139000", "值班员小王")
    good = routing_state(SCHEDULE, at("2026-11-24 20:00:00"), duty, ("小李", "13700137000"))
    assert (good.mobile, good.holder) == ("13700137000", "小李")
