"""Security alerts: counted and logged every time, sent to the webhook once per reason and channel
per window; the outbound guard hangs up only a channel Asterisk confirms belongs to the call."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from pbx_bridge.alerts import Alerter
from pbx_bridge.ami.client import AmiClient
from pbx_bridge.daemon import Outputs, guard
from pbx_bridge.metrics import Metrics
from pbx_bridge.security import SecurityReporter
from pbx_bridge.tracker import HangupChannel, SecurityAlert, Violation, ViolationKind


class CollectingAlerter(Alerter):
    """The real Alerter's interface; what it would send is kept here instead."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__("http://127.0.0.1:9/unused", metrics)
        self.sent: list[dict[str, Any]] = []

    def submit(self, alert: dict[str, Any]) -> None:
        self.sent.append(alert)


def alert(channel: str = "PJSIP/carrier-00000001", reason: str = "ami_identity") -> SecurityAlert:
    return SecurityAlert(reason, channel, "pbx-1.1", "pbx-1.1", "detail")


def test_every_alert_is_counted_but_the_webhook_gets_one_per_reason_and_channel_per_window() -> None:
    now = [0.0]
    metrics = Metrics()
    alerter = CollectingAlerter(metrics)
    reporter = SecurityReporter(alerter, metrics, repeat_seconds=60, clock=lambda: now[0])
    for _ in range(100):
        reporter.report(alert())
    reporter.report(alert(channel="PJSIP/carrier-00000002"))
    reporter.report(alert(reason="forged_user_event"))
    assert len(alerter.sent) == 3
    assert metrics.security_alerts.labels("ami_identity")._value.get() == 101
    now[0] = 61
    reporter.report(alert())
    assert len(alerter.sent) == 4 and alerter.sent[-1]["kind"] == "security"


def test_the_webhook_memory_is_bounded() -> None:
    metrics = Metrics()
    reporter = SecurityReporter(CollectingAlerter(metrics), metrics, remembered=10)
    for n in range(1000):
        reporter.report(alert(channel=f"PJSIP/carrier-{n:08x}"))
    assert len(reporter._last_sent) == 10


@dataclass
class StubAmi:
    """Answers Getvar CHANNEL(linkedid) with `linkedid_of` and records every action."""

    linkedid_of: dict[str, str]
    actions: list[dict[str, str]] = field(default_factory=list)

    async def send_action(self, fields: dict[str, str], **_: Any) -> dict[str, str]:
        self.actions.append(fields)
        if fields["Action"] == "Getvar":
            value = self.linkedid_of.get(fields["Channel"])
            return {"Response": "Success", "Value": value} if value else {"Response": "Error",
                                                                          "Message": "No such channel"}
        return {"Response": "Success", "Message": "Channel Hungup"}


class Writer:
    def __init__(self) -> None:
        self.submitted: list[object] = []

    def submit(self, item: object) -> None:
        self.submitted.append(item)


async def run_guard(ami: StubAmi, items: list[HangupChannel]) -> tuple[Writer, CollectingAlerter]:
    metrics = Metrics()
    alerter = CollectingAlerter(metrics)
    writer = Writer()
    out = cast(Outputs, type("Out", (), {"writer": writer, "metrics": metrics, "alerter": alerter,
                                          "security": SecurityReporter(alerter, metrics)})())
    queue: asyncio.Queue[HangupChannel | None] = asyncio.Queue()
    for item in [*items, None]:
        queue.put_nowait(item)
    await guard(queue, cast(AmiClient, ami), out)
    return writer, alerter


def leak(channel: str, linkedid: str) -> HangupChannel:
    violation = Violation(ViolationKind.OUTBOUND_ATTEMPT, datetime.now(UTC), linkedid, (("stopped_by", "guard"),))
    return HangupChannel(channel, "leak", linkedid=linkedid, violation=violation)


async def test_the_guard_hangs_up_a_confirmed_channel_and_records_the_violation() -> None:
    ami = StubAmi({"PJSIP/carrier-0000000a": "pbx-5.1"})
    writer, _ = await run_guard(ami, [leak("PJSIP/carrier-0000000a", "pbx-5.1")])
    assert [a["Action"] for a in ami.actions] == ["Getvar", "Hangup"]
    assert len(writer.submitted) == 1 and isinstance(writer.submitted[0], Violation)


async def test_a_forged_event_naming_another_calls_channel_gets_nothing_hung_up_nor_recorded() -> None:
    """A forged Newchannel names a real channel (of another call) under a made-up linkedid."""
    ami = StubAmi({"PJSIP/carrier-0000000b": "pbx-6.1"})
    writer, alerter = await run_guard(ami, [leak("PJSIP/carrier-0000000b", "pbx-forged"),
                                            leak("PJSIP/carrier-000000ff", "pbx-forged-2")])
    assert [a["Action"] for a in ami.actions] == ["Getvar", "Getvar"]  # no Hangup
    assert writer.submitted == []
    assert [a["reason"] for a in alerter.sent] == ["guard_target_mismatch"] * 2
