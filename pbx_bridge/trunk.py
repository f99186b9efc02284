"""Passive health of the hotline trunk: Asterisk's qualify (SIP OPTIONS) state of its contact,
read at every AMI login (PJSIPShowEndpoint) and followed through ContactStatus events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

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

    def read_detail(self, response: Any) -> None:
        """Take the state from a PJSIPShowEndpoint listing (its ContactStatusDetail); an error
        response (e.g. no such endpoint) leaves the state unknown."""
        for item in response if isinstance(response, list) else []:
            get = getattr(item, "get", None)
            if get is not None and get("Event") == "ContactStatusDetail":
                self.update(get("Status"), get("RoundtripUsec", ""), None)
                return
