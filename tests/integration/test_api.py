"""The ops API in-process over real HTTP, with a real database: roles, audit, the pool's bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from yarl import URL

from pbx_bridge.api import (
    ApiContext,
    ApiDatabase,
    DatabaseUnavailableError,
    LiveState,
    create_app,
    database_component,
    openapi_document,
)
from pbx_bridge.config import ApiToken, Role
from pbx_bridge.metrics import Metrics
from pbx_bridge.pbx import PbxNaming
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from tests.support.fixtures import fixture_messages

pytestmark = pytest.mark.integration

ROLES: tuple[Role, ...] = ("ops", "agent", "viewer")
SECRETS: dict[Role, str] = {"ops": "ops-t0ken-for-tests-0123456789", "agent": "agent-t0ken-for-tests-012345",
                            "viewer": "viewer-t0ken-for-tests-01234"}
NAMES: dict[Role, str] = {"ops": "ops-zhang", "agent": "agent101-li", "viewer": "wallboard"}
TOKENS = [ApiToken(NAMES[role], role, SecretStr(SECRETS[role])) for role in ROLES]
PATTERN = r"^1[3-9][0-9]{9}$"


class Api:
    def __init__(self, session: ClientSession, base: str, context: ApiContext, roster_changes: list[int]) -> None:
        self.session, self.base, self.context, self.roster_changes = session, base, context, roster_changes

    async def call(self, method: str, path: str, body: Any = None, role: Role | None = "ops",
                   raw: bytes | None = None, token: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """`role`: send that role's token (None: no token); `token`: send this one instead.
        `path` goes on the wire exactly as written (percent-encoding kept)."""
        token = token if token is not None else (SECRETS[role] if role else None)
        headers = (headers or {}) | ({"Authorization": f"Bearer {token}"} if token else {})
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        url = URL(self.base.rstrip("/") + path, encoded=True)
        async with self.session.request(method, url, data=data, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except json.JSONDecodeError:
                return response.status, text


def api_context(dsn: str, changes: list[int], **overrides: Any) -> ApiContext:
    async def roster_changed() -> None:
        changes.append(1)

    async def ami_down() -> tuple[bool, dict[str, Any]]:
        return False, {"sessions": 0}

    database = overrides.pop("database", None) or ApiDatabase(dsn, max_size=4)
    context = ApiContext(metrics=Metrics(), live=LiveState(), database=database,
                         health={"ami": ami_down, "database": database_component(database)},
                         critical=frozenset({"ami", "database"}), tokens=TOKENS, mobile_pattern=PATTERN,
                         on_roster_change=roster_changed)
    return replace(context, **overrides)


@contextlib.asynccontextmanager
async def serving(context: ApiContext, changes: list[int] | None = None) -> AsyncIterator[Api]:
    server = TestServer(create_app(context), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session:
            yield Api(session, str(server.make_url("")), context, [] if changes is None else changes)
    finally:
        await server.close()


@pytest.fixture
async def api(scratch_dsn: str) -> AsyncIterator[Api]:
    changes: list[int] = []
    async with serving(api_context(scratch_dsn, changes), changes) as running:
        yield running


def entry(holder: str, mobile: str, start_h: int, end_h: int) -> dict[str, str]:
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    return {"holder": holder, "mobile": mobile, "starts_at": (base + timedelta(hours=start_h)).isoformat(),
            "ends_at": (base + timedelta(hours=end_h)).isoformat()}


async def test_duty_roster_round_trip_needs_the_token_and_republishes(api: Api) -> None:
    body = {"entries": [entry("张三", "13800138000", 0, 12), entry("李四", "13900139000", 12, 24)]}
    assert (await api.call("PUT", "/duty", body, role=None))[0] == 401
    assert (await api.call("PUT", "/duty", body, token="wrong-token-wrong-token"))[0] == 401
    assert (await api.call("PUT", "/duty", body, role="agent"))[0] == 403
    assert api.roster_changes == []
    status, stored = await api.call("PUT", "/duty", body)
    assert status == 200 and [e["holder"] for e in stored["entries"]] == ["张三", "李四"]
    assert api.roster_changes == [1]
    assert (await api.call("GET", "/duty", role=None))[0] == 401  # names and mobile numbers: a token
    status, roster = await api.call("GET", "/duty", role="viewer")
    assert status == 200 and [e["mobile"] for e in roster["entries"]] == ["13800138000", "13900139000"]


@pytest.mark.parametrize(("entries", "problem"), [
    ([entry("x", "4008001234", 0, 1)], "not an allowed duty mobile number"),   # the 400 number itself
    ([entry("x", "1380013800;", 0, 1)], "not an allowed duty mobile number"),
    ([entry("x", "13800138000\n", 0, 1)], "not an allowed duty mobile number"),  # `$` passes a final newline
    ([entry("x", "１３８００１３８０００", 0, 1)], "not an allowed duty mobile number"),  # fullwidth digits
    ([entry("x", "13800138000", 2, 1)], "invalid roster"),                     # ends before it starts
    ([entry("x", "13800138000", 0, 5), entry("y", "13900139000", 4, 6)], "invalid roster"),  # overlap
    ([{"holder": "x", "mobile": "13800138000", "starts_at": "2026-11-24T09:00:00",
       "ends_at": "2026-11-24T10:00:00"}], "invalid roster"),                  # no time zone
    ([{**entry("x", "13800138000", 0, 1), "dial": "13800000000"}], "invalid roster"),  # unknown field
])
async def test_bad_rosters_are_refused_with_the_reason(api: Api, entries: list[Any], problem: str) -> None:
    status, body = await api.call("PUT", "/duty", {"entries": entries})
    assert status == 422 and body["error"] == problem
    assert api.roster_changes == []


async def test_malformed_and_oversized_bodies(api: Api) -> None:
    assert (await api.call("PUT", "/duty", raw=b"{not json"))[0] == 422
    status, body = await api.call("PUT", "/duty", raw=b"{" + b" " * 70_000 + b"}")
    assert status == 413 and "error" in body


async def test_without_configured_tokens_only_the_public_routes_answer(scratch_dsn: str) -> None:
    async with serving(api_context(scratch_dsn, [], tokens=[])) as closed:
        for method, path in [("PUT", "/duty"), ("GET", "/duty"), ("GET", "/calls/live"), ("POST", "/probes")]:
            status, body = await closed.call(method, path, raw=b"{}", token="anything-at-all-anything")
            assert status == 403 and "no [api] tokens" in body["error"], (method, path)
        assert (await closed.call("GET", "/metrics", role=None))[0] == 200


async def test_healthz_reports_each_component_and_503_when_a_critical_one_is_down(api: Api) -> None:
    status, body = await api.call("GET", "/healthz", role=None)
    assert status == 503 and body["status"] == "unavailable"
    assert body["components"]["ami"]["ok"] is False and body["components"]["database"]["ok"] is True


async def test_live_calls_show_a_ringing_call_and_its_ring_time(api: Api) -> None:
    settings = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier")
    state = TrackerState()
    messages = fixture_messages("answered_7s_talk_4s")
    for message in messages[:12]:  # up to both phones ringing
        state, _ = apply(state, message, settings)
    api.context.live.state = state
    assert (await api.call("GET", "/calls/live", role=None))[0] == 401  # callers' names and numbers
    status, body = await api.call("GET", "/calls/live", role="viewer")
    [call] = body["calls"]
    assert status == 200 and call["state"] == "ringing" and call["caller_name"] == "张三客户"
    assert call["ring_seconds"] > 0


async def test_metrics_and_openapi(api: Api) -> None:
    api.context.metrics.violations.labels("ring_limit").inc()
    api.context.metrics.ring_seconds.observe(7.0)
    api.context.metrics.watch(reconnects=lambda: 2, lag=lambda: 0.5, pending=lambda: 3, trunk=lambda: 1)
    status, text = await api.call("GET", "/metrics", role=None)
    assert status == 200 and 'pbx_bridge_violations_total{kind="ring_limit"} 1.0' in text
    assert 'pbx_bridge_ring_seconds_bucket{le="7.5"} 1.0' in text
    assert 'pbx_bridge_ring_seconds_bucket{le="5.0"} 0.0' in text
    assert "pbx_bridge_ami_reconnects 2.0" in text and "pbx_bridge_writer_pending 3.0" in text
    assert "pbx_bridge_writer_lag_seconds 0.5" in text
    status, document = await api.call("GET", "/openapi.json", role=None)
    assert status == 200 and document == json.loads(json.dumps(openapi_document()))
    assert document["paths"]["/duty"]["put"]["security"] == [{"bearer": []}]
    assert document["paths"]["/duty"]["put"]["x-roles"] == ["ops"]
    assert document["paths"]["/duty"]["get"]["x-roles"] == ["agent", "ops", "viewer"]
    assert document["paths"]["/calls/{linkedid}/note"]["get"]["x-roles"] == ["agent"]
    assert document["paths"]["/agents"]["get"]["x-roles"] == ["agent", "ops", "viewer"]
    assert document["paths"]["/agents/{agent}/presence"]["put"]["x-roles"] == ["ops"]
    assert document["paths"]["/healthz"]["get"]["security"] == []


async def test_unknown_paths_need_a_token_then_are_json_errors(api: Api) -> None:
    assert (await api.call("GET", "/nope", role=None))[0] == 401
    status, body = await api.call("GET", "/nope", role="viewer")
    assert status == 404 and body["error"] == "Not Found"
    assert (await api.call("DELETE", "/duty", role=None))[0] == 401
    assert (await api.call("DELETE", "/duty", role="ops"))[0] == 405


async def add_call(dsn: str, *, probe: bool = False) -> str:
    linkedid = f"{datetime.now(UTC).timestamp():.0f}.{secrets.randbelow(10**6)}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO calls (linkedid, did, trunk, caller_number, started_at, ended_at, disposition, is_probe, "
            "source) VALUES ($1, '4008001234', 'carrier', '13800138000', now(), now(), 'answered', $2, 'ami')",
            linkedid, probe)
    finally:
        await conn.close()
    return linkedid


SHEET = {"category": "投诉", "summary": "快递三天未到 '); DROP TABLE calls; --",
         "caller_name": "王女士 \"O'Brien\"", "contact": "13800138000", "owner": "杨雪峰", "status": "处理中"}


async def test_call_sheet_put_get_history_and_versions(api: Api, scratch_dsn: str) -> None:
    linkedid = await add_call(scratch_dsn)
    path = f"/calls/{linkedid}/note"
    assert (await api.call("PUT", path, SHEET, role=None))[0] == 401
    assert (await api.call("GET", path, role=None))[0] == 401  # customer data: the token even to read
    status, body = await api.call("GET", path, role="agent")
    assert status == 200 and body["note"] is None and body["history"] == []

    status, body = await api.call("PUT", path, SHEET, role="agent")
    assert status == 201 and body["changed"] is True
    note = body["note"]
    assert (note["version"], note["summary"], note["caller_name"], note["completed_at"]) == (
        1, SHEET["summary"], SHEET["caller_name"], None)

    done = SHEET | {"status": "已完成", "resolution": "已补发并致歉"}
    async with api.session.put(api.base + path, json=done, headers={
            "Authorization": f"Bearer {SECRETS['agent']}", "If-Match": '"1"'}) as response:
        assert response.status == 200 and response.headers["ETag"] == '"2"'
        assert (await response.json())["note"]["completed_at"] is not None
    async with api.session.put(api.base + path, json=done | {"summary": "改"}, headers={
            "Authorization": f"Bearer {SECRETS['agent']}", "If-Match": '"1"'}) as response:
        assert response.status == 412 and (await response.json())["detail"] == {"current_version": 2}
    status, body = await api.call("PUT", path, done, role="agent")  # the same again: nothing to record
    assert status == 200 and body["changed"] is False and body["note"]["version"] == 2

    status, body = await api.call("GET", path, role="agent")
    assert status == 200 and body["note"]["status"] == "已完成"
    assert [(h["version"], h["changed_by"]) for h in body["history"]] == [(1, NAMES["agent"]), (2, NAMES["agent"])]
    assert body["history"][0]["changes"]["category"] == {"old": None, "new": "投诉"}
    assert body["history"][1]["changes"] == {"status": {"old": "处理中", "new": "已完成"},
                                             "resolution": {"old": "", "new": "已补发并致歉"}}
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM calls") >= 1  # the summary was data, not SQL
    finally:
        await conn.close()


async def test_call_sheet_refuses_bad_input(api: Api, scratch_dsn: str) -> None:
    linkedid = await add_call(scratch_dsn)
    path = f"/calls/{linkedid}/note"
    cases: list[tuple[dict[str, Any], str]] = [
        (SHEET | {"category": "闲聊"}, "category"),
        (SHEET | {"status": "done"}, "status"),
        ({k: v for k, v in SHEET.items() if k != "category"}, "category"),
        (SHEET | {"changed_by": "老板"}, "changed_by"),  # who acted comes from the token
        (SHEET | {"summary": ""}, "summary"),
        (SHEET | {"summary": "x" * 2001}, "summary"),
        (SHEET | {"owner": "杨\r\nX-Injected: 1"}, "owner"),
        (SHEET | {"summary": "bad \x00 byte"}, "summary"),
        (SHEET | {"extra": 1}, "extra"),
    ]
    for body, field in cases:
        status, answer = await api.call("PUT", path, body, role="agent")
        assert status == 422 and field in {d["field"] for d in answer["detail"]}, (field, answer)
    assert (await api.call("PUT", path, raw=b"{not json", role="agent"))[0] == 422
    assert (await api.call("PUT", path, SHEET | {"summary": "多行\n描述\t可以"}, role="agent"))[0] == 201
    assert (await api.call("PUT", "/calls/no-such-call/note", SHEET, role="agent"))[0] == 404
    assert (await api.call("PUT", "/calls/bad;id'/note", SHEET, role="agent"))[0] == 404
    assert (await api.call("PUT", f"/calls/{linkedid}%0A/note", SHEET, role="agent"))[0] == 404
    probe = await add_call(scratch_dsn, probe=True)
    assert (await api.call("PUT", f"/calls/{probe}/note", SHEET, role="agent"))[0] == 409


# --- who may do what ------------------------------------------------------------------------

async def request_of_each_route(api: Api, scratch_dsn: str) -> list[tuple[str, str, Any, set[Role]]]:
    """One well-formed request per route (method, path, body) and the roles it allows."""
    linkedid = await add_call(scratch_dsn)
    return [
        ("GET", "/calls/live", None, {"ops", "agent", "viewer"}),
        ("GET", "/duty", None, {"ops", "agent", "viewer"}),
        ("PUT", "/duty", {"entries": [entry("张三", "13800138000", 30, 31)]}, {"ops"}),
        ("POST", "/probes", None, {"ops"}),  # no probes configured: 503 once allowed
        ("GET", "/probes/0123456789abcdef", None, {"ops"}),  # 404 once allowed
        ("GET", f"/calls/{linkedid}/note", None, {"agent"}),
        ("PUT", f"/calls/{linkedid}/note", SHEET, {"agent"}),
        ("GET", "/agents", None, {"ops", "agent", "viewer"}),
        ("PUT", "/agents/agent101/presence", {"state": "out"}, {"ops"}),  # no agents configured: 404 once allowed
    ]


async def test_each_route_allows_exactly_its_roles(api: Api, scratch_dsn: str) -> None:
    for method, path, body, allowed in await request_of_each_route(api, scratch_dsn):
        status, answer = await api.call(method, path, body, role=None)
        assert status == 401 and answer["error"] == "missing or unknown bearer token", (method, path)
        for role in ROLES:
            status, answer = await api.call(method, path, body, role=role)
            if role in allowed:
                assert status not in (401, 403), (method, path, role, status, answer)
            else:
                assert status == 403, (method, path, role, status)
                needed = " or ".join(sorted(allowed))
                assert answer["error"] == f"this request needs the role {needed}", answer
                assert answer["detail"] == {"needed": sorted(allowed), "role": role}
    for path in ("/healthz", "/metrics", "/openapi.json"):  # the public routes
        assert (await api.call("GET", path, role=None))[0] in (200, 503), path


async def test_bearer_token_must_be_exactly_a_configured_one(api: Api) -> None:
    ops = SECRETS["ops"]
    for header in (f"Bearer {ops[:-1]}", f"Bearer {ops}x", f"Basic {ops}", ops, "Bearer ", f"Bearer {ops.upper()}"):
        assert (await api.call("GET", "/duty", role=None, headers={"Authorization": header}))[0] == 401, header
    assert (await api.call("GET", "/duty", role=None, headers={"Authorization": f"bearer {ops}"}))[0] == 200


@pytest.mark.parametrize("path", [
    "/calls/X%2Fy/note",             # the old PRIVATE_PATH regex saw /calls/X/y/note on the decoded path
    "/calls/X%2F..%2F..%2Fduty/note",
    "/calls/%2e%2e/note",
    "/calls/X%2Fy/note%2F",
    "/calls/X/note%2F",
    "/%63alls/X/note",               # /calls, spelled with a percent-encoded c
    "/%64uty",                       # /duty
    "/healthz%2F..%2Fduty",           # looks like a public path: it is not one
    "/calls/live%2F",
])
async def test_no_spelling_of_a_path_reaches_a_handler_without_a_token(api: Api, path: str) -> None:
    reached: list[str] = []

    @contextlib.asynccontextmanager
    async def spy() -> AsyncIterator[Any]:
        reached.append(path)
        yield None

    api.context.database.connection = spy  # type: ignore[method-assign]  # any handler touching the database
    status, body = await api.call("GET", path, role=None)
    assert status == 401 and body["error"] == "missing or unknown bearer token"
    assert reached == []


async def test_who_acted_is_the_tokens_name_whatever_the_body_says(api: Api, scratch_dsn: str) -> None:
    linkedid = await add_call(scratch_dsn)
    path = f"/calls/{linkedid}/note"
    assert (await api.call("PUT", path, SHEET | {"author": "老板"}, role="agent"))[0] == 201  # ignored
    assert (await api.call("PUT", path, SHEET | {"changed_by": "老板"}, role="agent"))[0] == 422
    assert (await api.call("PUT", path, SHEET | {"status": "已完成", "author": "老板"}, role="agent"))[0] == 200
    conn = await asyncpg.connect(scratch_dsn)
    try:
        history = await conn.fetch("SELECT changed_by FROM call_note_history WHERE linkedid = $1 ORDER BY version",
                                   linkedid)
        sheet = await conn.fetchrow("SELECT created_by, updated_by, owner FROM call_notes WHERE linkedid = $1",
                                    linkedid)
    finally:
        await conn.close()
    assert [h["changed_by"] for h in history] == [NAMES["agent"], NAMES["agent"]]
    assert sheet is not None and (sheet["created_by"], sheet["updated_by"]) == (NAMES["agent"], NAMES["agent"])
    assert sheet["owner"] == SHEET["owner"]  # the sheet's owner is business data, as written


async def test_roster_changes_are_recorded_with_the_tokens_name(api: Api, scratch_dsn: str) -> None:
    first = [entry("张三", "13800138000", 40, 41)]
    second = [entry("李四", "13900139000", 42, 43), entry("王五", "13700137000", 41, 42)]
    assert (await api.call("PUT", "/duty", {"entries": first, "changed_by": "老板"}))[0] == 422
    conn = await asyncpg.connect(scratch_dsn)
    try:
        since = await conn.fetchval("SELECT coalesce(max(id), 0) FROM duty_roster_changes")
        assert (await api.call("PUT", "/duty", {"entries": first}))[0] == 200
        assert (await api.call("PUT", "/duty", {"entries": second}))[0] == 200
        rows = await conn.fetch("SELECT changed_by, changed_at, old_entries, new_entries FROM duty_roster_changes "
                                "WHERE id > $1 ORDER BY id", since)
    finally:
        await conn.close()
    assert [r["changed_by"] for r in rows] == [NAMES["ops"], NAMES["ops"]]
    assert json.loads(rows[1]["old_entries"]) == json.loads(rows[0]["new_entries"])
    assert [(e["holder"], e["mobile"]) for e in json.loads(rows[0]["new_entries"])] == [("张三", "13800138000")]
    assert [(e["holder"], e["mobile"]) for e in json.loads(rows[1]["new_entries"])] == [
        ("王五", "13700137000"), ("李四", "13900139000")]  # in time order
    assert abs((rows[1]["changed_at"] - datetime.now(UTC)).total_seconds()) < 60


# --- the API's database pool ----------------------------------------------------------------

async def api_connections(dsn: str, application_name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name)
        return count
    finally:
        await conn.close()


async def test_the_pool_bounds_the_apis_connections_and_answers_503_when_it_is_exhausted(scratch_dsn: str) -> None:
    name = f"pbx-bridge-api-test-{secrets.token_hex(3)}"
    database = ApiDatabase(scratch_dsn, max_size=2, acquire_timeout=0.5, application_name=name)
    async with serving(api_context(scratch_dsn, [], database=database)) as api:
        # Unauthenticated requests never touch the database.
        refused = await asyncio.gather(*(api.call(m, p, role=None) for m, p in
                                         [("GET", "/duty"), ("PUT", "/duty"), ("GET", "/calls/1.2/note")] * 10))
        assert {status for status, _ in refused} == {401}
        assert await api_connections(scratch_dsn, name) == 0
        # /healthz is public: one check at a time, whoever asks.
        await asyncio.gather(*(api.call("GET", "/healthz", role=None) for _ in range(20)))
        assert await api_connections(scratch_dsn, name) <= 1

        blocker = await asyncpg.connect(scratch_dsn)  # hold the roster: every GET /duty waits
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE duty_roster IN ACCESS EXCLUSIVE MODE")
        try:
            requests = asyncio.gather(*(api.call("GET", "/duty", role="viewer") for _ in range(20)))
            seen = []
            for _ in range(15):
                await asyncio.sleep(0.1)
                seen.append(await api_connections(scratch_dsn, name))
        finally:
            await transaction.rollback()
            await blocker.close()
        results = await requests
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert 1 <= max(seen) <= 2, seen
    unavailable = next(body for status, body in results if status == 503)
    assert unavailable == {"error": "database unavailable, try again", "detail": {"reason": "timeout"}}
    assert await api_connections(scratch_dsn, name) == 0  # the app's cleanup closed the pool


async def test_healthz_and_errors_show_no_database_error_text(scratch_dsn: str) -> None:
    async def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("/var/lib/secret/path exploded")

    unreachable = ApiDatabase("postgresql://bridge:s3cret-pw@127.0.0.1:1/pbx_bridge", acquire_timeout=1)
    context = api_context(scratch_dsn, [], database=unreachable)
    context = replace(context, health={**context.health, "broken": broken})
    async with serving(context) as api:
        async with api.session.get(api.base + "/healthz") as response:
            status, text = response.status, await response.text()
        assert status == 503
        components = json.loads(text)["components"]
        assert components["database"] == {"ok": False, "error": "refused"}
        assert components["broken"] == {"ok": False, "error": "check failed"}
        status, body = await api.call("GET", "/duty", role="viewer")
        assert (status, body) == (503, {"error": "database unavailable, try again", "detail": {"reason": "refused"}})
    for leak in ("127.0.0.1", "s3cret", "Errno", "Connect call failed", "/var/lib", "exploded"):
        assert leak not in text and leak not in json.dumps(body), leak


async def test_the_pools_sessions_stay_for_the_pbx_across_releases_and_wait_for_its_name(scratch_dsn: str) -> None:
    """asyncpg's pool runs RESET ALL on every release: the PBX (pbx_bridge.pbx) must survive it,
    or a connection's second request would read another PBX (the scratch database's default)."""
    naming = PbxNaming(scratch_dsn, None)
    database = ApiDatabase(naming.dsn, max_size=1, acquire_timeout=1)
    await database.open()
    try:
        with pytest.raises(DatabaseUnavailableError, match="no name yet"):  # before the first AMI login
            async with database.connection():
                pass
        naming.learn("site-b")  # the first AMI login: Asterisk's systemname names it
        for _ in range(3):  # one connection (max_size 1), released and acquired again
            async with database.connection() as conn:
                assert await conn.fetchval("SELECT session_pbx()") == "site-b"
    finally:
        await database.close()
