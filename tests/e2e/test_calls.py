"""End to end: a real SIP call into the real Asterisk becomes one correct row in PostgreSQL.

world (the carrier, callers and phones) -> SIP -> pbx (Asterisk 22, the repo's dialplan)
-> AMI -> the real `pbx-bridge run` process -> PostgreSQL. Each test uses its own caller
numbers, so the tests share one daemon and one database without seeing each other's rows.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.calls import fetch, finished_calls, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv
from tests.support.world import IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

QUOTED_NAME = 'Robert "Bob" ;-- \\ O\'Brien'


async def test_agent_answers_after_7s_and_talks_4s(bridge: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", answer(7, 4))
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "张三客户")
    row = await one_call(devenv.dsn, number, timeout=30)
    assert row["disposition"] == "answered"
    assert row["did"] == devenv.hotline_numbers[0]
    assert row["rings"] == 2
    assert row["within_ring_limit"] is True
    assert float(row["ring_seconds"]) == pytest.approx(7, abs=0.5)
    assert row["answered_by"] == "agent101"
    assert float(row["talk_seconds"]) == pytest.approx(4, abs=0.5)
    assert row["caller_name"] == "张三客户"
    assert row["source"] == "ami" and row["is_probe"] is False
    legs = await fetch(devenv.dsn, "SELECT endpoint, dial_status FROM call_legs WHERE linkedid = $1",
                       row["linkedid"])
    assert sorted((r["endpoint"], r["dial_status"]) for r in legs) == [("agent101", "ANSWER"),
                                                                        ("agent102", "CANCEL")]
    # Asterisk's own durable trail of the same call, for reconciliation (cel_pgsql).
    cel = await fetch(devenv.dsn, "SELECT eventtype, cid_name FROM cel WHERE linkedid = $1", row["linkedid"])
    assert "LINKEDID_END" in {r["eventtype"] for r in cel}
    assert "张三客户" in {r["cid_name"] for r in cel}


async def test_agent_answers_after_17s_breaches_the_ring_limit(bridge: BridgeProcess, devenv: DevEnv) -> None:
    # The group rings 15 s (three rings), then escalation rings every phone; agent103, a phone
    # only in the escalation, answers 2 s into it: 17 s of ringing in all.
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", IGNORE)
        await world.set_phone(number, "agent102", IGNORE)
        await world.set_phone(number, "agent103", answer(2, 1))
        await world.call(devenv.hotline_numbers[0], number, "李四")
    row = await one_call(devenv.dsn, number, timeout=35)
    assert row["disposition"] == "answered"
    assert row["rings"] == 4
    assert row["within_ring_limit"] is False
    assert row["answered_by"] == "agent103"
    assert row["answered_stage"] == "escalation"
    assert float(row["ring_seconds"]) == pytest.approx(17, abs=0.5)


async def test_caller_hangs_up_after_6s_of_ringing(bridge: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", IGNORE)
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[1], number, QUOTED_NAME, patience=6)
    row = await one_call(devenv.dsn, number, timeout=25)
    assert row["disposition"] == "abandoned"
    assert row["answered_at"] is None and row["answered_by"] is None
    assert row["did"] == devenv.hotline_numbers[1]
    assert float(row["ring_seconds"]) == pytest.approx(6, abs=0.5)
    assert row["within_ring_limit"] is None


async def test_caller_names_are_stored_exactly(bridge: BridgeProcess, devenv: DevEnv) -> None:
    names = {new_caller_number(): "张三客户", new_caller_number(): QUOTED_NAME,
             new_caller_number(): "王小明 \\\\ ;-- DROP TABLE calls; '\"'"}
    async with connect_world(devenv) as world:
        for number, name in names.items():
            await world.set_phone(number, "agent101", answer(1, 1))
            await world.call(devenv.hotline_numbers[0], number, name)
    rows = await finished_calls(devenv.dsn, list(names), timeout=25)
    assert {number: found[0]["caller_name"] for number, found in rows.items()} == names


async def test_twenty_concurrent_calls_make_twenty_correct_rows(bridge: BridgeProcess, devenv: DevEnv) -> None:
    plans: dict[str, tuple[str, float]] = {}
    answer_after = (1.0, 2.5, 4.0, 6.5, 8.0)  # at least 1 s from a ring boundary (5 s, 10 s)
    async with connect_world(devenv) as world:
        for i in range(20):
            number = new_caller_number()
            after = answer_after[i % len(answer_after)]
            phone = "agent101" if i % 2 == 0 else "agent102"
            plans[number] = (phone, after)
            await world.set_phone(number, phone, answer(after, 2))
            await world.set_phone(number, "agent102" if phone == "agent101" else "agent101", IGNORE)
        await asyncio.gather(*(world.call(devenv.hotline_numbers[0], number, f"并发{n}")
                               for n, number in enumerate(plans)))
    rows = await finished_calls(devenv.dsn, list(plans), timeout=40)
    assert all(len(found) == 1 for found in rows.values()), "one row per call, no duplicates"
    for number, (phone, after) in plans.items():
        row = rows[number][0]
        assert row["disposition"] == "answered", number
        assert row["answered_by"] == phone, number
        assert float(row["ring_seconds"]) == pytest.approx(after, abs=0.5), number
        assert row["rings"] == int(after // 5) + 1, number
        assert float(row["talk_seconds"]) == pytest.approx(2, abs=0.5), number
    assert len({rows[n][0]["linkedid"] for n in plans}) == 20


async def test_a_call_to_another_did_makes_no_row(bridge: BridgeProcess, devenv: DevEnv) -> None:
    other, control = new_caller_number(), new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(other, "reception", answer(1, 1))
        await world.call(devenv.other_number, other, "不是热线")
        await asyncio.sleep(3)  # the non-hotline call rings, is answered and ends meanwhile
        await world.set_phone(control, "agent101", answer(1, 1))
        await world.call(devenv.hotline_numbers[0], control, "control")
    await one_call(devenv.dsn, control, timeout=20)  # the daemon was watching all along
    assert await fetch(devenv.dsn, "SELECT 1 FROM calls WHERE caller_number = $1", other) == []
    cel = await fetch(devenv.dsn, "SELECT 1 FROM cel WHERE cid_num = $1", other)
    assert cel, "the other call did go through the PBX"


async def test_no_answer_in_three_rings_escalates_and_the_violation_is_recorded_while_ringing(
        bridge: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", IGNORE)
        await world.set_phone(number, "agent102", IGNORE)
        await world.set_phone(number, "agent103", answer(7, 1))  # 15 s group + 7 s: ring 5
        await world.call(devenv.hotline_numbers[0], number, "等了五声")
    [started] = await asyncio.to_thread(bridge.wait_for, "call_started", 10, caller=number)
    linkedid = started["linkedid"]
    await asyncio.sleep(17.5)  # past the limit (15 s), before the answer (22 s)
    early = await fetch(devenv.dsn, "SELECT kind, occurred_at FROM policy_violations WHERE linkedid = $1", linkedid)
    answered_yet = await fetch(devenv.dsn, "SELECT answered_at FROM calls WHERE linkedid = $1", linkedid)
    assert [r["kind"] for r in early] == ["ring_limit"]
    assert answered_yet[0]["answered_at"] is None
    row = await one_call(devenv.dsn, number, timeout=20)
    assert (row["disposition"], row["answered_by"], row["answered_stage"]) == ("answered", "agent103", "escalation")
    assert row["rings"] == 5 and row["within_ring_limit"] is False
    assert early[0]["occurred_at"] < row["answered_at"]
    assert float((early[0]["occurred_at"] - row["ring_started_at"]).total_seconds()) == pytest.approx(15, abs=0.01)
