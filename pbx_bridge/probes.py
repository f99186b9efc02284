"""Line health probes: a real test call out through an ordinary outbound line ([probe] trunk,
never the hotline trunk: the 400 line never dials out, unless [probe] allow_hotline_trunk) to the
400 number, expected back on the hotline trunk (seed: 长久没有来电时,应及时测拨 / 每天早上8:00进行线路检测).

Outcomes: `ok` (arrived; the delay is measured), `dial_failed` (the carrier refused the call),
`no_arrival` (the carrier took the call but it never came back), `timeout` (nothing definite
within the timeout). One probe runs at a time; a failure is retried once before it alerts.
Triggers: `manual` (ops API, `pbx-bridge probe`), `daily` (08:00 local), `quiet` (no hotline
call for `quiet_minutes` during business hours).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.alerts import Alerter
from pbx_bridge.ami.client import AmiClient, AmiError, set_global
from pbx_bridge.metrics import Metrics
from pbx_bridge.tracker import ProbeArrived

PROBE_NONCE_GLOBAL = "PROBE_NONCE"  # read by the dialplan's [hotline] probe check
log = structlog.get_logger("pbx_bridge.probes")

CHANNEL_PREFIX = "pbx-bridge-probe-"  # the guard leaves channels with this Uniqueid alone


class Outcome(StrEnum):
    OK = "ok"
    NO_ARRIVAL = "no_arrival"
    DIAL_FAILED = "dial_failed"
    TIMEOUT = "timeout"


@dataclass
class Attempt:
    """One test call."""

    attempt: int
    started_at: datetime
    finished_at: datetime
    outcome: Outcome
    delay_ms: int | None = None
    reason: str | None = None
    linkedid: str | None = None


@dataclass
class ProbeRun:
    """One probe request: up to two attempts."""

    id: str
    trigger: str
    created_at: datetime
    attempts: list[Attempt] = field(default_factory=list)
    finished: bool = False

    @property
    def status(self) -> str:
        """running, or the outcome of the last attempt."""
        return "running" if not self.finished else str(self.attempts[-1].outcome)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "trigger": self.trigger, "status": self.status,
                "created_at": self.created_at.isoformat(),
                "attempts": [{"attempt": a.attempt, "outcome": str(a.outcome), "delay_ms": a.delay_ms,
                              "reason": a.reason, "started_at": a.started_at.isoformat(),
                              "finished_at": a.finished_at.isoformat()} for a in self.attempts]}


class RateLimitedError(Exception):
    """A manual probe came too soon after the last one."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class ProbeTarget:
    """What a probe dials, all from configuration."""

    trunk: str  # the outbound line (PJSIP endpoint) the test call leaves on
    number: str
    caller_id: str
    timeout: float


