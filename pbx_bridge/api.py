"""The ops HTTP API (aiohttp), served inside the daemon's own event loop.

GET /healthz, GET /metrics, GET /calls/live, GET|PUT /duty, POST /probes, GET /probes/{id},
GET|PUT /calls/{linkedid}/note, GET /openapi.json. Anything that changes state, and reading a
call sheet (customer data), needs `Authorization: Bearer <token>` (compared in constant time);
without a configured token such requests are refused. Bodies are validated with pydantic; every error
is JSON `{"error": ..., "detail": ...}`. No request can choose a number the PBX dials: the
roster only accepts numbers matching `[duty] mobile_pattern`.
"""

from __future__ import annotations

import hmac
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pbx_bridge.aio import within
from pbx_bridge.metrics import Metrics
from pbx_bridge.notes import (
    LINKEDID,
    CallSheet,
    ProbeCallError,
    UnknownCallError,
    VersionConflictError,
    json_ready,
    read_sheet,
    save_sheet,
)
from pbx_bridge.probes import ProbeRunner, RateLimitedError
from pbx_bridge.tracker.tracker import TrackerState, live_calls

log = structlog.get_logger("pbx_bridge.api")

MAX_BODY_BYTES = 64 * 1024
PRIVATE_PATH = re.compile(r"^/calls/[^/]+/note$")  # call sheets hold customer data: token even to read


class LiveState:
    """The tracker's latest state, published by its consumer after every input (read-only here)."""

    def __init__(self) -> None:
        self.state = TrackerState()
        self.last_customer_call_at: datetime | None = None  # real time a non-probe call last ended

    def last_activity(self) -> datetime | None:
        """When the hotline was last in use by a customer: now if a customer call is live."""
        if any(c.probe_nonce is None for c in self.state.calls.values()):
            return datetime.now(UTC)
        return self.last_customer_call_at


Component = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]  # something /healthz asks about


@dataclass(frozen=True)
class ApiContext:
    """What the handlers need from the daemon."""

    metrics: Metrics
    live: LiveState
    health: dict[str, Component]  # name -> check; a failing one with `critical` makes /healthz 503
    critical: frozenset[str]
    connect: Callable[[], Awaitable[asyncpg.Connection]]
    token: str | None
    mobile_pattern: str
    on_roster_change: Callable[[], Awaitable[object]]
    probes: ProbeRunner | None = None


CONTEXT = web.AppKey("context", ApiContext)


def error(status: int, message: str, detail: Any = None) -> web.Response:
    """A JSON error response."""
    return web.json_response({"error": message, "detail": detail}, status=status)


