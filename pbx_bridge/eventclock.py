"""The time the tracker's ticks carry: Asterisk's event time, carried forward by this host's
monotonic clock, so a step of the daemon's wall clock (NTP, an operator) neither raises nor hides
a ring-limit violation."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class EventClock:
    """`now()` = the last channel event's Timestamp + monotonic time since it arrived.

    Before the first event (or for a moment after start) it is the wall clock. Only channel
    events (whole snapshots, which no caller ID can forge) should be observed.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._anchor: tuple[datetime, float] | None = None

    def observe(self, at: datetime) -> None:
        """An event stamped `at` by Asterisk arrived now."""
        self._anchor = (at, self._monotonic())

    def now(self) -> datetime:
        """Asterisk's time now, as far as this host can tell without reading its wall clock."""
        if self._anchor is None:
            return self._wall()
        at, then = self._anchor
        return at + timedelta(seconds=max(0.0, self._monotonic() - then))
