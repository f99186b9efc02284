"""End to end: line health probes through the real carrier loop (world) and back."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pbx_bridge.config import load_settings
from pbx_bridge.probes import CHANNEL_PREFIX
from tests.support.calls import fetch
from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import REPO, DevEnv
from tests.support.ops import api_token, ops
from tests.support.world import connect_world

pytestmark = pytest.mark.e2e


@pytest.fixture
async def line(devenv: DevEnv) -> AsyncIterator[object]:
    """Set the carrier's line mode for the test (ok, drop, reject, delay:N); restored after."""
    async def set_mode(mode: str) -> None:
        async with connect_world(devenv) as world:
            await world.action({"Action": "DBPut", "Family": "line", "Key": "mode", "Val": mode})
    yield set_mode
    await set_mode("ok")


def cli_probe(config: Path) -> tuple[int, str]:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "pbx-bridge"), "probe", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


async def test_manual_probe_on_a_healthy_line(bridge: BridgeProcess, devenv: DevEnv, line: object) -> None:
    code, output = await asyncio.to_thread(cli_probe, devenv.config_path)
    assert code == 0, output
    assert "attempt 1: ok" in output and "line healthy" in output
    [row] = await fetch(devenv.dsn, "SELECT * FROM line_probes ORDER BY id DESC LIMIT 1")
    assert (row["outcome"], row["trigger"], row["attempt"]) == ("ok", "manual", 1)
    assert 0 <= row["delay_ms"] < 2000
    [started] = await fetch(devenv.dsn, "SELECT is_probe FROM calls WHERE linkedid = $1", row["linkedid"])
    assert started["is_probe"] is True  # a probe from its first row: never counted as a customer call
    for _ in range(50):  # the PBX hangs the probe up after 1 s
        [call] = await fetch(devenv.dsn, "SELECT * FROM calls WHERE linkedid = $1", row["linkedid"])
        if call["ended_at"] is not None:
            break
        await asyncio.sleep(0.1)
    assert call["is_probe"] is True and call["answered_by"] == "pbx-bridge-probe"
    legs = await fetch(devenv.dsn, "SELECT endpoint FROM call_legs WHERE linkedid = $1", row["linkedid"])
    assert legs == [], "no agent phone rang for the probe"
    assert not bridge.events("guard_hangup")  # the probe's own outbound call is not a leak


async def channel_start(devenv: DevEnv, uniqueid: str) -> dict[str, Any]:
    """The CEL CHAN_START row of a channel (waiting briefly for cel_pgsql)."""
    for _ in range(50):
        rows = await fetch(devenv.dsn, "SELECT channame, cid_name FROM cel WHERE uniqueid = $1 "
                                       "AND eventtype = 'CHAN_START'", uniqueid)
        if rows:
            return dict(rows[0])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no CHAN_START in cel for {uniqueid}")


async def test_the_probe_leaves_on_the_ordinary_line_and_comes_back_on_the_hotline_trunk(
        bridge: BridgeProcess, devenv: DevEnv, line: object) -> None:
    """The 400 line never dials out: the probe's outbound channel is on [probe] trunk (pstn), never on
    the hotline trunk (carrier); it still arrives on the hotline trunk, recognised by its nonce."""
    settings = load_settings(devenv.config_path)
    assert (settings.probe_trunk, settings.hotline.trunk) == ("pstn", "carrier")
    await asyncio.sleep(5.2)  # manual probes are rate limited (5 s in the sandbox config)
    [mark] = await fetch(devenv.dsn, "SELECT coalesce(max(id), 0) AS id FROM cel")
    code, output = await asyncio.to_thread(cli_probe, devenv.config_path)
    assert code == 0, output
    [row] = await fetch(devenv.dsn, "SELECT * FROM line_probes ORDER BY id DESC LIMIT 1")
    assert (row["outcome"], row["attempt"]) == ("ok", 1)
    inbound = await channel_start(devenv, row["linkedid"])
    assert inbound["channame"].startswith("PJSIP/carrier-"), "the probe arrives on the hotline trunk"
    nonce = "".join(c for c in inbound["cid_name"] if c in "0123456789abcdef")  # as the dialplan reads it
    outbound = await channel_start(devenv, CHANNEL_PREFIX + nonce)  # the Originate's ChannelId
    assert outbound["channame"].startswith("PJSIP/pstn-"), outbound["channame"]
    probes_out = await fetch(devenv.dsn, "SELECT channame FROM cel WHERE id > $1 AND eventtype = 'CHAN_START' "
                                         "AND uniqueid LIKE 'pbx-bridge-probe-%'", mark["id"])
    assert probes_out and not [r for r in probes_out if r["channame"].startswith("PJSIP/carrier-")], probes_out
    requested = bridge.events("line_probe_requested")
    assert requested and requested[-1]["trunk"] == "pstn"
    assert {e["trunk"] for e in bridge.events("line_probes_on")} == {"pstn"}
    assert not bridge.events("probe_uses_hotline_trunk")
    assert not bridge.events("guard_hangup")
    _, health = await ops(devenv, "GET", "/healthz")
    assert health["components"]["probes"] == {"ok": True, "enabled": True, "trunk": "pstn", "hotline_trunk": False}
    [call] = await fetch(devenv.dsn, "SELECT is_probe FROM calls WHERE linkedid = $1", row["linkedid"])
    assert call["is_probe"] is True


