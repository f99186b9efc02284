"""End to end: /healthz follows AMI and the database down and back; /calls/live shows a real
ringing call."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import REPO, STATE, DevEnv
from tests.support.ops import ops, ops_text
from tests.support.world import IGNORE, connect_world, new_caller_number

pytestmark = pytest.mark.e2e


async def health_becomes(env: DevEnv, status: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await ops(env, "GET", "/healthz")
        if code == status:
            return dict(body)
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz stayed {code}: {body}")
        await asyncio.sleep(0.5)


async def test_healthz_follows_ami_down_and_back(bridge: BridgeProcess, devenv: DevEnv) -> None:
    body = await health_becomes(devenv, 200, 10)
    assert body["components"]["ami"]["ok"] and body["components"]["routing_state"]["ok"]
    # No [pbx] name in the sandbox's configuration: the rows are named after Asterisk's systemname.
    assert body["components"]["pbx"] == {"ok": True, "name": "pbx", "system_name": "pbx",
                                         "from": "Asterisk's systemname"}
    pid = int((STATE / "sandbox" / "pbx.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        body = await health_becomes(devenv, 503, 30)  # ping unanswered -> reconnecting
        assert body["components"]["ami"]["ok"] is False
    finally:
        os.kill(pid, signal.SIGCONT)
    await health_becomes(devenv, 200, 40)


async def test_healthz_follows_the_database_down_and_back(bridge: BridgeProcess, devenv: DevEnv) -> None:
    pg = [str(REPO / "scripts" / "pg.sh")]
    port = os.environ.get("PBX_BRIDGE_PG_PORT", "15432")
    await asyncio.to_thread(subprocess.run, [*pg, "stop", str(STATE / "pg")], check=True, capture_output=True)
    try:
        body = await health_becomes(devenv, 503, 15)
        assert body["components"]["database"]["ok"] is False and body["components"]["ami"]["ok"] is True
    finally:
        await asyncio.to_thread(subprocess.run, [*pg, "start", str(STATE / "pg"), port], check=True,
                                capture_output=True)
    await health_becomes(devenv, 200, 15)


async def test_calls_live_shows_a_ringing_call(bridge: BridgeProcess, devenv: DevEnv) -> None:
    number = new_caller_number()
    async with connect_world(devenv) as world:
        for phone in ("agent101", "agent102"):
            await world.set_phone(number, phone, IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "正在响", patience=8)
        await asyncio.sleep(4)
        assert (await ops(devenv, "GET", "/calls/live"))[0] == 401  # callers' names and numbers
        status, body = await ops(devenv, "GET", "/calls/live", role="viewer")
    [call] = [c for c in body["calls"] if c["caller_number"] == number]
    assert status == 200 and call["state"] == "ringing" and call["stage"] == "group"
    assert 3 < call["ring_seconds"] < 6 and call["caller_name"] == "正在响"


@pytest.mark.parametrize("attempt", [1, 2, 3])  # it was a race: repeat it
def test_a_failing_task_stops_the_daemon_at_once_with_the_reason(devenv: DevEnv, attempt: int,
                                                                 tmp_path: Path) -> None:
    """Regression: a task failing during AMI login used to leave the daemon hanging forever
    (Python 3.11's wait_for lost the TaskGroup's cancellation)."""
    import socket

    config = derived_config(devenv.config_path, tmp_path / "busy.toml", 18413)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 18413))  # the daemon's API port, taken
        blocker.listen()
        started = time.monotonic()
        result = subprocess.run([str(REPO / ".venv" / "bin" / "pbx-bridge"), "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert "pbx_bridge_failed" in result.stderr and "address already in use" in result.stderr


async def test_healthz_follows_the_trunks_qualify_state(bridge: BridgeProcess, devenv: DevEnv) -> None:
    async def trunk_ok(expected: bool, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, body = await ops(devenv, "GET", "/healthz")
            if body["components"]["trunk"]["ok"] is expected:
                return dict(body["components"]["trunk"])
            if time.monotonic() > deadline:
                raise AssertionError(f"trunk health stayed {body['components']['trunk']}")
            await asyncio.sleep(0.5)

    assert (await trunk_ok(True, 15))["qualify"] == "Reachable"
    world = int((STATE / "sandbox" / "world.pid").read_text())
    os.kill(world, signal.SIGSTOP)  # the carrier stops answering OPTIONS
    try:
        down = await trunk_ok(False, 30)
        assert down["qualify"] == "Unreachable"
        _, metrics_text = await ops_text(devenv, "/metrics")
        assert "pbx_bridge_trunk_reachable 0.0" in metrics_text
    finally:
        os.kill(world, signal.SIGCONT)
    await trunk_ok(True, 30)
