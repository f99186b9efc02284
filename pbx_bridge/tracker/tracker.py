"""The call tracker: `apply(state, event) -> (state, decisions)`.

Pure: no awaits, no clock reads (time is the event's `Timestamp`), no I/O. A call is every
channel sharing one Linkedid that began as an inbound channel on the hotline trunk whose
DID is a hotline number; every other channel is ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from pbx_bridge.ami.wire import AmiMessage, unescape_sip_quoted
from pbx_bridge.tracker.model import (
    CallEnded,
    CallLeg,
    CallLost,
    CallRecord,
    CallStarted,
    ChannelSnapshot,
    Decision,
    Disposition,
    HangupChannel,
    ProbeArrived,
    Tick,
    Violation,
    ViolationKind,
)
from pbx_bridge.tracker.rings import rings_heard, within_ring_limit

CHANNEL_STATE_DOWN = "0"  # a channel Asterisk creates to dial out
CHANNEL_STATE_RING = "4"  # inbound channel offered to Asterisk
CHANNEL_STATE_RINGING = "5"  # outbound channel ringing at the far end
RINGING_DIAL_STATUSES = frozenset({"RINGING", "PROGRESS"})
UNANSWERED_DISPOSITIONS = frozenset({Disposition.MISSED, Disposition.FORWARD_MISSED, Disposition.VOICEMAIL})
FORWARD_MARK_TTL = timedelta(minutes=10)
KNOWN_STAGES = frozenset({"group", "escalation", "after_hours", "mobile", "voicemail", "probe"})
ANSWERING_STAGES = frozenset({"group", "escalation", "mobile"})


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """What the tracker needs from configuration."""

    hotline_numbers: frozenset[str]
    trunk: str
    ring_period_seconds: float = 5.0
    max_rings: int = 3
    # Outbound channels on the trunk whose Uniqueid starts with this were started by pbx-bridge
    # itself (line probes use it as their Originate ChannelId); the guard leaves them alone.
    own_channel_prefix: str = "pbx-bridge-"
    # The caller number of pbx-bridge's line probes: such calls are probes from their first event.
    probe_caller: str | None = None


@dataclass(frozen=True, slots=True)
class CallState:
    """What is known so far about one call in progress."""

    linkedid: str
    inbound_uniqueid: str
    did: str
    trunk: str
    caller_number: str
    caller_name: str
    started_at: datetime
    legs: Mapping[str, CallLeg] = field(default_factory=dict)
    live_channels: frozenset[str] = frozenset()
    answered_leg: str | None = None
    answered_stage: str | None = None
    stages: tuple[str, ...] = ()  # as the dialplan announced them (UserEvent HotlineStage)
    forwarded_to: str | None = None
    duty_holder: str | None = None
    caller_hung_up_at: datetime | None = None
    ring_limit_reported: bool = False
    probe_nonce: str | None = None  # set when the dialplan recognised pbx-bridge's own test call
    inbound_ended_at: datetime | None = None
    hangup_cause: int | None = None
    hangup_cause_text: str | None = None


@dataclass(frozen=True, slots=True)
class TrackerState:
    """All calls in progress, by Linkedid. Never mutated: `apply` returns a new one."""

    calls: Mapping[str, CallState] = field(default_factory=dict)
    # Linkedids the dialplan announced a forward for (UserEvent HotlineStage, Stage: mobile)
    # though the call itself is not tracked (e.g. it began before pbx-bridge started): the
    # guard lets their trunk legs through. Forgotten after FORWARD_MARK_TTL.
    forward_marks: Mapping[str, datetime] = field(default_factory=dict)


def endpoint_of(channel: str) -> str:
    """`PJSIP/agent101-0000002a` -> `agent101` (technology and sequence suffix removed)."""
    _, _, rest = channel.partition("/")
    name, dash, suffix = rest.rpartition("-")
    return name if dash and suffix else rest


def _cause(event: AmiMessage) -> tuple[int | None, str | None]:
    raw = event.get("Cause")
    cause = int(raw) if raw.isdigit() else None
    return cause, event.get("Cause-txt") or None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 3)


def apply(
    state: TrackerState, event: AmiMessage | ChannelSnapshot | Tick, settings: TrackerSettings
) -> tuple[TrackerState, list[Decision]]:
    """Advance the tracker by one input; return the new state and what must be done."""
    if isinstance(event, ChannelSnapshot):
        return _reconcile_with_snapshot(state, event, settings)
    if isinstance(event, Tick):
        return _tick(state, event.now, settings)
    when = event.timestamp
    linkedid = event.get("Linkedid")
    if when is None or not linkedid:
        return state, []
    if event.event == "UserEvent" and event.get("UserEvent") == "OutboundAttempt":
        return state, [_outbound_attempt(event, when)]
    call = state.calls.get(linkedid)
    if call is None:
        started = _maybe_start_call(event, when, settings)
        if started is not None:
            new_state = replace(state, calls={**state.calls, linkedid: started})
            return new_state, [CallStarted(_record(started, settings))]
        if _is_forward_announcement(event):
            return replace(state, forward_marks={**state.forward_marks, linkedid: when}), []
        if linkedid in state.forward_marks:
            return state, []
        return state, _guard(event, when, settings)

    updated = _advance(call, event, when)
    if updated is call:
        return state, []
    if updated.probe_nonce is not None and call.probe_nonce is None:
        return (replace(state, calls={**state.calls, linkedid: updated}),
                [ProbeArrived(updated.probe_nonce, when, linkedid)])
    if updated.inbound_ended_at is not None and not updated.live_channels:
        calls = {k: v for k, v in state.calls.items() if k != linkedid}
        record = _record(updated, settings)
        decisions: list[Decision] = [CallEnded(record, tuple(updated.legs.values()))]
        if record.within_ring_limit is False and not updated.ring_limit_reported:
            decisions.append(_ring_limit_violation(updated, record, settings))  # e.g. no tick came in time
        if record.disposition in UNANSWERED_DISPOSITIONS:
            decisions.append(Violation(ViolationKind.UNANSWERED, record.ended_at or when, record.linkedid,
                                       (("disposition", str(record.disposition)), ("did", record.did),
                                        ("caller_number", record.caller_number))))
        return replace(state, calls=calls), decisions
    return replace(state, calls={**state.calls, linkedid: updated}), []


def _is_forward_announcement(event: AmiMessage) -> bool:
    return (event.event == "UserEvent" and event.get("UserEvent") == "HotlineStage"
            and event.get("Stage") == "mobile")


def _tick(state: TrackerState, now: datetime, settings: TrackerSettings) -> tuple[TrackerState, list[Decision]]:
    """Report, once per call, a ring limit passing while the agents' phones still ring;
    forget old forward marks."""
    if any(now - at > FORWARD_MARK_TTL for at in state.forward_marks.values()):
        state = replace(state, forward_marks={k: at for k, at in state.forward_marks.items()
                                              if now - at <= FORWARD_MARK_TTL})
    limit = settings.max_rings * settings.ring_period_seconds
    decisions: list[Decision] = []
    changed: dict[str, CallState] = {}
    for linkedid, call in state.calls.items():
        if (call.ring_limit_reported or call.answered_leg is not None or call.inbound_ended_at is not None
                or call.probe_nonce is not None):
            continue
        started = _ring_started_at(call)
        if started is None or _agents_stopped(call) is not None:
            continue
        if rings_heard((now - started).total_seconds(), settings.ring_period_seconds) > settings.max_rings:
            changed[linkedid] = replace(call, ring_limit_reported=True)
            decisions.append(_ring_limit_violation(call, _record(call, settings), settings,
                                                   at=started + timedelta(seconds=limit)))
    if not changed:
        return state, decisions
    return replace(state, calls={**state.calls, **changed}), decisions


def _ring_limit_violation(call: CallState, record: CallRecord, settings: TrackerSettings,
                          at: datetime | None = None) -> Violation:
    limit = settings.max_rings * settings.ring_period_seconds
    occurred = at or (record.ring_started_at or call.started_at) + timedelta(seconds=limit)
    return Violation(ViolationKind.RING_LIMIT, occurred, call.linkedid,
                     (("did", call.did), ("caller_number", call.caller_number),
                      ("max_rings", str(settings.max_rings)), ("limit_seconds", f"{limit:g}")))


def _outbound_attempt(event: AmiMessage, when: datetime) -> Violation:
    """A hotline phone dialled out; the dialplan refused it (UserEvent OutboundAttempt)."""
    channel = event.get("Channel")
    return Violation(ViolationKind.OUTBOUND_ATTEMPT, when, event.get("Linkedid"),
                     (("channel", channel), ("extension", endpoint_of(channel)),
                      ("digits", event.get("Digits")), ("stopped_by", "dialplan")))


def _guard(event: AmiMessage, when: datetime, settings: TrackerSettings) -> list[Decision]:
    """Second line of defence: an outbound channel on the hotline trunk that is neither a
    forward (of a tracked call, or announced by the dialplan) nor pbx-bridge's own is hung up."""
    if event.event != "Newchannel" or event.get("ChannelState") != CHANNEL_STATE_DOWN:
        return []
    channel = event.get("Channel")
    uniqueid = event.get("Uniqueid")
    if endpoint_of(channel) != settings.trunk or not channel.startswith("PJSIP/"):
        return []
    if uniqueid.startswith(settings.own_channel_prefix):
        return []
    return [HangupChannel(channel, "outbound call on the hotline trunk not started by the system"),
            Violation(ViolationKind.OUTBOUND_ATTEMPT, when, event.get("Linkedid"),
                      (("channel", channel), ("stopped_by", "guard")))]


