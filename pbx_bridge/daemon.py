"""The pbx-bridge daemon: AMI events -> pure tracker -> batched writer, as owned tasks.

Every task belongs to one TaskGroup (lifecycle.run_services): if any fails, the others are
cancelled and the failure is raised, never lost. SIGTERM/SIGINT start a bounded graceful
shutdown: stop reading AMI, let the tracker finish the queued events, write what the bound
allows (the rest stays in the journal). A second daemon for the same PBX refuses to start (storage/leader.py).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.alerts import Alerter
from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.api import (
    ApiContext,
    ApiDatabase,
    Component,
    LiveState,
    component_age,
    create_app,
    database_component,
    serve,
)
from pbx_bridge.cel.reconcile import Reconciler, tracker_settings_for
from pbx_bridge.config import Settings
from pbx_bridge.dialplan import event_key, event_key_id
from pbx_bridge.eventclock import EventClock
from pbx_bridge.lifecycle import Service, Task, run_services
from pbx_bridge.looplag import LoopLag
from pbx_bridge.metrics import Metrics
from pbx_bridge.notes import COMPLAINT_OVERDUE, ComplaintWatch
from pbx_bridge.pbx import PbxNaming, read_system_name
from pbx_bridge.phones import PhoneWatch
from pbx_bridge.presence import PresenceDesk
from pbx_bridge.probes import ProbeRunner, ProbeScheduler, ProbeTarget
from pbx_bridge.report import DailyReportScheduler
from pbx_bridge.routing import Clock, RoutingPublisher
from pbx_bridge.security import SecurityReporter
from pbx_bridge.standby import AlwaysLeading, LeaderOnly, Leadership, StandbyRecords
from pbx_bridge.storage.journal import Journal
from pbx_bridge.storage.leader import PAIR_KEEPALIVE, PbxLock, hold_pbx_lock, lock_connect, pbx_identity
from pbx_bridge.storage.settings import keep_settings_published
from pbx_bridge.storage.writer import CallWriter, connect_writer
from pbx_bridge.systemd import DaemonStatus, HeartbeatQueue, Notifier, Watchdog
from pbx_bridge.tracker import (
    CallEnded,
    CallLost,
    CallStarted,
    ChannelSnapshot,
    Decision,
    HangupChannel,
    LiveChannel,
    NeedsReconcile,
    PresenceRequest,
    ProbeArrived,
    SecurityAlert,
    Tick,
    TrackerSettings,
    TrackerState,
    Violation,
    apply,
)
from pbx_bridge.trunk import TrunkHealth, read_trunk
from pbx_bridge.web import Wallboard

log = structlog.get_logger("pbx_bridge.daemon")

_STOP: Final = None
HOTLINE_NEVER_DIALS_OUT: Final = "the 400 line never dials out: line probes should use another outbound line"


def health_checks(settings: Settings, ami: AmiClient, writer: CallWriter, publisher: RoutingPublisher,
                  database: ApiDatabase, trunk: TrunkHealth,
                  reports: DailyReportScheduler, security: SecurityReporter,
                  reconciler: Reconciler, leadership: Leadership | AlwaysLeading,
                  phones: PhoneWatch | None = None, pbx: PbxNaming | None = None) -> dict[str, Component]:
    """What /healthz reports: AMI and database are critical; the rest informs."""
    async def pbx_check() -> tuple[bool, dict[str, Any]]:
        # Which PBX this is (the name on its rows); not yet named: nothing is written until AMI says.
        if pbx is None:
            return True, {}
        return pbx.name is not None, {"name": pbx.name, "system_name": pbx.system_name,
                                      "from": "[pbx] name" if settings.pbx.name else "Asterisk's systemname"}

    async def phones_check() -> tuple[bool, dict[str, Any]]:
        if phones is None:
            return True, {"watched": False}
        ok, details = phones.status()
        return ok, {"watched": True, "phones": details}

    async def leadership_check() -> tuple[bool, dict[str, Any]]:
        if not isinstance(leadership, Leadership):
            return True, {"role": "leader", "standby_pair": False}
        leader = leadership.lock.name if leadership.leading else leadership.lock.holder
        return True, {"role": leadership.role, "standby_pair": True, "pbx": leadership.lock.identity,
                      "this_instance": leadership.lock.name, "leader": leader}

    async def ami_check() -> tuple[bool, dict[str, Any]]:
        return ami.connected.is_set(), {"sessions": ami.sessions, "reconnects": ami.reconnects}

    async def writer_check() -> tuple[bool, dict[str, Any]]:
        since = writer.oldest_pending_since
        lag = None if since is None else round(time.monotonic() - since, 1)
        return writer.healthy and (lag is None or lag < 30), {"lag_seconds": lag, **writer.status()}

    async def calendar_check() -> tuple[bool, dict[str, Any]]:
        today = datetime.now(settings.zone).date()
        known = publisher.effective.day(today).calendar_known
        return known, {"year": today.year, "holidays": "known" if known else "missing: weekly hours only"}

    async def trunk_check() -> tuple[bool, dict[str, Any]]:
        return trunk.reachable is not False, {"endpoint": trunk.endpoint, "qualify": trunk.status,
                                              "rtt_ms": trunk.rtt_ms}

    async def dialplan_key_check() -> tuple[bool, dict[str, Any]]:
        ok = security.dialplan_key_ok
        return ok is not False, {"matches": ok, "fix": None if ok is not False else
                                 "regenerate with `pbx-bridge dialplan` and `dialplan reload`"}

    async def report_check() -> tuple[bool, dict[str, Any]]:
        sent = reports.last_sent_day
        return reports.last_error is None, {
            "recipients": len(settings.report.recipients), "daily_at": settings.report.daily_at,
            "last_sent_day": sent.isoformat() if sent else None,
            "error": "failed (see the log)" if reports.last_error else None}

    async def probes_check() -> tuple[bool, dict[str, Any]]:
        # Informational: probing through the hotline trunk is an explicit opt-in, shown here, never a failure.
        trunk = settings.probe_trunk
        if trunk is None:
            return True, {"enabled": False}
        detail: dict[str, Any] = {"enabled": True, "trunk": trunk, "hotline_trunk": settings.probe_uses_hotline_trunk}
        if settings.probe_uses_hotline_trunk:
            detail |= {"allowed_by": "[probe] allow_hotline_trunk", "warning": HOTLINE_NEVER_DIALS_OUT}
        return True, detail

    async def reconcile_check() -> tuple[bool, dict[str, Any]]:
        if not settings.reconcile.enabled:
            return True, {"enabled": False}
        at = reconciler.last_pass_at
        age = None if at is None else round(time.monotonic() - at, 1)
        # Passes come every interval: three missed in a row (or an error) is worth a look.
        fresh = age is not None and age < 3 * settings.reconcile.interval_seconds + 30
        return reconciler.last_error is None and (fresh or at is None), {
            "last_pass_seconds_ago": age, "passes": reconciler.passes, "rebuilt": reconciler.rebuilt,
            "error": reconciler.last_error}

    return {
        "ami": ami_check,
        "pbx": pbx_check,
        "leadership": leadership_check,
        "reconcile": reconcile_check,
        "phones": phones_check,
        "trunk": trunk_check,
        "database": database_component(database),
        "writer": writer_check,
        "routing_state": component_age("published_seconds_ago", lambda: publisher.published_at,
                                       settings.hotline.state_max_age_seconds),
        "holiday_calendar": calendar_check,
        "daily_report": report_check,
        "dialplan_key": dialplan_key_check,
        "probes": probes_check,
    }


async def check_dialplan_key(ami: AmiClient, settings: Settings, security: SecurityReporter) -> None:
    """After a login: does the running dialplan carry our event key? (Compared by fingerprint.)
    If not, every stage event would be dropped as forged: say so loudly."""
    expected = event_key_id(event_key(settings.ami.resolved_secret().get_secret_value()))
    try:
        reply = await ami.send_action({"Action": "Getvar", "Variable": "PBX_BRIDGE_EVENT_KEY_ID"})
    except AmiError as exc:
        log.warning("dialplan_key_not_checked", error=str(exc))
        return
    security.dialplan_key_ok = reply.get("Value") == expected
    if not security.dialplan_key_ok:
        log.error("dialplan_key_mismatch", effect="the dialplan's UserEvents are dropped as forged",
                  fix="regenerate extensions_generated.conf with `pbx-bridge dialplan`, then `dialplan reload`")


def _probes(settings: Settings, ami: AmiClient, connect: Callable[[], Awaitable[asyncpg.Connection]],
            alerter: Alerter, metrics: Metrics, live: LiveState, clock: Clock,
            publisher: RoutingPublisher) -> tuple[ProbeRunner | None, ProbeScheduler | None]:
    """The probe runner and its scheduler, if [probe] caller_id is configured."""
    probe, trunk = settings.probe, settings.probe_trunk
    if probe.caller_id is None or trunk is None:
        log.warning("line_probes_off", fix="set [probe] caller_id to the number the probes call from")
        return None, None
    target = ProbeTarget(trunk=trunk, number=settings.probe_number,
                         caller_id=probe.caller_id, timeout=probe.timeout_seconds)
    if settings.probe_uses_hotline_trunk:
        log.warning("probe_uses_hotline_trunk", trunk=target.trunk, rule=HOTLINE_NEVER_DIALS_OUT,
                    allowed_by="[probe] allow_hotline_trunk",
                    fix="name another outbound line in [probe] trunk and drop allow_hotline_trunk")
    log.info("line_probes_on", trunk=target.trunk, number=target.number, daily_at=probe.daily_at,
             quiet_minutes=probe.quiet_minutes)
    runner = ProbeRunner(ami, target, connect, alerter, metrics, probe.manual_min_interval_seconds)

    def last_call() -> datetime | None:
        real = live.last_activity()
        return clock.business(real) if real is not None else None

    scheduler = ProbeScheduler(runner, clock.now, probe.daily_at, timedelta(minutes=probe.quiet_minutes),
                               lambda at: publisher.effective.is_open(at), settings.zone, last_call)
    return runner, scheduler


def tracker_settings(settings: Settings) -> TrackerSettings:
    """The tracker's view of the configuration."""
    return replace(tracker_settings_for(settings),
                   event_key=event_key(settings.ami.resolved_secret().get_secret_value()))


