"""Talk to the running daemon's ops API (end-to-end tests)."""

from __future__ import annotations

import json
import tomllib
from typing import Any, Literal

from aiohttp import ClientSession, ClientTimeout

from tests.support.env import STATE, DevEnv


def api_base(env: DevEnv) -> str:
    listen = tomllib.loads(env.config_path.read_text())["api"]["listen"]
    return f"http://{listen}"


Role = Literal["ops", "agent", "viewer"]


def api_token(role: Role = "ops") -> str:
    """The sandbox's token of `role` (scripts/devenv.py writes one per role: .state/api-<role>.token)."""
    return (STATE / f"api-{role}.token").read_text().strip()


async def ops(env: DevEnv, method: str, path: str, body: Any = None, token: str | None = None,
              role: Role | None = None) -> tuple[int, Any]:
    """Call the daemon's API with `token`, or with the sandbox's token of `role`; neither: no token."""
    token = token or (api_token(role) if role else None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.request(
            method, api_base(env) + path, data=None if body is None else json.dumps(body),
            headers=headers) as response:
        return response.status, await response.json()


async def ops_text(env: DevEnv, path: str) -> tuple[int, str]:
    """GET a text resource (e.g. /metrics)."""
    async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.get(api_base(env) + path) as response:
        return response.status, await response.text()
