"""Attacks on the real sandbox: raw SIP from a socket, the daemon's own AMI credentials.

Each test here failed before the fix it proves (see docs/security.md):
  * a stranger posing as the carrier or a phone entered the dialplan unauthenticated;
  * the pbx-bridge AMI user could run shell commands (Originate Application: System);
  * a caller number holding CR/LF forged AMI events (a violation that never happened);
  * a SIP MESSAGE to a DID ran [from-carrier] and dialled the duty mobile.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pbx_bridge.ami.client import AmiClient
from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv, pbx_log_dir
from tests.support.sip import INJECTION_USER, SHORT_INJECTION_USER, SipExchange, SipPeer
from tests.support.world import IGNORE, ami_session, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

STRANGER_IP = "127.0.10.9"  # a loopback address that is no endpoint's
ENDPOINTS = ["carrier", "pstn", "agent101", "agent102", "agent103", "reception", "leaky", "office201"]


def pbx(devenv: DevEnv) -> tuple[str, int]:
    return str(devenv.sandbox["pbx_ip"]), int(str(devenv.sandbox["sip_port"]))


async def cel_since(devenv: DevEnv, first_id: int) -> list[str]:
    """Channels that started (CEL CHAN_START) after CEL row `first_id`."""
    rows = await fetch(devenv.dsn, "SELECT channame FROM cel WHERE id > $1 AND eventtype = 'CHAN_START'", first_id)
    return [r["channame"] for r in rows]


async def last_cel_id(devenv: DevEnv) -> int:
    [row] = await fetch(devenv.dsn, "SELECT coalesce(max(id), 0) AS id FROM cel")
    return int(row["id"])


@pytest_asyncio.fixture
async def daemon_ami(devenv: DevEnv) -> AsyncIterator[AmiClient]:
    """A session with pbx-bridge's own AMI credentials, as an attacker who stole them would have."""
    async with ami_session(int(str(devenv.sandbox["pbx_ami_port"])), str(devenv.sandbox["pbx_ami_user"]),
                           str(devenv.sandbox["pbx_ami_secret"])) as client:
        yield client


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_stranger_posing_as_an_endpoint_is_challenged_and_reaches_no_dialplan(
        devenv: DevEnv, endpoint: str) -> None:
    before = await last_cel_id(devenv)
    dialled = devenv.hotline_numbers[0] if endpoint in ("carrier", "pstn") else "13800138000"

    def invite() -> SipExchange:
        with SipPeer(STRANGER_IP, pbx(devenv)) as peer:
            return peer.request("INVITE", dialled, endpoint, wait=3)

    exchange = await asyncio.to_thread(invite)
    statuses = exchange.statuses
    assert statuses and statuses[-1] in (401, 403, 407), statuses  # challenged or refused
    assert 180 not in statuses and 200 not in statuses
    assert not [r for r in exchange.responses if "Asterisk" in r], "the reply names the PBX software"
    await asyncio.sleep(1)
    assert await cel_since(devenv, before) == [], "the stranger's INVITE created a channel"
    # Asterisk's security log (for fail2ban) names the stranger.
    security_log = (pbx_log_dir() / "security.log").read_text(errors="replace")
    assert f"/{STRANGER_IP}/" in security_log


@pytest.mark.parametrize("source", ["carrier", "stranger"])
async def test_a_sip_message_runs_no_dialplan(devenv: DevEnv, source: str) -> None:
    before = await last_cel_id(devenv)
    ip = str(devenv.sandbox["world_carrier_ip"]) if source == "carrier" else STRANGER_IP

    def message() -> list[int]:
        with SipPeer(ip, pbx(devenv)) as peer:
            return peer.request("MESSAGE", devenv.hotline_numbers[0], "13800009999", body="hello",
                                content_type="text/plain", wait=2).statuses

    statuses = await asyncio.to_thread(message)
    assert statuses and statuses[-1] >= 400, statuses
    await asyncio.sleep(2)
    # Before the fix, a MESSAGE from the carrier's address dialled the duty mobile through the trunk.
    assert await cel_since(devenv, before) == []


async def test_replaces_from_a_stranger_is_challenged_and_the_call_goes_on(bridge: BridgeProcess,
                                                                          devenv: DevEnv) -> None:
    """Taking over a live call (INVITE with Replaces) needs an authenticated phone."""
    number = new_caller_number()
    async with connect_world(devenv) as world:
        await world.set_phone(number, "agent101", answer(1, 6))
        await world.set_phone(number, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "被劫持")
    await asyncio.sleep(3)  # talking now
    [inbound] = await fetch(devenv.dsn, "SELECT uniqueid FROM cel WHERE cid_num = $1 AND eventtype = 'CHAN_START' "
                                        "AND uniqueid = linkedid ORDER BY id DESC LIMIT 1", number)
    before = await last_cel_id(devenv)

    def replaces(posing_as: str) -> list[int]:
        with SipPeer(STRANGER_IP, pbx(devenv)) as peer:
            header = f"Replaces: {inbound['uniqueid']};to-tag={secrets.token_hex(4)};from-tag={secrets.token_hex(4)}"
            return peer.request("INVITE", "agent101", posing_as, extra=(header,), wait=3).statuses

    for posing_as in ("agent101", "carrier"):
        statuses = await asyncio.to_thread(replaces, posing_as)
        assert statuses and statuses[-1] in (401, 403, 407), (posing_as, statuses)
    assert await cel_since(devenv, before) == []
    row = await one_call(devenv.dsn, number, 15)  # the call talked its full 6 s: nobody took it over
    assert row["answered_by"] == "agent101" and row["talk_seconds"] >= 5.5


