"""The ops API in-process over real HTTP, with a real database for the roster."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from pbx_bridge.api import ApiContext, LiveState, create_app, database_component, openapi_document
from pbx_bridge.metrics import Metrics
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from tests.support.fixtures import fixture_messages

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests-0123456789"
PATTERN = r"^1[3-9][0-9]{9}$"


class Api:
    def __init__(self, session: ClientSession, base: str, context: ApiContext, roster_changes: list[int]) -> None:
        self.session, self.base, self.context, self.roster_changes = session, base, context, roster_changes

    async def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with self.session.request(method, self.base + path, data=data, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except json.JSONDecodeError:
                return response.status, text


@pytest.fixture
async def api(scratch_dsn: str) -> AsyncIterator[Api]:
    changes: list[int] = []

    async def roster_changed() -> None:
        changes.append(1)

    async def ami_down() -> tuple[bool, dict[str, Any]]:
        return False, {"sessions": 0}

    context = ApiContext(metrics=Metrics(), live=LiveState(), connect=lambda: asyncpg.connect(scratch_dsn),
                         health={"ami": ami_down, "database": database_component(
                             lambda: asyncpg.connect(scratch_dsn))},
                         critical=frozenset({"ami", "database"}), token=TOKEN, mobile_pattern=PATTERN,
                         on_roster_change=roster_changed)
    server = TestServer(create_app(context), host="127.0.0.1")
    await server.start_server()
    async with ClientSession() as session:
        yield Api(session, str(server.make_url("")), context, changes)
    await server.close()


def entry(holder: str, mobile: str, start_h: int, end_h: int) -> dict[str, str]:
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    return {"holder": holder, "mobile": mobile, "starts_at": (base + timedelta(hours=start_h)).isoformat(),
            "ends_at": (base + timedelta(hours=end_h)).isoformat()}


async def test_duty_roster_round_trip_needs_the_token_and_republishes(api: Api) -> None:
    body = {"entries": [entry("张三", "13800138000", 0, 12), entry("李四", "13900139000", 12, 24)]}
    assert (await api.call("PUT", "/duty", body, token=None))[0] == 401
    assert (await api.call("PUT", "/duty", body, token="wrong-token-wrong-token"))[0] == 401
    assert api.roster_changes == []
    status, stored = await api.call("PUT", "/duty", body)
    assert status == 200 and [e["holder"] for e in stored["entries"]] == ["张三", "李四"]
    assert api.roster_changes == [1]
    status, roster = await api.call("GET", "/duty", token=None)
    assert status == 200 and [e["mobile"] for e in roster["entries"]] == ["13800138000", "13900139000"]


@pytest.mark.parametrize(("entries", "problem"), [
    ([entry("x", "4008001234", 0, 1)], "not an allowed duty mobile number"),   # the 400 number itself
    ([entry("x", "1380013800;", 0, 1)], "not an allowed duty mobile number"),
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


async def test_without_a_configured_token_changes_are_refused(api: Api) -> None:
    context = ApiContext(**{**api.context.__dict__, "token": None})
    server = TestServer(create_app(context), host="127.0.0.1")
    await server.start_server()
    try:
        async with api.session.put(str(server.make_url("/duty")), data="{}",
                                   headers={"Authorization": "Bearer anything-at-all"}) as response:
            assert response.status == 403
            assert "no [api] token" in (await response.json())["error"]
    finally:
        await server.close()


async def test_healthz_reports_each_component_and_503_when_a_critical_one_is_down(api: Api) -> None:
    status, body = await api.call("GET", "/healthz", token=None)
    assert status == 503 and body["status"] == "unavailable"
    assert body["components"]["ami"]["ok"] is False and body["components"]["database"]["ok"] is True


async def test_live_calls_show_a_ringing_call_and_its_ring_time(api: Api) -> None:
    settings = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier")
    state = TrackerState()
    messages = fixture_messages("answered_7s_talk_4s")
    for message in messages[:12]:  # up to both phones ringing
        state, _ = apply(state, message, settings)
    api.context.live.state = state
    status, body = await api.call("GET", "/calls/live", token=None)
    [call] = body["calls"]
    assert status == 200 and call["state"] == "ringing" and call["caller_name"] == "张三客户"
    assert call["ring_seconds"] > 0


async def test_metrics_and_openapi(api: Api) -> None:
    api.context.metrics.violations.labels("ring_limit").inc()
    api.context.metrics.ring_seconds.observe(7.0)
    api.context.metrics.watch(reconnects=lambda: 2, lag=lambda: 0.5, pending=lambda: 3, trunk=lambda: 1)
    status, text = await api.call("GET", "/metrics", token=None)
    assert status == 200 and 'pbx_bridge_violations_total{kind="ring_limit"} 1.0' in text
    assert 'pbx_bridge_ring_seconds_bucket{le="7.5"} 1.0' in text
    assert 'pbx_bridge_ring_seconds_bucket{le="5.0"} 0.0' in text
    assert "pbx_bridge_ami_reconnects 2.0" in text and "pbx_bridge_writer_pending 3.0" in text
    assert "pbx_bridge_writer_lag_seconds 0.5" in text
    status, document = await api.call("GET", "/openapi.json", token=None)
    assert status == 200 and document == json.loads(json.dumps(openapi_document()))
    assert document["paths"]["/duty"]["put"]["security"] == [{"bearer": []}]


async def test_unknown_paths_are_json_errors(api: Api) -> None:
    status, body = await api.call("GET", "/nope", token=None)
    assert status == 404 and body["error"] == "Not Found"


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


SHEET = {"author": "agent101 张", "category": "投诉", "summary": "快递三天未到 '); DROP TABLE calls; --",
         "caller_name": "王女士 \"O'Brien\"", "contact": "13800138000", "owner": "杨雪峰", "status": "处理中"}


async def test_call_sheet_put_get_history_and_versions(api: Api, scratch_dsn: str) -> None:
    linkedid = await add_call(scratch_dsn)
    path = f"/calls/{linkedid}/note"
    assert (await api.call("PUT", path, SHEET, token=None))[0] == 401
    assert (await api.call("GET", path, token=None))[0] == 401  # customer data: the token even to read
    status, body = await api.call("GET", path)
    assert status == 200 and body["note"] is None and body["history"] == []

    status, body = await api.call("PUT", path, SHEET)
    assert status == 201 and body["changed"] is True
    note = body["note"]
    assert (note["version"], note["summary"], note["caller_name"], note["completed_at"]) == (
        1, SHEET["summary"], SHEET["caller_name"], None)

    done = SHEET | {"author": "组长", "status": "已完成", "resolution": "已补发并致歉"}
    async with api.session.put(api.base + path, json=done, headers={
            "Authorization": f"Bearer {TOKEN}", "If-Match": '"1"'}) as response:
        assert response.status == 200 and response.headers["ETag"] == '"2"'
        assert (await response.json())["note"]["completed_at"] is not None
    async with api.session.put(api.base + path, json=done | {"summary": "改"}, headers={
            "Authorization": f"Bearer {TOKEN}", "If-Match": '"1"'}) as response:
        assert response.status == 412 and (await response.json())["detail"] == {"current_version": 2}
    status, body = await api.call("PUT", path, done)  # the same again: nothing to record
    assert status == 200 and body["changed"] is False and body["note"]["version"] == 2

    status, body = await api.call("GET", path)
    assert status == 200 and body["note"]["status"] == "已完成"
    assert [(h["version"], h["changed_by"]) for h in body["history"]] == [(1, "agent101 张"), (2, "组长")]
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
        ({k: v for k, v in SHEET.items() if k != "author"}, "author"),
        (SHEET | {"summary": ""}, "summary"),
        (SHEET | {"summary": "x" * 2001}, "summary"),
        (SHEET | {"owner": "杨\r\nX-Injected: 1"}, "owner"),
        (SHEET | {"summary": "bad \x00 byte"}, "summary"),
        (SHEET | {"extra": 1}, "extra"),
    ]
    for body, field in cases:
        status, answer = await api.call("PUT", path, body)
        assert status == 422 and field in {d["field"] for d in answer["detail"]}, (field, answer)
    assert (await api.call("PUT", path, raw=b"{not json"))[0] == 422
    assert (await api.call("PUT", path, SHEET | {"summary": "多行\n描述\t可以"}))[0] == 201
    assert (await api.call("PUT", "/calls/no-such-call/note", SHEET))[0] == 404
    assert (await api.call("PUT", "/calls/bad;id'/note", SHEET))[0] == 404
    probe = await add_call(scratch_dsn, probe=True)
    assert (await api.call("PUT", f"/calls/{probe}/note", SHEET))[0] == 409
