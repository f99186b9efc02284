"""Prometheus metrics of the daemon (served at GET /metrics by the ops API)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RING_BUCKETS = (1, 2, 3, 5, 7.5, 10, 12.5, 15, 20, 25, 30, 45, 60)  # seconds; 15 = three China rings
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)  # seconds


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
        self.security_alerts = Counter("pbx_bridge_security_alerts",
                                       "Suspect input dropped or refused (forged AMI events...), by reason",
                                       ["reason"], registry=self.registry)
        self.calendar_known = Gauge("pbx_bridge_holiday_calendar_known",
                                    "1 if the holiday calendar has data for this year, 0 if only weekly hours apply",
                                    registry=self.registry)
        self.ring_seconds = Histogram("pbx_bridge_ring_seconds", "Ring time at the agents' phones per call",
                                      buckets=RING_BUCKETS, registry=self.registry)
        self.ami_reconnects = Gauge("pbx_bridge_ami_reconnects", "AMI reconnects since start", registry=self.registry)
        self.writer_lag = Gauge("pbx_bridge_writer_lag_seconds",
                                "Age of the oldest record not yet in PostgreSQL (0 when none)", registry=self.registry)
        self.writer_pending = Gauge("pbx_bridge_writer_pending", "Records not yet in PostgreSQL",
                                    registry=self.registry)
        self.trunk_reachable = Gauge("pbx_bridge_trunk_reachable",
                                     "1 if the hotline trunk answers qualify, 0 if not, -1 unknown or not qualified",
                                     registry=self.registry)
        self.hotline_open = Gauge("pbx_bridge_hotline_open", "1 while in business hours (as published to the PBX)",
                                  registry=self.registry)
        # The writer and its journal (storage/writer.py, storage/journal.py).
        self.journal_writable = Gauge("pbx_bridge_journal_writable",
                                      "1 while the journal takes records, 0 while it fails (disk full, I/O error)",
                                      registry=self.registry)
        self.journal_bytes = Gauge("pbx_bridge_journal_bytes", "Size of the journal file", registry=self.registry)
        self.journal_bad_lines = Counter("pbx_bridge_journal_bad_lines",
                                         "Journal lines skipped as torn (cut short) or corrupt", ["reason"],
                                         registry=self.registry)
        self.writer_on_disk_only = Gauge("pbx_bridge_writer_on_disk_only",
                                         "Records waiting in the journal only (the in-memory queue is full)",
                                         registry=self.registry)
        self.writer_not_journaled = Gauge("pbx_bridge_writer_not_journaled",
                                          "Records held in memory only (the journal cannot take them)",
                                          registry=self.registry)
        self.records_dropped = Counter("pbx_bridge_records_dropped",
                                       "Records refused because memory and journal were both full (logged whole)",
                                       registry=self.registry)
        self.records_rejected = Counter("pbx_bridge_records_rejected",
                                        "Records PostgreSQL refused as bad data (kept in the rejected file)",
                                        registry=self.registry)
        self.phone_reachable = Gauge("pbx_bridge_phone_reachable",
                                     "1 if an agent's phone has a registered contact, 0 if not, -1 unknown",
                                     ["phone"], registry=self.registry)
        # The reconcile from CEL (cel/reconcile.py).
        self.reconciled = Counter("pbx_bridge_reconciled_calls",
                                  "Call records created or completed from CEL, by action", ["action"],
                                  registry=self.registry)
        self.reconcile_failures = Counter("pbx_bridge_reconcile_failures",
                                          "Reconcile passes that failed (database unreachable, timeout)",
                                          registry=self.registry)
        self.leader = Gauge("pbx_bridge_leader",
                            "1 while this instance leads (acts for the PBX), 0 while it is the standby",
                            registry=self.registry)
        # The event loop itself (looplag.py): how late a timer fires; every part of the daemon waits that long.
        self.loop_lag = Histogram("pbx_bridge_event_loop_lag_seconds",
                                  "How late the event loop ran a due timer (sampled every 50 ms)",
                                  buckets=LAG_BUCKETS, registry=self.registry)
        self.loop_lag_max = Gauge("pbx_bridge_event_loop_lag_max_seconds",
                                  "The longest event-loop lag seen since start", registry=self.registry)
        self.writer_errors = Counter("pbx_bridge_writer_errors",
                                     "Failed database writes, by kind (transient, data, blocked)", ["kind"],
                                     registry=self.registry)

    def watch(self, reconnects: Callable[[], float], lag: Callable[[], float], pending: Callable[[], float],
              trunk: Callable[[], float]) -> None:
        """Read these gauges from the live objects at scrape time."""
        self.trunk_reachable.set_function(trunk)
        self.ami_reconnects.set_function(reconnects)
        self.writer_lag.set_function(lag)
        self.writer_pending.set_function(pending)