async def test_the_daemons_ami_user_cannot_run_shell_commands_or_touch_astdb(devenv: DevEnv,
                                                                          daemon_ami: AmiClient) -> None:
    marker = f"/tmp/pbx-bridge-pwned-{secrets.token_hex(4)}"
    attempts = [
        {"Action": "Originate", "Channel": "Local/s@messages-refused", "Application": "System",
         "Data": f"touch {marker}", "Async": "false"},
        {"Action": "Originate", "Channel": "Local/s@messages-refused", "Application": "Exec",
         "Data": f"System(touch {marker})"},
        {"Action": "DBPut", "Family": "pbx-bridge", "Key": "open", "Val": "1"},
        {"Action": "Command", "Command": f"core show version ; touch {marker}"},
    ]
    for action in attempts:
        reply = await daemon_ami.send_action(action)
        assert reply.get("Response") == "Error", (action["Action"], reply)
        message = str(reply.get("Message"))  # "Permission denied" / "Originate Access Forbidden: ..."
        assert "Permission denied" in message or "Forbidden" in message, reply
    # What the daemon needs still works: a global (its routing state) is readable and settable.
    reply = await daemon_ami.send_action({"Action": "Getvar", "Variable": "PBX_BRIDGE_EVENT_KEY_ID"})
    assert reply.get("Response") == "Success" and reply.get("Value")
    await asyncio.sleep(1)
    # Asterisk runs in the sandbox's chroot: its /tmp is inside the cached root filesystem.
    assert not list(Path("/var/cache/pbx-bridge").glob("rootfs-*" + marker)), "a shell command ran"
    assert not Path(marker).exists(), "a shell command ran"


async def test_a_caller_number_that_forges_ami_events_is_refused_alerted_and_recorded(
        bridge: BridgeProcess, devenv: DevEnv) -> None:
    since = datetime.now(UTC)
    before = {reason: len([a for a in bridge.events("security_alert") if a.get("reason") == reason])
              for reason in ("ami_identity", "caller_id_refused")}

    def invite(user: str) -> list[int]:
        with SipPeer(str(devenv.sandbox["world_carrier_ip"]), pbx(devenv)) as peer:
            return peer.request("INVITE", devenv.hotline_numbers[0], user, wait=3).statuses

    for user in (INJECTION_USER, SHORT_INJECTION_USER):
        statuses = await asyncio.to_thread(invite, user)
        assert statuses[-1] == 403, statuses  # the dialplan's screen rejected it (cause 21)
    # Each attack: the split Newchannel is dropped with an alert naming the channel, and the
    # refusal is alerted too.
    for reason, count in before.items():
        found = await asyncio.to_thread(bridge.wait_for, "security_alert", 10, count=count + 2, reason=reason)
        assert all(a["channel"].startswith("PJSIP/carrier-") for a in found[count:]), found[count:]
    # Each call has its record: refused, so missed, with the caller number reduced to its digits.
    for digits in ("13800000001", "19"):  # Asterisk kept 79 bytes of the first; the screen its digits
        row = await refused_call(devenv, digits, since)
        assert (row["did"], row["disposition"], row["hangup_cause"]) == (devenv.hotline_numbers[0], "missed", 21)
        assert row["answered_at"] is None and row["is_probe"] is False
    # The forged "a hotline phone dialled out" never became a violation, nor did "unanswered".
    await asyncio.sleep(1)
    rows = await fetch(devenv.dsn, "SELECT kind, details FROM policy_violations WHERE occurred_at >= $1", since)
    assert [(r["kind"], json.dumps(r["details"])) for r in rows] == []


async def refused_call(devenv: DevEnv, digits: str, since: datetime) -> Any:
    """The finished record of this test's refused call from `digits`."""
    deadline = time.monotonic() + 10
    while True:
        rows = await fetch(devenv.dsn, "SELECT * FROM calls WHERE caller_number = $1 AND started_at >= $2 "
                                       "AND ended_at IS NOT NULL", digits, since)
        if rows or time.monotonic() > deadline:
            assert len(rows) == 1, f"expected one record of the refused call from {digits}, got {len(rows)}"
            return rows[0]
        await asyncio.sleep(0.2)


async def test_a_spoofed_probe_caller_is_an_ordinary_caller(bridge: BridgeProcess, devenv: DevEnv) -> None:
    """The probe's caller number alone no longer makes the PBX answer a call itself and hide it."""
    probe_caller = str(devenv.sandbox["probe_caller"])
    since = time.time()
    async with connect_world(devenv) as world:
        await world.set_phone(probe_caller, "agent101", answer(1, 1))
        await world.set_phone(probe_caller, "agent102", IGNORE)
        await world.call(devenv.hotline_numbers[0], probe_caller, "0123456789abcdef")
    rows = await fetch(devenv.dsn, "SELECT * FROM calls WHERE caller_number = $1 AND started_at >= to_timestamp($2) "
                                   "AND ended_at IS NOT NULL", probe_caller, since)
    deadline = time.monotonic() + 15
    while not rows and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        rows = await fetch(devenv.dsn, "SELECT * FROM calls WHERE caller_number = $1 "
                                       "AND started_at >= to_timestamp($2) AND ended_at IS NOT NULL",
                           probe_caller, since)
    [row] = rows
    assert row["is_probe"] is False and row["answered_by"] == "agent101" and row["disposition"] == "answered"
