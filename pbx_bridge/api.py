"""The ops HTTP API (aiohttp), served inside the daemon's own event loop.

GET /healthz, GET /metrics, GET /calls/live, GET|PUT /duty, POST /probes, GET /probes/{id},
GET|PUT /calls/{linkedid}/note, GET /agents, PUT /agents/{agent}/presence, GET /openapi.json.

Who may do what is decided on the matched route, never on the raw path: /healthz, /metrics and
/openapi.json are public; every other request, an unknown path included, needs
`Authorization: Bearer <token>`, one of the named tokens of [api] (compared in constant time with
every one of them), whose role must be allowed on the route (ROUTES: ops, agent, viewer). Who
acted (the roster, call sheets, agents' presence) is recorded as the token's name, never taken from the body.
Handlers use a small pool of database connections of their own (ApiDatabase): many requests
wait briefly, then get 503, and never take connections the call writer needs. Bodies are
validated with pydantic; every error is JSON `{"error": ..., "detail": ...}`. No request can
choose a number the PBX dials: the roster only accepts numbers matching `[duty] mobile_pattern`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import asyncpg
import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pbx_bridge.aio import within
from pbx_bridge.config import ApiToken, Role, mobile_allowed
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
from pbx_bridge.pbx import PbxNotNamedError
from pbx_bridge.probes import ProbeRunner, RateLimitedError
from pbx_bridge.storage.presence import (
    MAX_REASON,
    AlreadyInStateError,
    LastAgentError,
    Presence,
    PresenceOrderError,
    UnknownAgentError,
    current_presence,
    sign_in,
    sign_out,
)
from pbx_bridge.tracker.tracker import TrackerState, live_calls
from pbx_bridge.web import Changes, Wallboard
from pbx_bridge.web import handlers as wallboard

log = structlog.get_logger("pbx_bridge.api")

MAX_BODY_BYTES = 64 * 1024
ROSTER_LOCK = 0x7062786475  # "pbxdu": one roster replacement at a time (advisory lock)
AGENT_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")  # a PJSIP endpoint name, as agent_presence checks it
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LiveState:
    """The tracker's latest state, published by its consumer after every input (read-only here)."""

    def __init__(self) -> None:
        self.state = TrackerState()
        self.last_customer_call_at: datetime | None = None  # real time a non-probe call last ended
        self.changes = Changes()  # bumped when `state` changes: the wallboard pushes on it

    def publish(self, state: TrackerState) -> None:
        """Take the tracker's state after an input; wake the wallboard if it changed."""
        if state is not self.state:
            self.state = state
            self.changes.bump()

    def last_activity(self) -> datetime | None:
        """When the hotline was last in use by a customer: now if a customer call is live."""
        if any(c.probe_nonce is None for c in self.state.calls.values()):
            return datetime.now(UTC)
        return self.last_customer_call_at


Component = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]  # something /healthz asks about


