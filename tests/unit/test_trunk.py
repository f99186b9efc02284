"""Passive trunk health from qualify events."""

from __future__ import annotations

from pbx_bridge.ami.wire import parse_message
from pbx_bridge.trunk import TrunkHealth


def status_event(endpoint: str, status: str, rtt: str = "754") -> str:
    return (f"Event: ContactStatus\r\nTimestamp: 1795434000.1\r\nURI: sip:127.0.10.2:5060\r\n"
            f"ContactStatus: {status}\r\nAOR: {endpoint}\r\nEndpointName: {endpoint}\r\nRoundtripUsec: {rtt}")


def test_follows_the_trunks_contact_status_and_ignores_other_endpoints() -> None:
    trunk = TrunkHealth("carrier")
    assert trunk.reachable is None and trunk.status == "unknown"
    trunk.observe(parse_message(status_event("carrier", "Reachable")))
    assert trunk.reachable is True and trunk.rtt_ms == 0.8
    trunk.observe(parse_message(status_event("agent101", "Unreachable")))
    assert trunk.reachable is True
    trunk.observe(parse_message(status_event("carrier", "Unreachable", "0")))
    assert trunk.reachable is False and trunk.rtt_ms is None and trunk.since is not None
