"""The pure call tracker, driven by AMI streams captured from the real sandbox PBX."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from pbx_bridge.ami.wire import AmiMessage, parse_message
from pbx_bridge.tracker import (
    CallEnded,
    CallLost,
    CallRecord,
    CallStarted,
    ChannelSnapshot,
    Decision,
    Disposition,
    HangupChannel,
    SecurityAlert,
    Tick,
    TrackerSettings,
    TrackerState,
    Violation,
    ViolationKind,
    apply,
)
from pbx_bridge.tracker.tracker import MAX_CHANNELS_PER_CALL, endpoint_of
from tests.support.capture import FIXTURE_EVENT_KEY
from tests.support.fixtures import fixture_messages

SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234", "4008005678"}), trunk="carrier",
                           event_key=FIXTURE_EVENT_KEY)


def run(messages: list[AmiMessage], settings: TrackerSettings = SETTINGS) -> tuple[TrackerState, list[Decision]]:
    state, out = TrackerState(), []
    for message in messages:
        state, decisions = apply(state, message, settings)
        out.extend(decisions)
    return state, out


def ended(name: str, settings: TrackerSettings = SETTINGS) -> list[CallRecord]:
    state, decisions = run(fixture_messages(name), settings)
    assert state.calls == {}, "every call in a finished capture must be closed"
    return [d.record for d in decisions if isinstance(d, CallEnded)]


def test_answered_after_7s_talk_4s() -> None:
    [call] = ended("answered_7s_talk_4s")
    assert call.disposition is Disposition.ANSWERED
    assert call.did == "4008001234"
    assert call.caller_number == "13800000001"
    assert call.caller_name == "张三客户"
    assert call.rings == 2
    assert call.within_ring_limit is True
    assert call.ring_seconds == pytest.approx(7, abs=0.5)
    assert call.talk_seconds == pytest.approx(4, abs=0.5)
    assert call.answered_by == "agent101"
    assert call.started_at <= call.ring_started_at <= call.answered_at <= call.ended_at  # type: ignore[operator]
    assert call.hangup_cause == 16
    assert call.source == "ami"


def test_answered_after_17s_in_the_escalation_breaches_the_ring_limit() -> None:
    [call] = ended("answered_17s")
    assert call.disposition is Disposition.ANSWERED
    assert call.rings == 4
    assert call.within_ring_limit is False
    assert call.answered_by == "agent103"
    assert call.answered_stage == "escalation"
    assert call.after_hours is False
    assert call.ring_seconds == pytest.approx(17, abs=0.5)


def test_caller_hangs_up_after_6s_is_abandoned() -> None:
    [call] = ended("abandoned_6s")
    assert call.disposition is Disposition.ABANDONED
    assert call.answered_at is None
    assert call.answered_by is None
    assert call.talk_seconds is None
    assert call.ring_seconds == pytest.approx(6, abs=0.5)
    assert call.rings == 2
    assert call.within_ring_limit is None  # left before the limit


def test_caller_name_with_quotes_and_backslash_is_restored_exactly() -> None:
    [call] = ended("abandoned_6s")
    assert call.caller_name == 'Robert "Bob" ;-- \\ O\'Brien'


def test_all_phones_busy_is_missed() -> None:
    [call] = ended("missed_all_busy")
    assert call.disposition is Disposition.MISSED
    assert call.caller_name == ""
    assert call.answered_at is None


def test_non_hotline_did_makes_no_record() -> None:
    _, decisions = run(fixture_messages("other_did"))
    assert decisions == []


def test_concurrent_calls_each_get_their_own_correct_record() -> None:
    calls = {c.caller_number: c for c in ended("concurrent_3")}
    assert set(calls) == {"13800000011", "13800000012", "13800000013"}
    assert calls["13800000011"].answered_by == "agent101"
    assert calls["13800000012"].answered_by == "agent102"
    assert calls["13800000013"].answered_by == "agent102"
    assert calls["13800000012"].ring_seconds == pytest.approx(4, abs=0.5)
    assert len({c.linkedid for c in calls.values()}) == 3
    assert all(c.caller_name.startswith("并发 ") for c in calls.values())


def test_legs_one_per_agent_channel_with_dial_status() -> None:
    _, decisions = run(fixture_messages("concurrent_3"))
    by_caller = {d.record.caller_number: d for d in decisions if isinstance(d, CallEnded)}
    legs = {leg.endpoint: leg for leg in by_caller["13800000013"].legs}
    assert set(legs) == {"agent101", "agent102"}
    assert legs["agent101"].dial_status == "BUSY"
    assert legs["agent102"].dial_status == "ANSWER"
    assert legs["agent102"].answered_at is not None
    assert all(leg.ended_at is not None for leg in legs.values())


def test_start_is_announced_once_per_call_before_its_end() -> None:
    _, decisions = run(fixture_messages("concurrent_3"))
    kinds = [(type(d).__name__, d.record.linkedid) for d in decisions if isinstance(d, CallStarted | CallEnded)]
    for linkedid in {lid for _, lid in kinds}:
        assert [k for k, lid in kinds if lid == linkedid] == ["CallStarted", "CallEnded"]
    started = [d for d in decisions if isinstance(d, CallStarted)]
    assert all(d.record.ended_at is None and d.record.disposition is None for d in started)


def test_wrong_trunk_is_ignored() -> None:
    _, decisions = run(fixture_messages("answered_7s_talk_4s"), replace(SETTINGS, trunk="other-carrier"))
    assert decisions == []


def test_ring_cadence_comes_from_settings() -> None:
    us = replace(SETTINGS, ring_period_seconds=6.0)
    [call] = ended("answered_17s", us)
    assert call.rings == 3  # floor(17 / 6) + 1
    assert call.within_ring_limit is True


def test_apply_is_pure_input_state_untouched_and_repeatable() -> None:
    messages = fixture_messages("answered_7s_talk_4s")
    state = TrackerState()
    for message in messages[:8]:
        state, _ = apply(state, message, SETTINGS)
    snapshot = copy.deepcopy(state)
    first = apply(state, messages[8], SETTINGS)
    second = apply(state, messages[8], SETTINGS)
    assert state == snapshot
    assert first == second


def test_events_without_timestamp_or_linkedid_are_ignored() -> None:
    messages = fixture_messages("answered_7s_talk_4s")
    newchannel = next(m for m in messages if m.event == "Newchannel")
    stripped = AmiMessage({k: v for k, v in newchannel.headers.items() if k != "timestamp"})
    assert apply(TrackerState(), stripped, SETTINGS) == (TrackerState(), [])
    assert apply(TrackerState(), parse_message("Event: Newchannel\r\nTimestamp: 1.0"), SETTINGS)[1] == []


@pytest.mark.parametrize(("channel", "endpoint"), [
    ("PJSIP/agent101-0000002a", "agent101"),
    ("PJSIP/my-trunk-00000001", "my-trunk"),
    ("PJSIP/noseq", "noseq"),
])
def test_endpoint_of(channel: str, endpoint: str) -> None:
    assert endpoint_of(channel) == endpoint


def _until_answered(name: str) -> tuple[TrackerState, list[AmiMessage]]:
    """Replay a capture up to its BridgeEnter events (call talking), return state and the rest."""
    messages = fixture_messages(name)
    cut = max(i for i, m in enumerate(messages) if m.event == "BridgeEnter") + 1
    state, _ = run(messages[:cut])
    return state, messages[cut:]


def test_snapshot_keeping_the_call_changes_nothing() -> None:
    state, rest = _until_answered("answered_7s_talk_4s")
    [call] = state.calls.values()
    state, decisions = apply(state, ChannelSnapshot(frozenset(call.live_channels) | {"other"}), SETTINGS)
    assert decisions == []
    state, decisions = run_from(state, rest)
    assert [type(d) for d in decisions] == [CallEnded]


def test_snapshot_without_the_callers_channel_loses_the_call() -> None:
    state, rest = _until_answered("answered_7s_talk_4s")
    state, decisions = apply(state, ChannelSnapshot(frozenset()), SETTINGS)
    [lost] = decisions
    assert isinstance(lost, CallLost)
    assert lost.record.caller_name == "张三客户"
    assert lost.record.ended_at is None
    assert state.calls == {}
    _, later = run_from(state, rest)  # the rest of the call is ignored, nothing is invented
    assert later == []


def test_snapshot_missing_a_vanished_leg_lets_the_call_finish() -> None:
    messages = fixture_messages("answered_7s_talk_4s")
    # drop agent102's Hangup (as if it fell into a gap); the snapshot says it is gone
    gone = next(m for m in messages if m.event == "Hangup" and "agent102" in m.get("Channel"))
    cut = messages.index(gone)
    state, _ = run(messages[:cut])
    [call] = state.calls.values()
    alive = frozenset(u for u in call.live_channels if u != gone.get("Uniqueid"))
    state, _ = apply(state, ChannelSnapshot(alive), SETTINGS)
    state, decisions = run_from(state, messages[cut + 1:])
    [final] = [d for d in decisions if isinstance(d, CallEnded)]
    assert final.record.disposition is Disposition.ANSWERED
    assert state.calls == {}


def run_from(state: TrackerState, messages: list[AmiMessage]) -> tuple[TrackerState, list[Decision]]:
    out: list[Decision] = []
    for message in messages:
        state, decisions = apply(state, message, SETTINGS)
        out.extend(decisions)
    return state, out


# --- violations: ring limit (ticks), unanswered, outbound attempts, the guard --------------

def _ringing_until_answer(name: str) -> tuple[TrackerState, list[AmiMessage], datetime]:
    """Replay up to the DialEnd ANSWER; return the state, the rest, and when ringing started."""
    messages = fixture_messages(name)
    cut = next(i for i, m in enumerate(messages) if m.event == "DialEnd" and m.get("DialStatus") == "ANSWER")
    state, _ = run(messages[:cut])
    [call] = state.calls.values()
    started = min(leg.ring_started_at for leg in call.legs.values() if leg.ring_started_at)
    return state, messages[cut:], started


def test_ring_limit_is_reported_once_by_tick_while_still_ringing() -> None:
    state, rest, started = _ringing_until_answer("answered_17s")
    state, early = apply(state, Tick(started + timedelta(seconds=14.9)), SETTINGS)
    assert early == []
    state, due = apply(state, Tick(started + timedelta(seconds=15.1)), SETTINGS)
    [violation] = due
    assert isinstance(violation, Violation) and violation.kind is ViolationKind.RING_LIMIT
    assert violation.occurred_at == started + timedelta(seconds=15)
    assert violation.detail("max_rings") == "3"
    state, again = apply(state, Tick(started + timedelta(seconds=16)), SETTINGS)
    assert again == []
    _, final = run_from(state, rest)
    assert [type(d) for d in final] == [CallEnded]  # not reported a second time at the end


def test_ring_limit_without_ticks_is_reported_at_the_end() -> None:
    _, decisions = run(fixture_messages("answered_17s"))
    [violation] = [d for d in decisions if isinstance(d, Violation)]
    assert violation.kind is ViolationKind.RING_LIMIT


def test_no_violation_for_calls_answered_in_time() -> None:
    _, decisions = run(fixture_messages("answered_7s_talk_4s"))
    assert not [d for d in decisions if isinstance(d, Violation)]


def test_nobody_answering_is_an_unanswered_violation_abandoning_early_is_not() -> None:
    _, missed = run(fixture_messages("missed_all_busy"))
    assert [d.kind for d in missed if isinstance(d, Violation)] == [ViolationKind.UNANSWERED]
    _, abandoned = run(fixture_messages("abandoned_6s"))
    assert not [d for d in abandoned if isinstance(d, Violation)]


def _trunk_newchannel(uniqueid: str, linkedid: str) -> AmiMessage:
    return parse_message(
        "Event: Newchannel\r\nTimestamp: 1795430000.000000\r\nChannel: PJSIP/carrier-0000004a\r\n"
        f"ChannelState: 0\r\nExten: s\r\nContext: leaky\r\nUniqueid: {uniqueid}\r\nLinkedid: {linkedid}")


def test_guard_hangs_up_an_outbound_trunk_channel_nobody_started() -> None:
    _, decisions = apply(TrackerState(), _trunk_newchannel("pbx-9.2", "pbx-9.1"), SETTINGS)
    [hangup] = decisions
    assert isinstance(hangup, HangupChannel) and hangup.channel == "PJSIP/carrier-0000004a"
    assert hangup.linkedid == "pbx-9.1"  # the daemon confirms the channel belongs to it before acting
    violation = hangup.violation  # recorded only once Asterisk confirmed the target
    assert violation is not None and violation.kind is ViolationKind.OUTBOUND_ATTEMPT
    assert violation.detail("stopped_by") == "guard"


def test_guard_leaves_pbx_bridges_own_channels_alone() -> None:
    assert apply(TrackerState(), _trunk_newchannel("pbx-bridge-probe-1", "pbx-bridge-probe-1"), SETTINGS)[1] == []


def test_refused_outbound_dial_is_a_violation_with_the_extension_and_digits() -> None:
    event = parse_message(
        "Event: UserEvent\r\nTimestamp: 1795430000.5\r\nUserEvent: OutboundAttempt\r\n"
        "Channel: PJSIP/agent101-00000007\r\nUniqueid: pbx-7.1\r\nLinkedid: pbx-7.1\r\nDigits: 13800138000"
        f"\r\nKey: {FIXTURE_EVENT_KEY}")
    [violation] = apply(TrackerState(), event, SETTINGS)[1]
    assert isinstance(violation, Violation)
    assert (violation.kind, violation.detail("extension"), violation.detail("digits")) == (
        ViolationKind.OUTBOUND_ATTEMPT, "agent101", "13800138000")



# --- the hotline dialplan's stages (captured with pbx-bridge's routing state set) ----------

DUTY_MOBILE, DUTY_HOLDER = "13900139000", "值班员小王"


def test_after_hours_call_answered_on_the_duty_mobile_is_forwarded() -> None:
    [call] = ended("after_hours_forwarded")
    assert call.disposition is Disposition.FORWARDED
    assert call.after_hours is True
    assert (call.answered_by, call.answered_stage) == (DUTY_MOBILE, "mobile")
    assert (call.forwarded_to, call.duty_holder) == (DUTY_MOBILE, DUTY_HOLDER)
    assert call.needs_call_sheet is True
    assert call.ring_seconds is None and call.within_ring_limit is None  # no agent phone rang
    assert call.talk_seconds == pytest.approx(2, abs=0.5)


def test_duty_mobile_not_answering_leads_to_voicemail() -> None:
    _, decisions = run(fixture_messages("after_hours_voicemail"))
    [call] = [d.record for d in decisions if isinstance(d, CallEnded)]
    assert call.disposition is Disposition.VOICEMAIL
    assert (call.forwarded_to, call.duty_holder, call.answered_by) == (DUTY_MOBILE, DUTY_HOLDER, None)
    # The mobile rang its 25 s unanswered: past the limit too (every phone, seed 004), raised at
    # the end here because no tick came while it rang.
    assert [(d.kind, d.detail("stage")) for d in decisions if isinstance(d, Violation)] == [
        (ViolationKind.RING_LIMIT, "mobile"), (ViolationKind.UNANSWERED, None)]
    assert call.mobile_ring_seconds == pytest.approx(25, abs=0.5) and call.mobile_within_ring_limit is False
    assert not any(isinstance(d, Violation) for d in run(fixture_messages("after_hours_voicemail"),
                                                         replace(SETTINGS, mobile_ring_limit=False))[1]
                   if isinstance(d, Violation) and d.kind is ViolationKind.RING_LIMIT)


def test_a_mobile_ringing_past_the_limit_is_reported_live_once() -> None:
    messages = fixture_messages("after_hours_voicemail")
    # the mobile's leg (out on the trunk) starts ringing: DialState RINGING/PROGRESS from the carrier
    at = next(i for i, m in enumerate(messages) if m.event == "DialState"
              and m.get("DestChannel").startswith("PJSIP/carrier-") and m.get("DialStatus") in ("RINGING", "PROGRESS"))
    ringing = messages[at].timestamp
    assert ringing is not None
    state, before = run(messages[: at + 1])
    state, early = apply(state, Tick(ringing + timedelta(seconds=14.9)), SETTINGS)
    assert not [d for d in before + early if isinstance(d, Violation)]
    state, due = apply(state, Tick(ringing + timedelta(seconds=15.1)), SETTINGS)
    [violation] = due
    assert isinstance(violation, Violation) and violation.kind is ViolationKind.RING_LIMIT
    assert (violation.detail("stage"), violation.detail("mobile")) == ("mobile", DUTY_MOBILE)
    # 15 s after the mobile's first ringing (its Newstate Ringing came a moment before the DialState)
    assert abs(violation.occurred_at - (ringing + timedelta(seconds=15))) < timedelta(milliseconds=50)
    state, again = apply(state, Tick(ringing + timedelta(seconds=16)), SETTINGS)
    assert again == []
    rest: list[Decision] = []
    for message in messages[at + 1:]:
        state, decisions = apply(state, message, SETTINGS)
        rest.extend(decisions)
    assert [d.kind for d in rest if isinstance(d, Violation)] == [ViolationKind.UNANSWERED]  # not twice


def test_the_callers_wait_and_the_mobiles_ring_time() -> None:
    [forwarded] = ended("after_hours_forwarded")
    assert forwarded.mobile_ring_seconds == pytest.approx(2, abs=0.5) and forwarded.mobile_within_ring_limit
    assert forwarded.wait_seconds == pytest.approx(2, abs=0.5)  # the mobile answered after 2 s
    [answered] = ended("answered_7s_talk_4s")
    assert answered.wait_seconds == pytest.approx(7, abs=0.5) and answered.mobile_ring_seconds is None
    assert answered.wait_seconds is not None and answered.wait_seconds >= (answered.ring_seconds or 0)


def test_every_phone_busy_in_hours_goes_through_every_stage_to_voicemail() -> None:
    _, decisions = run(fixture_messages("all_busy_voicemail"))
    [call] = [d.record for d in decisions if isinstance(d, CallEnded)]
    assert call.disposition is Disposition.VOICEMAIL and call.after_hours is False
    legs = [leg.endpoint for d in decisions if isinstance(d, CallEnded) for leg in d.legs]
    assert {"agent101", "agent102", "agent103", "carrier"} <= set(legs)


def test_captured_refused_dial_out() -> None:
    _, decisions = run(fixture_messages("outbound_refused"))
    [violation] = decisions
    assert isinstance(violation, Violation)
    assert (violation.detail("extension"), violation.detail("digits")) == ("agent101", "13800138000")


def test_captured_leak_is_caught_by_the_guard() -> None:
    _, decisions = run(fixture_messages("outbound_leaked"))
    hangups = [d for d in decisions if isinstance(d, HangupChannel)]
    assert len(hangups) == 1 and hangups[0].channel.startswith("PJSIP/carrier-")
    assert [v.detail("stopped_by") for v in (h.violation for h in hangups) if v] == ["guard"]
    assert not [d for d in decisions if isinstance(d, Violation)]  # recorded only after confirmation
    assert not [d for d in decisions if isinstance(d, CallStarted)]  # not a hotline call


def test_a_forward_announced_by_the_dialplan_passes_the_guard_even_for_an_untracked_call() -> None:
    # A call that began before pbx-bridge started is not tracked; the dialplan's stage event
    # right before it dials the mobile marks the forward as the system's own.
    mark = parse_message("Event: UserEvent\r\nTimestamp: 1795429999.9\r\nUserEvent: HotlineStage\r\n"
                         "Stage: mobile\r\nChannel: PJSIP/carrier-00000049\r\nUniqueid: pbx-9.1\r\nLinkedid: pbx-9.1"
                             f"\r\nKey: {FIXTURE_EVENT_KEY}")
    state, decisions = apply(TrackerState(), mark, SETTINGS)
    assert decisions == [] and "pbx-9.1" in state.forward_marks
    assert apply(state, _trunk_newchannel("pbx-9.2", "pbx-9.1"), SETTINGS)[1] == []
    later = datetime.fromtimestamp(1795429999.9 + 11 * 60).astimezone()
    state, _ = apply(state, Tick(later), SETTINGS)
    assert state.forward_marks == {}


def test_captured_after_hours_forward_is_not_touched_by_the_guard() -> None:
    _, decisions = run(fixture_messages("after_hours_forwarded"))
    assert not [d for d in decisions if isinstance(d, HangupChannel | Violation)]


def _with_dial_string(messages: list[AmiMessage], number: str) -> list[AmiMessage]:
    """The captured forward, its trunk leg's DialBegin changed to dial `number` instead."""
    return [AmiMessage({**m.headers, "dialstring": f"{number}@carrier"}) if m.event == "DialBegin" else m
            for m in messages]