def _log_decision(decision: Decision) -> None:
    if isinstance(decision, HangupChannel):
        log.warning("guard_hangup", channel=decision.channel, reason=decision.reason, linkedid=decision.linkedid)
        return
    if isinstance(decision, SecurityAlert | Violation):
        return  # SecurityReporter and record_violation log these
    if isinstance(decision, ProbeArrived):
        log.info("line_probe_arrived", nonce=decision.nonce, linkedid=decision.linkedid)
        return
    if isinstance(decision, PresenceRequest):
        log.info("presence_requested", agent=decision.agent, action=decision.action)
        return
    if isinstance(decision, NeedsReconcile):
        log.warning("call_needs_reconcile", linkedid=decision.record.linkedid, did=decision.record.did,
                    caller=decision.record.caller_number,
                    reason="some of its events were missed and no answer was seen: CEL settles how it ended")
        return
    record = decision.record
    if isinstance(decision, CallStarted):
        log.info("call_started", linkedid=record.linkedid, did=record.did, caller=record.caller_number)
    elif isinstance(decision, CallEnded):
        log.info("call_ended", linkedid=record.linkedid, disposition=str(record.disposition),
                 ring_seconds=record.ring_seconds, rings=record.rings,
                 within_ring_limit=record.within_ring_limit, answered_by=record.answered_by,
                 talk_seconds=record.talk_seconds)
    elif isinstance(decision, CallLost):
        log.error("call_lost_in_ami_gap", linkedid=record.linkedid, did=record.did, caller=record.caller_number,
                  hint="its end was not seen; the record stays incomplete until reconciled from CEL")


