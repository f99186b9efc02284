"""End to end: an agent transfers a hotline call to a colleague by SIP REFER (the world's phone
sends it), and the record follows the call: the first answerer stays `answered_by` (首问负责制),
each transfer is a leg, `transferred_to` names who had the caller at the end, and the talk is
the caller's whole talk. A transfer to an outside number is refused and recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.world import IGNORE, World, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

OPEN = "2026-11-24T10:00:00+08:00"  # a Tuesday morning: the agent group rings


@pytest.fixture
async def open_hours(devenv: DevEnv) -> AsyncIterator[BridgeProcess]:
    process = BridgeProcess(devenv.config_path, business_time=OPEN)
    await asyncio.to_thread(process.start)
    yield process
    assert await asyncio.to_thread(process.stop) == 0


def refer_to(devenv: DevEnv, extension: str) -> str:
    return f"sip:{extension}@{devenv.sandbox['pbx_ip']}:{devenv.sandbox['sip_port']}"


async def answered_by_agent101(world: World, devenv: DevEnv, bridge: BridgeProcess, number: str,
                               ring: float) -> None:
    """A caller rings; agent101 answers after `ring` s and stays on until transferred."""
    await world.set_phone(number, "agent101", answer(ring, 120))
    await world.set_phone(number, "agent102", IGNORE)
    await world.call(devenv.hotline_numbers[0], number, "转接客户")
    await asyncio.to_thread(bridge.wait_for, "call_started", 10, caller=number)
    await asyncio.sleep(ring + 0.3)


async def legs(devenv: DevEnv, linkedid: str) -> list[Any]:
    return await fetch(devenv.dsn, "SELECT * FROM call_legs WHERE linkedid = $1 ORDER BY dial_started_at", linkedid)


async def test_blind_transfer_to_a_colleague(open_hours: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent103", answer(6, 5))
        await answered_by_agent101(world, devenv, open_hours, number, ring=4)
        await asyncio.sleep(3 - 0.3)  # talks 3 s
        await world.transfer("agent101", number, refer_to(devenv, "103"))
    row = await one_call(devenv.dsn, number, timeout=30)
    assert (row["disposition"], row["answered_by"], row["transferred_to"]) == ("answered", "agent101", "agent103")
    assert row["rings"] == 1 and abs(float(row["ring_seconds"]) - 4) <= 0.5
    assert abs(float(row["talk_seconds"]) - 8) <= 1.0, row["talk_seconds"]  # 3 s with agent101, 5 s with agent103
    by_endpoint = {leg["endpoint"]: leg for leg in await legs(devenv, row["linkedid"])}
    moved = by_endpoint["agent103"]
    assert (moved["stage"], moved["transfer_kind"], moved["transferred_by"]) == ("transfer", "blind", "agent101")
    assert abs((moved["answered_at"] - moved["dial_started_at"]).total_seconds() - 6) <= 0.5
    assert abs(float(moved["talk_seconds"]) - 5) <= 0.5
    assert abs(float(by_endpoint["agent101"]["talk_seconds"]) - 3) <= 1.0
    [log] = await fetch(devenv.dsn, "SELECT transfers FROM v_call_log WHERE linkedid = $1", row["linkedid"])
    assert log["transfers"] == "agent101 → agent103"
    violations = await fetch(devenv.dsn, "SELECT kind FROM policy_violations WHERE linkedid = $1", row["linkedid"])
    assert violations == []


async def test_an_unanswered_transfer_goes_back_to_the_agent(open_hours: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await answered_by_agent101(world, devenv, open_hours, number, ring=2)
        await world.set_phone(number, "agent101", answer(2, 4))  # when the call comes back to it
        await world.transfer("agent101", number, refer_to(devenv, "102"))  # agent102 never answers
    row = await one_call(devenv.dsn, number, timeout=60)
    assert (row["disposition"], row["answered_by"], row["transferred_to"]) == ("answered", "agent101", None)
    chain = [(leg["endpoint"], leg["stage"], leg["answered_at"] is not None)
             for leg in await legs(devenv, row["linkedid"])]
    assert chain[-2:] == [("agent102", "transfer", False), ("agent101", "transfer_return", True)]
    [log] = await fetch(devenv.dsn, "SELECT transfers FROM v_call_log WHERE linkedid = $1", row["linkedid"])
    assert log["transfers"] == "agent101 → agent102 (未接), agent102 → agent101"


async def test_a_transfer_to_an_outside_number_is_refused_and_recorded(open_hours: BridgeProcess,
                                                                       devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await answered_by_agent101(world, devenv, open_hours, number, ring=2)
        await world.set_phone(number, "agent101", answer(1, 2))  # the call comes back to it
        await world.transfer("agent101", number, refer_to(devenv, "13800138000"))
    row = await one_call(devenv.dsn, number, timeout=40)
    assert (row["answered_by"], row["transferred_to"]) == ("agent101", None)
    [violation] = await fetch(devenv.dsn, "SELECT kind, details FROM policy_violations WHERE linkedid = $1",
                              row["linkedid"])
    assert violation["kind"] == "outbound_attempt"
    assert (violation["details"]["via"], violation["details"]["extension"], violation["details"]["digits"]) == (
        "transfer", "agent101", "13800138000")
    # Nothing left the PBX for it: no channel of the call on a trunk but the caller's own
    trunks = await fetch(devenv.dsn, "SELECT DISTINCT channame FROM cel WHERE linkedid = $1 "
                                     "AND eventtype = 'CHAN_START' "
                                     "AND (channame LIKE 'PJSIP/carrier-%' OR channame LIKE 'PJSIP/pstn-%')",
                         row["linkedid"])
    assert len(trunks) == 1 and trunks[0]["channame"].startswith("PJSIP/carrier-")  # the caller's inbound channel


async def test_attended_transfer_after_consulting_a_colleague(open_hours: BridgeProcess, devenv: DevEnv) -> None:
    """agent101 answers, consults agent102 (who answers after 2 s), then hands the caller over."""
    number = new_caller_number()
    pbx = f"{devenv.sandbox['pbx_ip']}:{devenv.sandbox['sip_port']}"
    async with connect_world(devenv) as world:
        await answered_by_agent101(world, devenv, open_hours, number, ring=3)
        await world.set_phone("agent101", "agent102", answer(2, 120))  # the consultation (from agent101)
        await world.dial_out("agent101", "102")
        await asyncio.sleep(2 + 2)  # agent102 answers after 2 s; they talk
        await world.attended_transfer("agent101", number, "102", pbx)
        await asyncio.sleep(4)  # the caller talks with agent102
        await world.hang_up_caller(number)
    row = await one_call(devenv.dsn, number, timeout=30)
    assert (row["disposition"], row["answered_by"], row["transferred_to"]) == ("answered", "agent101", "agent102")
    assert abs(float(row["ring_seconds"]) - 3) <= 0.5
    by_endpoint = {leg["endpoint"]: leg for leg in await legs(devenv, row["linkedid"])}
    moved = by_endpoint["agent102"]
    assert (moved["stage"], moved["transfer_kind"], moved["transferred_by"]) == ("transfer", "attended", "agent101")
    assert abs((moved["answered_at"] - moved["dial_started_at"]).total_seconds() - 2) <= 0.5  # the consultation
    assert abs(float(moved["talk_seconds"]) - 4) <= 1.0  # with the caller, from the transfer
    [log] = await fetch(devenv.dsn, "SELECT transfers FROM v_call_log WHERE linkedid = $1", row["linkedid"])
    assert log["transfers"] == "agent101 → agent102"
    # the consultation itself was an internal call: no outbound attempt, no other record
    assert await fetch(devenv.dsn, "SELECT kind FROM policy_violations WHERE linkedid = $1", row["linkedid"]) == []
