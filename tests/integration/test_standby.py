"""A standby pair on real PostgreSQL: one leads, the other takes over within 5 s of the leader's
death or cut-off, and a cut-off leader stops acting before the database lets the other lead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from pbx_bridge.standby import Leadership, LeadershipLostError, StandbyRecords
from pbx_bridge.storage.leader import PAIR_KEEPALIVE, PbxLock, lock_connect
from pbx_bridge.tracker import CallEnded, Violation
from pbx_bridge.tracker.model import CallRecord, ViolationKind
from tests.conftest import scratch_database
from tests.support.env import DevEnv
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "standby") as dsn:
        yield dsn


def instance(dsn: str, identity: str, name: str) -> Leadership:
    lock = PbxLock(lock_connect(dsn, keepalive=PAIR_KEEPALIVE), identity)
    lock.name = name
    return Leadership(lock)


class Watched:
    """A Leadership's `run` as a task, with when it led and when it stopped leading."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.led_at: float | None = None
        self.fenced_at: float | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            await self.leadership.run()
        except LeadershipLostError:
            self.fenced_at = time.monotonic()
            raise
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        await self.leadership.became_leader.wait()
        self.led_at = time.monotonic()

    async def stop(self) -> None:
        self.leadership.stop()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.leadership.lock.release()


async def until(predicate: object, timeout: float) -> float:
    """Wait until `predicate()` is true; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic()


@pytest.fixture
async def proxy(pair_dsn: str) -> AsyncIterator[TcpProxy]:
    port = int(pair_dsn.split("@127.0.0.1:")[1].split("/")[0])
    relay = TcpProxy(port)
    await relay.start()
    yield relay
    await relay.close()


def through(proxy: TcpProxy, dsn: str) -> str:
    return dsn.replace(f":{proxy.target_port}/", f":{proxy.port}/")


async def test_one_leads_and_the_standby_takes_over_within_a_second_of_its_death(pair_dsn: str) -> None:
    first = Watched(instance(pair_dsn, "site-a", "pbx-bridge host-1"))
    await until(lambda: first.led_at is not None, 5)
    second = Watched(instance(pair_dsn, "site-a", "pbx-bridge host-2"))
    other = Watched(instance(pair_dsn, "site-b", "pbx-bridge host-3"))  # another PBX leads on its own
    try:
        await asyncio.sleep(1.5)
        assert (first.leadership.role, second.leadership.role, other.leadership.role) == (
            "leader", "standby", "leader")
        assert second.leadership.lock.holder is not None and "host-1" in second.leadership.lock.holder
        died = time.monotonic()
        await first.leadership.lock.release()  # the session ends (as when the process is killed)
        took = await until(lambda: second.led_at is not None, 5) - died
        assert took < 1.0, f"the standby took {took:.2f} s"
        fenced = await until(lambda: first.fenced_at is not None, 2)
        assert first.leadership.leading is False and fenced - died < 1.5
    finally:
        for watched in (first, second, other):
            await watched.stop()


async def test_a_cut_off_leader_stops_acting_before_the_standby_may_lead(pair_dsn: str, proxy: TcpProxy) -> None:
    """The leader's link to PostgreSQL fails silently (packets dropped, no reset): it fences
    itself within 1.5 s; the server frees the lock after its keepalives (about 3 s); the standby
    then leads, within 5 s of the cut, and never while the old leader still acted."""
    leader = Watched(instance(through(proxy, pair_dsn), "site-c", "pbx-bridge cut-off"))
    await until(lambda: leader.led_at is not None, 5)
    standby = Watched(instance(pair_dsn, "site-c", "pbx-bridge standby"))
    try:
        await asyncio.sleep(1.0)
        assert standby.leadership.role == "standby"
        cut = time.monotonic()
        proxy.partition()
        fenced = await until(lambda: leader.fenced_at is not None, 3)
        took = await until(lambda: standby.led_at is not None, 6)
        assert fenced - cut <= 1.6, f"fenced after {fenced - cut:.2f} s"
        assert took - cut < 5.0, f"the standby led after {took - cut:.2f} s"
        assert fenced < took, "the cut-off leader still acted when the standby took over"
    finally:
        await standby.stop()
        await leader.stop()


def ended(linkedid: str) -> CallEnded:
    at = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    return CallEnded(CallRecord(
        linkedid=linkedid, did="4008001234", trunk="carrier", caller_number="13800000000", caller_name="",
        started_at=at, ring_started_at=at, answered_at=None, ended_at=at, ring_seconds=1.0, rings=1,
        within_ring_limit=None, answered_by=None, disposition=None, talk_seconds=None, hangup_cause=16,
        hangup_cause_text="Normal Clearing"), legs=())


async def test_at_takeover_only_the_calls_without_a_final_row_are_written(pair_dsn: str) -> None:
    conn = await asyncpg.connect(pair_dsn)
    try:
        await conn.execute(
            "INSERT INTO calls (linkedid, did, trunk, caller_number, caller_name, started_at, ended_at, source, "
            "disposition) VALUES ('pbx-1.1', '4008001234', 'carrier', '1', '', now(), now(), 'ami', 'abandoned')")
    finally:
        await conn.close()
    records = StandbyRecords()
    violation = Violation(ViolationKind.RING_LIMIT, datetime(2026, 11, 24, 2, 0, tzinfo=UTC), "pbx-1.2")
    for item in (ended("pbx-1.1"), ended("pbx-1.2"), violation, ended("pbx-1.2")):
        records.keep(item)
    assert len(records) == 3  # a call's newest record only
    submitted: list[CallEnded | Violation] = []

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(pair_dsn)

    assert await records.hand_over(connect, submitted.append) == 1
    assert submitted == [ended("pbx-1.2"), violation]  # the leader had committed pbx-1.1
    assert len(records) == 0