class ProbeRunner:
    """Owns probe execution (`run`, one owned task); `request` and `arrived` never block."""

    name = "probes"  # its task's name (lifecycle.Service)

    def __init__(self, ami: AmiClient, target: ProbeTarget, connect: Callable[[], Awaitable[asyncpg.Connection]],
                 alerter: Alerter, metrics: Metrics, manual_min_interval: float) -> None:
        self._ami = ami
        self._target = target
        self._connect = connect
        self._alerter = alerter
        self._metrics = metrics
        self._manual_min_interval = manual_min_interval
        self._pending: dict[str, asyncio.Future[ProbeArrived]] = {}
        self._queue: asyncio.Queue[ProbeRun | None] = asyncio.Queue()
        self._current: ProbeRun | None = None
        self._last_manual_finished: float | None = None
        self._last_failed = False
        self._task: asyncio.Task[None] | None = None
        self.runs: dict[str, ProbeRun] = {}

    @property
    def busy(self) -> bool:
        """A probe is in flight (or queued)."""
        return self._current is not None and not self._current.finished

    def request(self, trigger: str) -> tuple[ProbeRun, bool]:
        """Ask for a probe; returns (the run, whether a new one was started). A probe already
        in flight is returned instead of starting another; manual requests are rate limited."""
        if self._current is not None and not self._current.finished:
            return self._current, False
        if trigger == "manual" and self._last_manual_finished is not None:
            wait = self._manual_min_interval - (time.monotonic() - self._last_manual_finished)
            if wait > 0:
                raise RateLimitedError(wait)
        run = ProbeRun(id=secrets.token_hex(8), trigger=trigger, created_at=datetime.now(UTC))
        self.runs[run.id] = run
        if len(self.runs) > 500:
            self.runs.pop(next(iter(self.runs)))
        self._current = run
        self._queue.put_nowait(run)
        log.info("line_probe_requested", probe_id=run.id, trigger=trigger, trunk=self._target.trunk)
        return run, True

    def arrived(self, arrival: ProbeArrived) -> None:
        """The tracker saw a probe come back (called from the consumer)."""
        future = self._pending.get(arrival.nonce)
        if future is not None and not future.done():
            future.set_result(arrival)

    def stop(self) -> None:
        """End `run` now: a probe in flight is abandoned (shutdown must stay bounded)."""
        self._queue.put_nowait(None)
        if self._task is not None and self.busy:
            self._task.cancel()

    async def run(self) -> None:
        """Execute requested probes one at a time until stopped."""
        self._task = asyncio.current_task()
        while (run := await self._queue.get()) is not None:
            for attempt in (1, 2):
                result = await self._attempt(attempt)
                run.attempts.append(result)
                self._metrics.probes.labels(str(result.outcome)).inc()
                await self._store(run, result)
                log.info("line_probe_attempt", probe_id=run.id, attempt=attempt, outcome=str(result.outcome),
                         delay_ms=result.delay_ms, reason=result.reason)
                if result.outcome is Outcome.OK:
                    break
            run.finished = True
            if run.trigger == "manual":
                self._last_manual_finished = time.monotonic()
            self._report(run)

    def _report(self, run: ProbeRun) -> None:
        last = run.attempts[-1]
        if last.outcome is not Outcome.OK:
            self._last_failed = True
            log.error("line_probe_failed", probe_id=run.id, trigger=run.trigger, outcome=str(last.outcome),
                      reason=last.reason, attempts=len(run.attempts))
            self._alerter.submit({"service": "pbx-bridge", "kind": "line_probe_failed", "probe_id": run.id,
                                  "trigger": run.trigger, "outcome": str(last.outcome), "reason": last.reason,
                                  "number": self._target.number, "occurred_at": last.finished_at.isoformat()})
        elif self._last_failed:
            self._last_failed = False
            log.info("line_probe_recovered", probe_id=run.id, delay_ms=last.delay_ms)
            self._alerter.submit({"service": "pbx-bridge", "kind": "line_probe_recovered", "probe_id": run.id,
                                  "number": self._target.number, "occurred_at": last.finished_at.isoformat()})

    async def _attempt(self, number: int) -> Attempt:
        nonce = secrets.token_hex(8)
        arrival: asyncio.Future[ProbeArrived] = asyncio.get_running_loop().create_future()
        self._pending[nonce] = arrival
        target = self._target
        started, t0 = datetime.now(UTC), time.monotonic()

        def done(outcome: Outcome, reason: str | None = None, came: ProbeArrived | None = None) -> Attempt:
            delay = round((came.at - started).total_seconds() * 1000) if came is not None else None
            return Attempt(number, started, datetime.now(UTC), outcome, delay, reason,
                           came.linkedid if came is not None else None)

        try:
            # The dialplan treats the returning call as a probe only with this one-time nonce.
            await set_global(self._ami, PROBE_NONCE_GLOBAL, nonce)
        except AmiError as exc:
            self._pending.pop(nonce, None)
            return done(Outcome.DIAL_FAILED, f"probe nonce not published: {exc}")
        originate = asyncio.create_task(self._ami.send_action({
            "Action": "Originate", "Channel": f"PJSIP/{target.number}@{target.trunk}",
            "ChannelId": CHANNEL_PREFIX + nonce, "CallerID": f'"{nonce}" <{target.caller_id}>',
            "Application": "Wait", "Data": str(int(target.timeout)), "Timeout": str(int(target.timeout * 1000)),
            "Async": "true"}, response_timeout=target.timeout + 5), name=f"probe-originate-{nonce}")

        try:
            finished, _ = await asyncio.wait({arrival, originate}, timeout=target.timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            if arrival in finished:
                return done(Outcome.OK, came=arrival.result())
            if originate not in finished:
                return done(Outcome.TIMEOUT, "no answer from the carrier and no arrival")
            failure = _originate_failure(originate)
            if failure is not None:
                return done(Outcome.DIAL_FAILED, failure)
            remaining = max(0.0, target.timeout - (time.monotonic() - t0))
            try:
                return done(Outcome.OK, came=await within(arrival, remaining))
            except TimeoutError:
                return done(Outcome.NO_ARRIVAL, "the carrier answered but the call never reached the hotline")
        finally:
            self._pending.pop(nonce, None)
            if not originate.done():
                originate.cancel()
            with contextlib.suppress(asyncio.CancelledError, AmiError):
                await originate

    async def _store(self, run: ProbeRun, attempt: Attempt) -> None:
        try:
            conn = await within(self._connect(), 5)
            try:
                await conn.execute(
                    "INSERT INTO line_probes (probe_id, attempt, trigger, number, started_at, finished_at, outcome, "
                    "delay_ms, reason, linkedid) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                    "ON CONFLICT (probe_id, attempt) DO NOTHING",
                    run.id, attempt.attempt, run.trigger, self._target.number, attempt.started_at,
                    attempt.finished_at, str(attempt.outcome), attempt.delay_ms, attempt.reason, attempt.linkedid)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.error("line_probe_not_stored", probe_id=run.id, error=str(exc) or type(exc).__name__)


def _originate_failure(originate: asyncio.Task[Any]) -> str | None:
    """Why the Originate failed, or None if the carrier answered."""
    exc = originate.exception()
    if exc is not None:
        return str(exc) or type(exc).__name__
    response = originate.result()
    messages = response if isinstance(response, list) else [response]
    last = messages[-1]
    if last.get("Response") == "Success" and last.get("Event") == "OriginateResponse":
        return None
    code = last.get("Reason", "")
    meaning = {"0": "failed or no such number", "1": "hung up", "3": "no answer", "5": "busy",
               "8": "congestion"}.get(code, last.get("Message") or "refused")
    return f"{last.get('Response')}: Asterisk reason {code or '?'} ({meaning})"


class ProbeScheduler:
    """The `daily` and `quiet` triggers, on the business clock."""

    name = "probe-scheduler"  # its task's name (lifecycle.Service)

    def __init__(self, runner: ProbeRunner, now: Callable[[], datetime], daily_at: str, quiet: timedelta,
                 is_open: Callable[[datetime], bool], zone: Any, last_call: Callable[[], datetime | None]) -> None:
        self._runner = runner
        self._now = now
        self._daily = tuple(int(p) for p in daily_at.split(":"))
        self._quiet = quiet
        self._is_open = is_open
        self._zone = zone
        self._last_call = last_call
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def next_daily(self, after: datetime) -> datetime:
        """The next daily probe time after `after` (local time in the configured zone)."""
        local = after.astimezone(self._zone)
        candidate = local.replace(hour=self._daily[0], minute=self._daily[1], second=0, microsecond=0)
        if candidate <= local:
            candidate += timedelta(days=1)
        return candidate

    async def run(self) -> None:
        """Check every second whether a trigger is due; neither fires while a probe is in flight."""
        daily = self.next_daily(self._now())
        quiet_since = self._now()
        while not self._stop.is_set():
            now = self._now()
            last = self._last_call()
            if last is not None and last > quiet_since:
                quiet_since = last
            if now >= daily:
                daily = self.next_daily(now)
                if not self._runner.busy:
                    self._runner.request("daily")
                    quiet_since = now
            elif self._is_open(now) and now - quiet_since >= self._quiet and not self._runner.busy:
                self._runner.request("quiet")
                quiet_since = now
            await wait_set(self._stop, 1.0)
