"""One lifecycle for the daemon's long-running parts: run in one TaskGroup, stopped in a declared order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

log = structlog.get_logger("pbx_bridge.lifecycle")


class Service(Protocol):
    """A long-running part of the daemon: `run` works until `stop` is called, then returns soon.

    `stop` never blocks: it only asks (sets an event, queues a sentinel); `run` does the
    winding down, within its own bound. Whatever starting there is happens before `run`."""

    name: str  # its task's name

    async def run(self) -> None:
        """Work until stopped."""

    def stop(self) -> None:
        """Ask `run` to return; never blocks."""


class Task:
    """A plain coroutine as a Service: `work()` is its `run`, `stop` what makes that return."""

    def __init__(self, name: str, work: Callable[[], Awaitable[None]], stop: Callable[[], object]) -> None:
        self.name = name
        self._work = work
        self._stop = stop

    async def run(self) -> None:
        """Await a fresh `work()`."""
        await self._work()

    def stop(self) -> None:
        """Call the stop callable."""
        self._stop()


async def run_services(services: Sequence[Service], stop: asyncio.Event,
                       on_stopping: Callable[[], object] | None = None) -> None:
    """Run every service as a task of one TaskGroup (named after it) until `stop` is set, then
    call `on_stopping` and each service's `stop` in the declared order, in one go (nothing runs
    in between), and wait until every `run` has returned.

    Declare `services` in stop order: producers before what consumes their output (what must
    drain last, last). Their tasks are created in reverse order, consumers before producers.

    If a `run` raises, the TaskGroup cancels the others and raises an ExceptionGroup with the
    failure: nothing is lost. If a `stop` raises, the error is logged, that service's task is
    cancelled (its `run` might never return) and the remaining services are still stopped in
    order and left to finish; then the errors are raised as one ExceptionGroup.
    """
    failures: list[Exception] = []
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(service.run(), name=service.name) for service in reversed(services)]
        tasks.reverse()
        await stop.wait()
        if on_stopping is not None:
            on_stopping()
        for service, task in zip(services, tasks, strict=True):
            try:
                service.stop()
            except Exception as exc:
                log.exception("service_stop_failed", service=service.name)
                failures.append(exc)
                task.cancel()
    if failures:
        raise ExceptionGroup("services failed to stop", failures)
