"""The wallboard's HTTP handlers: the page, its event stream, its static files and the screen's login."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web

from pbx_bridge.config import ApiToken
from pbx_bridge.web.auth import (
    Digests,
    caller_from_cookie,
    set_key_cookie,
    token_of_key,
    token_of_secret,
    wallboard_key,
)
from pbx_bridge.web.board import Wallboard

log = structlog.get_logger("pbx_bridge.web")

BOARD = web.AppKey("wallboard", Wallboard)
DIGESTS = web.AppKey("wallboard_digests", tuple[tuple[bytes, ApiToken], ...])

COOKIE_PATHS: Final = frozenset({"/wallboard", "/wallboard/stream"})  # a wallboard key opens these, nothing else
STATIC: Final = {"wallboard.js": "text/javascript", "wallboard.css": "text/css"}
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@functools.cache
def _static(name: str) -> bytes:
    return (resources.files("pbx_bridge.web") / "static" / name).read_bytes()


def attach(app: web.Application, board: Wallboard, digests: tuple[tuple[bytes, ApiToken], ...]) -> None:
    """Give the app its wallboard: the board runs while the app does; streams end at shutdown."""
    app[BOARD] = board
    app[DIGESTS] = digests
    app.on_shutdown.append(board.on_shutdown)
    app.cleanup_ctx.append(board.lifespan)


def is_wallboard_route(request: web.Request) -> bool:
    """Whether the request matched a route a wallboard key (the screen's cookie) may open."""
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in COOKIE_PATHS and request.method == "GET"


def cookie_caller(request: web.Request, digests: Digests) -> ApiToken | None:
    """Whose wallboard key the request's cookie carries (only on the wallboard's own routes)."""
    return caller_from_cookie(request, digests) if is_wallboard_route(request) else None


def _page(name: str, status: int = 200) -> web.Response:
    return web.Response(body=_static(name), status=status, content_type="text/html", charset="utf-8",
                        headers=PAGE_HEADERS)


def unauthorized(request: web.Request) -> web.Response:
    """401 for the wallboard: the page answers with the screen's login form, the stream with JSON."""
    if request.match_info.route.resource is not None and request.match_info.route.resource.canonical == "/wallboard":
        response = _page("login.html", 401)
    else:
        response = web.json_response({"error": "missing or unknown bearer token or wallboard key", "detail": None},
                                     status=401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="pbx-bridge"'
    return response


def _board(request: web.Request) -> Wallboard:
    board = request.app.get(BOARD)
    if board is None:
        raise web.HTTPNotFound(reason="the wallboard is not set up")
    return board


async def wallboard_page(request: web.Request) -> web.StreamResponse:
    """The wall screen's page (static HTML; everything shown arrives through the stream)."""
    _board(request)
    return _page("wallboard.html")


async def wallboard_static(request: web.Request) -> web.StreamResponse:
    """The page's script and style sheet (public: they hold no data)."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_static(name), content_type=STATIC[name], charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def wallboard_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: `live` (calls, open or closed, duty holder, trunk) on every change,
    `figures` (today's) when they change, `ping` when idle. Callers' numbers arrive masked."""
    board = _board(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-store", "X-Accel-Buffering": "no",
                                           "X-Content-Type-Options": "nosniff"})
    await response.prepare(request)
    with board.client():
        log.info("wallboard_connected", clients=board.clients)
        try:
            await board.stream(response)
        except ConnectionResetError:
            pass  # the screen went away
        finally:
            log.info("wallboard_disconnected", clients=board.clients - 1)
    return response


def _logged_in(request: web.Request, token: ApiToken, key: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": "/wallboard", "Cache-Control": "no-store"})
    set_key_cookie(response, key, secure=request.secure)
    log.info("wallboard_login", token=token.name)
    return response


async def wallboard_login_link(request: web.Request) -> web.StreamResponse:
    """GET /wallboard/login: with `?key=` (from /wallboard/link) keep the key in a cookie and go to
    the board; without one, the form to paste a token into once."""
    _board(request)
    key = request.query.get("key", "")
    if not key:
        return _page("login.html")
    digests = request.app[DIGESTS]
    token = token_of_key(key, digests)
    if token is None:
        return _page("login.html", 401)
    return _logged_in(request, token, key)


async def wallboard_login(request: web.Request) -> web.StreamResponse:
    """POST /wallboard/login (form field `token`): keep the token's wallboard key in a cookie."""
    _board(request)
    form = await request.post()
    secret = form.get("token")
    digests = request.app[DIGESTS]
    token = token_of_secret(secret, digests) if isinstance(secret, str) else None
    if token is None:
        log.warning("wallboard_login_refused")
        return _page("login.html", 401)
    digest = next(d for d, t in digests if t == token)
    return _logged_in(request, token, wallboard_key(digest, token))


async def wallboard_link(request: web.Request) -> web.StreamResponse:
    """The long-lived link for a wall screen, derived from the bearer token of this request."""
    _board(request)
    digests = request.app[DIGESTS]
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    token = token_of_secret(secret, digests) if scheme.lower() == "bearer" else None
    if token is None:
        raise web.HTTPUnauthorized()
    digest = next(d for d, t in digests if t == token)
    key = wallboard_key(digest, token)
    return web.Response(text=json.dumps({"path": f"/wallboard/login?key={key}", "token": token.name,
                                         "opens": sorted(COOKIE_PATHS)}),
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def _doc(summary: str, ok: str, **responses: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": ok}, **responses}}


OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/wallboard": {"get": _doc("The wall screen (HTML): live calls, today's figures, callbacks, line, violations; "
                               "a bearer token or the wallboard cookie", "the page")},
    "/wallboard/stream": {"get": _doc("Server-Sent Events for the wall screen: live, figures, ping; callers' "
                                      "numbers masked", "text/event-stream")},
    "/wallboard/static/{name}": {"get": _doc("The wall screen's script and style sheet", "the file") | {
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]}},
    "/wallboard/login": {
        "get": _doc("The screen's login: with ?key= (from /wallboard/link) sets the wallboard cookie", "the form",
                    **{"303": {"description": "cookie set, to /wallboard"}}),
        "post": _doc("The screen's login form (field token): sets the wallboard cookie", "unused",
                     **{"303": {"description": "cookie set, to /wallboard"},
                        "401": {"description": "not a configured token"}}),
    },
    "/wallboard/link": {"get": _doc("A long-lived link that sets the wallboard cookie (opens /wallboard and its "
                                    "stream only; ends when the token changes)", "the link's path")},
}
