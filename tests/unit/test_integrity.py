"""Forged AMI events: the captured attack stream, through the integrity checks and the tracker."""

from __future__ import annotations

from pathlib import Path

from pbx_bridge.ami.integrity import StreamIntegrity, Suspicion
from pbx_bridge.ami.wire import AmiMessage, parse_message, parse_stream
from pbx_bridge.tracker import (
    CallEnded,
    CallStarted,
    Disposition,
    SecurityAlert,
    TrackerSettings,
    TrackerState,
    Violation,
    apply,
)
from tests.support.capture import FIXTURE_EVENT_KEY

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ami"
SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234", "4008005678"}), trunk="carrier",
                           event_key=FIXTURE_EVENT_KEY)


def attack() -> list[AmiMessage]:
    """What the pbx-bridge AMI user received for a caller number forging a UserEvent (sandbox)."""
    return [m for m in parse_stream((FIXTURES / "attack_callerid_injection.ami").read_bytes())
            if "response" not in m]


def test_the_captured_attack_splits_the_real_newchannel_and_forges_a_userevent() -> None:
    messages = attack()
    head = messages[1]
    assert head.event == "Newchannel" and "uniqueid" not in head  # the real event, cut at the caller number
    forged = messages[2]
    assert (forged.event, forged.get("UserEvent"), forged.get("Digits")) == ("UserEvent", "OutboundAttempt", "9")
    assert forged.get("Uniqueid") == head.get("Uniqueid") or forged.get("Uniqueid")  # it absorbed the real tail


def test_integrity_drops_the_split_head_and_the_forged_event_and_names_the_channel() -> None:
    integrity = StreamIntegrity()
    kept: list[AmiMessage] = []
    suspicions: list[Suspicion] = []
    for message in attack():
        suspicion = integrity.check(message)
        if suspicion is None:
            kept.append(message)
        else:
            suspicions.append(suspicion)
    assert [s.reason for s in suspicions] == ["identity", "unsequenced"]
    assert suspicions[0].channel.startswith("PJSIP/carrier-")
    assert not [m for m in kept if m.get("UserEvent") == "OutboundAttempt"]
    assert [m.event for m in kept] == ["FullyBooted", "NewCallerid", "UserEvent", "SoftHangupRequest", "Hangup"]


def test_the_tracker_refuses_the_forged_event_without_the_key_and_records_the_refused_call() -> None:
    """Even were the integrity checks bypassed, the forged UserEvent lacks the dialplan's key."""
    state, decisions = TrackerState(), []
    for message in attack():
        state, out = apply(state, message, SETTINGS)
        decisions += out
    assert not [d for d in decisions if isinstance(d, Violation)]  # no forged outbound_attempt, no unanswered
    alerts = [d for d in decisions if isinstance(d, SecurityAlert)]
    assert {a.reason for a in alerts} == {"forged_user_event", "caller_id_refused"}
    [started] = [d for d in decisions if isinstance(d, CallStarted)]
    [ended] = [d for d in decisions if isinstance(d, CallEnded)]
    assert started.record.linkedid == ended.record.linkedid
    assert (ended.record.did, ended.record.caller_number) == ("4008001234", "19")
    assert ended.record.disposition is Disposition.MISSED and ended.record.hangup_cause == 21
    assert state.calls == {}


def test_a_keyed_userevent_with_a_wrong_key_is_forged() -> None:
    [*_, keyed] = [m for m in attack() if m.get("UserEvent") == "HotlineRefused"]
    forged = parse_message("\r\n".join(f"{k}: {v}" for k, v in keyed.headers.items() if k != "key")
                           + "\r\nKey: " + "0" * 32)
    _, decisions = apply(TrackerState(), forged, SETTINGS)
    assert [type(d) for d in decisions] == [SecurityAlert]


def _numbered(n: int, name: str = "Hangup") -> AmiMessage:
    """A real captured event with its SequenceNumber set to n."""
    [hangup] = [m for m in attack() if m.event == "Hangup"]
    headers = dict(hangup.headers, sequencenumber=str(n), event=name)
    return AmiMessage(headers=headers)


def test_a_forged_high_sequence_number_never_makes_real_events_look_forged() -> None:
    integrity = StreamIntegrity()
    assert integrity.check(_numbered(100)) is None
    assert integrity.check(_numbered(10**9)) is None  # a forged guess: accepted, not yet known
    assert integrity.check(_numbered(101)) is None  # the real stream goes on: it is kept ...
    assert integrity.forged_after_the_fact == [10**9]  # ... and the guess is reported
    assert integrity.check(_numbered(102)) is None


def test_a_repeated_or_lower_sequence_number_is_dropped() -> None:
    integrity = StreamIntegrity()
    for n in (5, 6, 7):
        assert integrity.check(_numbered(n)) is None
    suspicion = integrity.check(_numbered(3))
    assert suspicion is not None and suspicion.reason == "sequence"
    suspicion = integrity.check(_numbered(7))
    assert suspicion is not None and suspicion.reason == "sequence"


def test_repeated_headers_are_dropped() -> None:
    [hangup] = [m for m in attack() if m.event == "Hangup"]
    text = "\r\n".join(f"{k}: {v}" for k, v in hangup.headers.items()) + "\r\nUniqueid: pbx-forged"
    suspicion = StreamIntegrity().check(parse_message(text))
    assert suspicion is not None and suspicion.reason == "duplicate_headers"


def test_every_captured_stream_passes_the_integrity_checks() -> None:
    for path in sorted(FIXTURES.glob("*.ami")):
        if path.name.startswith("attack_"):
            continue
        integrity = StreamIntegrity()
        for message in parse_stream(path.read_bytes()):
            if "response" in message or "actionid" in message:
                continue  # replies and list items: the client matches them to their actions
            assert integrity.check(message) is None, (path.name, message.event)
