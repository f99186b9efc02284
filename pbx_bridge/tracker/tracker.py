"""The call tracker: `apply(state, event) -> (state, decisions)`.

Pure: no awaits, no clock reads (time is the event's `Timestamp`), no I/O. A call is every
channel sharing one Linkedid that began as an inbound channel on the hotline trunk whose
DID is a hotline number; every other channel is ignored.
"""

from __future__ import annotations

import base64
import hmac
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
    LiveChannel,
    NeedsReconcile,
    PresenceRequest,
    ProbeArrived,
    SecurityAlert,
    Tick,
    Violation,
    ViolationKind,
)
from pbx_bridge.tracker.persistent import PMap, evolve
from pbx_bridge.tracker.rings import rings_heard, within_ring_limit

CHANNEL_STATE_DOWN = "0"  # a channel Asterisk creates to dial out
CHANNEL_STATE_RING = "4"  # inbound channel offered to Asterisk
CHANNEL_STATE_RINGING = "5"  # outbound channel ringing at the far end
RINGING_DIAL_STATUSES = frozenset({"RINGING", "PROGRESS"})
UNANSWERED_DISPOSITIONS = frozenset({Disposition.MISSED, Disposition.FORWARD_MISSED, Disposition.VOICEMAIL})
FORWARD_MARK_TTL = timedelta(minutes=10)
KNOWN_STAGES = frozenset({"group", "escalation", "after_hours", "mobile", "voicemail", "probe", "refused",
                          "transfer", "transfer_return"})
TRANSFER_STAGES = frozenset({"transfer", "transfer_return"})
# The UserEvents our dialplan raises: trusted only with the dialplan's key (TrackerSettings.event_key).
DIALPLAN_EVENTS = frozenset({"HotlineStage", "HotlineProbe", "OutboundAttempt", "HotlineRefused", "HotlineTransfer",
                             "InternalCall", "AgentPresence"})
PRESENCE_ACTIONS = frozenset({"out", "in", "status"})
ANSWERING_STAGES = frozenset({"group", "escalation", "mobile"})
# Bounds that hold however hostile the stream (events forged through a caller ID included):
# far above a real hotline's load, far below exhausting memory.
MAX_FORWARD_MARKS = 1_000
MAX_CHANNELS_PER_CALL = 64
MAX_STAGES_PER_CALL = 16
MAX_VALUE_CHARS = 512  # of any header value the tracker may keep
MAX_CONSULTS = 1_000  # consultation calls between phones remembered at once (for attended transfers)


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
    # The caller number of pbx-bridge's line probes (a probe is recognised by its nonce, never
    # by this number alone: anyone can send it).
    probe_caller: str | None = None
    # Calls in progress at most: a new one beyond it gives the oldest up as lost, with a security
    # alert (fake call starts forged into the stream must not fill memory). Far above a real PBX.
    max_calls: int = 10_000
    # The key every UserEvent of our dialplan carries (`pbx-bridge dialplan` generates it); one
    # without it is forged. None only where no dialplan is involved (tests of older captures).
    event_key: str | None = None
    # The ring limit applies to the duty mobile's leg too ([ring] mobile_limit).
    mobile_ring_limit: bool = True


@dataclass(frozen=True)  # no slots: updated with `evolve` (a copy of its attribute dict), not `replace`
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
    mobile_limit_reported: bool = False
    probe_nonce: str | None = None  # set when the dialplan recognised pbx-bridge's own test call
    inbound_ended_at: datetime | None = None
    hangup_cause: int | None = None
    hangup_cause_text: str | None = None
    # Some of its events may have been missed (it lived through an AMI gap, or was taken in from
    # a snapshot): unless an answer was seen, CEL settles how it ended.
    uncertain: bool = False
    adopted: bool = False  # taken in from a snapshot: its ring start was never seen, CEL settles it
    transfer_from: str | None = None  # the agent of the transfer in progress (UserEvent HotlineTransfer)
    transfer_kind: str | None = None  # blind | attended | return
    seq: int = 0  # the order in which the tracker took the call in (TrackerState.order)


