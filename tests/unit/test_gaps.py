"""AMI gaps and late starts: calls live at login are taken in with their true start; a call whose
answer may have been missed is left to CEL, never declared missed or abandoned, never a violation."""

from __future__ import annotations

from datetime import timedelta

from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.daemon import channel_snapshot
from pbx_bridge.tracker import (
    CallEnded,
    CallStarted,
    ChannelSnapshot,
    Decision,
    NeedsReconcile,
    Tick,
    TrackerState,
    Violation,
    apply,
)
from tests.support.fixtures import fixture_messages
from tests.unit.test_tracker import SETTINGS


def run(inputs: list[AmiMessage | ChannelSnapshot | Tick]) -> tuple[TrackerState, list[Decision]]:
    state, decisions = TrackerState(), list[Decision]()
    for item in inputs:
        state, out = apply(state, item, SETTINGS)
        decisions += out
    return state, decisions


def test_a_call_ringing_at_login_is_taken_in_with_its_true_start_and_left_to_cel() -> None:
    """Captured: the pbx-bridge user logged in 3 s into a ringing call and listed the live channels."""
    messages = fixture_messages("adopted_mid_call")
    listing = [m for m in messages if m.get("ActionID") == "capture-snapshot"]
    events = [m for m in messages if "actionid" not in m and m.event]
    first = next(m.timestamp for m in events if m.timestamp is not None)
    snapshot = channel_snapshot(listing, first, first)  # AmiMessage.get is what the daemon's items offer
    inbound = [c for c in snapshot.channels if c.uniqueid == c.linkedid and c.channel.startswith("PJSIP/carrier-")]
    assert len(inbound) == 1 and inbound[0].seconds >= 2 and inbound[0].state == "4"
    state, decisions = run([snapshot, *events])
    [started] = [d for d in decisions if isinstance(d, CallStarted)]
    assert started.record.started_at == first - timedelta(seconds=inbound[0].seconds)
    assert (started.record.did, started.record.caller_number, started.record.caller_name) == (
        "4008001234", "13800000031", "早到的来电")
    assert not [d for d in decisions if isinstance(d, CallEnded | Violation)]
    [settle] = [d for d in decisions if isinstance(d, NeedsReconcile)]
    assert settle.record.linkedid == started.record.linkedid and state.calls == {}


def _split_at_answer(name: str) -> tuple[list[AmiMessage], list[AmiMessage], list[AmiMessage]]:
    """A captured call cut into: before the answer, the answer (DialEnd ANSWER), after it."""
    messages = fixture_messages(name)
    answer = next(i for i, m in enumerate(messages) if m.event == "DialEnd" and m.get("DialStatus") == "ANSWER")
    return messages[:answer], [messages[answer]], messages[answer + 1:]


def _live(messages: list[AmiMessage]) -> frozenset[str]:
    started = {m.get("Uniqueid") for m in messages if m.event == "Newchannel"}
    ended = {m.get("Uniqueid") for m in messages if m.event == "Hangup"}
    return frozenset(started - ended)


def test_a_call_answered_during_an_ami_gap_is_not_declared_missed_and_raises_no_violation() -> None:
    before, _, after = _split_at_answer("answered_17s")
    since = max(m.timestamp for m in after if m.timestamp is not None)  # the login after the gap
    gap = ChannelSnapshot(_live(before), (), since, since)
    ticks = [Tick(since + timedelta(seconds=s)) for s in range(0, 60, 5)]
    _, decisions = run([*before, gap, *ticks, *[m for m in after if m.event in ("Hangup", "HangupRequest")]])
    assert not [d for d in decisions if isinstance(d, Violation)]
    assert not [d for d in decisions if isinstance(d, CallEnded)]
    assert len([d for d in decisions if isinstance(d, NeedsReconcile)]) == 1


def test_an_answer_seen_after_the_gap_still_gives_the_final_record() -> None:
    before, answer, after = _split_at_answer("answered_7s_talk_4s")
    since = answer[0].timestamp
    assert since is not None
    gap = ChannelSnapshot(_live(before), (), since, since)
    _, decisions = run([*before, gap, *answer, *after])
    [ended] = [d for d in decisions if isinstance(d, CallEnded)]
    assert ended.record.disposition == "answered" and ended.record.answered_by == "agent101"


def test_a_call_started_after_the_login_is_not_made_uncertain() -> None:
    messages = fixture_messages("answered_17s")
    first = next(m.timestamp for m in messages if m.timestamp is not None)
    login = ChannelSnapshot(frozenset(), (), first - timedelta(seconds=1), first - timedelta(seconds=1))
    _, decisions = run([login, *messages])
    assert [type(d) for d in decisions if isinstance(d, CallEnded | NeedsReconcile)] == [CallEnded]
