"""Value types the tracker produces: call records, legs, and the decisions that carry them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Disposition(StrEnum):
    """How a call ended (the `calls.disposition` column)."""

    ANSWERED = "answered"
    ABANDONED = "abandoned"  # the caller hung up before anyone answered
    MISSED = "missed"  # nobody answered and the PBX ended the call
    FORWARDED = "forwarded"
    FORWARD_MISSED = "forward_missed"
    VOICEMAIL = "voicemail"


@dataclass(frozen=True)  # no slots: the tracker updates legs with `persistent.evolve` (a dict copy)
class CallLeg:
    """One outbound channel of a call (an agent phone), as stored in `call_legs`."""

    linkedid: str
    uniqueid: str
    channel: str
    endpoint: str
    dial_started_at: datetime | None = None
    ring_started_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    dial_status: str | None = None
    hangup_cause: int | None = None
    hangup_cause_text: str | None = None
    # What rang it: group | escalation | mobile | transfer | transfer_return (the dialplan's stage).
    stage: str | None = None
    transfer_kind: str | None = None  # blind | attended, for a transfer's leg
    transferred_by: str | None = None  # the agent who transferred the caller to this leg (or back)
    talk_seconds: float | None = None  # this person's talk with the caller
    # An attended transfer: when this person, answered in the consultation, was given the caller
    # (their talk with the caller starts here, not at their answer).
    transferred_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One hotline call, as stored in `calls` (one row per linkedid)."""

    linkedid: str
    did: str
    trunk: str
    caller_number: str
    caller_name: str
    started_at: datetime
    ring_started_at: datetime | None
    answered_at: datetime | None
    ended_at: datetime | None
    ring_seconds: float | None
    rings: int | None
    within_ring_limit: bool | None
    answered_by: str | None
    disposition: Disposition | None
    talk_seconds: float | None
    hangup_cause: int | None
    hangup_cause_text: str | None
    is_probe: bool = False
    after_hours: bool | None = None
    answered_stage: str | None = None  # group | escalation | mobile
    forwarded_to: str | None = None  # the duty mobile dialled
    duty_holder: str | None = None
    needs_call_sheet: bool = False  # answered on the mobile: the sheet is filled in afterwards
    source: str = "ami"
    # The caller's wait: from the call's start to the answer by a person, else to its end.
    wait_seconds: float | None = None
    # A forward: the duty mobile's ring time, from its ringing (180/183 from the carrier; its dial
    # if none came) to its answer, else to the end of its leg.
    mobile_ring_seconds: float | None = None
    # Like within_ring_limit, for the duty mobile's leg (None when there was no forward).
    mobile_within_ring_limit: bool | None = None
    # Who had the caller at the end after a transfer (None: no transfer was taken).
    transferred_to: str | None = None


@dataclass(frozen=True, slots=True)
class CallStarted:
    """A hotline call arrived: its record so far (written at once, so a crash loses nothing)."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class CallEnded:
    """Every channel of the call has hung up: the final record and its legs."""

    record: CallRecord
    legs: tuple[CallLeg, ...]


@dataclass(frozen=True, slots=True)
class CallLost:
    """The call's channels are gone but its end was never seen (AMI gap, Asterisk restart).

    The record stays as last written; its end is for reconciliation from CEL to rebuild.
    """

    record: CallRecord


class ViolationKind(StrEnum):
    """Breaches of the hotline rules (the `policy_violations.kind` column)."""

    RING_LIMIT = "ring_limit"  # still ringing when max_rings passed (所有电话必须在三响之内接听)
    OUTBOUND_ATTEMPT = "outbound_attempt"  # the 400 line used to dial out (禁止外拨)
    UNANSWERED = "unanswered"  # nobody took the call (杜绝电话无人接听)


@dataclass(frozen=True, slots=True)
class Violation:
    """A rule breach, recorded the moment it is known (a ring-limit breach while still ringing)."""

    kind: ViolationKind
    occurred_at: datetime
    linkedid: str | None
    details: tuple[tuple[str, str], ...] = ()

    def detail(self, key: str) -> str | None:
        """One detail by name."""
        return dict(self.details).get(key)


@dataclass(frozen=True, slots=True)
class HangupChannel:
    """Hang this channel up now (the outbound guard), once Asterisk confirms the channel belongs
    to `linkedid` (an event forged through a caller ID must not get a real call hung up); then
    record `violation`."""

    channel: str
    reason: str
    linkedid: str = ""
    violation: Violation | None = None


@dataclass(frozen=True, slots=True)
class SecurityAlert:
    """Something in the AMI stream that only a stranger's bytes explain (a forged event)."""

    reason: str
    channel: str
    uniqueid: str
    linkedid: str
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeArrived:
    """A line probe came back on the hotline trunk (the dialplan answered it itself)."""

    nonce: str
    at: datetime
    linkedid: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Tracker input: the runtime clock's time, so limits can pass while no event arrives."""

    now: datetime


@dataclass(frozen=True, slots=True)
class LiveChannel:
    """One channel as CoreShowChannels lists it."""

    channel: str
    uniqueid: str
    linkedid: str
    state: str  # ChannelState: 4 Ring, 5 Ringing, 6 Up
    caller_number: str
    caller_name: str
    exten: str
    seconds: float  # Duration: how long the channel has existed
    bridged: bool


@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    """Tracker input: the channels Asterisk has right now (CoreShowChannels after a login), and
    when the list was taken (`at`: the event clock's time)."""

    uniqueids: frozenset[str]
    channels: tuple[LiveChannel, ...] = ()
    at: datetime | None = None
    since: datetime | None = None  # the login: calls that started before it lived through the gap


@dataclass(frozen=True, slots=True)
class NeedsReconcile:
    """A call ended whose events were not all seen (an AMI gap, or it began before pbx-bridge was
    listening) and whose answer may have been missed: it is not declared missed or abandoned,
    and raises no violation, until its CEL rows settle it. `record` is what AMI saw."""

    record: CallRecord


RecordWrite = CallStarted | CallEnded | Violation
@dataclass(frozen=True, slots=True)
class PresenceRequest:
    """An agent dialled a presence feature code (keyed UserEvent AgentPresence): the daemon decides
    and answers on `channel` (PRESENCE_RESULT), which waits for it."""

    agent: str
    action: str  # out | in | status
    channel: str
    at: datetime


Decision = (CallStarted | CallEnded | CallLost | Violation | HangupChannel | ProbeArrived | SecurityAlert
            | NeedsReconcile | PresenceRequest)