@dataclass(frozen=True)
class TrackerState:
    """All calls in progress, by Linkedid. Never mutated: `apply` returns a new one.

    The maps of calls are persistent (`PMap`): a new state shares all but O(log n) of the old
    one, so one event costs the same with 3 or 10,000 calls in progress."""

    calls: PMap[str, CallState] = field(default_factory=PMap)
    # Linkedids of the calls by `CallState.seq`: the oldest is given up first at `max_calls`.
    order: PMap[int, str] = field(default_factory=PMap)
    next_seq: int = 1
    oldest_seq: int = 1  # no call in progress has a lower seq (advanced as calls end)
    # Linkedids the dialplan announced a forward for (UserEvent HotlineStage, Stage: mobile)
    # though the call itself is not tracked (e.g. it began before pbx-bridge started): the
    # guard lets their trunk legs through. Forgotten after FORWARD_MARK_TTL.
    forward_marks: Mapping[str, datetime] = field(default_factory=dict)
    # Calls between hotline phones (UserEvent InternalCall: an agent consulting a colleague), by
    # Linkedid, until they end or an attended transfer hands their colleague the caller.
    consults: Mapping[str, CallState] = field(default_factory=dict)


def endpoint_of(channel: str) -> str:
    """`PJSIP/agent101-0000002a` -> `agent101` (technology and sequence suffix removed)."""
    _, _, rest = channel.partition("/")
    name, dash, suffix = rest.rpartition("-")
    return name if dash and suffix else rest


def _cause(event: AmiMessage) -> tuple[int | None, str | None]:
    raw = event.get("Cause")
    cause = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else None  # Q.850: 0-127
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
    if event.longest_value > MAX_VALUE_CHARS:
        event = _bounded(event)
    name = event.event
    user_event = event.get("UserEvent") if name == "UserEvent" else ""
    if user_event in DIALPLAN_EVENTS and not _keyed(event, settings):
        return state, [_security("forged_user_event", event,
                                 f"UserEvent {user_event[:40]} without the dialplan's key")]
    when = event.timestamp
    linkedid = event.get("Linkedid")
    if name == "AttendedTransfer" and when is not None:  # its channels' Linkedids are prefixed
        return _attended_transfer(state, event, when), []
    if when is None or not linkedid:
        return state, []
    if user_event == "OutboundAttempt":
        return state, [_outbound_attempt(event, when)]
    if user_event == "AgentPresence":
        action, channel = event.get("Action"), event.get("Channel")
        if action not in PRESENCE_ACTIONS or not channel.startswith("PJSIP/"):
            return state, []
        return state, [PresenceRequest(event.get("Agent")[:64], action, channel[:128], when)]
    call: CallState | None = state.calls.get(linkedid)
    if call is None and (linkedid in state.consults or _is_consult_start(event)):
        return _advance_consult(state, event, when), []
    if call is None:
        started = _maybe_start_call(event, when, settings)
        if started is not None:
            new_state, lost = _with_call(state, started, settings)
            return new_state, [*lost, CallStarted(_record(started, settings))]
        refused = _maybe_refused_call(event, when, settings)
        if refused is not None:
            new_state, lost = _with_call(state, refused, settings)
            return new_state, [*lost, CallStarted(_record(refused, settings)), _refusal_alert(event)]
        if _is_forward_announcement(event):
            marks = dict(state.forward_marks)
            while len(marks) >= MAX_FORWARD_MARKS:
                del marks[next(iter(marks))]  # the oldest
            marks[linkedid] = when
            return replace(state, forward_marks=marks), []
        if linkedid in state.forward_marks:
            return state, []
        return state, _guard(event, when, settings)

    updated = _advance(call, event, when)
    if updated is call:
        return state, []
    if name == "DialBegin" and _is_trunk_leg(event, settings) and not _is_announced_forward(updated, event):
        return _put(state, updated), [_forward_guard(updated, event, when)]
    if updated.stages is not call.stages and "refused" in updated.stages and "refused" not in call.stages:
        return _put(state, updated), [_refusal_alert(event)]
    if updated.probe_nonce is not None and call.probe_nonce is None:
        return _put(state, updated), [ProbeArrived(updated.probe_nonce, when, linkedid)]
    if updated.inbound_ended_at is not None and not updated.live_channels:
        ended = _without(state, updated)
        record = _record(updated, settings)
        if updated.adopted or (updated.uncertain and updated.answered_leg is None):
            return ended, [NeedsReconcile(record)]
        legs = tuple(evolve(leg, talk_seconds=leg_talk_seconds(leg, updated.inbound_ended_at))
                     for leg in updated.legs.values())
        decisions: list[Decision] = [CallEnded(record, legs)]
        if record.within_ring_limit is False and not updated.ring_limit_reported:
            decisions.append(_ring_limit_violation(updated, record, settings))  # e.g. no tick came in time
        mobile = _mobile_leg(updated)
        if (settings.mobile_ring_limit and mobile is not None and record.mobile_within_ring_limit is False
                and not updated.mobile_limit_reported):
            decisions.append(_mobile_ring_limit_violation(updated, mobile, settings))
        if record.disposition in UNANSWERED_DISPOSITIONS and "refused" not in updated.stages:
            decisions.append(Violation(ViolationKind.UNANSWERED, record.ended_at or when, record.linkedid,
                                       (("disposition", str(record.disposition)), ("did", record.did),
                                        ("caller_number", record.caller_number))))
        return ended, decisions
    return _put(state, updated), []