def _reconcile_with_snapshot(
    state: TrackerState, snapshot: ChannelSnapshot, settings: TrackerSettings
) -> tuple[TrackerState, list[Decision]]:
    """After an AMI gap: forget channels that vanished unseen; a call whose caller channel
    vanished is lost (its end was never seen)."""
    calls: dict[str, CallState] = {}
    decisions: list[Decision] = []
    for linkedid, call in state.calls.items():
        if call.inbound_uniqueid not in snapshot.uniqueids:
            decisions.append(CallLost(_record(call, settings)))
            continue
        calls[linkedid] = replace(call, live_channels=call.live_channels & snapshot.uniqueids)
    return replace(state, calls=calls), decisions


def _maybe_start_call(event: AmiMessage, when: datetime, settings: TrackerSettings) -> CallState | None:
    """A call starts with the Newchannel of an inbound trunk channel dialled at a hotline DID."""
    if event.event != "Newchannel":
        return None
    uniqueid = event.get("Uniqueid")
    channel = event.get("Channel")
    if (
        uniqueid != event.get("Linkedid")
        or event.get("ChannelState") != CHANNEL_STATE_RING
        or not channel.startswith("PJSIP/")
        or endpoint_of(channel) != settings.trunk
        or event.get("Exten") not in settings.hotline_numbers
    ):
        return None
    return CallState(
        linkedid=uniqueid,
        inbound_uniqueid=uniqueid,
        did=event.get("Exten"),
        trunk=settings.trunk,
        caller_number=event.get("CallerIDNum"),
        caller_name=_caller_name(event.get("CallerIDName")),
        started_at=when,
        live_channels=frozenset({uniqueid}),
    )


