"""Agent presence on real PostgreSQL: stored periods, refusals, the last-agent lock, v_agent_presence, the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from pbx_bridge.ami.client import AmiClient
from pbx_bridge.presence import PresenceDesk
from pbx_bridge.schedule import NoHolidays, Override, Schedule, parse_hours
from pbx_bridge.storage.presence import (
    PRESENCE_LOCK,
    AlreadyInStateError,
    LastAgentError,
    Presence,
    PresenceOrderError,
    UnknownAgentError,
    current_presence,
    sign_in,
    sign_out,
)
from pbx_bridge.storage.settings import publish_open_hours
from tests.conftest import scratch_database
from tests.integration.test_api import NAMES, Api, api_context, serving
from tests.support.env import DevEnv

pytestmark = pytest.mark.integration

AGENTS = ("agent101", "agent102", "agent103")
T0 = datetime(2030, 6, 10, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
ROW = "agent, signed_out_at, signed_in_at, reason, set_by, signed_out_by, signed_in_by, signed_in_set_by"


@pytest.fixture(scope="module")
def presence_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "presence") as dsn:
        yield dsn


@pytest.fixture
async def db(presence_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's database, every agent signed in (no periods stored)."""
    conn = await asyncpg.connect(presence_dsn)
    try:
        await conn.execute("DELETE FROM agent_presence")
        await conn.execute("UPDATE bridge_settings SET timezone = 'Asia/Shanghai'")
        yield conn
    finally:
        await conn.close()


async def stored(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in await conn.fetch(f"SELECT {ROW} FROM agent_presence ORDER BY id")]


async def test_sign_out_and_in_round_trip_stores_exact_rows(db: asyncpg.Connection) -> None:
    out = await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, reason="午饭 lunch", set_by="api",
                         actor="ops-zhang")
    assert out == Presence("agent101", T0, "午饭 lunch", "api")
    assert await stored(db) == [("agent101", T0, None, "午饭 lunch", "api", "ops-zhang", None, None)]
    assert await current_presence(db, AGENTS) == [out, Presence("agent102", None, "", ""),
                                                  Presence("agent103", None, "", "")]

    back = await sign_in(db, "agent101", T0 + timedelta(minutes=31), agents=AGENTS, set_by="phone", actor="agent101")
    assert back == Presence("agent101", None, "", "phone")
    assert await stored(db) == [("agent101", T0, T0 + timedelta(minutes=31), "午饭 lunch", "api", "ops-zhang",
                                 "agent101", "phone")]
    # In the order asked for; the signed-in agent's set_by says how it got back in.
    assert await current_presence(db, ["agent103", "agent101"]) == [Presence("agent103", None, "", ""), back]

    again = await sign_out(db, "agent101", T0 + timedelta(hours=2), agents=AGENTS, open_now=True, set_by="phone",
                           actor="agent101")
    assert again == Presence("agent101", T0 + timedelta(hours=2), "", "phone")
    assert (await stored(db))[1] == ("agent101", T0 + timedelta(hours=2), None, "", "phone", "agent101", None, None)
    assert (await current_presence(db, AGENTS))[0] == again


async def test_unknown_agents_are_refused(db: asyncpg.Connection) -> None:
    for agent in ("agent999", "agent101\n", "AGENT101", ""):
        with pytest.raises(UnknownAgentError, match="is not a configured agent"):
            await sign_out(db, agent, T0, agents=AGENTS, open_now=False, set_by="api", actor="ops")
        with pytest.raises(UnknownAgentError):
            await sign_in(db, agent, T0, agents=AGENTS, set_by="api", actor="ops")
    assert await stored(db) == []


