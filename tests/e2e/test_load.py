"""End to end under load, short: 50 calls placed at once through the sandbox; every one has exactly
one final record, as scripted, its ring time close to the script (`make load` is the long run)."""

from __future__ import annotations

import pytest

from tests.bench.load import percentile, run_load
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv

pytestmark = pytest.mark.e2e

BURST = 50


async def test_fifty_calls_at_once_are_recorded_once_each_as_scripted(bridge: BridgeProcess, devenv: DevEnv) -> None:
    assert bridge._process is not None
    result = await run_load(devenv, bridge._process.pid, BURST, rate=0, seconds=0, progress=lambda _: None)
    assert (result.lost, result.duplicated, result.wrong) == ([], [], [])
    assert result.placed == BURST and len(result.ring_errors) == BURST
    # `make load`'s goal is 100 ms at p99; a shared CI machine gets some slack here.
    assert percentile(result.ring_errors, 99) <= 0.25, sorted(result.ring_errors)[-5:]
    assert percentile(result.commit_delays, 99) <= 2.0, sorted(result.commit_delays)[-5:]
    # The database's load, measured from PostgreSQL's own counters: every call wrote its record
    # and its legs, Asterisk wrote its CEL rows, and it all went through the WAL.
    db = result.database
    print("database load of 50 calls:", {k: round(v) for k, v in db.items()})
    assert db["record_writes"] >= 2 * BURST and db["cel_rows"] >= 10 * BURST
    assert db["wal_bytes"] > 0 and db["transactions"] >= BURST