class DatabaseUnavailableError(Exception):
    """No API database connection could be had; `reason` is short and fixed (safe to show)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """A short, fixed description of a database failure: what /healthz and API errors may show
    (the exception's text, with addresses, paths or server messages, goes to the log only)."""
    if isinstance(exc, PbxNotNamedError):
        return "the PBX has no name yet (its first AMI login gives it)"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return "login refused"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return "too many connections"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return "not accepting connections"
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return "unreachable"
    return "error"


class ApiDatabase:
    """The API's own bounded asyncpg pool: at most `max_size` connections, and a request waits at
    most `acquire_timeout` seconds for one (then 503). Opened and closed with the aiohttp app."""

    def __init__(self, dsn: str | Callable[[], str], *, max_size: int = 4, acquire_timeout: float = 2.0,
                 command_timeout: float = 10.0, application_name: str = "pbx-bridge-api") -> None:
        self._dsn = dsn  # or a function, asked at each new connection (the PBX's name may come later)
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self.command_timeout = command_timeout
        self.application_name = application_name
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Create the pool (it connects lazily: the database may be down at start)."""
        if self._pool is not None:
            raise RuntimeError("the API database pool is already open")
        self._pool = await asyncpg.create_pool(  # connections from self._connect
            min_size=0, max_size=self.max_size, timeout=self.acquire_timeout,
            command_timeout=self.command_timeout, max_inactive_connection_lifetime=60,
            server_settings={"application_name": self.application_name}, connect=self._connect)

    async def _connect(self, *_: object, **options: Any) -> asyncpg.Connection:
        """A new pool connection from the DSN as it is now: a session setting in it (the PBX's) is
        set at connection start, so the pool's RESET ALL on every release keeps it."""
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn() if callable(self._dsn) else self._dsn,
                                                         **options)
        return conn

    async def close(self) -> None:
        """Close the pool, waiting at most 5 s for connections in use, then cutting them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await within(pool.close(), 5)
        except TimeoutError:
            pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, returned to the pool afterwards; DatabaseUnavailableError if none
        can be had within `acquire_timeout` (all in use, or the database unreachable)."""
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailableError("not started")
        try:
            conn = await pool.acquire(timeout=self.acquire_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = failure_reason(exc)
            log.warning("api_database_unavailable", reason=reason, error=str(exc) or type(exc).__name__)
            raise DatabaseUnavailableError(reason) from None
        try:
            yield conn
        finally:
            await pool.release(conn)


Access = frozenset[Role] | Literal["public"]
PUBLIC: Final = "public"
EVERY_ROLE: Final[frozenset[Role]] = frozenset({"ops", "agent", "viewer"})
OPS: Final[frozenset[Role]] = frozenset({"ops"})
AGENT: Final[frozenset[Role]] = frozenset({"agent"})


def _always_open() -> bool:
    return True


@dataclass(frozen=True)
class ApiContext:
    """What the handlers need from the daemon."""

    metrics: Metrics
    live: LiveState
    health: dict[str, Component]  # name -> check; a failing one with `critical` makes /healthz 503
    critical: frozenset[str]
    database: ApiDatabase  # opened and closed by the app (create_app)
    tokens: Sequence[ApiToken]  # empty: only the public routes answer
    mobile_pattern: str
    on_roster_change: Callable[[], Awaitable[object]]
    probes: ProbeRunner | None = None
    agents: Sequence[str] = ()  # the configured agents' endpoints, whose presence the API shows and sets
    is_open: Callable[[], bool] = _always_open  # business hours now: the last agent may not sign out
    on_presence_change: Callable[[], Awaitable[object]] | None = None  # republish the dial string
    wallboard: Wallboard | None = None  # GET /wallboard and its stream (pbx_bridge.web)
    leading: Callable[[], bool] = lambda: True  # False on the standby of a pair: it changes nothing


STANDBY = "this pbx-bridge is the standby: ask the leader (see /healthz, component leadership)"


CONTEXT = web.AppKey("context", ApiContext)
ACCESS = web.AppKey("access", dict[AbstractRoute, Access])  # each route's roles; absent: token, then 404/405
TOKEN_DIGESTS = web.AppKey("token_digests", tuple[tuple[bytes, ApiToken], ...])
CALLER = web.RequestKey("caller", ApiToken)  # whose token authenticated the request


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
    except DatabaseUnavailableError as exc:
        response = error(503, "database unavailable, try again", {"reason": exc.reason})
        response.headers["Retry-After"] = "1"
        return response
    except Exception:
        log.exception("api_handler_failed", path=request.path)
        return error(500, "internal error")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def identify(authorization: str, digests: Sequence[tuple[bytes, ApiToken]]) -> ApiToken | None:
    """The token an `Authorization: Bearer ...` header carries, if it is a configured one.

    The given token's digest is compared in constant time with every configured token's digest
    (no early exit, and equal lengths: nothing tells how close a guess was, or which token it was near).
    """
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    given_digest = _digest(given.strip())
    found = None
    for digest, token in digests:
        if hmac.compare_digest(given_digest, digest):
            found = token
    return found


@web.middleware
async def authorize(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Public routes pass; everything else needs a configured token whose role the route allows.

    Decided on the route the request matched (so no spelling of a path, percent-encoded or not,
    can reach a handler it was not meant to): an unknown path or method needs a token too, and
    only then gets its 404 or 405.
    """
    access = request.app[ACCESS].get(request.match_info.route)
    if access == PUBLIC:
        return await handler(request)
    digests = request.app[TOKEN_DIGESTS]
    if not digests:
        return error(403, "the API is closed: no [api] tokens are configured")
    caller = identify(request.headers.get("Authorization", ""), digests)
    if caller is None and wallboard.is_wallboard_route(request):  # a wall screen's key cookie opens these two
        caller = wallboard.cookie_caller(request, digests)
        if caller is None:
            return wallboard.unauthorized(request)
    if caller is None:
        response = error(401, "missing or unknown bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="pbx-bridge"'
        return response
    request[CALLER] = caller
    if access is not None and caller.role not in access:
        needed = sorted(access)
        log.warning("api_forbidden", token=caller.name, role=caller.role, method=request.method,
                    route=request.match_info.route.resource.canonical if request.match_info.route.resource else None)
        return error(403, f"this request needs the role {' or '.join(needed)}",
                     {"needed": needed, "role": caller.role})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Each component's state; 503 when a critical one (AMI, database) is down."""
    context = request.app[CONTEXT]
    components = {}
    healthy = True
    for name, check in context.health.items():
        try:
            ok, detail = await check()
        except Exception:  # a broken check says so, without its exception's text
            log.exception("health_check_failed", component=name)
            ok, detail = False, {"error": "check failed"}
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
    async with request.app[CONTEXT].database.connection() as conn:
        rows = await conn.fetch("SELECT holder, mobile, starts_at, ends_at FROM duty_roster WHERE ends_at > now() "
                                "ORDER BY starts_at")
    return _json({"entries": [_entry_json(r) for r in rows]})


async def put_duty(request: web.Request) -> web.Response:
    """Replace the roster from now on; numbers must match the configured mobile pattern. Who did it
    (the token's name), when, and the entries before and after go to duty_roster_changes."""
    context = request.app[CONTEXT]
    if not context.leading():
        return error(503, STANDBY)
    actor = request[CALLER].name
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "body too large")
    try:
        update = RosterUpdate.model_validate_json(raw)
    except ValidationError as exc:
        return error(422, "invalid roster", _invalid(exc))
    bad = [e.mobile for e in update.entries if not mobile_allowed(context.mobile_pattern, e.mobile)]
    if bad:
        return error(422, "not an allowed duty mobile number", {"numbers": bad, "pattern": context.mobile_pattern})
    new = [{"holder": e.holder, "mobile": e.mobile, "starts_at": e.starts_at.isoformat(),
            "ends_at": e.ends_at.isoformat()} for e in sorted(update.entries, key=lambda e: e.starts_at)]
    async with context.database.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROSTER_LOCK)
        old = await conn.fetch("DELETE FROM duty_roster WHERE ends_at > now() "
                               "RETURNING holder, mobile, starts_at, ends_at")
        await conn.executemany(
            "INSERT INTO duty_roster (holder, mobile, starts_at, ends_at) VALUES ($1, $2, $3, $4)",
            [(e.holder, e.mobile, e.starts_at, e.ends_at) for e in update.entries])
        await conn.execute(
            "INSERT INTO duty_roster_changes (changed_by, old_entries, new_entries) VALUES ($1, $2::jsonb, $3::jsonb)",
            actor, json.dumps([_entry_json(r) for r in sorted(old, key=lambda r: r["starts_at"])], ensure_ascii=False),
            json.dumps(new, ensure_ascii=False))
    log.info("duty_roster_replaced", entries=len(new), replaced=len(old), by=actor)
    await context.on_roster_change()  # the PBX learns the new mobile at once
    return _json({"entries": new})


async def post_probe(request: web.Request) -> web.Response:
    """Start a line probe (or return the one in flight); the number comes from configuration only."""
    runner = request.app[CONTEXT].probes
    if runner is None:
        return error(503, "line probes are not configured: set [probe] caller_id")
    if not request.app[CONTEXT].leading():
        return error(503, STANDBY)
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
    if not LINKEDID.fullmatch(linkedid):
        raise web.HTTPNotFound(reason="no such call")
    return linkedid


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def get_note(request: web.Request) -> web.Response:
    """A call's sheet (null while not filled) and its change history."""
    linkedid = _linkedid(request)
    try:
        async with request.app[CONTEXT].database.connection() as conn:
            sheet, history = await read_sheet(conn, linkedid)
    except UnknownCallError:
        return error(404, "no such call")
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
    try:
        async with request.app[CONTEXT].database.connection() as conn:
            saved = await save_sheet(conn, linkedid, sheet, request[CALLER].name, expected)
    except UnknownCallError:
        return error(404, "no such call")
    except ProbeCallError:
        return error(409, "this call is a line probe: it has no customer and takes no call sheet")
    except VersionConflictError as exc:
        return error(412, "the sheet was changed meanwhile; read it again", {"current_version": exc.current})
    response = _json({"linkedid": linkedid, "note": saved.as_json(), "changed": saved.changed},
                     status=201 if saved.changed and saved.row["version"] == 1 else 200)
    response.headers["ETag"] = f'"{saved.row["version"]}"'
    return response


class PresenceChange(BaseModel):
    """PUT /agents/{agent}/presence: sign the agent out (with an optional reason) or back in.

    Who made the change is never taken from here: the API records the name of the token used.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    state: Literal["out", "in"]
    reason: str = Field(default="", max_length=MAX_REASON)

    @field_validator("reason")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must be one line of text without control characters")
        return value

    @model_validator(mode="after")
    def _reason_with_out(self) -> PresenceChange:
        if self.state == "in" and self.reason:
            raise ValueError("a reason goes with a sign-out (state out) only")
        return self


def _presence_json(presence: Presence) -> dict[str, Any]:
    out = presence.signed_out_at
    return {"agent": presence.agent, "state": "in" if out is None else "out",
            "since": None if out is None else out.isoformat(), "reason": presence.reason, "set_by": presence.set_by}


async def get_agents(request: web.Request) -> web.Response:
    """Every configured agent: signed in, or signed out since when, why and how."""
    context = request.app[CONTEXT]
    async with context.database.connection() as conn:
        presence = await current_presence(conn, context.agents)
    return _json({"agents": [_presence_json(p) for p in presence]})


async def put_presence(request: web.Request) -> web.Response:
    """Sign an agent out or back in; who did it is the token's name. The last agent signed in may
    not sign out during business hours (409). The PBX is told at once (on_presence_change)."""
    context = request.app[CONTEXT]
    if not context.leading():
        return error(503, STANDBY)
    agent = request.match_info["agent"]
    if not AGENT_NAME.fullmatch(agent) or agent not in context.agents:
        return error(404, "no such agent")
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return error(413, "body too large")
    try:
        change = PresenceChange.model_validate_json(raw)
    except ValidationError as exc:
        return error(422, "invalid presence change", _invalid(exc))
    actor = request[CALLER].name
    at = datetime.now(UTC)
    try:
        async with context.database.connection() as conn:
            if change.state == "out":
                presence = await sign_out(conn, agent, at, agents=context.agents, open_now=context.is_open(),
                                          reason=change.reason, set_by="api", actor=actor)
            else:
                presence = await sign_in(conn, agent, at, agents=context.agents, set_by="api", actor=actor)
    except UnknownAgentError:
        return error(404, "no such agent")
    except AlreadyInStateError as exc:
        return error(409, str(exc), _presence_json(exc.current))
    except LastAgentError as exc:
        return error(409, str(exc), {"open": True})
    except PresenceOrderError as exc:
        return error(409, "the agent's last change is later than now (has the clock gone back?)",
                     {"last_change": exc.last.isoformat()})
    log.info("agent_presence_changed", agent=agent, state=change.state, reason=change.reason or None, by=actor)
    published = False
    if context.on_presence_change is not None:
        try:
            await context.on_presence_change()  # the dial string leaves out (or takes back) the agent
            published = True
        except Exception:  # stored all the same: the next routing publish carries it
            log.exception("agent_presence_publish_failed", agent=agent)
    return _json(_presence_json(presence) | {"published": published})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API; who may call what comes from ROUTES."""
    error_schema = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {}}}
    json_error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    unavailable = json_error | {"description": "no database connection within a short wait (Retry-After)"}
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "pbx-bridge ops API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": error_schema, "RosterUpdate": RosterUpdate.model_json_schema(
                ref_template="#/components/schemas/{model}")} | {
                "RosterEntry": RosterEntry.model_json_schema(), "CallSheet": CallSheet.model_json_schema(),
                "PresenceChange": PresenceChange.model_json_schema()},
        },
        "paths": {
            "/healthz": {"get": {"summary": "Component health",
                                 "responses": {"200": {"description": "healthy"},
                                               "503": {"description": "AMI or database down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/calls/live": {"get": {"summary": "Calls ringing or talking now",
                                    "responses": {"200": {"description": "calls"}}}},
            "/duty": {
                "get": {"summary": "Current and future duty roster",
                        "responses": {"200": {"description": "roster"}, "503": unavailable}},
                "put": {"summary": "Replace the roster from now on (recorded: who, when, before and after)",
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/RosterUpdate"}}}},
                        "responses": {"200": {"description": "stored"},
                                      "422": json_error | {"description": "invalid"}, "503": unavailable}},
            },
            "/probes": {"post": {"summary": "Start a line probe (no parameters; 202 with its id)",
                                 "responses": {"202": {"description": "started or already running"},
                                               "422": json_error | {"description": "a body was given"},
                                               "429": json_error | {"description": "rate limited"},
                                               "503": json_error | {
                                                   "description": "probes not configured, or this is the standby"}}}},
            "/probes/{id}": {"get": {"summary": "A probe's status and attempts",
                                     "parameters": [{"name": "id", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}],
                                     "responses": {"200": {"description": "probe"},
                                                   "404": json_error | {"description": "unknown"}}}},
            "/calls/{linkedid}/note": {
                "parameters": [{"name": "linkedid", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {"summary": "A call's sheet (接听记录单) and its change history",
                        "responses": {"200": {"description": "sheet (null if not filled) and history"},
                                      "404": json_error | {"description": "no such call"}, "503": unavailable}},
                "put": {"summary": "Fill in or change a call's sheet (If-Match: version, optional); the history "
                                   "records the token's name as who changed it",
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/CallSheet"}}}},
                        "responses": {"200": {"description": "updated (or unchanged)"},
                                      "201": {"description": "first version stored"},
                                      "404": json_error | {"description": "no such call"},
                                      "409": json_error | {"description": "a line probe"},
                                      "412": json_error | {"description": "changed meanwhile"},
                                      "422": json_error | {"description": "invalid"}, "503": unavailable}},
            },
            "/agents": {"get": {"summary": "Every configured agent's presence: state in or out, since, reason, "
                                           "set_by",
                                "responses": {"200": {"description": "agents"}, "503": unavailable}}},
            "/agents/{agent}/presence": {
                "parameters": [{"name": "agent", "in": "path", "required": True, "schema": {"type": "string"}}],
                "put": {"summary": "Sign an agent out (with an optional reason) or back in; recorded with the "
                                   "token's name as who did it",
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/PresenceChange"}}}},
                        "responses": {"200": {"description": "the agent's new presence"},
                                      "404": json_error | {"description": "not a configured agent"},
                                      "409": json_error | {"description": "already in that state, or the last "
                                                                          "agent signed in during business hours"},
                                      "422": json_error | {"description": "invalid"}, "503": unavailable}},
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "json"}}}},
        },
    }
    document["paths"] |= wallboard.OPENAPI_PATHS
    for method, path, _handler, access in ROUTES:
        operation = document["paths"][path][method.lower()]
        if access == PUBLIC:
            operation["security"] = []
            continue
        roles = sorted(access)
        operation["security"] = secured
        operation["x-roles"] = roles
        operation["description"] = f"Needs a bearer token with the role {' or '.join(roles)}."
        operation["responses"] |= {
            "401": json_error | {"description": "no token, or not a configured one"},
            "403": json_error | {"description": f"the token's role is not {' or '.join(roles)}"}}
    return document


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


# Every route, and which roles may use it (PUBLIC: no token). The middleware `authorize` decides
# on the route a request matched; a path not listed needs a token and then gets 404 or 405.
ROUTES: Final[tuple[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], Access], ...]] = (
    ("GET", "/healthz", healthz, PUBLIC),
    ("GET", "/metrics", metrics, PUBLIC),
    ("GET", "/openapi.json", openapi, PUBLIC),
    ("GET", "/calls/live", calls_live, EVERY_ROLE),  # callers' names and numbers
    ("GET", "/duty", get_duty, EVERY_ROLE),  # holders' names and mobile numbers
    ("PUT", "/duty", put_duty, OPS),
    ("POST", "/probes", post_probe, OPS),
    ("GET", "/probes/{id}", get_probe, OPS),
    ("GET", "/calls/{linkedid}/note", get_note, AGENT),  # customer data: agents only
    ("PUT", "/calls/{linkedid}/note", put_note, AGENT),
    ("GET", "/agents", get_agents, EVERY_ROLE),  # who is signed out, and why
    ("PUT", "/agents/{agent}/presence", put_presence, OPS),
    ("GET", "/wallboard", wallboard.wallboard_page, EVERY_ROLE),  # or the wallboard cookie (pbx_bridge.web)
    ("GET", "/wallboard/stream", wallboard.wallboard_stream, EVERY_ROLE),  # numbers masked
    ("GET", "/wallboard/link", wallboard.wallboard_link, EVERY_ROLE),  # a link that sets the cookie
    ("GET", "/wallboard/login", wallboard.wallboard_login_link, PUBLIC),  # the form, or ?key= to the cookie
    ("POST", "/wallboard/login", wallboard.wallboard_login, PUBLIC),  # a token once, to the cookie
    ("GET", "/wallboard/static/{name}", wallboard.wallboard_static, PUBLIC),  # script and style, no data
)


