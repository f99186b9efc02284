"""The PBX container of docker/asterisk/compose.yaml takes a real call from the sandbox's world; its record."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import scratch_database
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


@pytest.fixture(scope="module")
def container_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "container") as dsn:
        yield dsn


async def place_call(env: DevEnv, number: str) -> None:
    """An outside caller dials the first hotline number into the container, from world's carrier."""
    async with connect_world(env) as world:
        await world.set_phone(number, "agent101", answer(1, 2))
        await world.set_phone(number, "agent102", IGNORE)
        await world.action({
            "Action": "Originate", "Channel": f"PJSIP/pbx-trunk/sip:{env.hotline_numbers[0]}@{SIP_IP}:{SIP_PORT}",
            "CallerID": f'"容器来电" <{number}>', "Application": "Wait", "Data": "60", "Async": "true",
            "Timeout": "30000"})


async def forget_call(env: DevEnv, number: str) -> None:
    async with connect_world(env) as world:
        await world.action({"Action": "DBDelTree", "Family": f"phone/{number}"})


def test_container_pbx_takes_a_call_and_pbx_bridge_records_it(devenv: DevEnv, container_dsn: str,
                                                               tmp_path: Path) -> None:
    script = container_script()
    database = container_dsn.rsplit("/", 1)[1]
    ami_secret, phone_secret = secrets.token_hex(16), secrets.token_hex(16)
    site = tmp_path / "site"
    render_site(site, devenv, database, ami_secret, phone_secret)
    config = bridge_config(tmp_path, devenv, container_dsn.replace("postgres@", "pbx_bridge_app@"), ami_secret)
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
        bridge = BridgeProcess(config, business_time=OPEN_HOURS)
        bridge.start()
        number = new_caller_number()
        try:
            asyncio.run(place_call(devenv, number))
            row = asyncio.run(one_call(container_dsn, number, timeout=30))
        finally:
            assert bridge.stop() == 0
            asyncio.run(forget_call(devenv, number))
        print("call record:", {k: str(v) for k, v in dict(row).items() if v is not None})
        assert row["disposition"] == "answered"
        assert row["did"] == devenv.hotline_numbers[0]
        assert row["answered_by"] == "agent101"
        assert row["caller_name"] == "容器来电"
        assert float(row["talk_seconds"]) == pytest.approx(2, abs=0.5)
        # Asterisk's own trail of the same call, written by the container's cel_pgsql.
        cel = asyncio.run(fetch(container_dsn, "SELECT eventtype FROM cel WHERE linkedid = $1", row["linkedid"]))
        assert "LINKEDID_END" in {r["eventtype"] for r in cel}
    finally:
        script.down(PROJECT)
