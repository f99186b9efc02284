"""Agent presence (签入签出): who is signed out for a break, since when; stored in agent_presence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

import asyncpg

SetBy = Literal["phone", "api", "auto"]
SET_BY: Final[frozenset[str]] = frozenset({"phone", "api", "auto"})
MAX_REASON: Final = 100
PRESENCE_LOCK: Final = 0x7062786167  # "pbxag": one presence change at a time (advisory lock)


@dataclass(frozen=True)
class Presence:
    """An agent's current state: signed out since `signed_out_at`, or signed in (None).

    `reason` is the open sign-out's reason ('' when in); `set_by` is how the current state was set
    (phone, api, auto; '' for an agent who never signed out).
    """

    agent: str
    signed_out_at: datetime | None
    reason: str
    set_by: str

    @property
    def signed_in(self) -> bool:
        """The agent takes calls."""
        return self.signed_out_at is None


class PresenceError(Exception):
    """A presence change was refused; the message says why."""


class UnknownAgentError(PresenceError):
    """The agent is not one of the configured agents."""

    def __init__(self, agent: str) -> None:
        super().__init__(f"{agent!r} is not a configured agent")
        self.agent = agent


class AlreadyInStateError(PresenceError):
    """Sign-out of an agent already out, or sign-in of one already in."""

    def __init__(self, current: Presence) -> None:
        out = current.signed_out_at
        state = "signed in" if out is None else f"signed out (since {out.isoformat()})"
        super().__init__(f"{current.agent} is already {state}")
        self.current = current


class LastAgentError(PresenceError):
    """Signing this agent out would leave no configured agent signed in during business hours."""

    def __init__(self, agent: str) -> None:
        super().__init__(f"{agent} is the last agent signed in: signing out during business hours would leave "
                         "the hotline uncovered")
        self.agent = agent


class PresenceOrderError(PresenceError):
    """The change's time is before the agent's last change (periods must follow each other)."""

    def __init__(self, agent: str, at: datetime, last: datetime) -> None:
        super().__init__(f"{agent}: {at.isoformat()} is before its last change at {last.isoformat()}")
        self.agent, self.at, self.last = agent, at, last


# The open period if there is one, else the latest closed one (its sign-in: how the agent got in).
_CURRENT = """
    SELECT DISTINCT ON (agent) agent, signed_out_at, signed_in_at, reason, set_by, signed_in_set_by
    FROM agent_presence
    WHERE pbx = session_pbx() AND agent = ANY($1::text[])
    ORDER BY agent, (signed_in_at IS NULL) DESC, signed_out_at DESC, id DESC"""


def _presence(agent: str, row: asyncpg.Record | None) -> Presence:
    if row is None:
        return Presence(agent, None, "", "")
    if row["signed_in_at"] is None:
        return Presence(agent, row["signed_out_at"], row["reason"], row["set_by"])
    return Presence(agent, None, "", row["signed_in_set_by"])


async def _current(conn: asyncpg.Connection, agents: Sequence[str]) -> dict[str, tuple[Presence, datetime | None]]:
    """Each agent's presence and the time of its last change (None: never changed)."""
    rows = {r["agent"]: r for r in await conn.fetch(_CURRENT, list(agents))}
    return {agent: (_presence(agent, rows.get(agent)),
                    None if agent not in rows else rows[agent]["signed_in_at"] or rows[agent]["signed_out_at"])
            for agent in agents}


async def current_presence(conn: asyncpg.Connection, agents: Sequence[str]) -> list[Presence]:
    """Every agent of `agents`, in that order: signed in unless an open sign-out period exists."""
    current = await _current(conn, agents)
    return [current[agent][0] for agent in agents]


def _check(agent: str, agents: Sequence[str], set_by: str, actor: str) -> None:
    if agent not in agents:
        raise UnknownAgentError(agent)
    if set_by not in SET_BY:
        raise ValueError(f"set_by must be one of {sorted(SET_BY)}, not {set_by!r}")
    if len(actor) > MAX_REASON:
        raise ValueError("actor is longer than 100 characters")


