"""Security alerts: forged or split AMI events, refused caller IDs, guard targets that do not match.

Every alert is logged (`security_alert`) and counted (`pbx_bridge_security_alerts_total`);
the webhook gets one per reason and channel per `repeat_seconds`, so a flood of forged events
cannot flood the on-call phone.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import structlog

from pbx_bridge.alerts import Alerter
from pbx_bridge.ami.integrity import Suspicion
from pbx_bridge.metrics import Metrics
from pbx_bridge.tracker import SecurityAlert

log = structlog.get_logger("pbx_bridge.security")


class SecurityReporter:
    """Where every security alert goes: the log, a metric, and (rate-limited) the webhook."""

    def __init__(self, alerter: Alerter, metrics: Metrics, *, repeat_seconds: float = 60.0,
                 remembered: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self._alerter = alerter
        self._metrics = metrics
        self._repeat = repeat_seconds
        self._remembered = remembered
        self._clock = clock
        self._last_sent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.dialplan_key_ok: bool | None = None  # checked after every AMI login

    def suspicion(self, suspicion: Suspicion) -> None:
        """A message the AMI adapter dropped as forged or split."""
        self.report(SecurityAlert(f"ami_{suspicion.reason}", suspicion.channel, suspicion.uniqueid, "",
                                  f"{suspicion.detail} (event {suspicion.event or '-'})"))

    def report(self, alert: SecurityAlert) -> None:
        """Log and count every alert; send it to the webhook unless the same one went out lately."""
        self._metrics.security_alerts.labels(alert.reason).inc()
        log.warning("security_alert", reason=alert.reason, channel=alert.channel, uniqueid=alert.uniqueid,
                    linkedid=alert.linkedid, detail=alert.detail)
        key = (alert.reason, alert.channel)
        now = self._clock()
        last = self._last_sent.get(key)
        if last is not None and now - last < self._repeat:
            return
        self._last_sent[key] = now
        self._last_sent.move_to_end(key)
        while len(self._last_sent) > self._remembered:
            self._last_sent.popitem(last=False)
        self._alerter.submit({"service": "pbx-bridge", "kind": "security", "reason": alert.reason,
                              "channel": alert.channel, "uniqueid": alert.uniqueid, "linkedid": alert.linkedid,
                              "detail": alert.detail})
