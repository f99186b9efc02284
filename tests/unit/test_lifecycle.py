"""lifecycle.run_services with real asyncio: concurrency, stop order, failures in `run` and in `stop`."""

from __future__ import annotations

import asyncio

import pytest

from pbx_bridge.lifecycle import Service, Task, run_services

Log = list[tuple[str, ...]]


class Worker:
    """Runs until stopped, recording into a shared log when it runs, is stopped, returns or is cancelled."""

    def __init__(self, name: str, log: Log, *, run_error: Exception | None = None,
                 stop_error: Exception | None = None, returns_at_once: bool = False) -> None:
        self.name = name
        self._log = log
        self._run_error = run_error
        self._stop_error = stop_error
        self._returns_at_once = returns_at_once
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._log.append(("run", self.name, task.get_name()))
        self.started.set()
        try:
            await asyncio.sleep(0)
            if self._run_error is not None:
                raise self._run_error
            if not self._returns_at_once:
                await self._stopping.wait()
                self._log.append(("woke", self.name))
                await asyncio.sleep(0.01)  # winding down takes a while: the others are stopped meanwhile
        except asyncio.CancelledError:
            self._log.append(("cancelled", self.name))
            raise
        self._log.append(("returned", self.name))

    def stop(self) -> None:
        self._log.append(("stop", self.name))
        if self._stop_error is not None:
            raise self._stop_error
        self._stopping.set()


async def stop_when_started(workers: list[Worker], stop: asyncio.Event) -> None:
    for worker in workers:
        await worker.started.wait()
    stop.set()


def kinds(log: Log, kind: str) -> list[str]:
    return [entry[1] for entry in log if entry[0] == kind]


async def test_services_run_concurrently_as_named_tasks_and_stop_in_declared_order_in_one_go() -> None:
    log: Log = []
    workers = [Worker(name, log) for name in ("routing", "ami", "tracker", "writer")]
    stop = asyncio.Event()
    async with asyncio.timeout(2):  # run() only returns once stopped: run one at a time, this would hang
        await asyncio.gather(run_services(workers, stop, on_stopping=lambda: log.append(("stopping",))),
                             stop_when_started(workers, stop))
    assert [entry for entry in log if entry[0] == "run"] == [
        ("run", name, name) for name in ("writer", "tracker", "ami", "routing")]  # consumers' tasks first
    first_stop = log.index(("stop", "routing"))
    assert log[first_stop - 1] == ("stopping",)
    assert log[first_stop:first_stop + 4] == [("stop", name) for name in ("routing", "ami", "tracker", "writer")]
    assert log.index(("woke", "routing")) > first_stop + 3  # no run resumed between the stops
    assert sorted(kinds(log, "returned")) == ["ami", "routing", "tracker", "writer"]
    assert kinds(log, "cancelled") == []


async def test_a_failing_service_cancels_the_others_and_its_error_is_raised() -> None:
    log: Log = []
    boom = RuntimeError("boom")
    workers = [Worker("ami", log), Worker("tracker", log, run_error=boom), Worker("writer", log)]
    stop = asyncio.Event()
    async with asyncio.timeout(2):
        with pytest.raises(ExceptionGroup) as raised:
            await run_services(workers, stop, on_stopping=lambda: log.append(("stopping",)))
    assert raised.value.exceptions == (boom,)  # as the CLI sees it: `except* Exception` logs each
    assert sorted(kinds(log, "cancelled")) == ["ami", "writer"]
    assert kinds(log, "stop") == []
    assert ("stopping",) not in log
    assert not stop.is_set()


async def test_a_failing_stop_still_stops_the_rest_in_order_then_is_raised() -> None:
    log: Log = []
    broken = ValueError("cannot stop")
    workers = [Worker("routing", log), Worker("ami", log, stop_error=broken), Worker("writer", log)]
    stop = asyncio.Event()
    async with asyncio.timeout(2):
        with pytest.raises(ExceptionGroup) as raised:
            await asyncio.gather(run_services(workers, stop), stop_when_started(workers, stop))
    assert raised.value.exceptions == (broken,)
    assert kinds(log, "stop") == ["routing", "ami", "writer"]
    assert kinds(log, "cancelled") == ["ami"]  # its stop did not take: cancelled, so shutdown stays bounded
    assert sorted(kinds(log, "returned")) == ["routing", "writer"]  # the writer still drained


async def test_a_run_that_returns_early_ends_nothing_else_and_is_still_stopped() -> None:
    log: Log = []
    workers = [Worker("alerts", log, returns_at_once=True), Worker("writer", log)]
    stop = asyncio.Event()
    async with asyncio.timeout(2):
        await asyncio.gather(run_services(workers, stop), stop_when_started(workers, stop))
    assert log.index(("returned", "alerts")) < log.index(("stop", "alerts"))
    assert kinds(log, "stop") == ["alerts", "writer"]
    assert kinds(log, "returned") == ["alerts", "writer"]


async def test_task_makes_a_plain_coroutine_a_service() -> None:
    stopping = asyncio.Event()
    made: list[str] = []

    async def work() -> None:
        task = asyncio.current_task()
        assert task is not None
        made.append(task.get_name())
        await stopping.wait()

    ticker = Task("ticker", work, stopping.set)
    service: Service = ticker
    assert made == []  # the coroutine is made when it runs, never left un-awaited
    stop = asyncio.Event()
    stop.set()
    async with asyncio.timeout(2):
        await run_services([service], stop)
    assert made == ["ticker"]
    assert stopping.is_set()