async def test_signing_out_twice_or_in_twice_is_refused_not_ignored(db: asyncpg.Connection) -> None:
    with pytest.raises(AlreadyInStateError, match="agent101 is already signed in") as signed_in:
        await sign_in(db, "agent101", T0, agents=AGENTS, set_by="api", actor="ops")
    assert signed_in.value.current == Presence("agent101", None, "", "")
    await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, reason="培训", set_by="phone", actor="agent101")
    with pytest.raises(AlreadyInStateError, match="agent101 is already signed out") as signed_out:
        await sign_out(db, "agent101", T0 + timedelta(minutes=1), agents=AGENTS, open_now=True, reason="x",
                       set_by="api", actor="ops")
    assert signed_out.value.current == Presence("agent101", T0, "培训", "phone")
    await sign_in(db, "agent101", T0 + timedelta(minutes=5), agents=AGENTS, set_by="phone", actor="agent101")
    with pytest.raises(AlreadyInStateError):
        await sign_in(db, "agent101", T0 + timedelta(minutes=6), agents=AGENTS, set_by="api", actor="ops")
    assert len(await stored(db)) == 1


async def test_a_change_before_the_last_one_is_refused(db: asyncpg.Connection) -> None:
    await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    with pytest.raises(PresenceOrderError):
        await sign_in(db, "agent101", T0 - timedelta(seconds=1), agents=AGENTS, set_by="api", actor="ops")
    await sign_in(db, "agent101", T0 + timedelta(minutes=10), agents=AGENTS, set_by="api", actor="ops")
    with pytest.raises(PresenceOrderError):  # would overlap the period just closed
        await sign_out(db, "agent101", T0 + timedelta(minutes=5), agents=AGENTS, open_now=True, set_by="api",
                       actor="ops")
    assert len(await stored(db)) == 1


async def test_the_table_refuses_a_second_open_period_and_bad_values(db: asyncpg.Connection) -> None:
    await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    insert = ("INSERT INTO agent_presence (agent, signed_out_at, signed_in_at, set_by, signed_in_by, signed_in_set_by) "
              "VALUES ($1, $2, $3, $4, $5, $6)")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, "agent101", T0 + timedelta(hours=1), None, "api", None, None)
    await db.execute(insert, "agent101", T0 - timedelta(hours=2), T0 - timedelta(hours=1), "api", "ops", "api")
    for values in [("agent101\n", T0, None, "api", None, None),        # `$` is the very end in PostgreSQL
                   ("agent 101", T0, None, "api", None, None),
                   ("a" * 65, T0, None, "api", None, None),
                   ("agent102", T0, T0 - timedelta(seconds=1), "api", "ops", "api"),  # back before out
                   ("agent102", T0, None, "boss", None, None),
                   ("agent102", T0, T0, "api", "ops", None),  # signed in, but not how
                   ("agent102", T0, T0, "api", None, "api")]:  # signed in, but not by whom
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(insert, *values)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO agent_presence (agent, signed_out_at, set_by, reason) VALUES "
                         "('agent102', now(), 'api', $1)", "x" * 101)