async def sign_out(conn: asyncpg.Connection, agent: str, at: datetime, *, agents: Sequence[str], open_now: bool,
                   reason: str = "", set_by: SetBy, actor: str) -> Presence:
    """Sign `agent` out at `at`, recording `reason`, how (`set_by`) and who (`actor`: the phone's
    endpoint or the API token's name, never a name from a request body).

    Raises UnknownAgentError (not in `agents`), AlreadyInStateError (already out),
    LastAgentError (`open_now` and no other configured agent is signed in) or PresenceOrderError.
    One change at a time (an advisory transaction lock), so two concurrent sign-outs cannot both
    pass the last-agent check.
    """
    _check(agent, agents, set_by, actor)
    if len(reason) > MAX_REASON:
        raise ValueError("reason is longer than 100 characters")
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PRESENCE_LOCK)
            current = await _current(conn, agents)
            presence, last = current[agent]
            if not presence.signed_in:
                raise AlreadyInStateError(presence)
            if last is not None and at < last:
                raise PresenceOrderError(agent, at, last)
            if open_now and not any(p.signed_in for name, (p, _) in current.items() if name != agent):
                raise LastAgentError(agent)
            await conn.execute(
                "INSERT INTO agent_presence (agent, signed_out_at, reason, set_by, signed_out_by) "
                "VALUES ($1, $2, $3, $4, $5)", agent, at, reason, set_by, actor)
    except asyncpg.UniqueViolationError:  # an open period written without the lock
        raise AlreadyInStateError((await _current(conn, [agent]))[agent][0]) from None
    return Presence(agent, at, reason, set_by)


async def sign_in(conn: asyncpg.Connection, agent: str, at: datetime, *, agents: Sequence[str], set_by: SetBy,
                  actor: str) -> Presence:
    """Sign `agent` back in at `at` (closing its open period), recording how and who.

    Raises UnknownAgentError, AlreadyInStateError (already in) or PresenceOrderError (`at` is
    before the sign-out).
    """
    _check(agent, agents, set_by, actor)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PRESENCE_LOCK)
        presence, _ = (await _current(conn, [agent]))[agent]
        if presence.signed_out_at is None:
            raise AlreadyInStateError(presence)
        if at < presence.signed_out_at:
            raise PresenceOrderError(agent, at, presence.signed_out_at)
        await conn.execute(
            "UPDATE agent_presence SET signed_in_at = $2, signed_in_set_by = $3, signed_in_by = $4 "
            "WHERE pbx = session_pbx() AND agent = $1 AND signed_in_at IS NULL", agent, at, set_by, actor)
    return Presence(agent, None, "", set_by)


async def periods_since(conn: asyncpg.Connection, agents: Sequence[str],
                        since: datetime) -> dict[str, list[tuple[datetime, datetime | None]]]:
    """Each agent's sign-out periods that were open at or after `since`: (out, back in or None)."""
    rows = await conn.fetch(
        "SELECT agent, signed_out_at, signed_in_at FROM agent_presence WHERE pbx = session_pbx() "
        "AND agent = ANY($1::text[]) "
        "AND (signed_in_at IS NULL OR signed_in_at > $2) ORDER BY agent, signed_out_at", list(agents), since)
    periods: dict[str, list[tuple[datetime, datetime | None]]] = {agent: [] for agent in agents}
    for row in rows:
        periods[row["agent"]].append((row["signed_out_at"], row["signed_in_at"]))
    return periods


async def record_break_over_limit(conn: asyncpg.Connection, agent: str, day: str, at: datetime,
                                  limit_minutes: float) -> bool:
    """Record the breach once per agent and day; False if it was already recorded."""
    inserted = await conn.fetchval(
        "INSERT INTO policy_violations (kind, linkedid, occurred_at, details) VALUES ('break_over_limit', NULL, $1, "
        "jsonb_build_object('agent', $2::text, 'day', $3::text, 'limit_minutes', $4::float8)) "
        "ON CONFLICT DO NOTHING RETURNING id", at, agent, day, limit_minutes)
    return inserted is not None
