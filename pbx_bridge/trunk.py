"""Passive health of the hotline trunk: Asterisk's qualify (SIP OPTIONS) state of its contact,
read at every AMI login and followed through ContactStatus events.

At login it is read with Getvar of the PJSIP_ENDPOINT / PJSIP_AOR / PJSIP_CONTACT functions
(class `call`): PJSIPShowEndpoint needs `system`, which the AMI user must not have."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog

from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.ami.wire import AmiMessage

log = structlog.get_logger("pbx_bridge.trunk")


@dataclass
class TrunkHealth:
    """The latest qualify state of the trunk's contact."""

    endpoint: str
    status: str = "unknown"  # Reachable, Unreachable, NonQualified, Created, ... or unknown
    rtt_ms: float | None = None
    since: datetime | None = None

    @property
    def reachable(self) -> bool | None:
        """True / False from qualify; None when Asterisk does not qualify it or has not said yet."""
        return {"Reachable": True, "Unreachable": False}.get(self.status)

    def update(self, status: str, rtt_usec: str, when: datetime | None) -> None:
        """Record a state; log a change (a warning when the trunk stops answering)."""
        rtt = round(int(rtt_usec) / 1000, 1) if rtt_usec.isdigit() and int(rtt_usec) > 0 else None
        changed = status != self.status
        self.status, self.rtt_ms = status, rtt
        if changed:
            self.since = when
            (log.warning if status == "Unreachable" else log.info)(
                "trunk_state", endpoint=self.endpoint, status=status, rtt_ms=rtt)

    def observe(self, event: AmiMessage) -> None:
        """Follow a ContactStatus event about this trunk."""
        if event.event == "ContactStatus" and event.get("EndpointName") == self.endpoint:
            self.update(event.get("ContactStatus"), event.get("RoundtripUsec"), event.timestamp)



async def read_trunk(ami: AmiClient, trunk: TrunkHealth) -> None:
    """Read the trunk's first contact's qualify state (status, round trip) from Asterisk now."""
    async def function(expression: str) -> str:
        reply = await ami.send_action({"Action": "Getvar", "Variable": expression})
        if reply.get("Response") != "Success":
            raise AmiError(f"Getvar {expression} refused: {reply.get('Message')}")
        return str(reply.get("Value") or "")

    aors = (await function(f"PJSIP_ENDPOINT({trunk.endpoint},aors)")).split(",")
    if not aors[0]:
        return  # no such endpoint or no AOR: the state stays unknown
    contacts = (await function(f"PJSIP_AOR({aors[0].strip()},contact)")).split(",")
    if not contacts[0] or not all(c.isprintable() and "," not in c and ")" not in c for c in contacts[:1]):
        return
    contact = contacts[0].strip()
    status = await function(f"PJSIP_CONTACT({contact},status)")
    rtt = await function(f"PJSIP_CONTACT({contact},rtt)")
    trunk.update(status or "unknown", rtt, None)