def test_the_announced_forward_to_the_duty_mobile_passes_the_forward_guard() -> None:
    _, decisions = run(fixture_messages("after_hours_forwarded"))
    assert not [d for d in decisions if isinstance(d, HangupChannel | Violation)]


def test_a_trunk_leg_of_a_hotline_call_dialling_another_number_is_hung_up_and_recorded() -> None:
    _, decisions = run(_with_dial_string(fixture_messages("after_hours_forwarded"), "16800000000"))
    [hangup] = [d for d in decisions if isinstance(d, HangupChannel)]
    assert hangup.channel.startswith("PJSIP/carrier-") and hangup.violation is not None
    assert (hangup.violation.detail("digits"), hangup.violation.detail("announced_mobile"),
            hangup.violation.detail("stopped_by")) == ("16800000000", "13900139000", "forward_guard")
    assert hangup.linkedid == hangup.violation.linkedid


def test_dialplan_events_without_the_key_are_refused() -> None:
    unkeyed = [AmiMessage({k: v for k, v in m.headers.items() if k != "key"}) for m in fixture_messages(
        "after_hours_forwarded")]
    _, decisions = run(unkeyed)
    assert [d.reason for d in decisions if isinstance(d, SecurityAlert)] == ["forged_user_event"] * 2
    [ended_call] = [d for d in decisions if isinstance(d, CallEnded)]
    assert ended_call.record.forwarded_to is None  # the stage events were not believed