async def test_the_last_agent_may_not_sign_out_during_business_hours(db: asyncpg.Connection) -> None:
    await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    await sign_out(db, "agent102", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    with pytest.raises(LastAgentError, match=r"agent103 is the last agent signed in.*hotline uncovered"):
        await sign_out(db, "agent103", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    assert [r[0] for r in await stored(db)] == ["agent101", "agent102"]
    closed = await sign_out(db, "agent103", T0, agents=AGENTS, open_now=False, set_by="auto", actor="schedule")
    assert closed == Presence("agent103", T0, "", "auto")
    assert all(p.signed_out_at == T0 for p in await current_presence(db, AGENTS))
    # Only configured agents cover the line: one signed in but no longer configured does not count.
    await db.execute("DELETE FROM agent_presence")
    with pytest.raises(LastAgentError):
        await sign_out(db, "agent101", T0, agents=["agent101"], open_now=True, set_by="api", actor="ops")


async def test_two_concurrent_sign_outs_of_the_last_two_agents_one_succeeds(presence_dsn: str,
                                                                           db: asyncpg.Connection) -> None:
    await sign_out(db, "agent101", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops")
    blocker, first, second = [await asyncpg.connect(presence_dsn) for _ in range(3)]
    try:
        await blocker.execute("SELECT pg_advisory_lock($1)", PRESENCE_LOCK)  # both sign-outs start, then wait
        racing = asyncio.gather(
            sign_out(first, "agent102", T0, agents=AGENTS, open_now=True, set_by="api", actor="ops-a"),
            sign_out(second, "agent103", T0, agents=AGENTS, open_now=True, set_by="phone", actor="agent103"),
            return_exceptions=True)
        for _ in range(100):
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()")
            if waiting == 2:
                break
            await asyncio.sleep(0.05)
        assert waiting == 2
        await blocker.execute("SELECT pg_advisory_unlock($1)", PRESENCE_LOCK)
        results = await racing
    finally:
        for conn in (blocker, first, second):
            await conn.close()
    assert sorted(type(r).__name__ for r in results) == ["LastAgentError", "Presence"], results
    assert await db.fetchval("SELECT count(*) FROM agent_presence WHERE signed_in_at IS NULL") == 2
    assert sum(p.signed_in for p in await current_presence(db, AGENTS)) == 1


async def about_noon(conn: asyncpg.Connection) -> tuple[datetime, datetime, datetime]:
    """Set the views' time zone to a fixed-offset zone where it is now between 12:00 and 13:00, so
    periods "today" fit before now whenever the test runs; returns now and today's midnight (UTC),
    and that midnight as the zone's wall-clock time."""
    now: datetime = await conn.fetchval("SELECT now()")
    offset = 12 - now.astimezone(UTC).hour  # -11 … +12; Etc/GMT-N is UTC+N
    zone = "Etc/GMT" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"
    await conn.execute("UPDATE bridge_settings SET timezone = $1", zone)
    local_now = now.astimezone(UTC) + timedelta(hours=offset)
    assert 12 <= local_now.hour < 13
    local_midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    return now, local_midnight.replace(tzinfo=UTC) - timedelta(hours=offset), local_midnight


async def test_agent_presence_view_exact_figures(db: asyncpg.Connection) -> None:
    now, midnight, local_midnight = await about_noon(db)
    agents = [*AGENTS, "agent104"]

    async def period(agent: str, start: datetime, end: datetime | None, reason: str = "") -> None:
        await sign_out(db, agent, start, agents=agents, open_now=False, reason=reason, set_by="api",
                       actor="ops-zhang")
        if end is not None:
            await sign_in(db, agent, end, agents=agents, set_by="phone", actor=agent)

    hours = timedelta(hours=1)
    await period("agent101", midnight + 9 * hours, midnight + 9 * hours + timedelta(minutes=31), "午饭")  # 31 min
    await period("agent101", midnight + 10 * hours, midnight + 10 * hours + timedelta(minutes=5, seconds=30))
    await period("agent102", midnight - timedelta(minutes=50), midnight + timedelta(minutes=10))  # 10 min today
    await period("agent104", midnight - 3 * hours, midnight - 2 * hours)  # yesterday only
    open_since = now.replace(microsecond=0) - timedelta(minutes=5)
    await period("agent103", open_since, None, "培训 training")

    def local(moment: datetime) -> datetime:  # the zone's wall-clock time, as the view shows it
        return local_midnight + (moment - midnight)

    rows = [dict(r) for r in await db.fetch("SELECT * FROM v_agent_presence")]
    assert {r.pop("pbx") for r in rows} == {"pbx"}  # the scratch database's one PBX
    assert [r["agent"] for r in rows] == ["agent103", "agent101", "agent102", "agent104"]  # those out first
    out = rows[0]
    minutes = out.pop("signed_out_minutes_today")
    assert Decimal("5.0") <= minutes <= Decimal("6.0")  # open: counted until now()
    assert out == {"agent": "agent103", "state": "out", "state_label": "签出休息", "since": local(open_since),
                   "reason": "培训 training", "set_by": "api", "changed_by": "ops-zhang", "sign_outs_today": 1}
    day = await db.fetchval("SELECT (now() AT TIME ZONE (SELECT timezone FROM bridge_zone))::date")
    assert local(midnight).date() == day
    assert rows[1:] == [
        {"agent": "agent101", "state": "in", "state_label": "已签入",
         "since": local(midnight + 10 * hours + timedelta(minutes=5, seconds=30)), "reason": "", "set_by": "phone",
         "changed_by": "agent101", "signed_out_minutes_today": Decimal("36.5"), "sign_outs_today": 2},  # 31 + 5.5
        {"agent": "agent102", "state": "in", "state_label": "已签入", "since": local(midnight + timedelta(minutes=10)),
         "reason": "", "set_by": "phone", "changed_by": "agent102", "signed_out_minutes_today": Decimal("10.0"),
         "sign_outs_today": 0},  # began yesterday: only its 10 minutes after midnight count
        {"agent": "agent104", "state": "in", "state_label": "已签入", "since": local(midnight - 2 * hours),
         "reason": "", "set_by": "phone", "changed_by": "agent104", "signed_out_minutes_today": Decimal("0.0"),
         "sign_outs_today": 0},
    ]


async def test_agent_presence_view_uses_the_configured_local_time(db: asyncpg.Connection) -> None:
    await sign_out(db, "agent101", datetime(2030, 6, 10, 16, 0, 30, tzinfo=UTC), agents=AGENTS, open_now=False,
                   set_by="api", actor="ops")
    since = await db.fetchval("SELECT since FROM v_agent_presence WHERE agent = 'agent101'")
    assert str(since) == "2030-06-11 00:00:30"  # Shanghai
    assert await db.fetchval("SELECT signed_out_minutes_today FROM v_agent_presence") == Decimal("0.0")  # future


# --- the API ----------------------------------------------------------------------------------

class Presences:
    """What the API under test was told: business hours, and each republish."""

    def __init__(self) -> None:
        self.open = True
        self.published = 0
        self.fail = False

    async def changed(self) -> None:
        if self.fail:
            raise ConnectionError("AMI is down")
        self.published += 1


@pytest.fixture
async def api(presence_dsn: str, db: asyncpg.Connection) -> AsyncIterator[tuple[Api, Presences]]:
    told = Presences()
    context = api_context(presence_dsn, [], agents=AGENTS, is_open=lambda: told.open,
                          on_presence_change=told.changed)
    async with serving(context) as running:
        yield running, told


async def test_get_agents_shows_each_configured_agents_presence(api: tuple[Api, Presences],
                                                              db: asyncpg.Connection) -> None:
    client, _ = api
    assert (await client.call("GET", "/agents", role=None))[0] == 401
    status, body = await client.call("GET", "/agents", role="viewer")
    assert status == 200 and body == {"agents": [
        {"agent": agent, "state": "in", "since": None, "reason": "", "set_by": ""} for agent in AGENTS]}
    await sign_out(db, "agent102", T0, agents=AGENTS, open_now=True, reason="午饭", set_by="phone", actor="agent102")
    for role in ("viewer", "agent", "ops"):
        status, body = await client.call("GET", "/agents", role=role)
        assert status == 200 and body["agents"][1] == {"agent": "agent102", "state": "out",
                                                       "since": "2030-06-10T01:00:00+00:00", "reason": "午饭",
                                                       "set_by": "phone"}


async def test_put_presence_signs_out_and_in_recording_the_tokens_name(api: tuple[Api, Presences],
                                                                     db: asyncpg.Connection) -> None:
    client, told = api
    path = "/agents/agent101/presence"
    status, body = await client.call("PUT", path, {"state": "out", "reason": "  午饭 lunch  "})
    assert status == 200, body
    since = body.pop("since")
    assert body == {"agent": "agent101", "state": "out", "reason": "午饭 lunch", "set_by": "api", "published": True}
    assert told.published == 1
    [row] = await stored(db)
    assert row[0] == "agent101" and row[1] == datetime.fromisoformat(since) and row[2:] == (
        None, "午饭 lunch", "api", NAMES["ops"], None, None)
    assert abs((row[1] - datetime.now(UTC)).total_seconds()) < 60

    status, body = await client.call("PUT", path, {"state": "out"})
    assert status == 409 and body["error"].startswith("agent101 is already signed out")
    assert body["detail"] == {"agent": "agent101", "state": "out", "since": since, "reason": "午饭 lunch",
                              "set_by": "api"}
    status, body = await client.call("PUT", path, {"state": "in"})
    assert (status, body) == (200, {"agent": "agent101", "state": "in", "since": None, "reason": "", "set_by": "api",
                                    "published": True})
    status, body = await client.call("PUT", path, {"state": "in"})
    assert status == 409 and body["error"] == "agent101 is already signed in"
    assert told.published == 2
    assert [(r[5], r[6], r[7]) for r in await stored(db)] == [(NAMES["ops"], NAMES["ops"], "api")]


async def test_who_acted_cannot_come_from_the_body(api: tuple[Api, Presences], db: asyncpg.Connection) -> None:
    client, told = api
    for extra in ({"actor": "老板"}, {"signed_out_by": "老板"}, {"set_by": "phone"}):
        status, body = await client.call("PUT", "/agents/agent101/presence", {"state": "out", **extra})
        assert status == 422 and body["error"] == "invalid presence change", body
        assert [d["field"] for d in body["detail"]] == list(extra)
    assert await stored(db) == [] and told.published == 0


async def test_only_ops_may_change_presence(api: tuple[Api, Presences], db: asyncpg.Connection) -> None:
    client, told = api
    assert (await client.call("PUT", "/agents/agent101/presence", {"state": "out"}, role=None))[0] == 401
    for role in ("viewer", "agent"):
        status, body = await client.call("PUT", "/agents/agent101/presence", {"state": "out"}, role=role)
        assert status == 403 and body["detail"] == {"needed": ["ops"], "role": role}
    assert await stored(db) == [] and told.published == 0


async def test_bad_bodies_and_unknown_agents_are_refused(api: tuple[Api, Presences], db: asyncpg.Connection) -> None:
    client, told = api
    path = "/agents/agent101/presence"
    for body, field in [({"state": "away"}, "state"), ({"state": "OUT"}, "state"), ({}, "state"),
                        ({"state": "out", "reason": "x" * 101}, "reason"),
                        ({"state": "out", "reason": "午饭\nX-Injected: 1"}, "reason"),
                        ({"state": "out", "reason": "bad \x00 byte"}, "reason"),
                        ({"state": "out", "reason": 5}, "reason"),
                        ({"state": "in", "reason": "回来了"}, "")]:
        status, answer = await client.call("PUT", path, body)
        assert status == 422 and field in {d["field"] for d in answer["detail"]}, (body, answer)
    assert (await client.call("PUT", path, raw=b"{not json"))[0] == 422
    assert (await client.call("PUT", path, raw=b""))[0] == 422
    assert (await client.call("PUT", path, raw=b'{"state": "out", "reason": "' + b"x" * 70_000 + b'"}'))[0] == 413
    for agent in ("agent999", "bad;name'", "agent101%0A", "agent101%20", "AGENT101"):
        status, answer = await client.call("PUT", f"/agents/{agent}/presence", {"state": "out"})
        assert (status, answer["error"]) == (404, "no such agent"), agent
    status, _ = await client.call("PUT", path, {"state": "out", "reason": "x" * 100})
    assert status == 200
    assert len(await stored(db)) == 1 and told.published == 1


async def test_the_last_agent_gets_409_during_business_hours(api: tuple[Api, Presences],
                                                            db: asyncpg.Connection) -> None:
    client, told = api
    for agent in ("agent101", "agent102"):
        assert (await client.call("PUT", f"/agents/{agent}/presence", {"state": "out"}))[0] == 200
    status, body = await client.call("PUT", "/agents/agent103/presence", {"state": "out"})
    assert status == 409 and "hotline uncovered" in body["error"] and body["detail"] == {"open": True}
    assert told.published == 2
    told.open = False
    status, body = await client.call("PUT", "/agents/agent103/presence", {"state": "out", "reason": "下班"})
    assert status == 200 and body["state"] == "out"
    assert [p.signed_in for p in await current_presence(db, AGENTS)] == [False, False, False]


async def test_a_failed_republish_keeps_the_change_and_says_so(api: tuple[Api, Presences],
                                                              db: asyncpg.Connection) -> None:
    client, told = api
    told.fail = True
    status, body = await client.call("PUT", "/agents/agent101/presence", {"state": "out"})
    assert status == 200 and body["published"] is False and body["state"] == "out"
    assert len(await stored(db)) == 1


async def test_the_desk_records_a_break_over_the_limit_once_at_the_moment_it_passed(presence_dsn: str,
                                                                                   db: asyncpg.Connection) -> None:
    """A 31-minute break, the limit 30 minutes: one break_over_limit at its 30th minute, however
    often the limits are checked; v_violations names the agent."""
    await db.execute("DELETE FROM policy_violations WHERE kind = 'break_over_limit'")
    await sign_out(db, "agent102", T0, agents=AGENTS, open_now=True, set_by="phone", actor="agent102")
    await sign_in(db, "agent102", T0 + timedelta(minutes=31), agents=AGENTS, set_by="phone", actor="agent102")
    alerts: list[dict[str, Any]] = []
    now = [T0 + timedelta(minutes=20)]

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(presence_dsn)

    async def nothing() -> None:
        return None

    desk = PresenceDesk(cast(AmiClient, None), connect, AGENTS, lambda: True, nothing, alerts.append,
                        zone=ZoneInfo("Asia/Shanghai"), break_minutes=30, clock=lambda: now[0])
    assert await desk.check_breaks() == 60.0 and alerts == []  # 10 minutes to go: look again within a minute
    now[0] = T0 + timedelta(minutes=29, seconds=30)
    assert 30.0 < await desk.check_breaks() < 30.1  # wakes at the crossing itself
    for minutes in (30.5, 45, 60):
        now[0] = T0 + timedelta(minutes=minutes)
        await desk.check_breaks()
    rows = await db.fetch("SELECT occurred_at, details ->> 'agent' AS agent, details ->> 'day' AS day "
                          "FROM policy_violations WHERE kind = 'break_over_limit'")
    assert [tuple(r.values()) for r in rows] == [(T0 + timedelta(minutes=30), "agent102", "2030-06-10")]
    assert [(a["kind"], a["agent"]) for a in alerts] == [("break_over_limit", "agent102")]
    subject = await db.fetchval("SELECT subject FROM v_violations WHERE kind = 'break_over_limit'")
    assert subject == "agent102"
    fresh = PresenceDesk(cast(AmiClient, None), connect, AGENTS, lambda: True, nothing, alerts.append,
                         zone=ZoneInfo("Asia/Shanghai"), break_minutes=30, clock=lambda: now[0])
    await fresh.check_breaks()  # a restarted daemon: the database keeps it once
    assert len(alerts) == 1 and await db.fetchval(
        "SELECT count(*) FROM policy_violations WHERE kind = 'break_over_limit'") == 1


# --- signed-in time: the day's open hours minus the time signed out within them ---------------

SHANGHAI = ZoneInfo("Asia/Shanghai")


def weekday_hours(*overrides: Override) -> Schedule:
    """Weekdays 09:00-12:00 and 13:30-17:30 (7 h = 420 min), no holiday calendar."""
    weekly = {day: parse_hours(["09:00-12:00", "13:30-17:30"]) for day in ("mon", "tue", "wed", "thu", "fri")}
    return Schedule(weekly, (), NoHolidays(), list(overrides), SHANGHAI)


def shanghai(day: int, hour: int, minute: int = 0, month: int = 6, year: int = 2025) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=SHANGHAI)


async def test_signed_in_minutes_are_the_open_hours_minus_the_breaks_inside_them(db: asyncpg.Connection) -> None:
    """Monday 2025-06-09 (a past day when published on the 10th): agent101 out 10:00-10:30 and
    12:10-13:40 (lunch: only 13:30-13:40 is open time), agent102 out from 17:00 to 08:00 the next
    morning. A day still to come (2030-06-11) has nothing signed in so far."""
    await db.execute("DELETE FROM open_hours")
    await publish_open_hours(db, weekday_hours(), date(2025, 6, 10))
    await publish_open_hours(db, weekday_hours(), date(2030, 6, 11), past_days=())
    for agent, start, end in (("agent101", shanghai(9, 10), shanghai(9, 10, 30)),
                              ("agent101", shanghai(9, 12, 10), shanghai(9, 13, 40)),
                              ("agent102", shanghai(9, 17), shanghai(10, 8)),
                              ("agent103", shanghai(11, 10, year=2030), shanghai(11, 11, year=2030))):
        await sign_out(db, agent, start, agents=AGENTS, open_now=False, set_by="phone", actor=agent)
        await sign_in(db, agent, end, agents=AGENTS, set_by="phone", actor=agent)
    rows = await db.fetch("SELECT day, agent, break_minutes, signed_in_minutes FROM v_agent_daily "
                          "WHERE agent LIKE 'agent10_' ORDER BY day, agent")
    assert [tuple(r.values()) for r in rows] == [
        (date(2025, 6, 9), "agent101", Decimal("120.0"), Decimal("380.0")),  # 420 - 30 - 10
        (date(2025, 6, 9), "agent102", Decimal("420.0"), Decimal("390.0")),  # 420 - 30 (17:00-17:30)
        (date(2025, 6, 10), "agent102", Decimal("480.0"), Decimal("420.0")),  # out before opening only
        (date(2030, 6, 11), "agent103", Decimal("60.0"), Decimal("0.0")),  # not yet open: nothing so far
    ]
    await db.execute("DELETE FROM open_hours WHERE day = '2025-06-09'")
    assert await db.fetchval("SELECT signed_in_minutes FROM v_agent_daily WHERE day = '2025-06-09' "
                             "AND agent = 'agent101'") is None  # hours not recorded: unknown, not 0


async def test_past_days_hours_are_history_today_and_tomorrow_follow_overrides(db: asyncpg.Connection) -> None:
    await db.execute("DELETE FROM open_hours")
    await publish_open_hours(db, weekday_hours(), date(2025, 6, 10))
    closed = [Override(date(2025, 6, 9), (), "停电 power cut"), Override(date(2025, 6, 10), (), "停电 power cut"),
              Override(date(2025, 6, 11), parse_hours(["10:00-11:00"]), "half day")]
    await publish_open_hours(db, weekday_hours(*closed), date(2025, 6, 10))
    rows = {r["day"]: (multirange(r["open"]), r["reason"]) for r in await db.fetch("SELECT * FROM open_hours")}
    assert sorted(rows) == [date(2025, 6, n) for n in range(3, 12)]  # 7 past days, today and tomorrow
    assert rows[date(2025, 6, 9)] == ([(shanghai(9, 9), shanghai(9, 12)), (shanghai(9, 13, 30), shanghai(9, 17, 30))],
                                      "weekly hours")  # written once, then left
    assert rows[date(2025, 6, 10)] == ([], "override: 停电 power cut")
    assert rows[date(2025, 6, 11)] == ([(shanghai(11, 10), shanghai(11, 11))], "override: half day")
    assert rows[date(2025, 6, 8)] == ([], "weekly hours")  # a Sunday


def multirange(value: Any) -> list[tuple[datetime, datetime]]:
    """asyncpg's multirange (a list of Range) as (start, end) pairs."""
    return [(r.lower, r.upper) for r in value]