def _caller_name(raw: str) -> str:
    """The caller's name as the carrier sent it; Asterisk's `<unknown>` means none."""
    if raw == "<unknown>":
        return ""
    return unescape_sip_quoted(raw)


def _advance(call: CallState, event: AmiMessage, when: datetime) -> CallState:
    name = event.event
    uniqueid = event.get("Uniqueid")
    inbound = uniqueid == call.inbound_uniqueid

    if name == "Newchannel":
        live = call.live_channels | {uniqueid}
        channel = event.get("Channel")
        if inbound or channel.startswith("Local/"):
            return replace(call, live_channels=live)
        leg = CallLeg(linkedid=call.linkedid, uniqueid=uniqueid, channel=channel, endpoint=endpoint_of(channel))
        return replace(call, live_channels=live, legs={**call.legs, uniqueid: leg})

    if name == "UserEvent" and event.get("UserEvent") == "HotlineStage" and inbound:
        stage = event.get("Stage")
        if stage not in KNOWN_STAGES:
            return call
        if stage == "mobile":
            return replace(call, stages=(*call.stages, stage), forwarded_to=event.get("Mobile") or None,
                           duty_holder=_b64_text(event.get("HolderB64")) or None)
        return replace(call, stages=(*call.stages, stage))

    if name == "UserEvent" and event.get("UserEvent") == "HotlineProbe" and inbound:
        return replace(call, probe_nonce=event.get("Nonce"), stages=(*call.stages, "probe"))

    if name == "NewCallerid" and inbound:
        return replace(call, caller_number=event.get("CallerIDNum"),
                       caller_name=_caller_name(event.get("CallerIDName")))

    if name == "DialBegin":
        return _update_leg(call, event.get("DestUniqueid"),
                           lambda leg: leg if leg.dial_started_at else replace(leg, dial_started_at=when))

    if name == "DialState" and event.get("DialStatus") in RINGING_DIAL_STATUSES:
        return _update_leg(call, event.get("DestUniqueid"), lambda leg: _ringing(leg, when))

    if name == "Newstate" and event.get("ChannelState") == CHANNEL_STATE_RINGING and not inbound:
        return _update_leg(call, uniqueid, lambda leg: _ringing(leg, when))

    if name == "DialEnd":
        dest = event.get("DestUniqueid")
        status = event.get("DialStatus")
        updated = _update_leg(call, dest, lambda leg: replace(
            leg, dial_status=status, answered_at=when if status == "ANSWER" else leg.answered_at))
        if status == "ANSWER" and dest in call.legs and call.answered_leg is None:
            current = call.stages[-1] if call.stages and call.stages[-1] in ANSWERING_STAGES else None
            updated = replace(updated, answered_leg=dest, answered_stage=current)
        return updated

    if name == "HangupRequest" and inbound and call.caller_hung_up_at is None:
        # A remote hangup queued on the caller's channel: the caller put the phone down.
        return replace(call, caller_hung_up_at=when)

    if name == "Hangup":
        cause, text = _cause(event)
        live = call.live_channels - {uniqueid}
        if inbound:
            return replace(call, live_channels=live, inbound_ended_at=when, hangup_cause=cause,
                           hangup_cause_text=text)
        updated = _update_leg(call, uniqueid, lambda leg: replace(
            leg, ended_at=when, hangup_cause=cause, hangup_cause_text=text))
        return replace(updated, live_channels=live)

    return call


