"""The CEL call builder: the CEL rows of one linkedid in; the call's record, legs and violations out.

Pure: no I/O, no clock. It decides every field exactly as the AMI tracker does
(`pbx_bridge.tracker.tracker`), from what Asterisk's Channel Event Log keeps of a call:

- the inbound trunk channel's CHAN_START (uniqueid = linkedid, the DID in `exten`) starts it;
- every other channel but `Local/` halves is a leg (as the tracker counts them), dialled at its
  CHAN_START and ended at its HANGUP;
- a person answered only where a leg's own ANSWER row was written while Dial or Queue owned it
  (`appname` AppDial / AppQueue): the caller channel's ANSWER (an Answer() before voicemail, the
  bridge) and a `Local/` half's ANSWER prove nothing;
- what the dialplan knows is in its USER_DEFINED rows (`CELGenUserEvent`, see
  dialplan/extensions.conf): HotlineStage (stage, mobile, holder), HotlineProbe (nonce),
  HotlineRefused (reason, did), HotlineDial (after each Dial: its status and Asterisk's
  RINGTIME_MS / PROGRESSTIME_MS, the first ring of that Dial; CEL has no ringing event);
- the caller hung up when the `hangupsource` of its channel's HANGUP is that channel itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pbx_bridge.ami.wire import unescape_sip_quoted
from pbx_bridge.cel.causes import cause_text
from pbx_bridge.tracker.model import CallLeg, CallRecord, Disposition, Violation, ViolationKind
from pbx_bridge.tracker.rings import rings_heard, within_ring_limit
from pbx_bridge.tracker.tracker import (  # the tracker's own rules: both builders decide alike
    ANSWERING_STAGES,
    KNOWN_STAGES,
    MAX_STAGES_PER_CALL,
    TRANSFER_STAGES,
    UNANSWERED_DISPOSITIONS,
    TrackerSettings,
    endpoint_of,
    leg_talk_seconds,
    mobile_ring_limit,
    transferred_to_of,
)

# The application that owned a dialled channel when its far end answered: only these answers are
# a person picking up (a leg's ANSWER with AppDial; a queue member's with AppQueue).
PERSON_ANSWER_APPS = frozenset({"AppDial", "AppQueue"})
CONGESTION_CAUSES = frozenset({34, 38, 41, 42, 44})
UNAVAILABLE_CAUSES = frozenset({1, 3, 20, 27, 66})
# The columns of table `cel` the builder reads (sql/migrations/0001_calls.sql).
CEL_COLUMNS = ("id", "eventtype", "eventtime", "userdeftype", "cid_name", "cid_num", "cid_dnid", "exten",
               "context", "channame", "appname", "appdata", "uniqueid", "linkedid", "peer", "extra")


@dataclass(frozen=True, slots=True)
class CelRow:
    """One row of table `cel` (the columns the builder reads); `eventtime` is aware UTC."""

    id: int
    eventtype: str
    eventtime: datetime
    uniqueid: str
    linkedid: str
    channame: str = ""
    userdeftype: str = ""
    cid_name: str = ""
    cid_num: str = ""
    cid_dnid: str = ""
    exten: str = ""
    context: str = ""
    appname: str = ""
    appdata: str = ""
    peer: str = ""
    extra: str = ""

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> CelRow:
        """A row as asyncpg returns it, or as a fixture stores it (eventtime as ISO 8601 text).
        cel_pgsql writes UTC without a zone (usegmtime = yes): a naive time is UTC."""
        row = dict(row.items())
        when = row["eventtime"]
        if isinstance(when, str):
            when = datetime.fromisoformat(when)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        values = {name: str(row[name] or "") for name in CEL_COLUMNS
                  if name not in ("id", "eventtime") and name in row}
        return cls(id=int(row["id"]), eventtime=when.astimezone(UTC), **values)

    def to_json(self) -> dict[str, Any]:
        """The row as a fixture stores it."""
        return {name: (getattr(self, name).isoformat() if name == "eventtime" else getattr(self, name))
                for name in CEL_COLUMNS}


@dataclass(frozen=True, slots=True)
class CelCall:
    """A hotline call as its CEL rows tell it."""

    record: CallRecord
    legs: tuple[CallLeg, ...]
    violations: tuple[Violation, ...]
    stages: tuple[str, ...]
    finished: bool  # Asterisk wrote LINKEDID_END: every channel of the call is gone
    last_event_at: datetime  # its last row
    channels: frozenset[str]  # every channel's uniqueid (Local/ halves included)
    closed_at_last_event: bool = False  # no end was written (Asterisk crashed): ended at its last row


def parse_extra(text: str) -> dict[str, str]:
    """CEL's `extra` column (a JSON object, e.g. a HANGUP's hangupcause, hangupsource, dialstatus)
    as text values; {} if it is not one."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def attended_target(row: CelRow) -> str | None:
    """The colleague's channel (uniqueid) an ATTENDEDTRANSFER row hands the caller to."""
    if row.eventtype != "ATTENDEDTRANSFER":
        return None
    return parse_extra(row.extra).get("transfer_target_channel_uniqueid") or None