def test_a_calls_legs_stay_bounded_when_live_local_channels_are_announced_again_as_phones() -> None:
    """Found by `make fuzz`: channels announced first as Local ones (live, no leg), then again as
    phones', added legs past the bound. The captured agent leg and its hangup, renamed: 60 legs
    that come and go, then 10 Local channels at once, each announced again as a phone."""
    messages = fixture_messages("answered_7s_talk_4s")
    newchannel, hangup = messages[4], messages[18]
    assert (newchannel.event, hangup.event) == ("Newchannel", "Hangup")
    phone = newchannel.get("Channel")
    state, _ = run(messages[:4])

    def announce(n: int, channel: str, template: AmiMessage = newchannel) -> None:
        nonlocal state
        renamed = {**template.headers, "uniqueid": f"{newchannel.get('Uniqueid')}-{n}", "channel": channel}
        state, _ = apply(state, AmiMessage(renamed), SETTINGS)

    for n in range(60):
        announce(n, f"Local/{n}@hotline-transfer-{n:08x};1")
        announce(n, phone)
        announce(n, phone, hangup)
    for n in range(60, 70):
        announce(n, f"Local/{n}@hotline-transfer-{n:08x};1")
    for n in range(60, 70):
        announce(n, phone)
    [call] = state.calls.values()
    assert len(call.legs) <= MAX_CHANNELS_PER_CALL
    assert len(call.live_channels) <= MAX_CHANNELS_PER_CALL
