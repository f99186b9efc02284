"""The AMI connection: panoramisk's protocol with its defects neutralised, in one place.

panoramisk 1.4 is used for what it does well: action IDs, futures, and matching
(multi-message) responses to actions. Its defects are worked around here:
  * `data_received` decodes every TCP chunk as ASCII with errors ignored (Chinese names
    vanish, characters split across reads are lost): we frame bytes first, then decode
    each complete message as UTF-8 (`wire.AmiFramer`).
  * `send` encodes as ASCII inside a bare `except` that only logs, leaving the action's
    future unresolved forever: we encode UTF-8, refuse header injection, and fail the future.
  * an exception from an event handler escapes `data_received` and drops the connection:
    our handler is caught and counted, the connection survives.
  * coroutine handlers are fire-and-forget (`ensure_future`): events go, in arrival order,
    to one synchronous callback that the daemon points at its own queue and consumer.
  * the ping reply is never checked and reconnect is a fixed 2 s timer: `AmiClient` runs
    the only reconnect loop (bounded exponential backoff with jitter) and treats an
    unanswered ping as a dead connection.
panoramisk's `Manager` is therefore not used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message

from pbx_bridge.aio import wait_set, within
from pbx_bridge.ami.integrity import StreamIntegrity, Suspicion
from pbx_bridge.ami.wire import AmiFramer, AmiMessage, FramingError, format_action
from pbx_bridge.backoff import Backoff

log = structlog.get_logger("pbx_bridge.ami")

EventHandler = Callable[[AmiMessage], None]
SuspicionHandler = Callable[[Suspicion], None]


def log_suspicion(suspicion: Suspicion) -> None:
    """The default handler of dropped, suspect AMI messages: a security log line."""
    log.warning("ami_message_suspect", reason=suspicion.reason, ami_event=suspicion.event,
                channel=suspicion.channel, uniqueid=suspicion.uniqueid, detail=suspicion.detail)
SessionHook = Callable[["AmiClient"], Awaitable[None]]


class AmiError(Exception):
    """An AMI action failed or the connection is not usable."""


class SafeAmiProtocol(AMIProtocol):  # type: ignore[misc]
    """panoramisk's AMIProtocol with byte framing, UTF-8, and contained handler failures."""

    def __init__(self, on_event: EventHandler, on_lost: Callable[[Exception | None], None],
                 on_suspicion: SuspicionHandler = log_suspicion) -> None:
        super().__init__()
        self._on_event = on_event
        self._on_lost = on_lost
        self._on_suspicion = on_suspicion
        self._framer = AmiFramer()
        self._integrity = StreamIntegrity()
        self._warned_unnumbered = False
        self.handler_errors = 0
        self.decode_errors = 0

    def data_received(self, data: bytes) -> None:
        messages = self._framer.feed(data)
        while True:
            try:
                message = next(messages, None)
            except FramingError as exc:  # the messages before it in this read were handed over
                log.error("ami_framing_error", error=str(exc))
                self.transport.abort()
                return
            if message is None:
                return
            if message.decode_errors:
                self.decode_errors += 1
                log.warning("ami_message_not_utf8", ami_event=message.event)
            try:
                self._route(message)
            except Exception:  # a bad handler must not kill the connection
                self.handler_errors += 1
                log.exception("ami_handler_failed", ami_event=message.event)

    def _route(self, message: AmiMessage) -> None:
        if "actionid" in message or "commandid" in message:  # a reply: panoramisk's Message for its Action
            compat = Message({k: v for k, v in message.headers.items()})
            action = None
            if compat.id is not None:
                action = self.responses.get(compat.id)
            if action is None and compat.action_id:
                action = self.responses.get(compat.action_id)
            if action is not None:
                if action.add_message(compat):
                    self.responses.pop(action.id, None)
                    if action.action_id:
                        self.responses.pop(action.action_id, None)
                return
            if "actionid" in message:
                return  # a late reply to an action that gave up waiting: nothing for the tracker
        suspicion = self._integrity.check(message)
        if self._integrity.numbered is False and not self._warned_unnumbered:
            self._warned_unnumbered = True
            log.error("ami_events_unnumbered", fix="set debug = on in manager.conf [general]",
                      effect="events forged through a caller ID can be told only by their shape")
        for forged in self._integrity.forged_after_the_fact:
            self._on_suspicion(Suspicion("sequence", "", "", "",
                                         f"an event numbered {forged} was accepted, then a real event came lower"))
        self._integrity.forged_after_the_fact.clear()
        if suspicion is not None:
            self._on_suspicion(suspicion)  # dropped: a forged or split event is never applied
            return
        self._on_event(message)

    def send(self, data: Any, as_list: bool | None = None) -> asyncio.Future[Any]:
        action = data if isinstance(data, Action) else Action(data, as_list=as_list)
        try:
            payload = format_action({str(k): v for k, v in action.items()})
        except ValueError as exc:
            action.future.set_exception(AmiError(str(exc)))
            return action.future  # type: ignore[no-any-return]
        self.responses[action.id] = action
        self.transport.write(payload)
        return action.future  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        for action in list(self.responses.values()):
            if not action.future.done():
                action.future.set_exception(AmiError("AMI connection lost"))
        self.responses.clear()
        self.closed = True
        self._on_lost(exc)


