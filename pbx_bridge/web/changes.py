"""A version counter that wakes every waiter when it is bumped (the tracker's state changed)."""

from __future__ import annotations

import asyncio

from pbx_bridge.aio import wait_set


class Changes:
    """Bumped synchronously by the one writer (the tracker's consumer); any number of coroutines
    wait for the next bump. A bump costs one Event.set() whatever the number of waiters."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        """Something changed: wake every waiter."""
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int, seconds: float) -> bool:
        """Wait until the version differs from `seen`, at most `seconds`; True if it does."""
        if self.version != seen:
            return True
        await wait_set(self._event, seconds)
        return self.version != seen