def _put(state: TrackerState, call: CallState) -> TrackerState:
    """`state` with `call` (already in it) updated: O(log32 n), whatever the number of calls."""
    return evolve(state, calls=state.calls.set(call.linkedid, call))


def _without(state: TrackerState, call: CallState) -> TrackerState:
    """`state` without `call` (it ended or was given up)."""
    order = state.order.delete(call.seq)
    oldest = state.oldest_seq
    if call.seq == oldest:  # amortised O(1): each sequence number is passed once
        while oldest < state.next_seq and oldest not in order:
            oldest += 1
    return evolve(state, calls=state.calls.delete(call.linkedid), order=order, oldest_seq=oldest)


def _is_consult_start(event: AmiMessage) -> bool:
    return (event.event == "UserEvent" and event.get("UserEvent") == "InternalCall"
            and event.get("Uniqueid") == event.get("Linkedid"))


def _advance_consult(state: TrackerState, event: AmiMessage, when: datetime) -> TrackerState:
    """A call between hotline phones (a consultation): its legs are followed, so that an attended
    transfer can hand its colleague the caller with their ring and answer; forgotten at its end."""
    linkedid = event.get("Linkedid")
    consults = dict(state.consults)
    consult = consults.get(linkedid)
    if consult is None:
        while len(consults) >= MAX_CONSULTS:
            del consults[next(iter(consults))]  # the oldest
        uniqueid = event.get("Uniqueid")
        consult = CallState(linkedid=linkedid, inbound_uniqueid=uniqueid, did="", trunk="", caller_number="",
                            caller_name="", started_at=when, live_channels=frozenset({uniqueid}),
                            transfer_from=event.get("From")[:64] or None)
    updated = _advance(consult, event, when)
    if updated.inbound_ended_at is not None and not updated.live_channels:
        consults.pop(linkedid, None)
    else:
        consults[linkedid] = updated
    return replace(state, consults=consults)


def _attended_transfer(state: TrackerState, event: AmiMessage, when: datetime) -> TrackerState:
    """An agent handed the caller to the colleague they consulted (AMI AttendedTransfer): the
    colleague's leg joins the hotline call, with its ring and answer from the consultation; the
    colleague's channel now carries the call's Linkedid (Asterisk relinks it), so its end is seen."""
    call = state.calls.get(event.get("OrigTransfererLinkedid"))
    consult = state.consults.get(event.get("SecondTransfererLinkedid"))
    if event.get("Result") != "Success" or call is None:
        return state
    target_id = event.get("TransferTargetUniqueid")
    if target_id not in call.legs and max(len(call.legs), len(call.live_channels)) >= MAX_CHANNELS_PER_CALL:
        return state  # bounded: a real call never has this many
    target_channel = event.get("TransferTargetChannel")
    leg = consult.legs.get(target_id) if consult is not None else None
    if leg is None:
        if not target_id or not target_channel.startswith("PJSIP/"):
            return state
        leg = CallLeg(linkedid=call.linkedid, uniqueid=target_id, channel=target_channel,
                      endpoint=endpoint_of(target_channel))
    by = endpoint_of(event.get("OrigTransfererChannel")) or (consult.transfer_from if consult else None)
    moved = evolve(leg, linkedid=call.linkedid, stage="transfer", transfer_kind="attended", transferred_by=by,
                   transferred_at=when)
    updated = evolve(call, legs={**call.legs, target_id: moved}, live_channels=call.live_channels | {target_id},
                     stages=(*call.stages, "transfer")[:MAX_STAGES_PER_CALL])
    consults = {k: v for k, v in state.consults.items() if k != event.get("SecondTransfererLinkedid")}
    return replace(_put(state, updated), consults=consults)