class AmiClient:
    """One AMI session at a time: connect, log in, keep alive, reconnect with backoff.

    Events are handed, in arrival order, to `on_event` (a synchronous callback; the
    daemon makes it a `put_nowait` into the queue its consumer owns). `on_session` is
    awaited after every successful login (e.g. to re-read the live channels after a gap);
    an AmiError from it is logged, anything else is a bug and ends `run`.
    """

    name = "ami"  # its task's name (lifecycle.Service)

    def __init__(self, *, host: str, port: int, username: str, secret: str, on_event: EventHandler,
                 connect_timeout: float = 5.0, ping_interval: float = 10.0, ping_timeout: float = 5.0,
                 reconnect_max: float = 30.0, on_session: SessionHook | None = None,
                 on_suspicion: SuspicionHandler = log_suspicion) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._secret = secret
        self._on_event = on_event
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._reconnect_max = reconnect_max
        self._on_session = on_session
        self._on_suspicion = on_suspicion
        self._protocol: SafeAmiProtocol | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.sessions = 0
        self.reconnects = 0

    async def run(self) -> None:
        """Keep a logged-in session until `stop()`; reconnect after any failure."""
        backoff = Backoff(0.5, self._reconnect_max)
        while not self._stopping.is_set():
            failure: Exception | None = None
            try:
                await self._session()
                backoff.reset()  # the session had logged in: retry soon
            except (OSError, TimeoutError, AmiError) as exc:
                failure = exc
            self.connected.clear()
            if self._stopping.is_set():
                break
            delay = backoff.next_delay()
            if failure is not None:
                log.warning("ami_unavailable", host=self._host, port=self._port,
                            error=str(failure) or type(failure).__name__, retry_in=round(delay, 2))
            self.reconnects += 1
            await wait_set(self._stopping, delay)

    def stop(self) -> None:
        """End the session and make `run` return."""
        self._stopping.set()
        if self._protocol is not None:
            self._protocol.transport.close()

    async def send_action(self, fields: Mapping[str, str | list[str]], *, as_list: bool | None = None,
                          response_timeout: float = 10.0) -> Any:
        """Send an action on the current session and wait for its response (or list).

        `as_list=None` lets panoramisk decide from the first response whether more follow
        (an async Originate's OriginateResponse, an EventList); True forces a list."""
        protocol = self._protocol
        if protocol is None or protocol.closed or not self.connected.is_set():
            raise AmiError("AMI is not connected")
        future = protocol.send(Action(dict(fields), as_list=as_list), as_list=as_list)
        try:
            return await within(future, response_timeout)
        except TimeoutError:
            raise AmiError(f"no response to {fields.get('Action')} within {response_timeout} s") from None

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Exception | None] = loop.create_future()

        def on_lost(exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(exc)

        _, protocol = await within(
            loop.create_connection(lambda: SafeAmiProtocol(self._on_event, on_lost, self._on_suspicion),
                                  self._host, self._port),
            self._connect_timeout)
        self._protocol = protocol
        try:
            response = await within(protocol.send(Action({
                "Action": "Login", "Username": self._username, "Secret": self._secret, "Events": "on"})),
                self._connect_timeout)
            if response.get("Response") != "Success":
                raise AmiError(f"AMI login refused: {response.get('Message') or 'no reason given'}")
            self.sessions += 1
            self.connected.set()
            log.info("ami_connected", host=self._host, port=self._port, banner=protocol._framer.banner)
            if self._on_session is not None:
                try:
                    await self._on_session(self)
                except AmiError as exc:
                    log.warning("ami_session_setup_failed", error=str(exc))
            await self._keepalive(protocol, lost)
        finally:
            self.connected.clear()
            self._protocol = None
            protocol.transport.close()
            if not self._stopping.is_set():
                log.warning("ami_disconnected")

    async def _keepalive(self, protocol: SafeAmiProtocol, lost: asyncio.Future[Exception | None]) -> None:
        """Ping every interval; an unanswered ping means the connection is dead."""
        while not lost.done():
            done, _ = await asyncio.wait({lost}, timeout=self._ping_interval)
            if done or self._stopping.is_set():
                return
            try:
                reply = await within(protocol.send(Action({"Action": "Ping"})), self._ping_timeout)
            except (TimeoutError, AmiError):
                log.warning("ami_ping_unanswered", timeout=self._ping_timeout)
                protocol.transport.abort()
                return
            if reply.get("Response") != "Success":
                log.warning("ami_ping_failed", response=reply.get("Response"))
                protocol.transport.abort()
                return


async def set_global(ami: AmiClient, name: str, value: str) -> None:
    """Set a dialplan global with AMI Setvar (class `call`); AmiError if Asterisk refuses it."""
    response = await ami.send_action({"Action": "Setvar", "Variable": name, "Value": value})
    if response.get("Response") != "Success":
        raise AmiError(f"Setvar {name} refused: {response.get('Message')}")
