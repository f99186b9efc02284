"""Ring counting: floor(t / P) + 1, and the three-ring limit at 3P."""

from __future__ import annotations

import pytest

from pbx_bridge.tracker.rings import rings_heard, within_ring_limit


@pytest.mark.parametrize(("seconds", "rings"), [(0, 1), (4.999, 1), (5, 2), (7, 2), (14.999, 3), (15, 4), (17, 4)])
def test_rings_heard_china_cadence(seconds: float, rings: int) -> None:
    assert rings_heard(seconds, 5.0) == rings


def test_negative_ring_time_is_an_error() -> None:
    with pytest.raises(ValueError):
        rings_heard(-0.1, 5.0)


@pytest.mark.parametrize(("seconds", "answered", "expected"), [
    (14.999, True, True),
    (15.0, True, False),
    (14.9, False, None),   # the caller left before the limit
    (15.0, False, False),  # rang past the limit unanswered: a breach
    (None, False, None),   # nothing ever rang
])
def test_within_ring_limit(seconds: float | None, answered: bool, expected: bool | None) -> None:
    assert within_ring_limit(seconds, answered, 5.0, 3) is expected
