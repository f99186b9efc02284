"""End to end: the 400 line is never used to dial out (禁止在任何时间以任何理由外拨).

First line: the hotline phones' context has no route to a trunk; an attempt is refused and
recorded. Second line: pbx-bridge hangs up, within 250 ms, any outbound channel on the
hotline trunk the system did not start (proved with a deliberately leaky sandbox context).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.support.calls import fetch
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.world import answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e


async def violations_for(dsn: str, key: str, value: str, since: datetime,
                         timeout: float = 15) -> list[asyncpg.Record]:
    """This test's outbound_attempt violations: detail `key` = `value`, occurred after `since`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await fetch(dsn, "SELECT * FROM policy_violations WHERE kind = 'outbound_attempt' "
                                "AND details ->> $1 = $2 AND occurred_at >= $3 ORDER BY id", key, value, since)
        if rows:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no outbound_attempt violation with {key} = {value}")
        await asyncio.sleep(0.2)


async def test_a_hotline_phone_dialling_out_is_refused_and_recorded(bridge: BridgeProcess,
                                                                   devenv: DevEnv) -> None:
    digits, since = new_caller_number(), datetime.now(UTC)
    async with connect_world(devenv) as world:
        await world.set_phone("agent101", digits, answer(1, 5))  # the outside number would answer
        await world.dial_out("agent101", digits)
    [row] = await violations_for(devenv.dsn, "digits", digits, since)
    assert row["details"]["extension"] == "agent101"
    assert row["details"]["stopped_by"] == "dialplan"
    await asyncio.sleep(1)
    trunk_legs = await fetch(devenv.dsn, "SELECT 1 FROM cel WHERE linkedid = $1 AND eventtype = 'CHAN_START' "
                                         "AND channame LIKE 'PJSIP/carrier-%'", row["linkedid"])
    assert trunk_legs == [], "the refused dial never reached the trunk"


async def test_the_guard_hangs_up_a_leaked_outbound_call_within_250_ms(bridge: BridgeProcess,
                                                                     devenv: DevEnv) -> None:
    digits, since = new_caller_number(), datetime.now(UTC)
    async with connect_world(devenv) as world:
        await world.set_phone("leaky", digits, answer(3, 5))  # would connect after 3 s if not stopped
        await world.dial_out("leaky", digits)
    await asyncio.to_thread(bridge.wait_for, "guard_hangup_done", 10)
    [row] = await violations_for(devenv.dsn, "stopped_by", "guard", since)
    channel = row["details"]["channel"]
    await asyncio.sleep(1)  # CEL rows of the hangup
    # channel names restart after an Asterisk restart: the Linkedid makes them this call's
    cel = {r["eventtype"]: r["eventtime"] for r in await fetch(
        devenv.dsn, "SELECT eventtype, eventtime FROM cel WHERE channame = $1 AND linkedid = $2",
        channel, row["linkedid"])}
    lived = (cel["HANGUP"] - cel["CHAN_START"]).total_seconds()
    assert lived < 0.25, f"the leaked channel lived {lived * 1000:.0f} ms"
    assert "ANSWER" not in cel
