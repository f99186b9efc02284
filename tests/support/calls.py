"""Wait for call rows in PostgreSQL (end-to-end tests and the demo)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg


async def finished_calls(dsn: str, numbers: list[str], timeout: float) -> dict[str, list[asyncpg.Record]]:
    """Wait until every caller number has a finished call row; return all rows per number."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT * FROM calls WHERE caller_number = ANY($1::text[]) ORDER BY started_at", numbers)
            by_number: dict[str, list[asyncpg.Record]] = {n: [] for n in numbers}
            for row in rows:
                by_number[row["caller_number"]].append(row)
            if all(any(r["ended_at"] is not None for r in v) for v in by_number.values()):
                return by_number
            if time.monotonic() > deadline:
                missing = [n for n, v in by_number.items() if not v or v[-1]["ended_at"] is None]
                raise AssertionError(f"no finished call row within {timeout} s for {missing}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def one_call(dsn: str, number: str, timeout: float) -> asyncpg.Record:
    """The single finished call row of `number` (fails if there are several)."""
    rows = (await finished_calls(dsn, [number], timeout))[number]
    assert len(rows) == 1, f"expected exactly one row for {number}, got {len(rows)}"
    return rows[0]


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a short-lived connection (jsonb comes back decoded)."""
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()
