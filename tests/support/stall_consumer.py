"""`pbx-bridge` whose tracker consumer stalls on SIGUSR1, the event loop running on (test only).

Run as `python -m tests.support.stall_consumer run --config PATH` by tests/e2e/test_systemd.py: the
fault is injected here, in the test's own entry point, so no production code path can trigger it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from pbx_bridge import cli, daemon

real_consume: Callable[..., Awaitable[None]] = daemon.consume


async def stalling_consume(queue: asyncio.Queue[Any], *args: Any) -> None:
    """The real consumer; after SIGUSR1 its next `queue.get()` never returns (nothing else stops)."""
    stalled = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stalled.set)
    take = queue.get

    async def get() -> Any:
        if stalled.is_set():
            await asyncio.Event().wait()  # stalled for good: only SIGKILL ends this process
        return await take()

    setattr(queue, "get", get)  # noqa: B010 (an instance attribute over the method; mypy forbids assigning one)
    await real_consume(queue, *args)


if __name__ == "__main__":
    setattr(daemon, "consume", stalling_consume)  # noqa: B010 (run_daemon looks `consume` up when it runs)
    cli.main()