def user_fields(row: CelRow) -> dict[str, str]:
    """The `key=value&...` facts a dialplan CELGenUserEvent carries (in the `extra` member of the
    row's `extra`, or the raw column); a repeated key keeps its first value."""
    raw = parse_extra(row.extra).get("extra", row.extra if not row.extra.startswith("{") else "")
    fields: dict[str, str] = {}
    for part in raw.split("&"):
        key, sep, value = part.partition("=")
        if sep and key and key not in fields:
            fields[key] = value
    return fields


@dataclass
class _Channel:
    """What the rows say about one channel (working state of the builder)."""

    uniqueid: str
    channel: str
    started_at: datetime
    order: int  # position of its CHAN_START among the call's rows
    answered_at: datetime | None = None
    answer_order: int | None = None
    ended_at: datetime | None = None
    hangup: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Dial:
    """A Dial the dialplan reported (HotlineDial): where it ended among the rows, and its first ring
    (RINGTIME_MS / PROGRESSTIME_MS after its start)."""

    order: int
    ring_offset: timedelta | None


def _ms(value: str) -> timedelta | None:
    return timedelta(milliseconds=int(value)) if value.isascii() and value.isdigit() and len(value) < 10 else None


def _b64_text(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""


def _caller_name(raw: str) -> str:
    """As the tracker: the caller's name as the carrier sent it; `<unknown>` means none. CEL's
    cid_name keeps PJSIP's SIP quoted-pair backslashes (it is not C-escaped like AMI's)."""
    return "" if raw == "<unknown>" else unescape_sip_quoted(raw)


def _cause(values: Mapping[str, str]) -> int | None:
    raw = values.get("hangupcause", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 3)


def _inbound(rows: Sequence[CelRow], settings: TrackerSettings) -> tuple[CelRow, str] | None:
    """The inbound trunk channel's first row and the DID: its CHAN_START at a hotline number, or
    (a call the dialplan's screen refused) the HotlineRefused row naming a hotline number."""
    for row in rows:
        on_trunk = (row.uniqueid == row.linkedid and row.channame.startswith("PJSIP/")
                    and endpoint_of(row.channame) == settings.trunk)
        if not on_trunk:
            continue
        if row.eventtype == "CHAN_START" and row.exten in settings.hotline_numbers:
            return row, row.exten
        if row.eventtype == "USER_DEFINED" and row.userdeftype == "HotlineRefused":
            did = user_fields(row).get("did", "")
            if did in settings.hotline_numbers:
                return row, did
    return None


@dataclass
class _Scan:
    """What one pass over a call's rows found (working state of the builder)."""

    caller: CelRow  # the caller channel's last row: its caller ID as it last was
    channels: dict[str, _Channel] = field(default_factory=dict)
    stages: list[tuple[int, str]] = field(default_factory=list)  # (row position, stage), as announced
    dials: list[_Dial] = field(default_factory=list)
    forwarded_to: str | None = None
    duty_holder: str | None = None
    probe_nonce: str | None = None
    transfers: list[tuple[int, str, str]] = field(default_factory=list)  # (row position, kind, from agent)
    attended: dict[str, tuple[datetime, str]] = field(default_factory=dict)  # target uniqueid: (when, by whom)


def _scan(ordered: Sequence[CelRow], first: CelRow) -> _Scan:
    """Read the rows in order: channels, their answers and hangups, the dialplan's facts."""
    scan = _Scan(caller=first)
    inbound_id = first.uniqueid
    for order, row in enumerate(ordered):
        if row.uniqueid == inbound_id and row.eventtype != "LINKEDID_END":
            scan.caller = row  # the screen may have rewritten the caller ID
        channel = scan.channels.get(row.uniqueid)
        if row.eventtype == "CHAN_START" and channel is None:
            scan.channels[row.uniqueid] = _Channel(row.uniqueid, row.channame, row.eventtime, order)
        elif row.eventtype == "ANSWER" and channel is not None and channel.answered_at is None:
            if row.appname in PERSON_ANSWER_APPS:
                channel.answered_at, channel.answer_order = row.eventtime, order
        elif row.eventtype == "HANGUP" and channel is not None and channel.ended_at is None:
            channel.ended_at, channel.hangup = row.eventtime, parse_extra(row.extra)
        elif row.eventtype == "USER_DEFINED" and row.uniqueid == inbound_id:
            _dialplan_fact(scan, order, row.userdeftype, user_fields(row))
        elif row.eventtype == "ATTENDEDTRANSFER" and (target := attended_target(row)):
            # the agent handed the caller to the colleague they consulted (that colleague's rows
            # before it are under the consultation's linkedid: the reconcile fetches them too)
            scan.attended[target] = (row.eventtime, endpoint_of(row.channame))
            scan.stages.append((order, "transfer"))
    return scan


def _dialplan_fact(scan: _Scan, order: int, kind: str, facts: Mapping[str, str]) -> None:
    """One CELGenUserEvent of the dialplan, read as the tracker reads the UserEvent beside it."""
    if kind == "HotlineDial":
        offsets = [o for o in (_ms(facts.get("ringtime_ms", "")), _ms(facts.get("progresstime_ms", "")))
                   if o is not None]
        scan.dials.append(_Dial(order, min(offsets) if offsets else None))
        return
    names = [stage for _, stage in scan.stages]
    if len(names) >= MAX_STAGES_PER_CALL:
        return
    if kind == "HotlineStage" and facts.get("stage") in KNOWN_STAGES:
        scan.stages.append((order, facts["stage"]))
        if facts["stage"] == "mobile":
            scan.forwarded_to = facts.get("mobile") or None
            scan.duty_holder = _b64_text(facts.get("holder_b64", "")) or None
    elif kind == "HotlineProbe":
        scan.probe_nonce = facts.get("nonce", "")
        scan.stages.append((order, "probe"))
    elif kind == "HotlineRefused" and "refused" not in names:
        scan.stages.append((order, "refused"))
    elif kind == "HotlineTransfer" and facts.get("kind") in ("blind", "attended", "return"):
        scan.stages.append((order, "transfer_return" if facts["kind"] == "return" else "transfer"))
        scan.transfers.append((order, facts["kind"], facts.get("from", "")[:64]))


def build_call(rows: Iterable[CelRow], settings: TrackerSettings, *,
               close_at_last_event: bool = False) -> CelCall | None:
    """The call these rows (all of one linkedid) record, or None if they are not a hotline call.

    Until the caller's channel has hung up the record is not final (no `ended_at`, no
    disposition), unless `close_at_last_event`: its channels vanished without an end (Asterisk
    crashed), so it ended at its last row.
    """
    ordered = sorted(rows, key=lambda r: (r.eventtime, r.id))
    found = _inbound(ordered, settings)
    if found is None:
        return None
    first, did = found
    targets = {t for r in ordered if r.linkedid == first.linkedid and (t := attended_target(r))}
    ordered = [r for r in ordered if r.linkedid == first.linkedid or r.uniqueid in targets]
    scan = _scan(ordered, first)
    stages = [stage for _, stage in scan.stages]
    last_time = ordered[-1].eventtime
    finished = any(r.eventtype == "LINKEDID_END" for r in ordered)
    inbound = scan.channels.setdefault(first.uniqueid, _Channel(first.uniqueid, first.channame, first.eventtime, 0))
    closed = False
    if close_at_last_event and not finished:
        for channel in scan.channels.values():
            if channel.ended_at is None:
                channel.ended_at, closed = last_time, True

    # Legs as the tracker counts them: every channel but the caller's and Local/ halves.
    leg_channels = [c for c in scan.channels.values()
                    if c.uniqueid != inbound.uniqueid and not c.channel.startswith("Local/")]
    answered = min((c for c in leg_channels if c.answer_order is not None),
                   key=lambda c: c.answer_order or 0, default=None)
    answered_stage = None
    if answered is not None:
        before = [stage for order, stage in scan.stages if order < (answered.answer_order or 0)]
        answered_stage = before[-1] if before and before[-1] in ANSWERING_STAGES else None

    trunk = settings.trunk
    agent_legs = [c for c in leg_channels if endpoint_of(c.channel) != trunk]
    ring_started_at = _ring_started_at(agent_legs, scan.dials)
    answered_at = answered.answered_at if answered is not None else None
    on_mobile = answered is not None and endpoint_of(answered.channel) == trunk
    ended_at = inbound.ended_at
    # Ring time is time at the agents' phones: until an agent answered, or until the agents
    # stopped ringing (the call went on to the mobile) or the call ended.
    agents_stopped = None
    if agent_legs and all(c.ended_at is not None for c in agent_legs) and "mobile" in stages:
        agents_stopped = max(c.ended_at for c in agent_legs if c.ended_at is not None)
    agent_ring_end = answered_at if answered is not None and not on_mobile else agents_stopped or ended_at
    ring_seconds = _seconds(ring_started_at, agent_ring_end)

    mobile = next((c for c in leg_channels if endpoint_of(c.channel) == trunk), None) if "mobile" in stages else None
    mobile_ring_started_at = mobile_ring_seconds = mobile_within = None
    if mobile is not None:
        mobile_ring_started_at = _leg_ring_started_at(mobile, scan.dials)
        mobile_ring_end = answered_at if on_mobile else mobile.ended_at or ended_at
        mobile_ring_seconds = _seconds(mobile_ring_started_at, mobile_ring_end)
        mobile_within = within_ring_limit(mobile_ring_seconds, on_mobile, settings.ring_period_seconds,
                                          settings.max_rings)

    legs = tuple(_leg(first.linkedid, c, scan, ended_at) for c in leg_channels)
    talks = [leg.talk_seconds for leg in legs if leg.talk_seconds is not None]

    answered_by: str | None = None
    if scan.probe_nonce is not None:
        answered_by = "pbx-bridge-probe"
    elif answered is not None:
        endpoint = endpoint_of(answered.channel)
        answered_by = (scan.forwarded_to or endpoint) if on_mobile else endpoint
    cause = _cause(inbound.hangup)
    record = CallRecord(
        linkedid=first.linkedid,
        did=did,
        trunk=trunk,
        caller_number=scan.caller.cid_num,
        caller_name=_caller_name(scan.caller.cid_name),
        started_at=first.eventtime,
        ring_started_at=ring_started_at,
        answered_at=answered_at,
        ended_at=ended_at,
        ring_seconds=ring_seconds,
        rings=rings_heard(ring_seconds, settings.ring_period_seconds) if ring_seconds is not None else None,
        within_ring_limit=within_ring_limit(ring_seconds, answered is not None and not on_mobile,
                                            settings.ring_period_seconds, settings.max_rings),
        answered_by=answered_by,
        disposition=_disposition(scan, stages, inbound, answered is not None, on_mobile),
        talk_seconds=round(sum(talks), 3) if talks else None,
        hangup_cause=cause,
        hangup_cause_text=cause_text(cause) if cause is not None else None,
        is_probe=scan.probe_nonce is not None,
        after_hours=(stages[0] == "after_hours") if stages else None,
        answered_stage=answered_stage,
        forwarded_to=scan.forwarded_to,
        duty_holder=scan.duty_holder,
        needs_call_sheet=on_mobile,
        source="cel",
        wait_seconds=_seconds(first.eventtime, answered_at if answered is not None else ended_at),
        mobile_ring_seconds=mobile_ring_seconds,
        mobile_within_ring_limit=mobile_within,
        transferred_to=transferred_to_of(list(legs)),
    )
    violations = _violations(record, stages, settings)
    if (settings.mobile_ring_limit and mobile is not None and mobile_within is False
            and record.ended_at is not None):
        violations += (mobile_ring_limit(record, mobile.channel, mobile_ring_started_at or mobile.started_at,
                                         settings),)
    return CelCall(record, legs, violations, tuple(stages), finished, last_time, frozenset(scan.channels), closed)


def _disposition(scan: _Scan, stages: Sequence[str], inbound: _Channel, answered: bool,
                 on_mobile: bool) -> Disposition | None:
    """How the call ended, in the tracker's order of precedence; None until the caller hung up."""
    if inbound.ended_at is None:
        return None
    if scan.probe_nonce is not None:
        return Disposition.ANSWERED  # answered by the PBX itself: a probe, not a customer
    if on_mobile:
        return Disposition.FORWARDED
    if answered:
        return Disposition.ANSWERED
    if "voicemail" in stages:
        return Disposition.VOICEMAIL
    if "mobile" in stages:
        return Disposition.FORWARD_MISSED
    if _caller_hung_up(inbound):
        return Disposition.ABANDONED
    return Disposition.MISSED


def _caller_hung_up(inbound: _Channel) -> bool:
    """The caller put the phone down: Asterisk names the caller's own channel as the source of its
    hangup (a hangup by the dialplan or by the other party names them instead)."""
    return bool(inbound.hangup.get("hangupsource")) and inbound.hangup.get("hangupsource") == inbound.channel


def _ring_started_at(agent_legs: Sequence[_Channel], dials: Sequence[_Dial]) -> datetime | None:
    """First agent phone ringing: for each Dial the dialplan reported, the creation of its first leg
    plus Asterisk's RINGTIME/PROGRESSTIME; the first leg's creation if no Dial reported a ring."""
    if not agent_legs:
        return None
    rang: list[datetime] = []
    previous = -1
    for dial in dials:
        members = [c.started_at for c in agent_legs if previous < c.order < dial.order]
        if members and dial.ring_offset is not None:
            rang.append(min(members) + dial.ring_offset)
        previous = dial.order
    return min(rang) if rang else min(c.started_at for c in agent_legs)


def _leg_ring_started_at(leg: _Channel, dials: Sequence[_Dial]) -> datetime:
    """One leg's ringing: its creation plus the RINGTIME/PROGRESSTIME of the Dial that made it
    (the first Dial reported after it); its creation if that Dial reported no ring."""
    dial = next((d for d in dials if d.order > leg.order), None)
    return leg.started_at + dial.ring_offset if dial is not None and dial.ring_offset is not None else leg.started_at


def _leg(linkedid: str, channel: _Channel, scan: _Scan, caller_ended_at: datetime | None) -> CallLeg:
    cause = _cause(channel.hangup)
    stages = [stage for order, stage in scan.stages if order < channel.order]
    stage = stages[-1] if stages else None
    transfers = [(kind, by) for order, kind, by in scan.transfers if order < channel.order]
    kind, by = transfers[-1] if transfers and stage in TRANSFER_STAGES else (None, None)
    transferred_at = None
    if channel.uniqueid in scan.attended:  # rung in a consultation, then given the caller
        transferred_at, handed_by = scan.attended[channel.uniqueid]
        stage, kind, by = "transfer", "attended", handed_by
    leg = CallLeg(
        linkedid=linkedid,
        uniqueid=channel.uniqueid,
        channel=channel.channel,
        endpoint=endpoint_of(channel.channel),
        dial_started_at=channel.started_at,
        ring_started_at=None,  # CEL has no ringing event; the call's first ring is on its record
        answered_at=channel.answered_at,
        ended_at=channel.ended_at,
        dial_status=_dial_status(channel, cause),
        hangup_cause=cause,
        hangup_cause_text=cause_text(cause) if cause is not None else None,
        stage=stage,
        transfer_kind=kind if stage == "transfer" else None,
        transferred_by=by or None,
        transferred_at=transferred_at,
    )
    return replace(leg, talk_seconds=leg_talk_seconds(leg, caller_ended_at))


def _dial_status(channel: _Channel, cause: int | None) -> str | None:
    """Dial's verdict on one leg (AMI DialEnd's DialStatus), from the cause its HANGUP row carries:
    a Dial that times out hangs its legs up with no cause (0); one cancelled because another phone
    answered gives them 26, and one whose caller left (or whose Local/ half hung up) the caller's
    cause. Verified in the sandbox for Dial, Queue and Local/ ring groups."""
    if channel.answered_at is not None:
        return "ANSWER"
    if channel.ended_at is None:
        return None
    if cause == 17:
        return "BUSY"
    if cause in CONGESTION_CAUSES:
        return "CONGESTION"
    if cause in UNAVAILABLE_CAUSES:
        return "CHANUNAVAIL"
    if cause in (None, 0, 18, 19):
        return "NOANSWER"
    return "CANCEL"


def _violations(record: CallRecord, stages: Sequence[str], settings: TrackerSettings) -> tuple[Violation, ...]:
    """The rule breaches this record proves, as the tracker records them at the call's end."""
    if record.ended_at is None:
        return ()
    out: list[Violation] = []
    if record.within_ring_limit is False:
        limit = settings.max_rings * settings.ring_period_seconds
        out.append(Violation(ViolationKind.RING_LIMIT,
                             (record.ring_started_at or record.started_at) + timedelta(seconds=limit),
                             record.linkedid,
                             (("did", record.did), ("caller_number", record.caller_number),
                              ("max_rings", str(settings.max_rings)), ("limit_seconds", f"{limit:g}"))))
    if record.disposition in UNANSWERED_DISPOSITIONS and "refused" not in stages:
        out.append(Violation(ViolationKind.UNANSWERED, record.ended_at, record.linkedid,
                             (("disposition", str(record.disposition)), ("did", record.did),
                              ("caller_number", record.caller_number))))
    return tuple(out)
