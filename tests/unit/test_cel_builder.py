"""The CEL call builder, on CEL rows captured from the sandbox with the AMI stream of the same calls:
it decides every field as the tracker does, and reads other dialplans' shapes (Queue, Local/ ring
groups, an answer before voicemail) without taking a machine's answer for a person's."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest

from pbx_bridge.cel.builder import CelCall, CelRow, build_call, parse_extra, user_fields
from pbx_bridge.tracker import (
    CallEnded,
    CallLost,
    Disposition,
    NeedsReconcile,
    TrackerState,
    Violation,
    ViolationKind,
    apply,
)
from pbx_bridge.tracker.model import CallLeg, CallRecord
from tests.support.capture import SITE_DIDS
from tests.support.cel import cel_calls, cel_fixture_names, cel_rows
from tests.support.fixtures import fixture_messages
from tests.unit.test_tracker import SETTINGS as AMI_SETTINGS

SETTINGS = replace(AMI_SETTINGS, hotline_numbers=AMI_SETTINGS.hotline_numbers | SITE_DIDS,
                   probe_caller="02566660000")
EQUAL = ("did", "trunk", "caller_number", "caller_name", "rings", "within_ring_limit", "answered_by",
         "disposition", "hangup_cause", "hangup_cause_text", "is_probe", "after_hours", "answered_stage",
         "forwarded_to", "duty_holder", "needs_call_sheet", "mobile_within_ring_limit", "transferred_to")
TIMES = ("started_at", "ring_started_at", "answered_at", "ended_at")
SECONDS = ("ring_seconds", "talk_seconds", "wait_seconds", "mobile_ring_seconds")


def ami_calls(name: str) -> tuple[dict[str, CallEnded], list[Violation], set[str]]:
    """What the tracker decides from the AMI stream captured with the CEL rows: the calls it ended,
    the violations, and the calls it left to CEL (it did not see all of them)."""
    state, ended, violations, left = TrackerState(), {}, [], set()
    for message in fixture_messages(name):
        if message.event == "" or "actionid" in message:
            continue  # the login's reply and action lists (a late login's channel list)
        state, decisions = apply(state, message, SETTINGS)
        for decision in decisions:
            if isinstance(decision, CallEnded):
                ended[decision.record.linkedid] = decision
            elif isinstance(decision, Violation):
                violations.append(decision)
            elif isinstance(decision, NeedsReconcile | CallLost):
                left.add(decision.record.linkedid)
    return ended, violations, left | set(state.calls)


def built(name: str) -> dict[str, CelCall]:
    return {linkedid: call for linkedid, rows in cel_calls(name).items()
            if (call := build_call(rows, SETTINGS)) is not None}


def only(name: str) -> CelCall:
    [call] = built(name).values()
    return call


def _leg_facts(leg: CallLeg) -> tuple[object, ...]:
    return (leg.endpoint, leg.dial_status, leg.hangup_cause, leg.stage, leg.transfer_kind, leg.transferred_by,
            leg.talk_seconds is None)


@pytest.mark.parametrize("name", cel_fixture_names())
def test_the_cel_record_agrees_with_the_ami_record(name: str) -> None:
    ended, violations, left_to_cel = ami_calls(name)
    cel = built(name)
    assert set(ended) | left_to_cel <= set(cel), "every hotline call AMI saw is in CEL"
    starts = {m.get("Linkedid") for m in fixture_messages(name) if m.event == "Newchannel"}
    assert not (set(cel) - set(ended) - left_to_cel) & starts, "no more: only calls AMI did not see begin"
    for linkedid, ami in ended.items():
        call = cel[linkedid]
        assert call.finished and call.record.source == "cel" and ami.record.source == "ami"
        for field in EQUAL:
            assert getattr(call.record, field) == getattr(ami.record, field), (linkedid, field)
        for field in TIMES:
            ours, theirs = getattr(call.record, field), getattr(ami.record, field)
            assert (ours is None) == (theirs is None), (linkedid, field)
            if ours is not None:
                assert abs((ours - theirs).total_seconds()) < 0.05, (linkedid, field)
        for field in SECONDS:
            assert getattr(call.record, field) == pytest.approx(getattr(ami.record, field), abs=0.05), field
        assert sorted(_leg_facts(leg) for leg in call.legs) == sorted(_leg_facts(leg) for leg in ami.legs), linkedid
        assert sorted(v.kind for v in call.violations) == sorted(
            v.kind for v in violations if v.linkedid == linkedid and v.kind != ViolationKind.OUTBOUND_ATTEMPT)


def test_answered_after_7s_talk_4s() -> None:
    record = only("answered_7s_talk_4s").record
    assert (record.disposition, record.answered_by, record.answered_stage) == (Disposition.ANSWERED, "agent101",
                                                                                "group")
    assert record.ring_seconds == pytest.approx(7, abs=0.5) and record.rings == 2 and record.within_ring_limit
    assert record.talk_seconds == pytest.approx(4, abs=0.5)
    assert record.caller_name == "张三客户" and record.source == "cel"


def test_the_first_ring_comes_from_the_dialplans_ringtime_not_the_legs_creation() -> None:
    call = only("answered_17s")
    first_leg = min(leg.dial_started_at for leg in call.legs if leg.dial_started_at is not None)
    assert call.record.ring_started_at is not None
    assert timedelta(0) < call.record.ring_started_at - first_leg < timedelta(seconds=0.5)  # + RINGTIME_MS
    assert (call.record.rings, call.record.within_ring_limit, call.record.answered_stage) == (4, False, "escalation")
    assert [v.kind for v in call.violations] == [ViolationKind.RING_LIMIT]
    assert call.violations[0].occurred_at == call.record.ring_started_at + timedelta(seconds=15)


def test_a_quoted_name_keeps_no_sip_backslashes() -> None:
    rows = cel_rows("abandoned_6s")
    assert any('\\"Bob\\"' in row.cid_name for row in rows), "CEL keeps PJSIP's quoted-pair backslashes"
    record = only("abandoned_6s").record
    assert record.caller_name == 'Robert "Bob" ;-- \\ O\'Brien'
    assert record.disposition is Disposition.ABANDONED and record.within_ring_limit is None


def test_the_callers_own_answer_before_voicemail_is_nobody_answering() -> None:
    rows = cel_rows("site_answer_voicemail")
    assert any(r.eventtype == "ANSWER" and r.uniqueid == r.linkedid for r in rows)  # Answer() on the caller
    call = only("site_answer_voicemail")
    assert call.record.answered_at is None and call.record.answered_by is None
    assert call.record.disposition is Disposition.ABANDONED  # no HotlineStage voicemail: as the tracker says
    assert sorted((leg.endpoint, leg.dial_status) for leg in call.legs) == [("agent101", "CANCEL"),
                                                                            ("agent102", "CANCEL")]


def test_a_local_half_answering_for_voicemail_is_nobody_answering() -> None:
    rows = cel_rows("site_member_voicemail")
    assert any(r.eventtype == "ANSWER" and r.appname == "AppDial" and r.channame.startswith("Local/")
               for r in rows), "the Local/ half's answer looks like a dialled leg's"
    call = only("site_member_voicemail")
    assert call.record.answered_by is None and call.record.disposition is Disposition.ABANDONED
    assert [(leg.endpoint, leg.dial_status) for leg in call.legs] == [("agent101", "NOANSWER")]


def test_a_ring_group_of_local_pairs_counts_the_phones_not_the_halves() -> None:
    rows = cel_rows("site_ringgroup_answered")
    assert len({r.uniqueid for r in rows if r.eventtype == "CHAN_START" and r.channame.startswith("Local/")}) == 4
    call = only("site_ringgroup_answered")
    assert sorted((leg.channel.split("-")[0], leg.dial_status) for leg in call.legs) == [
        ("PJSIP/agent101", "ANSWER"), ("PJSIP/agent102", "CANCEL")]
    assert call.record.answered_by == "agent101" and call.record.ring_seconds == pytest.approx(4, abs=0.5)


def test_a_queue_member_answering_is_a_person() -> None:
    rows = cel_rows("site_queue_answered")
    assert {r.appname for r in rows if r.eventtype == "ANSWER" and r.uniqueid != r.linkedid} == {"AppQueue"}
    call = only("site_queue_answered")
    assert (call.record.answered_by, call.record.disposition) == ("agent102", Disposition.ANSWERED)
    assert len(call.legs) == 2 and call.record.talk_seconds == pytest.approx(2, abs=0.5)


def test_after_hours_forward_to_the_duty_mobile() -> None:
    record = only("after_hours_forwarded").record
    assert (record.disposition, record.after_hours, record.answered_stage) == (Disposition.FORWARDED, True, "mobile")
    assert (record.forwarded_to, record.duty_holder, record.needs_call_sheet) == ("13900139000", "值班员小王", True)
    assert record.answered_by == "13900139000" and record.ring_seconds is None


def test_voicemail_after_the_mobile_is_an_unanswered_violation() -> None:
    call = only("after_hours_voicemail")
    assert call.record.disposition is Disposition.VOICEMAIL
    assert call.stages == ("after_hours", "mobile", "voicemail")
    unanswered, mobile = call.violations
    assert unanswered.kind is ViolationKind.UNANSWERED and unanswered.occurred_at == call.record.ended_at
    # The mobile rang its 25 s ([duty] ring_seconds) unanswered: past the limit (every phone, seed 004)
    assert mobile.kind is ViolationKind.RING_LIMIT and dict(mobile.details)["stage"] == "mobile"
    assert call.record.mobile_ring_seconds is not None and abs(call.record.mobile_ring_seconds - 25) < 0.5
    assert call.record.mobile_within_ring_limit is False
    assert mobile.occurred_at < call.record.ended_at


def test_without_the_mobile_limit_a_long_ringing_mobile_is_no_breach() -> None:
    settings = replace(SETTINGS, mobile_ring_limit=False)
    [call] = [c for rows in cel_calls("after_hours_voicemail").values() if (c := build_call(rows, settings))]
    assert [v.kind for v in call.violations] == [ViolationKind.UNANSWERED]


def test_the_callers_wait_and_the_mobiles_ring_time_of_a_forward() -> None:
    record = only("after_hours_forwarded").record
    # the mobile answered after 2 s (world's script): the caller waited that long too
    assert record.mobile_ring_seconds is not None and abs(record.mobile_ring_seconds - 2) < 0.5
    assert record.wait_seconds is not None and abs(record.wait_seconds - 2) < 0.5
    assert record.mobile_within_ring_limit is True


def test_a_refused_call_is_missed_without_an_unanswered_violation() -> None:
    call = only("attack_callerid_injection")
    assert call.stages == ("refused",) and call.record.disposition is Disposition.MISSED
    assert call.record.hangup_cause == 21 and call.violations == ()
    assert call.record.caller_number.isdigit()  # the screen's digits, not the forged bytes


def test_a_probe_is_answered_by_the_pbx_itself() -> None:
    record = only("probe_arrived").record
    assert (record.is_probe, record.answered_by, record.disposition) == (True, "pbx-bridge-probe",
                                                                         Disposition.ANSWERED)


@pytest.mark.parametrize("name", ["other_did", "outbound_refused", "outbound_leaked"])
def test_calls_that_are_not_hotline_calls_build_nothing(name: str) -> None:
    assert cel_calls(name) and built(name) == {}


def test_outbound_attempts_are_durable_in_cel_without_the_key() -> None:
    [row] = [r for r in cel_rows("outbound_refused") if r.eventtype == "USER_DEFINED"]
    assert (row.userdeftype, user_fields(row)) == ("OutboundAttempt", {"digits": "13800138000"})


def test_the_order_rows_arrive_in_does_not_matter() -> None:
    rows = cel_rows("answered_17s")
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert build_call(shuffled, SETTINGS) == build_call(rows, SETTINGS)


def _cut_before_the_end(name: str) -> list[CelRow]:
    """The rows of a call as if Asterisk had been killed mid-call: nothing after the answer's bridge."""
    rows = cel_rows(name)
    bridged = next(i for i, r in enumerate(rows) if r.eventtype == "BRIDGE_ENTER")
    return rows[: bridged + 1]


