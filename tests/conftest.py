"""Shared fixtures: the local environment (make env), a scratch database, the running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest

from pbx_bridge.storage.migrations import migrate, sql_dir
from tests.support.env import DevEnv, load_devenv


@pytest.fixture(scope="session")
def devenv() -> DevEnv:
    """The sandbox and database set up by `make env`; an error (never a skip) when absent."""
    return load_devenv()


@contextlib.contextmanager
def scratch_database(devenv: DevEnv, label: str = "it",
                     seed: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> Iterator[str]:
    """A freshly migrated database of its own on the private cluster (then `seed`ed), dropped afterwards."""
    name = f"pbx_bridge_{label}_{secrets.token_hex(4)}"
    admin = devenv.dsn.rsplit("/", 1)[0] + "/postgres"
    dsn = devenv.dsn.rsplit("/", 1)[0] + f"/{name}"

    async def create() -> None:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        # The database of a single PBX named "pbx" (the sandbox's systemname): what its sessions
        # write for unless they say otherwise (the daemon's always do, see pbx_bridge/pbx.py).
        await conn.execute(f'ALTER DATABASE "{name}" SET pbx_bridge.pbx = \'pbx\'')
        await conn.close()
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, sql_dir())
            if seed is not None:
                await seed(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(create())
    try:
        yield dsn
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def scratch_dsn(devenv: DevEnv) -> Iterator[str]:
    """A freshly migrated database shared by the session's integration tests."""
    with scratch_database(devenv) as dsn:
        yield dsn