def _bounded(event: AmiMessage) -> AmiMessage:
    """`event` with every value cut to MAX_VALUE_CHARS: a stranger's 1 MB caller name (or Uniqueid)
    must not be kept, per call and leg, for as long as the call lasts."""
    if event.longest_value <= MAX_VALUE_CHARS:
        return event
    return replace(event, headers={k: v[:MAX_VALUE_CHARS] for k, v in event.headers.items()})


def _with_call(state: TrackerState, call: CallState,
               settings: TrackerSettings) -> tuple[TrackerState, list[Decision]]:
    """`state` with a new call; at `max_calls` the oldest is given up as lost, with a security
    alert (fake call starts that never end must not fill memory)."""
    lost: list[Decision] = []
    while len(state.calls) >= settings.max_calls:
        oldest = state.calls[state.order[state.oldest_seq]]
        state = _without(state, oldest)
        lost += [CallLost(_record(oldest, settings)),
                 SecurityAlert("too_many_calls", "", oldest.inbound_uniqueid, oldest.linkedid,
                               f"more than {settings.max_calls} calls in progress: the oldest is given up")]
    seq = state.next_seq
    oldest_seq = seq if not state.order else state.oldest_seq
    return evolve(state, calls=state.calls.set(call.linkedid, evolve(call, seq=seq)),
                  order=state.order.set(seq, call.linkedid), next_seq=seq + 1, oldest_seq=oldest_seq), lost


def _keyed(event: AmiMessage, settings: TrackerSettings) -> bool:
    """Did our dialplan raise this UserEvent (it carries the per-install key)?"""
    if settings.event_key is None:
        return True
    return hmac.compare_digest(event.get("Key").encode(), settings.event_key.encode())


def _security(reason: str, event: AmiMessage, detail: str) -> SecurityAlert:
    return SecurityAlert(reason, event.get("Channel")[:128], event.get("Uniqueid")[:64],
                         event.get("Linkedid")[:64], detail)


def _refusal_alert(event: AmiMessage) -> SecurityAlert:
    return _security("caller_id_refused", event,
                     f"the dialplan refused a call whose {event.get('Reason')[:20] or 'number'} held "
                     "characters no telephone number has (an attempt to forge AMI events)")


def _maybe_refused_call(event: AmiMessage, when: datetime, settings: TrackerSettings) -> CallState | None:
    """A hotline call the dialplan's screen refused (UserEvent HotlineRefused): its Newchannel
    was split by the stranger's bytes, so the call is taken in from this whole, keyed event."""
    if event.event != "UserEvent" or event.get("UserEvent") != "HotlineRefused":
        return None
    uniqueid = event.get("Uniqueid")
    channel = event.get("Channel")
    if (uniqueid != event.get("Linkedid") or not channel.startswith("PJSIP/")
            or endpoint_of(channel) != settings.trunk or event.get("Did") not in settings.hotline_numbers):
        return None
    return CallState(linkedid=uniqueid, inbound_uniqueid=uniqueid, did=event.get("Did"), trunk=settings.trunk,
                     caller_number=event.get("CallerIDNum"), caller_name=_caller_name(event.get("CallerIDName")),
                     started_at=when, live_channels=frozenset({uniqueid}), stages=("refused",))


def _is_trunk_leg(event: AmiMessage, settings: TrackerSettings) -> bool:
    dest = event.get("DestChannel")
    return dest.startswith("PJSIP/") and endpoint_of(dest) == settings.trunk


def _is_announced_forward(call: CallState, event: AmiMessage) -> bool:
    """A trunk leg of a hotline call may dial only the duty mobile the dialplan announced."""
    number, _, _ = event.get("DialString").partition("@")
    return call.forwarded_to is not None and number == call.forwarded_to and "mobile" in call.stages


