"""The pure call tracker: AMI events in, call records and decisions out (no I/O, no clock)."""

from pbx_bridge.tracker.model import (
    CallEnded,
    CallLeg,
    CallLost,
    CallRecord,
    CallStarted,
    ChannelSnapshot,
    Decision,
    Disposition,
    HangupChannel,
    LiveChannel,
    NeedsReconcile,
    ProbeArrived,
    SecurityAlert,
    Tick,
    Violation,
    ViolationKind,
)
from pbx_bridge.tracker.tracker import TrackerSettings, TrackerState, apply

__all__ = [
    "CallEnded",
    "CallLeg",
    "CallLost",
    "CallRecord",
    "CallStarted",
    "ChannelSnapshot",
    "Decision",
    "Disposition",
    "HangupChannel",
    "LiveChannel",
    "NeedsReconcile",
    "ProbeArrived",
    "SecurityAlert",
    "Tick",
    "TrackerSettings",
    "TrackerState",
    "Violation",
    "ViolationKind",
    "apply",
]
