"""Transfers, the caller's wait and the duty mobile's ring time, from AMI streams and CEL rows
captured from the sandbox (tests/support/capture.py: transfer_*, mobile_*); the AMI tracker and the
CEL builder must tell the same story (the agreement test in test_cel_builder.py compares them)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pbx_bridge.tracker import CallEnded, PresenceRequest, SecurityAlert, Violation, ViolationKind
from pbx_bridge.tracker.model import CallLeg, CallRecord
from tests.support.fixtures import fixture_messages
from tests.unit.test_cel_builder import only
from tests.unit.test_tracker import run


def ended_call(name: str) -> tuple[CallEnded, list[Violation]]:
    state, decisions = run(fixture_messages(name))
    assert state.calls == {}, "every call in a finished capture must be closed"
    [call] = [d for d in decisions if isinstance(d, CallEnded)]
    return call, [d for d in decisions if isinstance(d, Violation)]


def flow(name: str, source: str) -> tuple[CallRecord, tuple[CallLeg, ...], list[Violation]]:
    """The record, legs and violations of the one call of capture `name`, from AMI or from CEL."""
    if source == "ami":
        ended, violations = ended_call(name)
        return ended.record, ended.legs, violations
    cel = only(name)
    return cel.record, cel.legs, list(cel.violations)


def leg_of(legs: tuple[CallLeg, ...], endpoint: str, stage: str) -> CallLeg:
    [leg] = [leg for leg in legs if leg.endpoint == endpoint and leg.stage == stage]
    return leg


def seconds(leg: CallLeg) -> float:
    assert leg.answered_at is not None and leg.dial_started_at is not None
    return (leg.answered_at - leg.dial_started_at).total_seconds()


@pytest.mark.parametrize("source", ["ami", "cel"])
def test_blind_transfer(source: str) -> None:
    """agent101 answers after 4 s, talks 3 s, blind-transfers to 103; agent103 answers after 6 s, talks 5 s."""
    record, legs, violations = flow("transfer_blind", source)
    assert (record.answered_by, record.transferred_to, record.rings) == ("agent101", "agent103", 1)
    assert record.ring_seconds == pytest.approx(4, abs=0.5)
    assert record.talk_seconds == pytest.approx(8, abs=1.0)
    moved = leg_of(legs, "agent103", "transfer")
    assert (moved.transfer_kind, moved.transferred_by) == ("blind", "agent101")
    assert seconds(moved) == pytest.approx(6, abs=0.5) and moved.talk_seconds == pytest.approx(5, abs=0.5)
    assert leg_of(legs, "agent101", "group").talk_seconds == pytest.approx(3, abs=1.0)
    assert violations == []


@pytest.mark.parametrize("source", ["ami", "cel"])
def test_an_unanswered_transfer_comes_back(source: str) -> None:
    record, legs, violations = flow("transfer_unanswered", source)
    assert (record.answered_by, record.transferred_to) == ("agent101", None)
    tried = leg_of(legs, "agent102", "transfer")
    back = leg_of(legs, "agent101", "transfer_return")
    assert tried.answered_at is None and tried.transferred_by == "agent101"
    assert back.answered_at is not None and back.transferred_by == "agent102"
    assert seconds(back) == pytest.approx(2, abs=0.5)
    assert violations == []


def test_a_transfer_to_an_outside_number_is_an_outbound_attempt() -> None:
    ended, violations = ended_call("transfer_outside")
    assert (ended.record.answered_by, ended.record.transferred_to) == ("agent101", None)
    [violation] = violations
    assert violation.kind is ViolationKind.OUTBOUND_ATTEMPT
    assert (violation.detail("via"), violation.detail("extension"), violation.detail("digits")) == (
        "transfer", "agent101", "13800138000")
    assert not [leg for leg in ended.legs if leg.endpoint in ("carrier", "pstn") and leg.stage != "mobile"]


@pytest.mark.parametrize("source", ["ami", "cel"])
def test_attended_transfer(source: str) -> None:
    """agent101 answers after 3 s, consults 102 (answers after 2 s), hands over; 3 s more with agent102."""
    record, legs, violations = flow("transfer_attended", source)
    assert (record.answered_by, record.transferred_to) == ("agent101", "agent102")
    assert record.ring_seconds == pytest.approx(3, abs=0.5)
    consulted = leg_of(legs, "agent102", "transfer")
    assert (consulted.transfer_kind, consulted.transferred_by) == ("attended", "agent101")
    assert seconds(consulted) == pytest.approx(2, abs=0.5)  # rang in the consultation
    assert consulted.transferred_at is not None and consulted.talk_seconds == pytest.approx(3, abs=1.0)
    assert violations == []


@pytest.mark.parametrize(("name", "ring", "wait"), [
    ("after_hours_forwarded", 2.0, 2.0),   # 180 at once
    ("mobile_progress_only", 3.0, 3.0),    # 183 with early media, no 180
    ("mobile_late_ringing", 3.0, 5.0),     # 180 only after 2 s of silence
])
@pytest.mark.parametrize("source", ["ami", "cel"])
def test_the_mobiles_ring_time_starts_at_its_ringing(name: str, ring: float, wait: float, source: str) -> None:
    record = ended_call(name)[0].record if source == "ami" else only(name).record
    assert record.mobile_ring_seconds == pytest.approx(ring, abs=0.5)
    assert record.wait_seconds == pytest.approx(wait, abs=0.5)
    assert record.mobile_within_ring_limit is True


def test_a_mobile_answering_after_17_s_broke_the_limit() -> None:
    ended, violations = ended_call("mobile_17s")
    assert ended.record.disposition == "forwarded" and ended.record.mobile_within_ring_limit is False
    assert ended.record.mobile_ring_seconds == pytest.approx(17, abs=0.5)
    assert [(v.kind, v.detail("stage")) for v in violations] == [(ViolationKind.RING_LIMIT, "mobile")]


def test_presence_feature_codes_become_requests_for_the_daemon() -> None:
    """agent102 dialled *21, *23, *22 (captured): three requests, each naming the channel that waits
    for the answer; nothing else is decided (no call, no outbound attempt)."""
    _, decisions = run(fixture_messages("presence_codes"))
    assert [(d.agent, d.action, d.channel.startswith("PJSIP/agent102-")) for d in decisions
            if isinstance(d, PresenceRequest)] == [("agent102", "out", True), ("agent102", "status", True),
                                                    ("agent102", "in", True)]
    assert all(isinstance(d, PresenceRequest) for d in decisions)


def test_a_forged_presence_event_is_dropped() -> None:
    messages = fixture_messages("presence_codes")
    forged = next(m for m in messages if m.get("UserEvent") == "AgentPresence")
    forged = replace(forged, headers={**forged.headers, "key": "not-the-key"})
    _, decisions = run([forged])
    assert not any(isinstance(d, PresenceRequest) for d in decisions)
    assert [d.reason for d in decisions if isinstance(d, SecurityAlert)] == ["forged_user_event"]
