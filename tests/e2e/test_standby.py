"""End to end: a hot standby pair for one PBX. Both track the calls, only the leader acts; when
the leader is killed mid-call the standby takes over within 5 s, completes that call's record,
and hangs up a leaked outbound call within 250 ms; alerts and hangups are never doubled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from tests.e2e.conftest import OPEN_HOURS
from tests.e2e.test_faults import get_json
from tests.e2e.test_outbound import violations_for
from tests.support.calls import fetch, one_call
from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import DevEnv
from tests.support.mail import MailServer, free_port
from tests.support.ops import api_token
from tests.support.webhook import Webhook
from tests.support.world import IGNORE, answer, connect_world, new_caller_number

pytestmark = pytest.mark.e2e

PORTS = (18451, 18452)
AGENTS = ("agent101", "agent102")


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    async with Webhook() as receiver:
        yield receiver


REPORT_DAY = "2026-11-23"  # the day before OPEN_HOURS: its report is due (09:00) when the pair starts


@pytest.fixture
def mail() -> Iterator[MailServer]:
    with MailServer(free_port()) as server:
        yield server


@pytest.fixture
def pair(devenv: DevEnv, tmp_path: Path, webhook: Webhook,
         mail: MailServer) -> Iterator[tuple[BridgeProcess, BridgeProcess]]:
    """Two pbx-bridge for the sandbox's PBX, `[pbx] standby = true`, each with its own journal and
    API, both mailing the daily report and alerting to the same places."""
    processes = []
    for n, port in enumerate(PORTS):
        home = tmp_path / f"instance-{n}"
        home.mkdir()
        config = derived_config(devenv.config_path, home / "pbx-bridge.toml", port, (
            f'[alerts]\nwebhook_url = "{webhook.url}"\n'
            '[report]\nrecipients = ["manager@example.com"]\ndaily_at = "09:00"\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {mail.port}\nsecurity = "none"\nsender = "hotline@example.com"\n'))
        config.write_text(config.read_text().replace(f'name = "sandbox-beside-{port}"\n',
                                                     'name = "sandbox-pair"\nstandby = true\n'))
        processes.append(BridgeProcess(config, business_time=OPEN_HOURS))
    yield processes[0], processes[1]
    for process in processes:
        if process.running:
            process.stop()


async def leak(devenv: DevEnv) -> tuple[str, datetime]:
    """A phone in the sandbox's deliberately leaky context dials out through the 400 trunk."""
    digits, since = new_caller_number(), datetime.now(UTC)
    async with connect_world(devenv) as world:
        await world.set_phone("leaky", digits, answer(3, 5))
        await world.dial_out("leaky", digits)
    return digits, since


async def leaked_channel_lifetime(devenv: DevEnv, since: datetime) -> float:
    [row] = await violations_for(devenv.dsn, "stopped_by", "guard", since)
    await asyncio.sleep(1)  # the hangup's CEL rows
    cel = {r["eventtype"]: r["eventtime"] for r in await fetch(
        devenv.dsn, "SELECT eventtype, eventtime FROM cel WHERE channame = $1 AND linkedid = $2",
        row["details"]["channel"], row["linkedid"])}
    assert "ANSWER" not in cel
    return float((cel["HANGUP"] - cel["CHAN_START"]).total_seconds())


async def test_the_standby_takes_over_a_killed_leader_mid_call_without_losing_or_doubling_anything(
        pair: tuple[BridgeProcess, BridgeProcess], devenv: DevEnv, webhook: Webhook, mail: MailServer) -> None:
    leader, standby = pair
    await fetch(devenv.dsn, "DELETE FROM report_deliveries WHERE day = $1::text::date RETURNING day", REPORT_DAY)
    await asyncio.to_thread(leader.start)
    await asyncio.to_thread(leader.wait_for, "daily_report_sent", 20, day=REPORT_DAY)
    await asyncio.to_thread(standby.start, 20.0, "standby")
    health = await get_json(f"http://127.0.0.1:{PORTS[1]}/healthz")
    assert health["components"]["leadership"]["role"] == "standby"
    leading = (await get_json(f"http://127.0.0.1:{PORTS[0]}/healthz"))["components"]["leadership"]
    async with ClientSession(timeout=ClientTimeout(total=10)) as http, http.post(
            f"http://127.0.0.1:{PORTS[1]}/probes", headers={"Authorization": f"Bearer {api_token('ops')}"}) as refused:
        assert refused.status == 503 and "standby" in (await refused.json())["error"]  # the standby places no probe
    assert leading["role"] == "leader" and leading["this_instance"] in health["components"]["leadership"]["leader"]

    # Both up: one hangup, one violation, one alert for a leaked call.
    _, since = await leak(devenv)
    assert await leaked_channel_lifetime(devenv, since) < 0.25
    await asyncio.sleep(2)
    assert len(leader.events("guard_hangup_done")) == 1 and standby.events("guard_hangup_done") == []
    assert len(webhook.kinds("outbound_attempt")) == 1

    # The leader dies while a call rings; agent101 answers it after 8 s.
    number = new_caller_number()
    async with connect_world(devenv) as world:
        for phone in AGENTS:
            await world.set_phone(number, phone, answer(8, 3) if phone == "agent101" else IGNORE)
        await world.call(devenv.hotline_numbers[0], number, "主备切换")
        await asyncio.to_thread(standby.wait_for, "call_started", 10, caller=number)  # the standby tracks it too
        await asyncio.sleep(2)
        killed = time.monotonic()
        await asyncio.to_thread(leader.kill)
        await asyncio.to_thread(standby.wait_for, "leadership_taken", 5)
        took = time.monotonic() - killed
    assert took < 5, f"the standby led {took:.1f} s after the leader's death"
    print(f"standby took over {took:.2f} s after the leader's SIGKILL")
    row = await one_call(devenv.dsn, number, timeout=30)
    assert (row["disposition"], row["answered_by"], row["source"]) == ("answered", "agent101", "ami")
    assert abs(float(row["ring_seconds"]) - 8) < 1
    health = await get_json(f"http://127.0.0.1:{PORTS[1]}/healthz")
    assert health["components"]["leadership"]["role"] == "leader"

    # After the switch: the new leader's guard, within 250 ms, once.
    _, since = await leak(devenv)
    lived = await leaked_channel_lifetime(devenv, since)
    print(f"after the switch a leaked outbound channel lived {lived * 1000:.0f} ms")
    assert lived < 0.25
    assert len(standby.events("guard_hangup_done")) == 1
    await asyncio.sleep(1)
    assert len(webhook.kinds("outbound_attempt")) == 2  # one per leaked call, never doubled
    assert [r["n"] for r in await fetch(devenv.dsn, "SELECT count(*) AS n FROM calls WHERE caller_number = $1",
                                        number)] == [1]

    # The daily report: mailed once by the first leader, not again by the new one (it checked).
    deadline = time.monotonic() + 10
    while (await get_json(f"http://127.0.0.1:{PORTS[1]}/healthz"))["components"]["daily_report"][
            "last_sent_day"] != REPORT_DAY:
        assert time.monotonic() < deadline, "the new leader never checked the daily report"
        await asyncio.sleep(0.2)
    assert standby.events("daily_report_sent") == []
    assert len(mail.inbox.messages()) == 1
