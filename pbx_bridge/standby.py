"""A hot standby: two pbx-bridge for one PBX, both tracking AMI, only the holder of the PBX lock acting."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.lifecycle import Service, run_services
from pbx_bridge.storage.leader import UNREACHABLE, PbxLock
from pbx_bridge.tracker import CallEnded, Violation

log = structlog.get_logger("pbx_bridge.standby")

Kept = CallEnded | Violation


class LeadershipLostError(Exception):
    """The leader lost its lock's connection: it has stopped acting and the process must end."""


class Leadership:
    """Whether this process acts for its PBX, from the PBX's advisory lock ([pbx] standby = true).

    The standby tries the lock every `check_interval`; once it holds it, it leads. The leader
    pings the lock's connection just as often, each ping bounded by `ping_timeout`: a ping that
    fails makes it stop acting at once (`leading` turns False before anything else runs) and
    raise LeadershipLostError, which ends the process (its supervisor starts it again, as a
    standby). The lock's session has server-side TCP keepalives of about 3 s, so the database
    frees the lock for the standby only after the old leader has fenced itself (≤ 1.5 s)."""

    name = "leadership"

    def __init__(self, lock: PbxLock, *, check_interval: float = 0.5, ping_timeout: float = 1.0,
                 metric: Callable[[bool], None] | None = None) -> None:
        self.lock = lock
        self.became_leader = asyncio.Event()
        self._leading = False
        self._check_interval = check_interval
        self._ping_timeout = ping_timeout
        self._metric = metric
        self._stop = asyncio.Event()
        self._announced = False

    @property
    def leading(self) -> bool:
        """True while this process holds the lock and its connection answers."""
        return self._leading

    @property
    def role(self) -> str:
        """`leader` or `standby`, for logs, /healthz, metrics and systemd's STATUS."""
        return "leader" if self._leading else "standby"

    def stop(self) -> None:
        """Make `run` return (the lock itself is released by the daemon at the very end)."""
        self._stop.set()

    async def run(self) -> None:
        """Take the lock when free, then keep checking it; raise LeadershipLostError when lost."""
        while not self._stop.is_set():
            if self._leading:
                if not await self._alive():
                    self._leading = False  # fenced: nothing acts from here on
                    self._publish_metric()
                    log.error("leadership_lost", pbx=self.lock.identity,
                              effect="stopped acting; exiting so the standby leads (restart makes this one a standby)")
                    raise LeadershipLostError(f"lost the PBX lock of {self.lock.identity!r}")
            else:
                await self._try_to_lead()
            await wait_set(self._stop, self._check_interval)

    async def _try_to_lead(self) -> None:
        try:
            got = await self.lock.acquire()
        except UNREACHABLE as exc:
            log.debug("standby_lock_unavailable", error=str(exc) or type(exc).__name__)
            return
        if got:
            self._leading = True
            self._publish_metric()
            self.became_leader.set()
            log.info("leadership_taken", pbx=self.lock.identity, role="leader")
        elif not self._announced:
            self._announced = True
            log.info("standby", pbx=self.lock.identity, leader=self.lock.holder)
            self._publish_metric()

    async def _alive(self) -> bool:
        try:
            return await within(self.lock.alive(), self._ping_timeout)
        except TimeoutError:
            log.error("pbx_lock_ping_timeout", pbx=self.lock.identity, timeout=self._ping_timeout)
            return False

    def _publish_metric(self) -> None:
        if self._metric is not None:
            self._metric(self._leading)


class AlwaysLeading:
    """Leadership of a single pbx-bridge ([pbx] standby = false): it always acts (the lock only
    keeps a second one from starting)."""

    leading = True
    role = "leader"

    def __init__(self) -> None:
        self.became_leader = asyncio.Event()
        self.became_leader.set()


class LeaderOnly:
    """Services that act for the PBX (writing, hanging up, publishing, probing, mailing,
    alerting, reconciling): started once this process leads, in their own stop order."""

    name = "leader-only"

    def __init__(self, leadership: Leadership | AlwaysLeading, services: Sequence[Service],
                 on_lead: Callable[[], Awaitable[None]] | None = None) -> None:
        self._leadership = leadership
        self._services = list(services)
        self._on_lead = on_lead
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Wait for leadership, then run the services until stopped."""
        stopped = asyncio.ensure_future(self._stop.wait())
        leading = asyncio.ensure_future(self._leadership.became_leader.wait())
        try:
            await asyncio.wait((stopped, leading), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            leading.cancel()
        if self._stop.is_set():
            return
        if self._on_lead is not None:
            await self._on_lead()
        await run_services(self._services, self._stop)

    def stop(self) -> None:
        """Stop the services (or stop waiting for leadership)."""
        self._stop.set()


class StandbyRecords:
    """What a standby's tracker decided to write, kept for a while: at takeover, the records the
    old leader may not have committed (it died between the call's end and the commit) are
    written by the new one. Bounded by age and count; oldest dropped first."""

    def __init__(self, keep_seconds: float = 900.0, limit: int = 20_000) -> None:
        self._keep = keep_seconds
        self._limit = limit
        self._items: OrderedDict[tuple[str, str], tuple[float, Kept]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, decision: Kept) -> None:
        """Remember a record or a violation (the newest per call and kind)."""
        key = ("call", decision.record.linkedid) if isinstance(decision, CallEnded) else (
            f"violation:{decision.kind}:{decision.detail('channel') or ''}", decision.linkedid or "")
        self._items.pop(key, None)
        self._items[key] = (time.monotonic(), decision)
        self._trim()

    def _trim(self) -> None:
        horizon = time.monotonic() - self._keep
        while self._items and (len(self._items) > self._limit or next(iter(self._items.values()))[0] < horizon):
            self._items.popitem(last=False)

    async def hand_over(self, connect: Callable[[], Awaitable[asyncpg.Connection]],
                        submit: Callable[[Kept], None]) -> int:
        """At takeover: submit the kept records whose call has no final row yet, and every kept
        violation (stored once by the database); return how many records were submitted."""
        self._trim()
        kept = [decision for _, decision in self._items.values()]
        self._items.clear()
        calls = [d for d in kept if isinstance(d, CallEnded)]
        final: set[str] = set()
        if calls:
            try:
                conn = await within(connect(), 5)
                try:
                    rows = await within(conn.fetch(
                        "SELECT linkedid FROM calls WHERE linkedid = ANY($1::text[]) AND ended_at IS NOT NULL",
                        [d.record.linkedid for d in calls]), 5)
                finally:
                    await conn.close()
                final = {row["linkedid"] for row in rows}
            except UNREACHABLE as exc:  # just taken the lock through it: rare; the rows are the same call's
                log.warning("standby_handover_check_failed", error=str(exc) or type(exc).__name__)
        missing = [d for d in calls if d.record.linkedid not in final]
        for call in missing:
            submit(call)
        for item in kept:
            if isinstance(item, Violation):
                submit(item)
        log.info("standby_records_handed_over", calls_kept=len(calls), written=len(missing),
                 already_final=len(final))
        return len(missing)
