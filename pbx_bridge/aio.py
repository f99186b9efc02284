"""Bounded waits that never lose a cancellation.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives as the awaited thing
completes (CPython gh-86296, fixed in 3.12). A TaskGroup cancels each task once, so a lost
cancellation leaves the daemon hanging instead of exiting. `asyncio.timeout` tracks
cancellations correctly; pbx-bridge waits only through these helpers (ruff bans wait_for).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """Await `awaitable` for at most `seconds`; TimeoutError after that."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; return whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
