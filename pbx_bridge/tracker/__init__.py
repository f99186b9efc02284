"""The pure call tracker: AMI events in, call records and decisions out (no I/O, no clock)."""

from pbx_bridge.tracker.model import CallEnded, CallLeg, CallRecord, CallStarted, Decision, Disposition
from pbx_bridge.tracker.tracker import TrackerSettings, TrackerState, apply

__all__ = [
    "CallEnded",
    "CallLeg",
    "CallRecord",
    "CallStarted",
    "Decision",
    "Disposition",
    "TrackerSettings",
    "TrackerState",
    "apply",
]