def _forward_guard(call: CallState, event: AmiMessage, when: datetime) -> HangupChannel:
    """Hang up a trunk leg of a hotline call that dials anything but the announced mobile."""
    channel = event.get("DestChannel")
    dialled = event.get("DialString").partition("@")[0]
    return HangupChannel(channel, "trunk leg of a hotline call dialling other than the announced duty mobile",
                         linkedid=call.linkedid,
                         violation=Violation(ViolationKind.OUTBOUND_ATTEMPT, when, call.linkedid,
                                             (("channel", channel), ("digits", dialled[:64]),
                                              ("announced_mobile", call.forwarded_to or ""),
                                              ("stopped_by", "forward_guard"))))


def _is_forward_announcement(event: AmiMessage) -> bool:
    return (event.event == "UserEvent" and event.get("UserEvent") == "HotlineStage"
            and event.get("Stage") == "mobile")


def _tick(state: TrackerState, now: datetime, settings: TrackerSettings) -> tuple[TrackerState, list[Decision]]:
    """Report, once per call, a ring limit passing while the agents' phones still ring;
    forget old forward marks."""
    if any(abs(now - at) > FORWARD_MARK_TTL for at in state.forward_marks.values()):  # abs: future-dated too
        state = replace(state, forward_marks={k: at for k, at in state.forward_marks.items()
                                              if abs(now - at) <= FORWARD_MARK_TTL})
    limit = settings.max_rings * settings.ring_period_seconds
    found: list[tuple[int, list[Decision]]] = []  # by the calls' order, whatever the map's
    calls = state.calls
    for call in state.calls.values():
        if (call.answered_leg is not None or call.inbound_ended_at is not None
                or call.probe_nonce is not None or call.uncertain
                or (call.ring_limit_reported and (call.mobile_limit_reported or "mobile" not in call.stages))):
            continue
        decisions: list[Decision] = []
        if not call.ring_limit_reported and _agents_stopped(call) is None:
            started = _ring_started_at(call)
            if started is not None and _past_limit(started, now, settings):
                call = evolve(call, ring_limit_reported=True)
                decisions.append(_ring_limit_violation(call, _record(call, settings), settings,
                                                       at=started + timedelta(seconds=limit)))
        mobile = _mobile_leg(call)
        if settings.mobile_ring_limit and mobile is not None and not call.mobile_limit_reported:
            started = _mobile_ring_started_at(mobile)
            if mobile.ended_at is None and mobile.answered_at is None and _past_limit(started, now, settings):
                decisions.append(_mobile_ring_limit_violation(call, mobile, settings))
                call = evolve(call, mobile_limit_reported=True)
        if decisions:
            calls = calls.set(call.linkedid, call)
            found.append((call.seq, decisions))
    if not found:
        return state, []
    found.sort(key=lambda pair: pair[0])
    return evolve(state, calls=calls), [d for _, decisions in found for d in decisions]


def _past_limit(started: datetime | None, now: datetime, settings: TrackerSettings) -> bool:
    """Has a phone ringing since `started` rung past the limit by `now`? (A start after `now`:
    the PBX's clock is ahead of ours; rings_heard refuses negative time.)"""
    return (started is not None and started <= now
            and rings_heard((now - started).total_seconds(), settings.ring_period_seconds) > settings.max_rings)


def _ring_limit_violation(call: CallState, record: CallRecord, settings: TrackerSettings,
                          at: datetime | None = None) -> Violation:
    limit = settings.max_rings * settings.ring_period_seconds
    occurred = at or (record.ring_started_at or call.started_at) + timedelta(seconds=limit)
    return Violation(ViolationKind.RING_LIMIT, occurred, call.linkedid,
                     (("did", call.did), ("caller_number", call.caller_number),
                      ("max_rings", str(settings.max_rings)), ("limit_seconds", f"{limit:g}")))


def _mobile_ring_limit_violation(call: CallState, mobile: CallLeg, settings: TrackerSettings) -> Violation:
    return mobile_ring_limit(_record(call, settings), mobile.channel,
                             _mobile_ring_started_at(mobile) or call.started_at, settings)


