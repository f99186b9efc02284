"""Ring arithmetic: how many rings a caller heard, and whether that met the limit."""

from __future__ import annotations

import math


def rings_heard(ring_seconds: float, period_seconds: float) -> int:
    """Rings heard after `ring_seconds` of ringing with cadence period P: floor(t / P) + 1."""
    if ring_seconds < 0:
        raise ValueError("ring time cannot be negative")
    return math.floor(ring_seconds / period_seconds) + 1


def within_ring_limit(
    ring_seconds: float | None, answered: bool, period_seconds: float, max_rings: int
) -> bool | None:
    """True if answered within `max_rings`; False for any call that rang longer (answered or not);
    None when the caller left unanswered before the limit (or nothing ever rang)."""
    if ring_seconds is None:
        return None
    limit_passed = rings_heard(ring_seconds, period_seconds) > max_rings
    if answered:
        return not limit_passed
    return False if limit_passed else None