def _b64_text(value: str) -> str:
    """Decode a base64 UTF-8 value from the dialplan; '' if it is not one."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""


def _ringing(leg: CallLeg, when: datetime) -> CallLeg:
    return leg if leg.ring_started_at else replace(leg, ring_started_at=when)


def _update_leg(call: CallState, uniqueid: str, change: Callable[[CallLeg], CallLeg]) -> CallState:
    leg = call.legs.get(uniqueid)
    if leg is None:
        return call
    new_leg = change(leg)
    if new_leg is leg:
        return call
    return replace(call, legs={**call.legs, uniqueid: new_leg})


def _agent_legs(call: CallState) -> list[CallLeg]:
    """The legs to the agents' phones (not the forward to the duty mobile on the trunk)."""
    return [leg for leg in call.legs.values() if leg.endpoint != call.trunk]


def _ring_started_at(call: CallState) -> datetime | None:
    """First agent leg ringing; the first DialBegin if no leg ever reported ringing."""
    legs = _agent_legs(call)
    ringing = [leg.ring_started_at for leg in legs if leg.ring_started_at]
    if ringing:
        return min(ringing)
    dialled = [leg.dial_started_at for leg in legs if leg.dial_started_at]
    return min(dialled) if dialled else None


def _record(call: CallState, settings: TrackerSettings) -> CallRecord:
    """The call's record as far as it is known (final once the call has ended)."""
    answered = call.legs.get(call.answered_leg) if call.answered_leg else None
    answered_at = answered.answered_at if answered else None
    on_mobile = answered is not None and answered.endpoint == call.trunk
    ended_at = call.inbound_ended_at
    ring_started_at = _ring_started_at(call)
    # Ring time is time at the agents' phones: until an agent answered, or until the
    # agents stopped ringing (the call went on to the mobile) or the call ended.
    agent_ring_end = answered_at if answered is not None and not on_mobile else _agents_stopped(call) or ended_at
    ring_seconds = _seconds(ring_started_at, agent_ring_end)  # None while still ringing
    rings = rings_heard(ring_seconds, settings.ring_period_seconds) if ring_seconds is not None else None
    talk_end = None
    if answered is not None:
        ends = [t for t in (ended_at, answered.ended_at) if t is not None]
        talk_end = min(ends) if ends else None

    disposition: Disposition | None = None
    if ended_at is not None:
        if call.probe_nonce is not None:
            disposition = Disposition.ANSWERED  # answered by the PBX itself: a probe, not a customer
        elif on_mobile:
            disposition = Disposition.FORWARDED
        elif answered is not None:
            disposition = Disposition.ANSWERED
        elif "voicemail" in call.stages:
            disposition = Disposition.VOICEMAIL
        elif "mobile" in call.stages:
            disposition = Disposition.FORWARD_MISSED
        elif call.caller_hung_up_at is not None:
            disposition = Disposition.ABANDONED
        else:
            disposition = Disposition.MISSED

    return CallRecord(
        linkedid=call.linkedid,
        did=call.did,
        trunk=call.trunk,
        caller_number=call.caller_number,
        caller_name=call.caller_name,
        started_at=call.started_at,
        ring_started_at=ring_started_at,
        answered_at=answered_at,
        ended_at=ended_at,
        ring_seconds=ring_seconds,
        rings=rings,
        within_ring_limit=within_ring_limit(
            ring_seconds, answered is not None and not on_mobile, settings.ring_period_seconds, settings.max_rings),
        answered_by="pbx-bridge-probe" if call.probe_nonce is not None else _answered_by(call, answered, on_mobile),
        disposition=disposition,
        talk_seconds=_seconds(answered_at, talk_end),
        hangup_cause=call.hangup_cause,
        hangup_cause_text=call.hangup_cause_text,
        after_hours=(call.stages[0] == "after_hours") if call.stages else None,
        answered_stage=call.answered_stage,
        forwarded_to=call.forwarded_to,
        duty_holder=call.duty_holder,
        needs_call_sheet=on_mobile,
        is_probe=call.probe_nonce is not None or (
            settings.probe_caller is not None and call.caller_number == settings.probe_caller),
    )


