"""The presence desk: answers agents' feature codes (sign out for a break, back in, state) from the database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import structlog

from pbx_bridge.aio import within
from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.storage.presence import (
    AlreadyInStateError,
    LastAgentError,
    PresenceError,
    UnknownAgentError,
    current_presence,
    sign_in,
    sign_out,
)
from pbx_bridge.tracker import PresenceRequest

log = structlog.get_logger("pbx_bridge.presence")

Connect = Callable[[], Awaitable[asyncpg.Connection]]
MAX_WAITING: Final = 1_000  # requests queued at most (each is a phone waiting up to 3 s)


class PresenceDesk:
    """One owned task (`run`): each agent's feature code is decided in the database (the last
    agent signed in during open hours may not sign out), answered on the waiting channel
    (Setvar PRESENCE_RESULT), and a change republishes the group the dialplan rings."""

    name = "presence"  # its task's name (lifecycle.Service)

    def __init__(self, ami: AmiClient, connect: Connect, agents: Sequence[str], is_open: Callable[[], bool],
                 republish: Callable[[], Awaitable[object]], alert: Callable[[dict[str, Any]], None]) -> None:
        self._ami = ami
        self._connect = connect
        self._agents = tuple(agents)
        self._is_open = is_open
        self._republish = republish
        self._alert = alert
        self._queue: asyncio.Queue[PresenceRequest | None] = asyncio.Queue()

    def submit(self, request: PresenceRequest) -> None:
        """Take a request from the tracker; never blocks (beyond MAX_WAITING the phone hears
        "unavailable" when its 3 s pass)."""
        if self._queue.qsize() >= MAX_WAITING:
            log.warning("presence_request_dropped", agent=request.agent, reason="too many waiting")
            return
        self._queue.put_nowait(request)

    def stop(self) -> None:
        """Make `run` return after the requests already queued."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        """Answer requests in order until stopped."""
        while (request := await self._queue.get()) is not None:
            await self.handle(request)

    async def handle(self, request: PresenceRequest) -> str | None:
        """Decide one request and answer it; returns what the phone was told, one of the extensions
        of [hotline-presence-said] in dialplan/extensions.conf (None: nothing, the database failed,
        and the phone hears "unavailable")."""
        try:
            result, changed = await within(self._decide(request), 2.5)
        except (OSError, TimeoutError, asyncpg.PostgresError, PresenceError) as exc:
            log.warning("presence_not_decided", agent=request.agent, action=request.action,
                        error=str(exc) or type(exc).__name__)
            return None
        try:
            await self._ami.send_action({"Action": "Setvar", "Channel": request.channel,
                                         "Variable": "PRESENCE_RESULT", "Value": result})
        except AmiError as exc:
            log.warning("presence_not_answered", agent=request.agent, error=str(exc))
        if changed:
            try:
                await self._republish()
            except AmiError as exc:  # the routing loop publishes again within its refresh
                log.warning("presence_not_republished", error=str(exc))
        return result

    async def _decide(self, request: PresenceRequest) -> tuple[str, bool]:
        conn = await self._connect()
        try:
            agent = request.agent
            if request.action == "status":
                state = {p.agent: p for p in await current_presence(conn, self._agents)}.get(agent)
                if state is None:
                    return "unknown_agent", False
                return ("is_out" if state.signed_out_at is not None else "is_in"), False
            try:
                if request.action == "out":
                    await sign_out(conn, agent, request.at, reason="", set_by="phone", actor=agent,
                                   agents=self._agents, open_now=self._is_open())
                    log.info("agent_signed_out", agent=agent, set_by="phone")
                    return "signed_out", True
                await sign_in(conn, agent, request.at, set_by="phone", actor=agent, agents=self._agents)
                log.info("agent_signed_in", agent=agent, set_by="phone")
                return "signed_in", True
            except UnknownAgentError:
                return "unknown_agent", False
            except AlreadyInStateError:
                return "already", False
            except LastAgentError:
                log.error("last_agent_sign_out_refused", agent=agent,
                          effect="refused: the hotline would be left with nobody to answer")
                self._alert({"service": "pbx-bridge", "kind": "last_agent_sign_out_refused", "agent": agent,
                             "at": request.at.isoformat()})
                return "last_agent", False
        finally:
            await conn.close()