def mobile_ring_limit(record: CallRecord, channel: str, ring_started_at: datetime,
                      settings: TrackerSettings) -> Violation:
    """The duty mobile (leg `channel`, ringing since `ring_started_at`) rang past the limit (seed
    004: every phone answers within three rings). Its leg's channel keeps it apart from the
    agents' ring-limit breach of the same call (one of each per call)."""
    limit = settings.max_rings * settings.ring_period_seconds
    return Violation(ViolationKind.RING_LIMIT, ring_started_at + timedelta(seconds=limit), record.linkedid,
                     (("did", record.did), ("caller_number", record.caller_number), ("stage", "mobile"),
                      ("mobile", record.forwarded_to or ""), ("channel", channel),
                      ("max_rings", str(settings.max_rings)), ("limit_seconds", f"{limit:g}")))


def _outbound_attempt(event: AmiMessage, when: datetime) -> Violation:
    """A hotline phone dialled out, or transferred a call to an outside number; the dialplan
    refused it (UserEvent OutboundAttempt; a transfer's names the agent in From)."""
    channel = event.get("Channel")
    via = "transfer" if event.get("Via") == "transfer" else "dial"
    extension = event.get("From")[:64] if via == "transfer" else endpoint_of(channel)
    return Violation(ViolationKind.OUTBOUND_ATTEMPT, when, event.get("Linkedid"),
                     (("channel", channel), ("extension", extension),
                      ("digits", event.get("Digits")), ("stopped_by", "dialplan"), ("via", via)))


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
    return [HangupChannel(channel, "outbound call on the hotline trunk not started by the system",
                          linkedid=event.get("Linkedid"),
                          violation=Violation(ViolationKind.OUTBOUND_ATTEMPT, when, event.get("Linkedid"),
                                              (("channel", channel), ("stopped_by", "guard"))))]


def _reconcile_with_snapshot(
    state: TrackerState, snapshot: ChannelSnapshot, settings: TrackerSettings
) -> tuple[TrackerState, list[Decision]]:
    """After every AMI login: the events of a gap are gone. A tracked call whose caller channel
    vanished unseen is lost (CEL rebuilds it); one still live becomes uncertain (its answer may
    have been missed); a hotline call live but untracked (it began while pbx-bridge was not
    listening) is taken in, with its true start, uncertain too."""
    decisions: list[Decision] = []
    for _, linkedid in sorted(state.order.items()):  # in the order the calls were taken in
        call = state.calls[linkedid]
        if call.inbound_uniqueid not in snapshot.uniqueids:
            decisions.append(CallLost(_record(call, settings)))
            state = _without(state, call)
            continue
        through_gap = snapshot.since is None or call.started_at < snapshot.since
        state = _put(state, evolve(call, live_channels=call.live_channels & snapshot.uniqueids,
                                   uncertain=call.uncertain or through_gap))
    for channel in snapshot.channels:
        if channel.linkedid in state.calls or not _is_hotline_inbound(channel, settings) or snapshot.at is None:
            continue
        if len(state.calls) >= settings.max_calls:
            break
        adopted = _adopt(channel, [c for c in snapshot.channels if c.linkedid == channel.linkedid], snapshot.at,
                         settings)
        state, _ = _with_call(state, adopted, settings)
        decisions.append(CallStarted(_record(adopted, settings)))
    return state, decisions


def _is_hotline_inbound(channel: LiveChannel, settings: TrackerSettings) -> bool:
    return (channel.uniqueid == channel.linkedid and channel.channel.startswith("PJSIP/")
            and endpoint_of(channel.channel) == settings.trunk and channel.exten in settings.hotline_numbers)