def create_app(context: ApiContext) -> web.Application:
    """The aiohttp application (app factory); it opens the API's database pool at start and
    closes it at cleanup."""
    app = web.Application(middlewares=[errors_as_json, authorize], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = context
    app[TOKEN_DIGESTS] = tuple((_digest(t.secret.get_secret_value()), t) for t in context.tokens)
    app[ACCESS] = {}
    for method, path, handler, access in ROUTES:
        app[ACCESS][app.router.add_route(method, path, handler)] = access
    if context.wallboard is not None:
        wallboard.attach(app, context.wallboard, app[TOKEN_DIGESTS])

    async def database_pool(app: web.Application) -> AsyncIterator[None]:
        await context.database.open()
        try:
            yield
        finally:
            await context.database.close()

    app.cleanup_ctx.append(database_pool)
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


def database_component(database: ApiDatabase, min_interval: float = 1.0) -> Component:
    """A health check that runs SELECT 1 on a connection of the API's pool.

    One check at a time, its result reused for `min_interval` seconds, so /healthz (public)
    uses at most one connection however often it is asked. A failure shows a short fixed reason
    ("refused", "timeout", "unreachable", ...); the detail goes to the log when the state changes.
    """
    last: list[tuple[float, bool, dict[str, Any]]] = []
    running: list[asyncio.Task[tuple[bool, dict[str, Any]]]] = []
    logged: list[str | None] = [None]

    async def select_one() -> tuple[bool, dict[str, Any]]:
        reason, error_text = None, ""
        try:
            async with database.connection() as conn:
                await within(conn.fetchval("SELECT 1"), 2)
        except DatabaseUnavailableError as exc:
            reason = exc.reason  # api_database_unavailable is logged with the detail
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason, error_text = failure_reason(exc), str(exc) or type(exc).__name__
        if reason != logged[0]:
            if reason is None:
                log.info("database_health_ok")
            else:
                log.warning("database_health_failed", reason=reason, error=error_text or None)
            logged[0] = reason
        result = (reason is None, {} if reason is None else {"error": reason})
        last[:] = [(time.monotonic(), *result)]
        return result

    async def check() -> tuple[bool, dict[str, Any]]:
        if last and time.monotonic() - last[0][0] < min_interval:
            return last[0][1], last[0][2]
        if not running or running[0].done():
            running[:] = [asyncio.ensure_future(select_one())]
        return await asyncio.shield(running[0])
    return check
