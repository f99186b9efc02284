"""Hotline phones in working order: each agent's phone registered and reachable, and none left off the hook."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.metrics import Metrics
from pbx_bridge.tracker.tracker import endpoint_of

log = structlog.get_logger("pbx_bridge.phones")

UP: Final = frozenset({"Created", "Reachable", "Updated", "NonQualified"})
DOWN: Final = frozenset({"Removed", "Unreachable"})
CHECK_SECONDS: Final = 1.0


@dataclass
class PhoneState:
    """What is known of one agent's phone."""

    phone: str
    reachable: bool | None = None  # None: not known yet
    since: datetime | None = None  # when it became (un)reachable
    unreachable_alerted: bool = False
    busy_since: datetime | None = None  # the first of an unbroken run of busy answers
    busy_count: int = 0
    off_hook_alerted: bool = False


class PhoneWatch:
    """Follows each agent's phone (its registered contact: ContactStatus events, read again at
    every AMI login) and how it answers calls (DialEnd). One owned task (`run`) raises, during
    open hours, `phone_unreachable` for a phone without a contact for `unreachable_after`, and
    `phone_off_hook` for a phone signed in that answered every call BUSY for `off_hook_after`
    (a handset not put back: 电话接听完毕后应将听筒放好); each once, until it is cleared."""

    name = "phones"  # its task's name (lifecycle.Service)

    def __init__(self, phones: Sequence[str], *, unreachable_after: timedelta, off_hook_after: timedelta,
                 is_open: Callable[[], bool], signed_in: Callable[[str], bool],
                 alert: Callable[[dict[str, Any]], None], metrics: Metrics,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.phones = {phone: PhoneState(phone) for phone in phones}
        self._unreachable_after = unreachable_after
        self._off_hook_after = off_hook_after
        self._is_open = is_open
        self._signed_in = signed_in
        self._alert = alert
        self._clock = clock
        self._stopping = asyncio.Event()
        for phone in phones:
            metrics.phone_reachable.labels(phone).set_function(self._gauge(phone))

    def _gauge(self, phone: str) -> Callable[[], float]:
        def value() -> float:
            return {True: 1.0, False: 0.0, None: -1.0}[self.phones[phone].reachable]
        return value

    def observe(self, event: AmiMessage) -> None:
        """Follow a ContactStatus (registration, qualify) or DialEnd (how the phone answered) event."""
        if event.event == "ContactStatus":
            state = self.phones.get(event.get("AOR")) or self.phones.get(event.get("EndpointName"))
            status = event.get("ContactStatus")
            if state is not None and (status in UP or status in DOWN):
                self._set_reachable(state, status in UP, status)
        elif event.event == "DialEnd":
            state = self.phones.get(endpoint_of(event.get("DestChannel")))
            if state is None:
                return
            if event.get("DialStatus") == "BUSY":
                state.busy_since = state.busy_since or self._clock()
                state.busy_count += 1
            elif event.get("DialStatus") in ("ANSWER", "NOANSWER"):
                self._clear_off_hook(state)

    async def read(self, ami: AmiClient) -> None:
        """At a login: whether each phone has a registered contact now (Getvar of PJSIP_AOR, class
        `call`; the PJSIPShow* actions need `system`)."""
        for state in self.phones.values():
            try:
                reply = await ami.send_action({"Action": "Getvar", "Variable": f"PJSIP_AOR({state.phone},contact)"})
            except AmiError as exc:
                log.warning("phone_not_read", phone=state.phone, error=str(exc))
                continue
            if reply.get("Response") == "Success":
                contacts = str(reply.get("Value") or "")
                self._set_reachable(state, bool(contacts), "Registered" if contacts else "NoContact")

    def check(self) -> None:
        """Raise and clear the alerts that are due now."""
        now, open_now = self._clock(), self._is_open()
        for state in self.phones.values():
            down_for = now - state.since if state.reachable is False and state.since is not None else None
            if (down_for is not None and down_for >= self._unreachable_after and open_now
                    and not state.unreachable_alerted):
                state.unreachable_alerted = True
                log.error("phone_unreachable", phone=state.phone, minutes=round(down_for.total_seconds() / 60, 1))
                self._alert({"service": "pbx-bridge", "kind": "phone_unreachable", "phone": state.phone,
                             "since": state.since.isoformat() if state.since else None})
            busy_for = now - state.busy_since if state.busy_since is not None else None
            if (busy_for is not None and busy_for >= self._off_hook_after and state.busy_count >= 2
                    and self._signed_in(state.phone) and open_now and not state.off_hook_alerted):
                state.off_hook_alerted = True
                log.error("phone_off_hook", phone=state.phone, busy_calls=state.busy_count)
                self._alert({"service": "pbx-bridge", "kind": "phone_off_hook", "phone": state.phone,
                             "busy_calls": state.busy_count,
                             "since": state.busy_since.isoformat() if state.busy_since else None})

    def status(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: ok unless a phone is alerted; each phone's state."""
        details = {p.phone: {"reachable": p.reachable, "since": p.since.isoformat() if p.since else None,
                             "unreachable_alert": p.unreachable_alerted, "off_hook_alert": p.off_hook_alerted}
                   for p in self.phones.values()}
        return not any(p.unreachable_alerted or p.off_hook_alerted for p in self.phones.values()), details

    def stop(self) -> None:
        """Make `run` return."""
        self._stopping.set()

    async def run(self) -> None:
        """Check every second until stopped."""
        while not self._stopping.is_set():
            self.check()
            await wait_set(self._stopping, CHECK_SECONDS)

    def _set_reachable(self, state: PhoneState, reachable: bool, status: str) -> None:
        if state.reachable == reachable:
            return
        state.reachable, state.since = reachable, self._clock()
        (log.info if reachable else log.warning)("phone_state", phone=state.phone, status=status)
        if reachable and state.unreachable_alerted:
            state.unreachable_alerted = False
            self._alert({"service": "pbx-bridge", "kind": "phone_reachable_again", "phone": state.phone})

    def _clear_off_hook(self, state: PhoneState) -> None:
        if state.off_hook_alerted:
            self._alert({"service": "pbx-bridge", "kind": "phone_answering_again", "phone": state.phone})
        state.busy_since, state.busy_count, state.off_hook_alerted = None, 0, False
