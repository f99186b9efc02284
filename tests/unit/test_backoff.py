"""Bounded exponential backoff."""

from __future__ import annotations

import pytest

from pbx_bridge.backoff import Backoff


def test_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 4.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert nominal * 0.8 <= delay <= min(nominal * 1.2, 4.0)
    backoff.reset()
    assert 0.4 <= backoff.next_delay() <= 0.6


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(5, 1)