def test_a_call_without_its_end_is_not_final() -> None:
    call = build_call(_cut_before_the_end("answered_7s_talk_4s"), SETTINGS)
    assert call is not None and not call.finished
    assert (call.record.ended_at, call.record.disposition, call.violations) == (None, None, ())
    assert call.record.answered_by == "agent101"


def test_a_call_whose_channels_vanished_is_closed_at_its_last_row() -> None:
    rows = _cut_before_the_end("answered_7s_talk_4s")
    call = build_call(rows, SETTINGS, close_at_last_event=True)
    assert call is not None and call.closed_at_last_event and not call.finished
    assert call.record.ended_at == rows[-1].eventtime == call.last_event_at
    assert call.record.disposition is Disposition.ANSWERED and call.record.hangup_cause is None
    [answered] = [leg for leg in call.legs if leg.dial_status == "ANSWER"]
    assert answered.ended_at == rows[-1].eventtime  # still up when the rows stop: ended with them


def test_fixture_rows_round_trip_and_hold_no_key() -> None:
    for name in cel_fixture_names():
        for row in cel_rows(name):
            assert CelRow.from_mapping(row.to_json()) == row
            assert "fixture0" not in row.extra and "Key" not in row.extra


def test_extra_parsing() -> None:
    assert parse_extra('{"hangupcause":16,"hangupsource":"PJSIP/x","dialstatus":"ANSWER"}') == {
        "hangupcause": "16", "hangupsource": "PJSIP/x", "dialstatus": "ANSWER"}
    assert parse_extra("") == {} and parse_extra("not json") == {} and parse_extra("[1]") == {}
    row = cel_rows("after_hours_forwarded")[0]
    facts = user_fields(replace(row, extra='{"extra":"stage=mobile&mobile=139&holder_b64=5YC8+/==&stage=x"}'))
    assert facts == {"stage": "mobile", "mobile": "139", "holder_b64": "5YC8+/=="}


def test_a_record_has_every_column_the_tracker_fills() -> None:
    record = only("answered_7s_talk_4s").record
    assert isinstance(record, CallRecord)
    ami = next(iter(ami_calls("answered_7s_talk_4s")[0].values())).record
    assert {f for f in CallRecord.__dataclass_fields__ if getattr(ami, f) is not None} <= {
        f for f in CallRecord.__dataclass_fields__ if getattr(record, f) is not None}


def test_a_call_already_ringing_when_pbx_bridge_logged_in_is_whole_in_cel() -> None:
    record = only("adopted_mid_call").record
    assert (record.disposition, record.answered_by, record.answered_stage) == (Disposition.ANSWERED, "agent101",
                                                                                "group")
    assert record.ring_seconds == pytest.approx(8, abs=0.5) and record.talk_seconds == pytest.approx(3, abs=0.5)
