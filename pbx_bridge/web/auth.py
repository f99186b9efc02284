"""The wall screen's credentials: a cookie (or a link that sets it) derived from an API token."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from aiohttp import web

from pbx_bridge.config import ApiToken

COOKIE = "pbx_wallboard"
COOKIE_MAX_AGE = 400 * 86400  # browsers cap cookie lifetimes at about 400 days
_LABEL = b"pbx-bridge wallboard key v1"

Digests = Sequence[tuple[bytes, ApiToken]]  # (sha256 of the token, the token), as the API keeps them


def wallboard_key(digest: bytes, token: ApiToken) -> str:
    """The wallboard key of a token: its name and an HMAC of a fixed label under the token's digest.

    It opens the wallboard and its stream only (never another route), shows nothing of the token,
    and stops working when the token is changed or removed; no server-side state."""
    return f"{token.name}.{hmac.new(digest, _LABEL, hashlib.sha256).hexdigest()}"


def _compare(given: str, expected: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def token_of_key(key: str, digests: Digests) -> ApiToken | None:
    """The token whose wallboard key `key` is (compared in constant time with every one)."""
    if not key or len(key) > 256:
        return None
    found = None
    for digest, token in digests:
        if _compare(key, wallboard_key(digest, token)):
            found = token
    return found


def token_of_secret(secret: str, digests: Digests) -> ApiToken | None:
    """The token whose secret is `secret` (compared in constant time with every one)."""
    secret = secret.strip()
    if not secret or len(secret) > 1024:
        return None
    given = hashlib.sha256(secret.encode()).digest()
    found = None
    for digest, token in digests:
        if hmac.compare_digest(given, digest):
            found = token
    return found


def set_key_cookie(response: web.StreamResponse, key: str, secure: bool) -> None:
    """Keep the key in the browser: HttpOnly, SameSite=Strict, for the wallboard's paths only."""
    response.set_cookie(COOKIE, key, max_age=COOKIE_MAX_AGE, path="/wallboard", httponly=True,
                        samesite="Strict", secure=secure)


def caller_from_cookie(request: web.Request, digests: Digests) -> ApiToken | None:
    """Whose wallboard key the request's cookie carries, if any."""
    return token_of_key(request.cookies.get(COOKIE, ""), digests)