TrackerInput = AmiMessage | ChannelSnapshot | Tick | None
TICK_SECONDS = 0.25


async def tick(queue: asyncio.Queue[TrackerInput], stop: asyncio.Event, clock: EventClock,
               synced: Callable[[], bool]) -> None:
    """Feed the time to the tracker, so limits pass on time while no event arrives. The time is
    Asterisk's (the last channel event's, carried forward monotonically), never the wall clock's.
    No tick while AMI is down or before the tracker has the channel snapshot that follows a
    login: a call answered in the gap must not look like one still ringing."""
    while not stop.is_set():
        if synced():
            queue.put_nowait(Tick(clock.now()))
        await wait_set(stop, TICK_SECONDS)


def channel_snapshot(listing: list[Any], at: datetime, since: datetime) -> ChannelSnapshot:
    """The tracker's view of a CoreShowChannels reply."""
    channels = []
    for item in listing:
        if item.get("Event") != "CoreShowChannel":
            continue
        channels.append(LiveChannel(
            channel=str(item.get("Channel") or ""), uniqueid=str(item.get("Uniqueid") or ""),
            linkedid=str(item.get("Linkedid") or ""), state=str(item.get("ChannelState") or ""),
            caller_number=str(item.get("CallerIDNum") or ""), caller_name=str(item.get("CallerIDName") or ""),
            exten=str(item.get("Exten") or ""), seconds=_duration(str(item.get("Duration") or "")),
            bridged=bool(item.get("BridgeId"))))
    return ChannelSnapshot(frozenset(c.uniqueid for c in channels), tuple(channels), at, since)


