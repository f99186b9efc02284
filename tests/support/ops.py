"""Talk to the running daemon's ops API (end-to-end tests)."""

from __future__ import annotations

import json
import tomllib
from typing import Any

from aiohttp import ClientSession, ClientTimeout

from tests.support.env import STATE, DevEnv


def api_base(env: DevEnv) -> str:
    listen = tomllib.loads(env.config_path.read_text())["api"]["listen"]
    return f"http://{listen}"


def api_token() -> str:
    return (STATE / "api.token").read_text().strip()


async def ops(env: DevEnv, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with ClientSession(timeout=ClientTimeout(total=10)) as session, session.request(
            method, api_base(env) + path, data=None if body is None else json.dumps(body),
            headers=headers) as response:
        return response.status, await response.json()