@web.middleware
async def errors_as_json(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure leaves as JSON; unexpected ones are logged, never shown in detail."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except Exception:
        log.exception("api_handler_failed", path=request.path)
        return error(500, "internal error")


@web.middleware
async def bearer_token(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """State-changing methods, and reading customer data, need the configured bearer token."""
    if request.method in ("GET", "HEAD", "OPTIONS") and not PRIVATE_PATH.match(request.path):
        return await handler(request)
    expected = request.app[CONTEXT].token
    if expected is None:
        return error(403, "state-changing requests are disabled: no [api] token is configured")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
        return error(401, "missing or wrong bearer token")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Each component's state; 503 when a critical one (AMI, database) is down."""
    context = request.app[CONTEXT]
    components = {}
    healthy = True
    for name, check in context.health.items():
        ok, detail = await check()
        components[name] = {"ok": ok, **detail}
        if not ok and name in context.critical:
            healthy = False
    return web.json_response({"status": "ok" if healthy else "unavailable", "components": components},
                             status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = generate_latest(request.app[CONTEXT].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def calls_live(request: web.Request) -> web.Response:
    """Calls ringing or talking now, with their ring time so far."""
    now = datetime.now(UTC)
    calls = [{**asdict(call), "started_at": call.started_at.isoformat()}
             for call in live_calls(request.app[CONTEXT].live.state, now)]
    return web.json_response({"calls": calls, "at": now.isoformat()})


class RosterEntry(BaseModel):
    """Who holds the duty mobile, from when to when."""

    model_config = ConfigDict(extra="forbid")

    holder: str = Field(min_length=1, max_length=100)
    mobile: str
    starts_at: AwareDatetime
    ends_at: AwareDatetime

    @model_validator(mode="after")
    def _order(self) -> RosterEntry:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class RosterUpdate(BaseModel):
    """PUT /duty: the roster from now on (entries already over are kept as history)."""

    model_config = ConfigDict(extra="forbid")

    entries: list[RosterEntry] = Field(max_length=1000)

    @field_validator("entries")
    @classmethod
    def _no_overlap(cls, entries: list[RosterEntry]) -> list[RosterEntry]:
        ordered = sorted(entries, key=lambda e: e.starts_at)
        for before, after in itertools.pairwise(ordered):
            if after.starts_at < before.ends_at:
                raise ValueError(f"entries overlap at {after.starts_at.isoformat()}")
        return entries


def _entry_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"holder": row["holder"], "mobile": row["mobile"], "starts_at": row["starts_at"].isoformat(),
            "ends_at": row["ends_at"].isoformat()}


async def get_duty(request: web.Request) -> web.Response:
    """The roster entries that are current or to come."""
    conn = await request.app[CONTEXT].connect()
    try:
        rows = await conn.fetch("SELECT holder, mobile, starts_at, ends_at FROM duty_roster WHERE ends_at > now() "
                                "ORDER BY starts_at")
    finally:
        await conn.close()
    return web.json_response({"entries": [_entry_json(r) for r in rows]})


async def put_duty(request: web.Request) -> web.Response:
    """Replace the roster from now on; numbers must match the configured mobile pattern."""
    context = request.app[CONTEXT]
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "body too large")
    try:
        update = RosterUpdate.model_validate_json(raw)
    except ValidationError as exc:
        return error(422, "invalid roster", _invalid(exc))
    pattern = re.compile(context.mobile_pattern)
    bad = [e.mobile for e in update.entries if not pattern.match(e.mobile)]
    if bad:
        return error(422, "not an allowed duty mobile number", {"numbers": bad, "pattern": context.mobile_pattern})
    conn = await context.connect()
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM duty_roster WHERE ends_at > now()")
            await conn.executemany(
                "INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) VALUES ($1, $2, $3, $4)",
                [(e.holder, e.mobile, e.starts_at, e.ends_at) for e in update.entries])
    finally:
        await conn.close()
    log.info("duty_roster_replaced", entries=len(update.entries))
    await context.on_roster_change()  # the PBX learns the new mobile at once
    return web.json_response({"entries": [
        {"holder": e.holder, "mobile": e.mobile, "starts_at": e.starts_at.isoformat(),
         "ends_at": e.ends_at.isoformat()} for e in update.entries]})


async def post_probe(request: web.Request) -> web.Response:
    """Start a line probe (or return the one in flight); the number comes from configuration only."""
    runner = request.app[CONTEXT].probes
    if runner is None:
        return error(503, "line probes are not configured: set [probe] caller_id")
    raw = (await request.read()).strip()
    if raw not in (b"", b"{}"):
        return error(422, "a probe takes no parameters: what it dials comes from the configuration")
    try:
        run, started = runner.request("manual")
    except RateLimitedError as exc:
        response = error(429, "too many probe requests", {"retry_after_seconds": round(exc.retry_after)})
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response
    return web.json_response({**run.as_json(), "started": started, "url": f"/probes/{run.id}"}, status=202)


async def get_probe(request: web.Request) -> web.Response:
    """A probe's status and attempts."""
    runner = request.app[CONTEXT].probes
    run = runner.runs.get(request.match_info["id"]) if runner is not None else None
    if run is None:
        return error(404, "no such probe")
    return web.json_response(run.as_json())


def _invalid(exc: ValidationError) -> list[dict[str, str]]:
    return [{"field": ".".join(map(str, e["loc"])), "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)]


def _linkedid(request: web.Request) -> str:
    linkedid = request.match_info["linkedid"]
    if not LINKEDID.match(linkedid):
        raise web.HTTPNotFound(reason="no such call")
    return linkedid


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def get_note(request: web.Request) -> web.Response:
    """A call's sheet (null while not filled) and its change history."""
    linkedid = _linkedid(request)
    conn = await request.app[CONTEXT].connect()
    try:
        sheet, history = await read_sheet(conn, linkedid)
    except UnknownCallError:
        return error(404, "no such call")
    finally:
        await conn.close()
    response = _json({"linkedid": linkedid, "note": json_ready(sheet) if sheet else None, "history": history})
    if sheet is not None:
        response.headers["ETag"] = f'"{sheet["version"]}"'
    return response


async def put_note(request: web.Request) -> web.Response:
    """Fill in or change a call's sheet; `If-Match: "<version>"` refuses to overwrite a newer one."""
    linkedid = _linkedid(request)
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "body too large")
    try:
        sheet = CallSheet.model_validate_json(raw)
    except ValidationError as exc:
        return error(422, "invalid call sheet", _invalid(exc))
    expected: int | None = None
    if "If-Match" in request.headers:
        tag = request.headers["If-Match"].strip().removeprefix("W/").strip('"')
        if not tag.isdigit():
            return error(400, 'If-Match must be a sheet version, e.g. "3"')
        expected = int(tag)
    conn = await request.app[CONTEXT].connect()
    try:
        saved = await save_sheet(conn, linkedid, sheet, expected)
    except UnknownCallError:
        return error(404, "no such call")
    except ProbeCallError:
        return error(409, "this call is a line probe: it has no customer and takes no call sheet")
    except VersionConflictError as exc:
        return error(412, "the sheet was changed meanwhile; read it again", {"current_version": exc.current})
    finally:
        await conn.close()
    response = _json({"linkedid": linkedid, "note": saved.as_json(), "changed": saved.changed},
                     status=201 if saved.changed and saved.row["version"] == 1 else 200)
    response.headers["ETag"] = f'"{saved.row["version"]}"'
    return response


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API."""
    error_schema = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {}}}
    json_error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "pbx-bridge ops API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": error_schema, "RosterUpdate": RosterUpdate.model_json_schema(
                ref_template="#/components/schemas/{model}")} | {
                "RosterEntry": RosterEntry.model_json_schema(), "CallSheet": CallSheet.model_json_schema()},
        },
        "paths": {
            "/healthz": {"get": {"summary": "Component health",
                                 "responses": {"200": {"description": "healthy"},
                                               "503": {"description": "AMI or database down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/calls/live": {"get": {"summary": "Calls ringing or talking now",
                                    "responses": {"200": {"description": "calls"}}}},
            "/duty": {
                "get": {"summary": "Current and future duty roster", "responses": {"200": {"description": "roster"}}},
                "put": {"summary": "Replace the roster from now on", "security": secured,
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/RosterUpdate"}}}},
                        "responses": {"200": {"description": "stored"}, "401": json_error | {"description": "token"},
                                      "403": json_error | {"description": "no token configured"},
                                      "422": json_error | {"description": "invalid"}}},
            },
            "/probes": {"post": {"summary": "Start a line probe (no parameters; 202 with its id)", "security": secured,
                                 "responses": {"202": {"description": "started or already running"},
                                               "401": json_error | {"description": "token"},
                                               "422": json_error | {"description": "a body was given"},
                                               "429": json_error | {"description": "rate limited"},
                                               "503": json_error | {"description": "probes not configured"}}}},
            "/probes/{id}": {"get": {"summary": "A probe's status and attempts",
                                     "parameters": [{"name": "id", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}],
                                     "responses": {"200": {"description": "probe"},
                                                   "404": json_error | {"description": "unknown"}}}},
            "/calls/{linkedid}/note": {
                "parameters": [{"name": "linkedid", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {"summary": "A call's sheet (接听记录单) and its change history", "security": secured,
                        "responses": {"200": {"description": "sheet (null if not filled) and history"},
                                      "401": json_error | {"description": "token"},
                                      "404": json_error | {"description": "no such call"}}},
                "put": {"summary": "Fill in or change a call's sheet (If-Match: version, optional)",
                        "security": secured,
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/CallSheet"}}}},
                        "responses": {"200": {"description": "updated (or unchanged)"},
                                      "201": {"description": "first version stored"},
                                      "401": json_error | {"description": "token"},
                                      "404": json_error | {"description": "no such call"},
                                      "409": json_error | {"description": "a line probe"},
                                      "412": json_error | {"description": "changed meanwhile"},
                                      "422": json_error | {"description": "invalid"}}},
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "json"}}}},
        },
    }


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


def create_app(context: ApiContext) -> web.Application:
    """The aiohttp application (app factory)."""
    app = web.Application(middlewares=[errors_as_json, bearer_token], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = context
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/calls/live", calls_live)
    app.router.add_get("/duty", get_duty)
    app.router.add_put("/duty", put_duty)
    app.router.add_post("/probes", post_probe)
    app.router.add_get("/probes/{id}", get_probe)
    app.router.add_get("/calls/{linkedid}/note", get_note)
    app.router.add_put("/calls/{linkedid}/note", put_note)
    app.router.add_get("/openapi.json", openapi)
    return app


async def serve(app: web.Application, host: str, port: int, stop: Callable[[], Awaitable[object]]) -> None:
    """Run the app on host:port until `stop` returns, then shut the server down (bounded)."""
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("api_listening", listen=f"{host}:{port}")
        await stop()
    finally:
        await runner.cleanup()


def component_age(label: str, last: Callable[[], float | None], max_age: float) -> Component:
    """A health check that something happened within `max_age` seconds."""
    async def check() -> tuple[bool, dict[str, Any]]:
        at = last()
        age = None if at is None else round(time.monotonic() - at, 1)
        return age is not None and age <= max_age, {label: age}
    return check


def database_component(connect: Callable[[], Awaitable[asyncpg.Connection]]) -> Component:
    """A health check that runs SELECT 1 within 2 s."""
    async def check() -> tuple[bool, dict[str, Any]]:
        try:
            conn = await within(connect(), 2)
            try:
                await within(conn.fetchval("SELECT 1"), 2)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            return False, {"error": str(exc) or type(exc).__name__}
        return True, {}
    return check