def _answered_by(call: CallState, answered: CallLeg | None, on_mobile: bool) -> str | None:
    """The phone that answered: an agent's endpoint, or the duty mobile's number."""
    if answered is None:
        return None
    return (call.forwarded_to or answered.endpoint) if on_mobile else answered.endpoint


def _agents_stopped(call: CallState) -> datetime | None:
    """When the last agent leg ended, if every agent leg has ended and the call went on."""
    legs = _agent_legs(call)
    if not legs or any(leg.ended_at is None for leg in legs) or "mobile" not in call.stages:
        return None
    return max(leg.ended_at for leg in legs if leg.ended_at is not None)


@dataclass(frozen=True, slots=True)
class LiveCall:
    """A call ringing or talking right now, as the ops API shows it."""

    linkedid: str
    did: str
    caller_number: str
    caller_name: str
    started_at: datetime
    state: str  # ringing | talking
    stage: str | None
    ring_seconds: float | None  # so far, or until answered
    answered_by: str | None


def live_calls(state: TrackerState, now: datetime) -> list[LiveCall]:
    """The calls in progress at `now`, oldest first."""
    out = []
    for call in sorted(state.calls.values(), key=lambda c: c.started_at):
        answered = call.legs.get(call.answered_leg) if call.answered_leg else None
        started = _ring_started_at(call)
        ring_end = answered.answered_at if answered is not None else now
        out.append(LiveCall(
            linkedid=call.linkedid, did=call.did, caller_number=call.caller_number, caller_name=call.caller_name,
            started_at=call.started_at, state="talking" if answered is not None else "ringing",
            stage=call.stages[-1] if call.stages else None, ring_seconds=_seconds(started, ring_end),
            answered_by=answered.endpoint if answered is not None else None))
    return out
