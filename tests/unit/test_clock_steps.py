"""Clock steps: the tracker's ticks follow Asterisk's event time, so a step of the daemon's wall
clock either way neither raises nor hides a ring-limit violation, and no tick crashes the tracker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pbx_bridge.eventclock import EventClock
from pbx_bridge.tracker import Decision, Tick, TrackerState, Violation, ViolationKind, apply
from tests.support.fixtures import fixture_messages
from tests.unit.test_tracker import SETTINGS


class Host:
    """This host's clocks: a monotonic one the test advances, and a wall clock it can step."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_step = timedelta(0)

    def wall(self) -> datetime:
        return datetime.now(UTC) + self.wall_step


def replay(name: str, wall_step: timedelta, step_after: int) -> list[Decision]:
    """Replay a captured call as the daemon would: each event observed as it arrives (monotonic time
    follows the events' own spacing), ticks every 0.25 s in between; after `step_after` events the
    wall clock jumps by `wall_step`."""
    host = Host()
    clock = EventClock(monotonic=lambda: host.mono, wall=host.wall)
    state, decisions = TrackerState(), list[Decision]()
    previous: datetime | None = None
    for index, message in enumerate(fixture_messages(name)):
        if index == step_after:
            host.wall_step = wall_step
        at = message.timestamp
        if at is not None and previous is not None:
            gap = (at - previous).total_seconds()
            while gap > 0.25:
                host.mono += 0.25
                gap -= 0.25
                state, out = apply(state, Tick(clock.now()), SETTINGS)
                decisions += out
            host.mono += max(gap, 0.0)
        if at is not None and "uniqueid" in message:
            clock.observe(at)
            previous = at
        state, out = apply(state, message, SETTINGS)
        decisions += out
    for _ in range(40):  # the call is over; time goes on
        host.mono += 0.25
        state, out = apply(state, Tick(clock.now()), SETTINGS)
        decisions += out
    return decisions


def ring_limits(decisions: list[Decision]) -> list[Violation]:
    return [d for d in decisions if isinstance(d, Violation) and d.kind is ViolationKind.RING_LIMIT]


@pytest.mark.parametrize("step", [timedelta(hours=1), timedelta(hours=-1), timedelta(days=-400)])
def test_a_wall_clock_step_does_not_invent_a_violation(step: timedelta) -> None:
    assert ring_limits(replay("answered_7s_talk_4s", step, step_after=3)) == []


@pytest.mark.parametrize("step", [timedelta(hours=1), timedelta(hours=-1), timedelta(0)])
def test_a_wall_clock_step_does_not_hide_nor_move_a_violation(step: timedelta) -> None:
    [violation] = ring_limits(replay("answered_17s", step, step_after=3))
    messages = fixture_messages("answered_17s")
    first_ring = min(m.timestamp for m in messages
                     if m.timestamp is not None and m.event == "DialState" and m.get("DialStatus") == "RINGING")
    assert abs((violation.occurred_at - first_ring).total_seconds() - 15) < 0.3


def test_ticks_before_the_ring_started_or_far_ahead_never_raise() -> None:
    messages = fixture_messages("answered_17s")
    state = TrackerState()
    for message in messages[: len(messages) // 2]:
        state, _ = apply(state, message, SETTINGS)
    assert state.calls  # ringing now
    stamped = [m.timestamp for m in messages if m.timestamp is not None]
    for at in (stamped[0] - timedelta(hours=5), datetime(1970, 1, 2, tzinfo=UTC), stamped[0] + timedelta(days=3650)):
        state, _ = apply(state, Tick(at), SETTINGS)  # must not raise (it did: "ring time cannot be negative")


def test_the_event_clock_ignores_the_wall_clock_once_an_event_came() -> None:
    host = Host()
    clock = EventClock(monotonic=lambda: host.mono, wall=host.wall)
    at = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    clock.observe(at)
    host.wall_step = timedelta(hours=-3)
    host.mono += 2.5
    assert clock.now() == at + timedelta(seconds=2.5)
    host.wall_step = timedelta(hours=7)
    host.mono += 0.5
    assert clock.now() == at + timedelta(seconds=3)
