"""End to end: Asterisk crashes or freezes under pbx-bridge. It notices (a dropped socket, an
unanswered ping), reconnects with backoff, re-reads the live channels, says which call it
lost, and keeps recording."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC

import pytest

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import REPO, STATE, DevEnv
from tests.support.world import IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e


def pbx_pid() -> int:
    return int((STATE / "sandbox" / "pbx.pid").read_text())


def restart_sandbox() -> None:
    port = os.environ.get("PBX_BRIDGE_PG_PORT", "15432")
    subprocess.run([sys.executable, str(REPO / "docker" / "asterisk" / "sandbox.py"), "start", "--state",
                    str(STATE / "sandbox"), "--pg-port", port, "--extra", str(STATE / "pbx-generated")],
                   check=True, capture_output=True)


async def talking_call(bridge: BridgeProcess, devenv: DevEnv, talk: float) -> tuple[str, str]:
    """Place a call that agent101 answers after 1 s; return (caller number, linkedid) once talking."""
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", answer(1, talk))
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "通话中")
    [started] = await asyncio.to_thread(bridge.wait_for, "call_started", 10, caller=number)
    await asyncio.sleep(2)  # answered after 1 s, now talking
    return number, str(started["linkedid"])


async def test_asterisk_crash_mid_call(bridge: BridgeProcess, devenv: DevEnv) -> None:
    _, linkedid = await talking_call(bridge, devenv, talk=60)
    sessions = len(bridge.events("ami_connected"))
    published = len(bridge.events("routing_state_published"))

    os.kill(pbx_pid(), signal.SIGKILL)  # no hangup events: the call's end is never seen
    await asyncio.to_thread(bridge.wait_for, "ami_disconnected", 10)
    await asyncio.to_thread(restart_sandbox)
    await asyncio.to_thread(bridge.wait_for, "ami_connected", 30, sessions + 1)
    await asyncio.to_thread(bridge.wait_for, "routing_state_published", 10, published + 1)  # republished
    lost = await asyncio.to_thread(bridge.wait_for, "call_lost_in_ami_gap", 10)
    assert linkedid in [e["linkedid"] for e in lost]
    # Asterisk wrote no end (no HANGUP, no LINKEDID_END in CEL): once it no longer lists the call's
    # channels, the reconcile closes the record at the call's last CEL event, from CEL's facts.
    await asyncio.to_thread(bridge.wait_for, "call_reconciled_from_cel", 20, linkedid=linkedid)
    [row] = await fetch(devenv.dsn, "SELECT * FROM calls WHERE linkedid = $1", linkedid)
    [last] = await fetch(devenv.dsn, "SELECT max(eventtime) AS at FROM cel WHERE linkedid = $1", linkedid)
    assert (row["source"], row["disposition"], row["answered_by"]) == ("cel", "answered", "agent101")
    assert row["ended_at"] == last["at"].replace(tzinfo=UTC)

    after = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(after, "agent102", answer(2, 1))
        await world.call(devenv.hotline_numbers[0], after, "重启之后")
    row = await one_call(devenv.dsn, after, timeout=30)
    assert row["disposition"] == "answered" and row["answered_by"] == "agent102"


async def test_frozen_asterisk_is_detected_by_ping_and_the_call_is_still_recorded(
        bridge: BridgeProcess, devenv: DevEnv) -> None:
    number, linkedid = await talking_call(bridge, devenv, talk=20)
    sessions = len(bridge.events("ami_connected"))
    pid = pbx_pid()
    os.kill(pid, signal.SIGSTOP)  # the socket stays open, but nothing answers
    try:
        await asyncio.to_thread(bridge.wait_for, "ami_ping_unanswered", 20)
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.to_thread(bridge.wait_for, "ami_connected", 30, sessions + 1)
    # The call survived the freeze; the snapshot kept it, and its end is recorded normally.
    row = await one_call(devenv.dsn, number, timeout=40)
    assert row["linkedid"] == linkedid
    assert row["disposition"] == "answered" and row["answered_by"] == "agent101"
    assert not [e for e in bridge.events("call_lost_in_ami_gap") if e["linkedid"] == linkedid]