def _adopt(inbound: LiveChannel, family: list[LiveChannel], at: datetime, settings: TrackerSettings) -> CallState:
    """A call in progress when pbx-bridge started listening, from CoreShowChannels: its start is
    Asterisk's (`at` - the channel's age), its legs the other channels of its linkedid."""
    legs = {c.uniqueid: CallLeg(linkedid=inbound.linkedid, uniqueid=c.uniqueid, channel=c.channel,
                                endpoint=endpoint_of(c.channel))
            for c in family if c.uniqueid != inbound.uniqueid and not c.channel.startswith("Local/")}
    return CallState(linkedid=inbound.linkedid, inbound_uniqueid=inbound.uniqueid, did=inbound.exten,
                     trunk=settings.trunk, caller_number=inbound.caller_number[:64],
                     caller_name=_caller_name(inbound.caller_name[:256]),
                     started_at=at - timedelta(seconds=max(inbound.seconds, 0.0)),
                     legs=legs, live_channels=frozenset(c.uniqueid for c in family), uncertain=True,
                     adopted=True)


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

    if name == "UserEvent" and len(call.stages) >= MAX_STAGES_PER_CALL:
        return call  # a real call announces a handful of stages
    if name == "Newchannel":
        if uniqueid not in call.live_channels and len(call.live_channels) >= MAX_CHANNELS_PER_CALL:
            return call
        live = call.live_channels | {uniqueid}
        channel = event.get("Channel")
        # Bounded on its own: a repeated Newchannel of a channel already live (a Local one, say)
        # must not add a leg past the bound either.
        if inbound or channel.startswith("Local/") or (
                uniqueid not in call.legs and len(call.legs) >= MAX_CHANNELS_PER_CALL):
            return evolve(call, live_channels=live)
        stage = call.stages[-1] if call.stages else None
        transfer = stage in TRANSFER_STAGES
        leg = CallLeg(linkedid=call.linkedid, uniqueid=uniqueid, channel=channel, endpoint=endpoint_of(channel),
                      stage=stage, transfer_kind=call.transfer_kind if stage == "transfer" else None,
                      transferred_by=call.transfer_from if transfer else None)
        return evolve(call, live_channels=live, legs={**call.legs, uniqueid: leg})

    if name == "UserEvent" and event.get("UserEvent") == "HotlineStage" and inbound:
        stage = event.get("Stage")
        if stage not in KNOWN_STAGES:
            return call
        if stage == "mobile":
            return evolve(call, stages=(*call.stages, stage), forwarded_to=event.get("Mobile") or None,
                          duty_holder=_b64_text(event.get("HolderB64")) or None)
        return evolve(call, stages=(*call.stages, stage))

    if name == "UserEvent" and event.get("UserEvent") == "HotlineTransfer" and inbound:
        kind = event.get("Kind")
        if kind not in ("blind", "attended", "return"):
            return call
        return evolve(call, stages=(*call.stages, "transfer_return" if kind == "return" else "transfer"),
                      transfer_kind=kind, transfer_from=event.get("From")[:64] or None)

    if name == "UserEvent" and event.get("UserEvent") == "HotlineProbe" and inbound:
        return evolve(call, probe_nonce=event.get("Nonce"), stages=(*call.stages, "probe"))

    if name == "UserEvent" and event.get("UserEvent") == "HotlineRefused" and inbound:
        return call if "refused" in call.stages else evolve(call, stages=(*call.stages, "refused"))

    if name == "NewCallerid" and inbound:
        return evolve(call, caller_number=event.get("CallerIDNum"),
                      caller_name=_caller_name(event.get("CallerIDName")))

    if name == "DialBegin":
        return _update_leg(call, event.get("DestUniqueid"),
                           lambda leg: leg if leg.dial_started_at else evolve(leg, dial_started_at=when))

    if name == "DialState" and event.get("DialStatus") in RINGING_DIAL_STATUSES:
        return _update_leg(call, event.get("DestUniqueid"), lambda leg: _ringing(leg, when))

    if name == "Newstate" and event.get("ChannelState") == CHANNEL_STATE_RINGING and not inbound:
        return _update_leg(call, uniqueid, lambda leg: _ringing(leg, when))

    if name == "DialEnd":
        dest = event.get("DestUniqueid")
        status = event.get("DialStatus")
        updated = _update_leg(call, dest, lambda leg: evolve(
            leg, dial_status=status, answered_at=when if status == "ANSWER" else leg.answered_at))
        if status == "ANSWER" and dest in call.legs and call.answered_leg is None:
            current = call.stages[-1] if call.stages and call.stages[-1] in ANSWERING_STAGES else None
            updated = evolve(updated, answered_leg=dest, answered_stage=current)
        return updated

    if name == "HangupRequest" and inbound and call.caller_hung_up_at is None:
        # A remote hangup queued on the caller's channel: the caller put the phone down.
        return evolve(call, caller_hung_up_at=when)

    if name == "Hangup":
        cause, text = _cause(event)
        live = call.live_channels - {uniqueid}
        if inbound:
            return evolve(call, live_channels=live, inbound_ended_at=when, hangup_cause=cause,
                          hangup_cause_text=text)
        updated = _update_leg(call, uniqueid, lambda leg: evolve(
            leg, ended_at=when, hangup_cause=cause, hangup_cause_text=text))
        return evolve(updated, live_channels=live)

    return call


