"""Prometheus metrics of the daemon (served at GET /metrics by the ops API)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """The daemon's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("pbx_bridge_calls", "Hotline calls finished, by disposition",
                             ["disposition"], registry=self.registry)
        self.violations = Counter("pbx_bridge_violations", "Rule breaches recorded, by kind",
                                  ["kind"], registry=self.registry)
        self.alerts = Counter("pbx_bridge_alerts", "Webhook alerts, by result (sent, failed, dropped)",
                              ["result"], registry=self.registry)
        self.probes = Counter("pbx_bridge_probes", "Line probe attempts, by outcome", ["outcome"],
                              registry=self.registry)
        self.calendar_known = Gauge("pbx_bridge_holiday_calendar_known",
                                    "1 if the holiday calendar has data for this year, 0 if only weekly hours apply",
                                    registry=self.registry)
        self.hotline_open = Gauge("pbx_bridge_hotline_open", "1 while in business hours (as published to the PBX)",
                                  registry=self.registry)