def _duration(text: str) -> float:
    """CoreShowChannels' `Duration: HH:MM:SS` in seconds (0 if unreadable)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return 0.0
    hours, minutes, seconds = (int(p) for p in parts)
    return float(hours * 3600 + minutes * 60 + seconds)


async def guard(hangups: asyncio.Queue[HangupChannel | None], ami: AmiClient, out: Outputs) -> None:
    """Carry out the tracker's hangups at once, in order, each result checked and logged.

    Each target is first confirmed with Asterisk (the channel exists and belongs to the call the
    event named), so an event forged through a caller ID cannot get a real call hung up; only
    then is the violation recorded."""
    while (item := await hangups.get()) is not None:
        try:
            if item.linkedid:
                reply = await ami.send_action({"Action": "Getvar", "Channel": item.channel,
                                               "Variable": "CHANNEL(linkedid)"}, response_timeout=2)
                if reply.get("Response") != "Success" or reply.get("Value") != item.linkedid:
                    out.security.report(SecurityAlert(
                        "guard_target_mismatch", item.channel[:128], "", item.linkedid[:64],
                        f"no such channel of that call ({str(reply.get('Message') or 'other linkedid')[:80]}): "
                        "not hung up"))
                    continue
            response = await ami.send_action({"Action": "Hangup", "Channel": item.channel, "Cause": "21"},
                                             response_timeout=2)
            log.info("guard_hangup_done", channel=item.channel, response=response.get("Response"),
                     message=response.get("Message"))
        except AmiError as exc:
            log.error("guard_hangup_failed", channel=item.channel, error=str(exc))
        if item.violation is not None:
            record_violation(item.violation, out)


@dataclass(frozen=True)
class Outputs:
    """Where the tracker's decisions go (and its latest state, for the ops API)."""

    writer: CallWriter
    hangups: asyncio.Queue[HangupChannel | None]
    alerter: Alerter
    metrics: Metrics
    live: LiveState
    probes: ProbeRunner | None
    trunk: TrunkHealth
    security: SecurityReporter
    reconcile: Callable[[str], None]  # rebuild this call from CEL once it has ended
    leadership: Leadership | AlwaysLeading  # a standby decides but does not act: it keeps its records
    standby: StandbyRecords
    presence: PresenceDesk | None = None  # [presence] agents listed: their feature codes are answered
    answered: Callable[[str, datetime], None] | None = None  # an agent's answered call ended ([ring] fair)
    phones: PhoneWatch | None = None  # the agents' phones in working order


