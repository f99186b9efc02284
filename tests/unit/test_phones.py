"""Agents' phones in working order, from AMI events captured in the sandbox: a phone that left the
network (unregistered) and one answering every call BUSY (a handset left off the hook)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pbx_bridge.metrics import Metrics
from pbx_bridge.phones import PhoneWatch
from tests.support.fixtures import fixture_messages

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def watch(clock: Clock, alerts: list[dict[str, Any]], open_now: bool = True,
          signed_in: bool = True) -> PhoneWatch:
    return PhoneWatch(("agent101", "agent102", "agent103"), unreachable_after=timedelta(minutes=2),
                      off_hook_after=timedelta(minutes=5), is_open=lambda: open_now,
                      signed_in=lambda _: signed_in, alert=alerts.append, metrics=Metrics(), clock=clock)


def test_a_phone_off_the_network_for_two_minutes_is_alerted_once_and_cleared() -> None:
    messages = [m for m in fixture_messages("phone_unregistered") if m.event == "ContactStatus"]
    gone = [m for m in messages if m.get("ContactStatus") == "Removed"]
    back = [m for m in messages if m.get("ContactStatus") == "NonQualified"]  # registered again (no qualify)
    assert gone and back and gone[0].get("AOR") == "agent103"
    clock, alerts = Clock(), list[dict[str, Any]]()
    phones = watch(clock, alerts)
    phones.observe(gone[0])
    clock.now += timedelta(minutes=1, seconds=59)
    phones.check()
    assert alerts == [] and phones.status()[0]
    clock.now += timedelta(seconds=2)
    phones.check()
    phones.check()
    assert [(a["kind"], a["phone"]) for a in alerts] == [("phone_unreachable", "agent103")]
    assert phones.status()[0] is False and phones.status()[1]["agent103"]["reachable"] is False
    phones.observe(back[0])
    assert [a["kind"] for a in alerts] == ["phone_unreachable", "phone_reachable_again"]
    assert phones.status()[0]


def test_outside_open_hours_a_phone_away_is_no_alert() -> None:
    [gone] = [m for m in fixture_messages("phone_unregistered") if m.get("ContactStatus") == "Removed"][:1]
    clock, alerts = Clock(), list[dict[str, Any]]()
    phones = watch(clock, alerts, open_now=False)
    phones.observe(gone)
    clock.now += timedelta(hours=1)
    phones.check()
    assert alerts == []


def test_a_phone_busy_on_every_call_for_five_minutes_is_off_the_hook() -> None:
    busy = [m for m in fixture_messages("off_hook_busy")
            if m.event == "DialEnd" and m.get("DestChannel").startswith("PJSIP/agent102-")]
    assert [m.get("DialStatus") for m in busy] == ["BUSY", "BUSY"]
    clock, alerts = Clock(), list[dict[str, Any]]()
    phones = watch(clock, alerts)
    phones.observe(busy[0])
    clock.now += timedelta(minutes=5)
    phones.check()
    assert alerts == []  # one busy call is not a pattern
    phones.observe(busy[1])
    phones.check()
    assert [(a["kind"], a["phone"], a["busy_calls"]) for a in alerts] == [("phone_off_hook", "agent102", 2)]
    signed_out, quiet = Clock(), list[dict[str, Any]]()
    away = watch(signed_out, quiet, signed_in=False)
    for message in busy:
        away.observe(message)
    signed_out.now += timedelta(minutes=6)
    away.check()
    assert quiet == []  # an agent signed out for a break may leave the phone as it likes
