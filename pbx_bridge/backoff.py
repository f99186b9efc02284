"""Bounded exponential backoff with jitter, for every retry loop (AMI reconnect, database writes)."""

from __future__ import annotations

import random


class Backoff:
    """Delays first, 2*first, 4*first, ... capped at `maximum`, each with +/-20 % jitter."""

    def __init__(self, first: float, maximum: float) -> None:
        if not 0 < first <= maximum:
            raise ValueError("need 0 < first <= maximum")
        self._first = first
        self._maximum = maximum
        self._next = first

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the following one, up to the cap."""
        delay = self._next * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography
        self._next = min(self._next * 2, self._maximum)
        return min(delay, self._maximum)

    def reset(self) -> None:
        """After a success: start again from the first delay."""
        self._next = self._first