def record_violation(violation: Violation, out: Outputs) -> None:
    """Write a rule breach, count it, and alert."""
    log.error("policy_violation", kind=str(violation.kind), linkedid=violation.linkedid,
              occurred_at=violation.occurred_at.isoformat(), **dict(violation.details))
    out.writer.submit(violation)
    out.metrics.violations.labels(str(violation.kind)).inc()
    out.alerter.submit(alert_of(violation))


def reconciled_violation(violation: Violation, metrics: Metrics, alerter: Alerter) -> None:
    """A breach only CEL showed (AMI did not see the call end), already written by the reconcile:
    log, count and alert it like any other."""
    log.error("policy_violation", kind=str(violation.kind), linkedid=violation.linkedid,
              occurred_at=violation.occurred_at.isoformat(), source="cel", **dict(violation.details))
    metrics.violations.labels(str(violation.kind)).inc()
    alerter.submit(alert_of(violation))


def alert_of(violation: Violation) -> dict[str, object]:
    """The webhook payload of a rule breach."""
    return {"service": "pbx-bridge", "kind": str(violation.kind), "linkedid": violation.linkedid,
            "occurred_at": violation.occurred_at.isoformat(), "details": dict(violation.details)}


async def consume(queue: asyncio.Queue[TrackerInput], settings: TrackerSettings, out: Outputs) -> None:
    """The one consumer of AMI events: apply each to the tracker, route what it decides."""
    state = TrackerState()
    while True:
        event = await queue.get()
        if event is _STOP:
            if state.calls:
                log.warning("calls_in_progress_at_shutdown", count=len(state.calls))
            return
        if isinstance(event, AmiMessage) and event.event == "ContactStatus":
            out.trunk.observe(event)
            if out.phones is not None:
                out.phones.observe(event)
            continue
        if out.phones is not None and isinstance(event, AmiMessage) and event.event == "DialEnd":
            out.phones.observe(event)  # how each agent's phone answers (a handset left off the hook)
        state, decisions = apply(state, event, settings)
        out.live.publish(state)  # wakes the wallboard when the state changed
        if not out.leadership.leading:  # the standby: hot state, no action
            for decision in decisions:
                if isinstance(decision, CallStarted | CallEnded):
                    _log_decision(decision)
                if isinstance(decision, CallEnded | Violation):
                    out.standby.keep(decision)  # written at takeover if the leader never committed it
            continue
        for decision in decisions:
            if isinstance(decision, HangupChannel):
                out.hangups.put_nowait(decision)  # first: the guard must act within 250 ms
        for decision in decisions:
            if isinstance(decision, Violation):
                record_violation(decision, out)
                continue
            _log_decision(decision)
            if isinstance(decision, SecurityAlert):
                out.security.report(decision)
                continue
            if isinstance(decision, ProbeArrived):
                if out.probes is not None:
                    out.probes.arrived(decision)
                continue
            if isinstance(decision, CallLost | NeedsReconcile):
                out.reconcile(decision.record.linkedid)
                continue
            if isinstance(decision, PresenceRequest):
                if out.presence is not None:
                    out.presence.submit(decision)
                continue
            if isinstance(decision, HangupChannel):
                continue  # a hangup's violation is recorded once Asterisk confirmed its target; CEL settles the rest
            out.writer.submit(decision)
            if isinstance(decision, CallEnded) and not decision.record.is_probe:
                out.metrics.calls.labels(str(decision.record.disposition)).inc()
                if decision.record.ring_seconds is not None:
                    out.metrics.ring_seconds.observe(decision.record.ring_seconds)
                out.live.last_customer_call_at = decision.record.ended_at
                record = decision.record
                if out.answered is not None and record.answered_by and record.answered_stage in ("group", "escalation"):
                    out.answered(record.answered_by, record.ended_at or record.started_at)