def _b64_text(value: str) -> str:
    """Decode a base64 UTF-8 value from the dialplan; '' if it is not one."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""


def _ringing(leg: CallLeg, when: datetime) -> CallLeg:
    return leg if leg.ring_started_at else evolve(leg, ring_started_at=when)


def _update_leg(call: CallState, uniqueid: str, change: Callable[[CallLeg], CallLeg]) -> CallState:
    leg = call.legs.get(uniqueid)
    if leg is None:
        return call
    new_leg = change(leg)
    if new_leg is leg:
        return call
    return evolve(call, legs={**call.legs, uniqueid: new_leg})


def _agent_legs(call: CallState) -> list[CallLeg]:
    """The legs to the agents' phones (not the forward to the duty mobile on the trunk)."""
    return [leg for leg in call.legs.values() if leg.endpoint != call.trunk]


def _mobile_leg(call: CallState) -> CallLeg | None:
    """The forward's leg to the duty mobile (out on the trunk), if the call was forwarded."""
    legs = [leg for leg in call.legs.values() if leg.endpoint == call.trunk]
    return legs[0] if legs and "mobile" in call.stages else None


def _mobile_ring_started_at(leg: CallLeg) -> datetime | None:
    """The mobile's ringing (180/183 from the carrier), else its dial."""
    return leg.ring_started_at or leg.dial_started_at


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

    mobile = _mobile_leg(call)
    mobile_ring_seconds = mobile_within = None
    if mobile is not None:
        mobile_answered = answered is not None and on_mobile
        mobile_ring_seconds = _seconds(_mobile_ring_started_at(mobile),
                                       answered_at if mobile_answered else mobile.ended_at or ended_at)
        mobile_within = within_ring_limit(mobile_ring_seconds, mobile_answered, settings.ring_period_seconds,
                                          settings.max_rings)

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
        talk_seconds=_talk_seconds(call),
        hangup_cause=call.hangup_cause,
        hangup_cause_text=call.hangup_cause_text,
        after_hours=(call.stages[0] == "after_hours") if call.stages else None,
        answered_stage=call.answered_stage,
        forwarded_to=call.forwarded_to,
        duty_holder=call.duty_holder,
        needs_call_sheet=on_mobile,
        # A probe is proved by the nonce the dialplan matched (keyed HotlineProbe). Until the call
        # ends, the probe's caller number marks it provisionally, so a probe's first rows never
        # count as a customer's; the final record of a stranger who spoofed it says False.
        is_probe=call.probe_nonce is not None or (
            ended_at is None and settings.probe_caller is not None and call.caller_number == settings.probe_caller),
        wait_seconds=_seconds(call.started_at, answered_at if answered is not None else ended_at),
        mobile_ring_seconds=mobile_ring_seconds,
        mobile_within_ring_limit=mobile_within,
        transferred_to=_transferred_to(call),
    )


def leg_talk_seconds(leg: CallLeg, caller_ended_at: datetime | None) -> float | None:
    """One person's talk with the caller: from the leg's answer (an attended transfer's colleague:
    from the transfer) to its end or the caller's."""
    ends = [t for t in (caller_ended_at, leg.ended_at) if t is not None]
    joined = leg.transferred_at or leg.answered_at
    return _seconds(joined, min(ends)) if leg.answered_at is not None and joined is not None and ends else None


def _talk_seconds(call: CallState) -> float | None:
    """The caller's whole talk: every person's talk with them, added up (a transfer's ringing
    between two people is not talk)."""
    talks = [t for leg in call.legs.values() if (t := leg_talk_seconds(leg, call.inbound_ended_at)) is not None]
    return round(sum(talks), 3) if talks else None


def transferred_to_of(legs: list[CallLeg]) -> str | None:
    """Who had the caller at the end after a transfer: the last answered leg, if a transfer rang
    it (a call that went back to the agent who transferred it names nobody)."""
    answered = [(leg.transferred_at or leg.answered_at, leg) for leg in legs if leg.answered_at is not None]
    last = max(answered, key=lambda pair: pair[0] or datetime.min, default=(None, None))[1]
    return last.endpoint if last is not None and last.stage == "transfer" else None


def _transferred_to(call: CallState) -> str | None:
    return transferred_to_of(list(call.legs.values()))


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
