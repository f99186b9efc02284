"""The PBX container of docker/asterisk/compose.yaml takes a real call from the sandbox's world; its record,
beside the sandbox's PBX in the same database (two real PBXs, two pbx-bridges, one database)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import REPO, DevEnv
from tests.support.world import IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

# The container shares the host's network beside the running sandbox, so nothing may clash:
# its own AMI port and RTP range, and SIP on the sandbox pbx's address but another port. The
# world instance identifies its pbx by address only, so it takes the container's calls to the
# agents' phones as the pbx's, and reaches the container through its trunk endpoint with an
# explicit URI: the sandbox's configuration is not changed at all.
AMI_PORT = 25038
SIP_IP, SIP_PORT = "127.0.10.1", 5070
RTP = (32000, 32999)
API_PORT = 18479
PROJECT = "pbx-bridge-container-test"
OPEN_HOURS = "2026-11-24T10:00:00+08:00"  # a Tuesday morning in Shanghai
PHONES = ("agent101", "agent102", "agent103")


def container_script() -> ModuleType:
    """scripts/container.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("pbx_container", REPO / "scripts" / "container.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)  # Asterisk reads the mounted files as its own user, not root


def render_site(site: Path, env: DevEnv, database: str, ami_secret: str, phone_secret: str) -> None:
    """The site files compose.yaml mounts (the shapes of site.example/), for this test's container."""
    s = env.sandbox
    carrier_ip, phones = str(s["world_carrier_ip"]), f"{s['world_phones_ip']}:{s['sip_port']}"
    site.mkdir(parents=True)
    dids = "\n".join(f"exten => {n},1,Goto(hotline,${{EXTEN}},1)" for n in env.hotline_numbers)
    write(site / "extensions_site.conf", f"""[globals](+)
HOTLINE_PHONES = PJSIP/agent101&PJSIP/agent102
HOTLINE_ESCALATION_PHONES = PJSIP/agent101&PJSIP/agent102&PJSIP/agent103
OTHER_DID_PHONES = PJSIP/reception

[hotline-dids](+)
{dids}

[hotline-extension-map](+)
exten => 101,1,Return(agent101)
exten => 102,1,Return(agent102)
exten => 103,1,Return(agent103)
""")
    phone_blocks = "".join(f"""
[{p}](hotline-phone)
aors = {p}
auth = {p}
[{p}]
type = auth
auth_type = userpass
username = {p}
password = {phone_secret}
[{p}]
type = aor
contact = sip:{p}@{phones}
""" for p in (*PHONES, "reception"))
    write(site / "pjsip_site.conf", f"""[transport-udp]
type = transport
protocol = udp
bind = {SIP_IP}:{SIP_PORT}

[carrier](hotline-trunk)
aors = carrier
[carrier]
type = aor
contact = sip:{carrier_ip}:{s['sip_port']}
[carrier]
type = identify
endpoint = carrier
match = {carrier_ip}
{phone_blocks}""")
    write(site / "manager_site.conf", f"""port = {AMI_PORT}

[pbx-bridge]
secret = {ami_secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = call,user,system
write = call,reporting,originate
writetimeout = 1000
#include "manager_pbx_bridge_filters.conf"
""")
    write(site / "cel_pgsql_site.conf",
          f"hostname = 127.0.0.1\nport = {os.environ.get('PBX_BRIDGE_PG_PORT', '15432')}\n"
          f"dbname = {database}\nuser = pbx_cel_app\npassword =\n")
    write(site / "rtp.conf", f"[general]\nrtpstart = {RTP[0]}\nrtpend = {RTP[1]}\n")
    write(site / "logger.conf", (REPO / "docker" / "asterisk" / "common" / "logger.conf").read_text())


def bridge_config(directory: Path, env: DevEnv, dsn: str, ami_secret: str) -> Path:
    """pbx-bridge's configuration for the container's AMI and the scratch database."""
    secret = directory / "ami.secret"
    secret.write_text(ami_secret + "\n")
    secret.chmod(0o600)
    numbers = ", ".join(f'"{n}"' for n in env.hotline_numbers)
    config = directory / "pbx-bridge.toml"
    config.write_text(f"""timezone = "Asia/Shanghai"

[ami]
host = "127.0.0.1"
port = {AMI_PORT}
username = "pbx-bridge"
secret_file = "{secret}"
ping_interval_seconds = 5.0

[database]
dsn = "{dsn}"
spool_path = "{directory / 'spool.jsonl'}"

[pbx]
name = "container-test"

[hotline]
numbers = [{numbers}]
trunk = "carrier"

[ring]
period_seconds = 5.0
max_rings = 3
escalation_seconds = 20

[duty]
mobile = "{env.duty_mobile}"
holder = "{env.duty_holder}"
ring_seconds = 25

[api]
listen = "127.0.0.1:{API_PORT}"
""")
    return config


async def place_call(env: DevEnv, number: str) -> None:
    """An outside caller dials the first hotline number into the container, from world's carrier."""
    async with connect_world(env) as world:
        await world.set_phone(number, "agent101", answer(1, 2))
        await world.set_phone(number, "agent102", IGNORE)
        await world.action({
            "Action": "Originate", "Channel": f"PJSIP/pbx-trunk/sip:{env.hotline_numbers[0]}@{SIP_IP}:{SIP_PORT}",
            "CallerID": f'"容器来电" <{number}>', "Application": "Wait", "Data": "60", "Async": "true",
            "Timeout": "30000"})


async def call_sandbox(env: DevEnv, number: str) -> None:
    """An outside caller dials the first hotline number into the sandbox's PBX."""
    async with connect_world(env) as world:
        await world.set_phone(number, "agent101", answer(1, 2))
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(env.hotline_numbers[0], number, "沙箱来电")


async def forget_call(env: DevEnv, number: str) -> None:
    async with connect_world(env) as world:
        await world.action({"Action": "DBDelTree", "Family": f"phone/{number}"})


def reconcile_dry_run(config: Path, minutes: int = 10) -> str:
    """What `pbx-bridge reconcile --dry-run` of the last minutes lists (the calls of its PBX in CEL)."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "pbx-bridge"), "reconcile", "--config", str(config), "--dry-run",
         "--since", f"{minutes}m"], check=True, capture_output=True, text=True, timeout=60).stdout


async def kpi_calls(dsn: str, day: object) -> dict[str, int]:
    """Today's calls per PBX (v_daily_kpi), and across all of them (v_daily_kpi_all, key '*')."""
    per_pbx = await fetch(dsn, "SELECT pbx, calls FROM v_daily_kpi WHERE day = $1", day)
    [total] = await fetch(dsn, "SELECT calls FROM v_daily_kpi_all WHERE day = $1", day)
    return {**{r["pbx"]: int(r["calls"]) for r in per_pbx}, "*": int(total["calls"])}


def test_two_pbxs_write_into_one_database_the_container_and_the_sandbox(devenv: DevEnv, tmp_path: Path) -> None:
    """The PBX container and the sandbox's PBX, each with its pbx-bridge, into the one database:
    each call's row names its PBX, the views count each PBX apart and all together, and each
    pbx-bridge's reconcile reads only its own PBX's CEL rows (both Asterisks write into `cel`)."""
    script = container_script()
    database = devenv.dsn.rsplit("/", 1)[1]
    ami_secret, phone_secret = secrets.token_hex(16), secrets.token_hex(16)
    site = tmp_path / "site"
    render_site(site, devenv, database, ami_secret, phone_secret)
    config = bridge_config(tmp_path, devenv, devenv.dsn.replace("postgres@", "pbx_bridge_app@"), ami_secret)
    subprocess.run([str(REPO / ".venv" / "bin" / "pbx-bridge"), "dialplan", "--config", str(config),
                    "--output", str(site / "extensions_generated.conf")], check=True, capture_output=True)
    (site / "extensions_generated.conf").chmod(0o644)
    script.down(PROJECT)  # what a run killed half-way left behind
    started = time.monotonic()
    script.up(site, PROJECT)
    try:
        print(f"container up in {time.monotonic() - started:.1f} s")
        version = script.cli("core show version", PROJECT).stdout
        assert "Asterisk 22." in version
        # The container's Asterisk has no systemname (Debian's asterisk.conf): bare linkedids, and
        # its rows are named by [pbx] name. The sandbox's has systemname "pbx", its default name.
        container = BridgeProcess(config, business_time=OPEN_HOURS)
        sandbox = BridgeProcess(devenv.config_path, business_time=OPEN_HOURS)
        container.start()
        sandbox.start()
        [named] = sandbox.events("pbx_named")
        assert (named["pbx"], named["system_name"]) == ("pbx", "pbx")
        day = asyncio.run(fetch(devenv.dsn, "SELECT (now() AT TIME ZONE 'Asia/Shanghai')::date AS d"))[0]["d"]
        before = asyncio.run(kpi_calls(devenv.dsn, day))
        into_container, into_sandbox = new_caller_number(), new_caller_number()
        try:
            asyncio.run(place_call(devenv, into_container))
            asyncio.run(call_sandbox(devenv, into_sandbox))
            row = asyncio.run(one_call(devenv.dsn, into_container, timeout=30))
            other = asyncio.run(one_call(devenv.dsn, into_sandbox, timeout=30))
            cel_settled = time.monotonic() + 5  # CEL's LINKEDID_END follows the record closely
            dry_runs = {}
            while True:
                dry_runs = {"container-test": reconcile_dry_run(config), "pbx": reconcile_dry_run(devenv.config_path)}
                if (row["linkedid"] in dry_runs["container-test"] and other["linkedid"] in dry_runs["pbx"]) \
                        or time.monotonic() > cel_settled:
                    break
                time.sleep(0.5)
            after = asyncio.run(kpi_calls(devenv.dsn, day))
        finally:
            assert container.stop() == 0
            assert sandbox.stop() == 0
            asyncio.run(forget_call(devenv, into_container))
            asyncio.run(forget_call(devenv, into_sandbox))
        print("call record:", {k: str(v) for k, v in dict(row).items() if v is not None})
        assert row["disposition"] == "answered"
        assert row["did"] == devenv.hotline_numbers[0]
        assert row["answered_by"] == "agent101"
        assert row["caller_name"] == "容器来电"
        assert float(row["talk_seconds"]) == pytest.approx(2, abs=0.5)
        # Each row names its PBX; the linkedids cannot collide (a systemname prefix, or none).
        assert (row["pbx"], other["pbx"]) == ("container-test", "pbx")
        assert "-" not in row["linkedid"] and other["linkedid"].startswith("pbx-")
        legs = asyncio.run(fetch(devenv.dsn, "SELECT DISTINCT pbx FROM call_legs WHERE linkedid = ANY($1::text[])",
                                 [row["linkedid"], other["linkedid"]]))
        assert {r["pbx"] for r in legs} == {"container-test", "pbx"}
        log_rows = asyncio.run(fetch(devenv.dsn, "SELECT linkedid, pbx FROM v_call_log "
                                     "WHERE linkedid = ANY($1::text[])", [row["linkedid"], other["linkedid"]]))
        assert {r["linkedid"]: r["pbx"] for r in log_rows} == {row["linkedid"]: "container-test",
                                                               other["linkedid"]: "pbx"}
        # Per PBX and across all: one more call each, two more in all.
        assert after.get("container-test", 0) - before.get("container-test", 0) == 1
        assert after.get("pbx", 0) - before.get("pbx", 0) == 1
        assert after["*"] - before.get("*", 0) == 2
        assert after["*"] == sum(n for pbx, n in after.items() if pbx != "*")
        # Both Asterisks wrote CEL into the one `cel` table; each pbx-bridge reads only its own.
        cel = asyncio.run(fetch(devenv.dsn, "SELECT DISTINCT linkedid FROM cel WHERE linkedid = ANY($1::text[]) "
                                "AND eventtype = 'LINKEDID_END'", [row["linkedid"], other["linkedid"]]))
        assert len(cel) == 2
        print("reconcile --dry-run of each PBX:", dry_runs)
        assert row["linkedid"] in dry_runs["container-test"] and other["linkedid"] not in dry_runs["container-test"]
        assert other["linkedid"] in dry_runs["pbx"] and row["linkedid"] not in dry_runs["pbx"]
        assert "of the PBX container-test" in dry_runs["container-test"] and "of the PBX pbx " in dry_runs["pbx"]
    finally:
        script.down(PROJECT)