async def take_over(records: StandbyRecords, connect: Callable[[], Awaitable[asyncpg.Connection]],
                    writer: CallWriter, publisher: RoutingPublisher, ami: AmiClient) -> None:
    """Just became the leader: write what the old one may not have committed, and publish the
    routing state at once if AMI is up (the writer and the publisher then run as usual)."""
    await records.hand_over(connect, writer.submit)
    if ami.connected.is_set():
        try:
            await publisher.publish(announce=True)
        except AmiError as exc:
            log.warning("routing_state_not_published", error=str(exc))


async def run_daemon(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down within bounded time."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Modules, configuration and the like live as long as the process: keep them out of every
    # garbage collection (with ~1,000 calls live, full collections paused the loop 20-36 ms).
    gc.freeze()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _run(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _run(settings: Settings, stop: asyncio.Event) -> None:
    raw_dsn = settings.database.dsn.get_secret_value()
    identity = pbx_identity(settings.ami.host, settings.ami.port, settings.pbx.name)
    if settings.pbx.standby:  # a pair: whoever holds the lock leads, the other waits hot
        pbx_lock = PbxLock(lock_connect(raw_dsn, keepalive=PAIR_KEEPALIVE), identity)
    else:  # First of all: refuse to be a second pbx-bridge for this PBX (AlreadyRunningError: exit 2).
        pbx_lock = await hold_pbx_lock(raw_dsn, identity)
    try:
        await _serve(settings, stop, pbx_lock)
    finally:
        await pbx_lock.release()


async def _serve(settings: Settings, stop: asyncio.Event, pbx_lock: PbxLock) -> None:
    """The daemon proper, once its PBX lock is taken (or waited for: a standby)."""
    # Every session writes for this PBX: [pbx] name, else the systemname read at the first login.
    pbx = PbxNaming(settings.database.dsn.get_secret_value(), settings.pbx.name)

    async def connect() -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(pbx.dsn())
        return conn

    writer = CallWriter(
        connect_writer(pbx.dsn, settings.database.statement_timeout_seconds),
        batch_size=settings.database.batch_size,
        flush_interval=settings.database.flush_interval_seconds,
        queue_limit=settings.database.queue_limit,
        journal=Journal.open(settings.database.journal_file, max_bytes=settings.database.journal_max_bytes),
        rejected_path=settings.database.rejected_file,
        statement_timeout=settings.database.statement_timeout_seconds,
    )
    writer.recover(legacy_spool=settings.database.spool_path)
    queue: HeartbeatQueue[TrackerInput] = HeartbeatQueue()  # the systemd watchdog's heartbeats pass through it
    notifier = Notifier.from_environment()  # READY/STATUS/WATCHDOG/STOPPING to systemd (nothing outside it)
    hangups: asyncio.Queue[HangupChannel | None] = asyncio.Queue()
    shutting_down = asyncio.Event()

    publisher: RoutingPublisher | None = None
    trunk = TrunkHealth(settings.hotline.trunk)

    async def after_login(client: AmiClient) -> None:
        """After every login: publish the routing state, tell the tracker which channels exist
        (events may have been missed while disconnected), and read the trunk's qualify state."""
        system_name = await read_system_name(client)
        pbx.learn(system_name)  # first: the name every row carries, and whose CEL rows are whose
        if publisher is not None and leadership.leading:  # first: callers ringing in now are routed by it
            await publisher.publish(announce=True)
        since = event_clock.now()
        listing = await client.send_action({"Action": "CoreShowChannels"}, as_list=True)
        snapshot = channel_snapshot(listing, event_clock.now(), since)
        queue.put_nowait(snapshot)
        synced_session[0] = client.sessions  # the tracker knows what the gap hid: ticks may resume
        log.info("channels_snapshot", channels=len(snapshot.uniqueids))
        reconciler.after_login(snapshot.uniqueids, snapshot.at or datetime.now(UTC), system_name)  # ends the gap hid
        for linkedid in live.state.calls:  # in progress across the gap: AMI may have missed some of their events
            reconciler.rebuild(linkedid)
        await check_dialplan_key(client, settings, security)
        await read_trunk(client, trunk)
        if phones is not None:
            await phones.read(client)
        notifier.ready()  # READY=1 once: configuration, database (PBX lock, journal) and first AMI login done

    metrics = Metrics()
    alerter = Alerter(settings.alerts.webhook_url, metrics, timeout=settings.alerts.webhook_timeout_seconds,
                      attempts=settings.alerts.webhook_attempts)
    leadership = (Leadership(pbx_lock, metric=lambda leading: metrics.leader.set(1 if leading else 0))
                  if settings.pbx.standby else AlwaysLeading())
    metrics.leader.set(1 if leadership.leading else 0)
    alerter.only_while(lambda: leadership.leading)
    standby_records = StandbyRecords()
    security = SecurityReporter(alerter, metrics)
    writer.report_to(metrics, alerter.submit)
    event_clock = EventClock()
    synced_session = [0]  # the AMI session whose channel snapshot the tracker has

    def on_event(message: AmiMessage) -> None:
        """Into the tracker's queue; a channel event (unforgeable: a whole snapshot) sets the clock."""
        if "uniqueid" in message and (at := message.timestamp) is not None:
            event_clock.observe(at)
        queue.put_nowait(message)

    ami = AmiClient(
        host=settings.ami.host, port=settings.ami.port, username=settings.ami.username,
        secret=settings.ami.resolved_secret().get_secret_value(), on_event=on_event,
        connect_timeout=settings.ami.connect_timeout_seconds,
        ping_interval=settings.ami.ping_interval_seconds, ping_timeout=settings.ami.ping_timeout_seconds,
        reconnect_max=settings.ami.reconnect_max_seconds, on_session=after_login, on_suspicion=security.suspicion,
    )
    clock = Clock.from_environment()
    publisher = RoutingPublisher(ami, settings.hours.schedule(settings.zone), settings.duty, clock, connect,
                                 settings.hotline.state_refresh_seconds, metrics, settings.presence.agents,
                                 fair=settings.ring.strategy == "fair")
    desk = PresenceDesk(ami, connect, settings.presence.agents,
                        is_open=lambda: publisher.current is None or publisher.current.open,
                        republish=publisher.publish, alert=alerter.submit, zone=settings.zone,
                        break_minutes=settings.presence.break_minutes_per_day, lunch=settings.presence.lunch_windows,
                        on_break_over=lambda _: metrics.violations.labels("break_over_limit").inc(),
                        ) if settings.presence.agents else None
    phones = PhoneWatch(
        settings.presence.agents, unreachable_after=timedelta(minutes=settings.presence.phone_unreachable_minutes),
        off_hook_after=timedelta(minutes=settings.presence.off_hook_minutes),
        is_open=lambda: publisher.current is None or publisher.current.open,
        signed_in=lambda agent: publisher.current is None or agent in publisher.current.signed_in,
        alert=alerter.submit, metrics=metrics) if settings.presence.agents else None
    live = LiveState()
    metrics.watch(reconnects=lambda: ami.reconnects, pending=lambda: writer.pending,
                  lag=lambda: 0.0 if writer.oldest_pending_since is None
                  else time.monotonic() - writer.oldest_pending_since,
                  trunk=lambda: {True: 1.0, False: 0.0, None: -1.0}[trunk.reachable])
    probes, scheduler = _probes(settings, ami, connect, alerter, metrics, live, clock, publisher)

    def complaint_overdue(alert: dict[str, object]) -> None:
        metrics.violations.labels(COMPLAINT_OVERDUE).inc()
        alerter.submit(alert)

    reports = DailyReportScheduler(settings.report, settings.smtp, settings.zone, clock, connect,
                                   ring_limit_seconds=settings.ring.period_seconds * settings.ring.max_rings)
    complaints = ComplaintWatch(connect, settings.call_sheet.complaint_reply_minutes,
                                settings.call_sheet.sweep_interval_seconds,
                                lambda: datetime.now(UTC), complaint_overdue)  # call times are real time
    reconciler = Reconciler(connect, tracker_settings(settings), interval=settings.reconcile.interval_seconds,
                            lookback=timedelta(hours=settings.reconcile.lookback_hours),
                            settle=timedelta(seconds=settings.reconcile.settle_seconds),
                            on_violation=lambda violation: reconciled_violation(violation, metrics, alerter),
                            metrics=metrics)
    outputs = Outputs(writer, hangups, alerter, metrics, live, probes, trunk, security, reconciler.rebuild, leadership,
                      standby_records, desk,
                      publisher.note_answered, phones)
    api_database = ApiDatabase(pbx.dsn)  # the API's own small pool: requests never starve the writer
    api = create_app(ApiContext(
        metrics=metrics, live=live, database=api_database,
        health=health_checks(settings, ami, writer, publisher, api_database, trunk, reports, security,
                              reconciler, leadership, phones, pbx),
        critical=frozenset({"ami", "database"}),
        tokens=settings.api.resolved_tokens(),
        mobile_pattern=settings.duty.mobile_pattern, on_roster_change=publisher.publish, probes=probes,
        agents=tuple(settings.presence.agents), is_open=lambda: publisher.current is None or publisher.current.open,
        on_presence_change=publisher.publish, leading=lambda: leadership.leading,
        wallboard=Wallboard(live, database=api_database, routing=lambda: publisher.current, trunk=trunk,
                            period=settings.ring.period_seconds, max_rings=settings.ring.max_rings,
                            timezone=settings.timezone)))
    host, port = settings.api.host_port
    if settings.duty.mobile is None:
        log.warning("no_duty_mobile", effect="after-hours calls go to voicemail", fix="set [duty] mobile")
    log.info("pbx_bridge_starting", ami=f"{settings.ami.host}:{settings.ami.port}",
             hotline=settings.hotline.numbers, trunk=settings.hotline.trunk)

    def synced() -> bool:
        """AMI is up and the tracker has this session's channel snapshot: ticks may flow."""
        return ami.connected.is_set() and synced_session[0] == ami.sessions

    reconciling: list[Service] = [reconciler] if settings.reconcile.enabled else []
    probing: list[Service] = [probes, scheduler] if probes is not None and scheduler is not None else []
    presence: list[Service] = [desk, phones] if desk is not None and phones is not None else []
    services: list[Service] = [  # in stop order: producers first, the writer last
        Watchdog(notifier, queue, DaemonStatus(  # first: STOPPING=1 at once
            lambda: len(live.state.calls), lambda: writer.pending, ami.connected.is_set, role=lambda: leadership.role)),
        leadership if isinstance(leadership, Leadership) else
        Task("pbx-lock", lambda: pbx_lock.keep(shutting_down, alerter.submit), shutting_down.set),
        Task("ticker", lambda: tick(queue, shutting_down, event_clock, synced), shutting_down.set),
        LoopLag(metrics),  # pbx_bridge_event_loop_lag_seconds
        Task("api", lambda: serve(api, host, port, shutting_down.wait), shutting_down.set),
        ami,
        Task("tracker", lambda: consume(queue, tracker_settings(settings), outputs), lambda: queue.put_nowait(_STOP)),
        alerter,
        LeaderOnly(leadership, [  # what acts for the PBX: the leader's (at once when there is no standby)
            publisher,
            Task("settings", lambda: keep_settings_published(connect, settings, shutting_down), shutting_down.set),
            Task("guard", lambda: guard(hangups, ami, outputs), lambda: hangups.put_nowait(None)),
            complaints,
            reports,
            *reconciling,
            *probing,
            *presence,
            writer,  # last: it drains what the tracker produced
        ], on_lead=(lambda: take_over(standby_records, connect, writer, publisher, ami))
           if isinstance(leadership, Leadership) else None),
    ]
    await run_services(services, stop, on_stopping=lambda: log.info("pbx_bridge_stopping"))
    log.info("pbx_bridge_stopped", written=writer.written)
