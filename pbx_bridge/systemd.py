"""systemd integration: sd_notify messages, and a watchdog that pings only while the tracker makes progress."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import structlog

from pbx_bridge.aio import wait_set

log = structlog.get_logger("pbx_bridge.systemd")

T = TypeVar("T")

STATUS_PERIOD: Final = 2.0  # seconds between STATUS refreshes (and pings, when WatchdogSec/4 is longer)


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET with the standard library (the one place that does so).

    Outside systemd (no NOTIFY_SOCKET) every call does nothing. A message that cannot be sent
    is logged once and dropped: the daemon never blocks or fails on its service manager."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds if address is not None else None
        self.ready_sent = False
        self.status_line: Callable[[], str] = lambda: "running"  # the Watchdog sets the daemon's
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as sd_notify and sd_watchdog_enabled do."""
        environ = os.environ if environ is None else environ
        raw = environ.get("NOTIFY_SOCKET") or None
        address: str | None = None
        if raw is not None and raw[0] in "/@":
            address = "\0" + raw[1:] if raw[0] == "@" else raw
        elif raw is not None:
            log.warning("systemd_notify_socket_unsupported", socket=raw, effect="no READY, STATUS or WATCHDOG")
        watchdog: float | None = None
        usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isascii() and usec.isdigit() and int(usec) > 0 and owner in ("", str(pid or os.getpid())):
            watchdog = int(usec) / 1_000_000
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram of KEY=value lines (keys as given, e.g. READY="1"); False if not sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value.replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:  # full queue, socket gone: drop it, say so once
            if not self._failing:
                log.warning("systemd_notify_failed", error=str(exc), socket=self.address.replace("\0", "@"))
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self) -> None:
        """READY=1, once (configuration loaded, database reached, first AMI login done), with STATUS."""
        if self.ready_sent:
            return
        self.ready_sent = True
        if self.send(READY="1", STATUS=self.status_line()):
            log.info("systemd_ready")

    def stopping(self, status: str = "stopping: draining the tracker, writing records") -> None:
        """STOPPING=1: the bounded graceful shutdown has begun."""
        self.send(STOPPING="1", STATUS=status)


class _Heartbeat:
    """A marker the watchdog puts into the tracker's queue; never reaches the tracker."""

    __slots__ = ("sent_at",)

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at


class HeartbeatQueue(asyncio.Queue[T]):
    """The tracker's input queue, through which the watchdog sends heartbeats.

    `get` passes over heartbeats: the consumer taking one proves it is alive, awaiting its
    queue, and has handled everything queued before it. At most one is in the queue at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._beat: _Heartbeat | None = None
        self.beats = 0  # heartbeats the consumer has taken

    def beat(self, now: float) -> None:
        """Queue a heartbeat sent at `now` (monotonic), unless one is still waiting."""
        if self._beat is None:
            self._beat = _Heartbeat(now)
            self.put_nowait(cast(T, self._beat))  # filtered out by `get`: never a T for the consumer

    def waiting_since(self) -> float | None:
        """When the heartbeat the consumer has not taken yet was queued; None if it took them all."""
        return None if self._beat is None else self._beat.sent_at

    async def get(self) -> T:
        """The next input, passing over (and noting) heartbeats."""
        while True:
            item = await super().get()
            if not isinstance(item, _Heartbeat):
                return item
            if item is self._beat:
                self._beat = None
                self.beats += 1


@dataclass(frozen=True)
class DaemonStatus:
    """What STATUS= shows in `systemctl status`: role, AMI, calls live, records pending."""

    calls_live: Callable[[], int]
    records_pending: Callable[[], int]
    ami_connected: Callable[[], bool]
    role: Callable[[], str] = lambda: "leader"  # "leader" | "standby": the hot standby's election plugs in here

    def line(self) -> str:
        """e.g. "leader; AMI connected; 2 calls live; 0 records pending"."""
        ami = "AMI connected" if self.ami_connected() else "AMI disconnected (reconnecting)"
        return f"{self.role()}; {ami}; {self.calls_live()} calls live; {self.records_pending()} records pending"


class Watchdog:
    """The daemon's systemd service: WATCHDOG=1 only while the event loop and the tracker consumer
    make progress, STATUS= kept current, STOPPING=1 when stopped (first in the stop order).

    Every `period` (a quarter of WatchdogSec, at most 2 s) a loop task queues a heartbeat into the tracker's
    queue; it pings only if no heartbeat has been waiting longer than `bound` (half WatchdogSec).
    A stalled loop sends nothing; a stalled or dead consumer leaves the heartbeat waiting, so the
    pings stop and systemd restarts the service after WatchdogSec. An AMI outage does not: the
    heartbeat goes through the queue whether or not AMI events do."""

    name = "systemd"

    def __init__(self, notifier: Notifier, queue: HeartbeatQueue[Any], status: DaemonStatus,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._queue = queue
        self._status = status
        notifier.status_line = status.line
        self._clock = clock
        self._stopped = asyncio.Event()
        watchdog = notifier.watchdog_seconds
        self.period = min(watchdog / 4, STATUS_PERIOD) if watchdog else STATUS_PERIOD
        self.bound = watchdog / 2 if watchdog else None
        self.withheld = False  # the last ping was withheld: the consumer is not making progress

    async def run(self) -> None:
        """Ping and refresh STATUS until stopped."""
        if not self._notifier.enabled:
            return
        log.info("systemd_watchdog", watchdog_seconds=self._notifier.watchdog_seconds, period=self.period)
        shown = ""
        while not self._stopped.is_set():
            now = self._clock()
            self._queue.beat(now)
            fields: dict[str, str] = {}
            waiting = self._queue.waiting_since()
            age = 0.0 if waiting is None else now - waiting
            stalled = self.bound is not None and age >= self.bound
            if stalled and not self.withheld:
                log.error("systemd_watchdog_withheld", waiting_seconds=round(age, 1),
                          reason="the tracker has not taken its queue's heartbeat: it is stalled or dead",
                          effect="systemd restarts pbx-bridge after WatchdogSec")
            elif not stalled and self.withheld:
                log.info("systemd_watchdog_resumed")
            self.withheld = stalled
            if self.bound is not None and not stalled:
                fields["WATCHDOG"] = "1"
            status = self._status.line()
            if stalled:
                status = f"tracker stalled {age:.0f} s, watchdog pings withheld; {status}"
            elif not self._notifier.ready_sent:
                status = f"starting: waiting for the first AMI login; {status}"
            if status != shown:
                fields["STATUS"] = shown = status
            if fields:
                self._notifier.send(**fields)
            await wait_set(self._stopped, self.period)

    def stop(self) -> None:
        """Send STOPPING=1 at once and end the pings."""
        self._stopped.set()
        self._notifier.stopping()