@pytest.mark.parametrize(("mode", "outcome"), [("drop", "no_arrival"), ("reject", "dial_failed"),
                                               ("delay:14", "timeout")])
async def test_a_broken_line_is_retried_once_then_alerted(bridge: BridgeProcess, devenv: DevEnv, line: object,
                                                          mode: str, outcome: str) -> None:
    await line(mode)  # type: ignore[operator]
    await asyncio.sleep(5.2)  # manual probes are rate limited (5 s in the sandbox config)
    code, output = await asyncio.to_thread(cli_probe, devenv.config_path)
    assert code == 1, output
    assert f"attempt 1: {outcome}" in output and f"attempt 2: {outcome}" in output
    assert f"line NOT healthy: {outcome}" in output
    failed = bridge.wait_for("line_probe_failed", 5, outcome=outcome)
    assert failed[-1]["attempts"] == 2
    await line("ok")  # type: ignore[operator]
    await asyncio.sleep(5.2)
    assert (await asyncio.to_thread(cli_probe, devenv.config_path))[0] == 0
    assert bridge.events("line_probe_recovered")


async def test_probe_requests_need_the_token_take_no_number_and_coalesce(bridge: BridgeProcess,
                                                                         devenv: DevEnv) -> None:
    await asyncio.sleep(5.2)
    assert (await ops(devenv, "POST", "/probes"))[0] == 401
    status, body = await ops(devenv, "POST", "/probes", {"number": "13800138000"}, token=api_token())
    assert status == 422 and "takes no parameters" in body["error"]
    results = await asyncio.gather(*(ops(devenv, "POST", "/probes", token=api_token()) for _ in range(30)))
    accepted = [b for s, b in results if s == 202]
    assert len({b["id"] for b in accepted}) == 1, "30 rapid requests start at most one probe"
    assert sum(b["started"] for b in accepted) == 1
    probe_id = accepted[0]["id"]
    for _ in range(60):
        status, run = await ops(devenv, "GET", f"/probes/{probe_id}", role="ops")
        if run["status"] != "running":
            break
        await asyncio.sleep(0.5)
    assert run["status"] == "ok"
    assert (await ops(devenv, "GET", "/probes/nope"))[0] == 401
    assert (await ops(devenv, "GET", f"/probes/{probe_id}", role="agent"))[0] == 403
    assert (await ops(devenv, "GET", "/probes/nope", role="ops"))[0] == 404


async def test_daily_probe_fires_at_eight(bridge: BridgeProcess, devenv: DevEnv, tmp_path: Path) -> None:
    bridge.stop()  # one daemon at a time on the PBX: the module's would probe too
    config = derived_config(devenv.config_path, tmp_path / "daily.toml", 18411)
    process = BridgeProcess(config, business_time="2026-11-24T07:59:55+08:00")
    await asyncio.to_thread(process.start)
    try:
        [attempt] = await asyncio.to_thread(process.wait_for, "line_probe_requested", 15, trigger="daily")
        await asyncio.to_thread(process.wait_for, "line_probe_attempt", 15, probe_id=attempt["probe_id"])
    finally:
        assert await asyncio.to_thread(process.stop) == 0


async def test_quiet_line_probe_fires_in_open_hours_only(devenv: DevEnv, tmp_path: Path) -> None:
    config = derived_config(devenv.config_path, tmp_path / "quiet.toml", 18412)
    config.write_text(config.read_text().replace("[probe]\n", "[probe]\nquiet_minutes = 0.1\n"))
    process = BridgeProcess(config, business_time="2026-11-24T10:00:00+08:00")
    await asyncio.to_thread(process.start)
    try:
        await asyncio.to_thread(process.wait_for, "line_probe_requested", 20, trigger="quiet")
    finally:
        assert await asyncio.to_thread(process.stop) == 0
    night = BridgeProcess(config, business_time="2026-11-24T20:00:00+08:00")
    await asyncio.to_thread(night.start)
    try:
        await asyncio.sleep(10)
        assert not night.events("line_probe_requested"), "no quiet probe after hours"
    finally:
        assert await asyncio.to_thread(night.stop) == 0
