"""Capture real AMI byte streams from the sandbox PBX as test fixtures.

    python tests/support/capture.py tests/fixtures/ami [SCENARIO ...]

Logs in to the pbx instance as the pbx-bridge AMI user (same privileges and event
filters as production), drives one scenario through the world instance, and writes the
exact bytes received to DIR/SCENARIO.ami. The tracker's unit tests replay these files.
The CEL rows Asterisk wrote for the same calls (every linkedid of the stream) go to
DIR/../cel/SCENARIO.json, for the CEL builder's tests (they hold no key: the dialplan never
gives CEL one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg

from pbx_bridge.ami.wire import parse_stream
from pbx_bridge.cel.builder import CelRow
from pbx_bridge.dialplan import b64, event_key
from tests.support.env import DevEnv, load_devenv
from tests.support.sip import SHORT_INJECTION_USER, SipPeer
from tests.support.world import (
    BUSY,
    IGNORE,
    World,
    answer,
    answer_after_progress,
    answer_after_silence,
    connect_pbx_admin,
    connect_world,
)

HOTLINE = "4008001234"
# Captures carry the dialplan's event key; it is replaced by this placeholder (same length)
# so no sandbox secret lands in the repository. Unit tests use it as the key.
FIXTURE_EVENT_KEY = "fixture0" * 4

Scenario = Callable[[World, DevEnv], Awaitable[None]]

# missed_all_busy.ami is not re-captured: it was captured from this sandbox with the first
# dialplan, which hung up when every phone was busy (disposition `missed`). The current
# dialplan always offers voicemail, so it can no longer produce that stream; the file stays
# as the real example of a PBX-ended unanswered call.


async def answered_7s_talk_4s(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000001", "agent101", answer(7, 4))
    await world.set_phone("13800000001", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000001", "张三客户")


async def answered_17s(world: World, env: DevEnv) -> None:
    # nobody in the group (15 s); agent103 answers 2 s into the escalation
    await world.set_phone("13800000002", "agent101", IGNORE)
    await world.set_phone("13800000002", "agent102", IGNORE)
    await world.set_phone("13800000002", "agent103", answer(2, 2))
    await world.call(HOTLINE, "13800000002", "李四")


async def abandoned_6s(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000003", "agent101", IGNORE)
    await world.set_phone("13800000003", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000003", 'Robert "Bob" ;-- \\ O\'Brien', patience=6)


async def all_busy_voicemail(world: World, env: DevEnv) -> None:
    for phone in ("agent101", "agent102", "agent103", env.duty_mobile):
        await world.set_phone("13800000004", phone, BUSY)
    await world.call(HOTLINE, "13800000004", "", talk=2)  # leaves a 2 s message


async def other_did(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000005", "reception", answer(1, 1))
    await world.call(env.other_number, "13800000005", "王五")


async def concurrent_3(world: World, env: DevEnv) -> None:
    plans = [("13800000011", answer(2, 3), IGNORE), ("13800000012", IGNORE, answer(4, 1)),
             ("13800000013", BUSY, answer(1, 2))]
    for number, plan101, plan102 in plans:
        await world.set_phone(number, "agent101", plan101)
        await world.set_phone(number, "agent102", plan102)
    for number, _, _ in plans:
        await world.call(HOTLINE, number, f"并发 {number[-2:]}")
        await asyncio.sleep(0.3)


async def after_hours_forwarded(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000021", env.duty_mobile, answer(2, 2))
    await world.call(HOTLINE, "13800000021", "晚上来电")


async def after_hours_voicemail(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000022", env.duty_mobile, IGNORE)
    await world.call(HOTLINE, "13800000022", "留言", talk=2)


async def outbound_refused(world: World, env: DevEnv) -> None:
    await world.dial_out("agent101", "13800138000")


async def outbound_leaked(world: World, env: DevEnv) -> None:
    await world.set_phone("leaky", "13800138001", answer(1, 1))
    await world.dial_out("leaky", "13800138001")


async def attack_callerid_injection(world: World, env: DevEnv) -> None:
    """From the carrier's own address, a caller number holding CR/LF that forges a UserEvent."""
    def invite() -> None:
        with SipPeer(str(env.sandbox["world_carrier_ip"]), (str(env.sandbox["pbx_ip"]), 5060)) as peer:
            peer.request("INVITE", HOTLINE, SHORT_INJECTION_USER, wait=3)

    await asyncio.to_thread(invite)


async def adopted_mid_call(world: World, env: DevEnv) -> None:
    """A call already ringing when pbx-bridge logs in (LATE_LOGIN): agent101 answers at 8 s."""
    await world.set_phone("13800000031", "agent101", answer(8, 3))
    await world.set_phone("13800000031", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000031", "早到的来电")


PROBE_NONCE = "0123456789abcdef"
# Test DIDs of the sandbox's other-dialplan shapes (docker/asterisk/pbx-site/extensions_site.conf.in):
# not hotline numbers of the sandbox configuration; the CEL builder's tests add them.
SITE_QUEUE = "4008009001"
SITE_RINGGROUP = "4008009002"
SITE_ANSWER_VOICEMAIL = "4008009003"
SITE_MEMBER_VOICEMAIL = "4008009004"
SITE_DIDS = frozenset({SITE_QUEUE, SITE_RINGGROUP, SITE_ANSWER_VOICEMAIL, SITE_MEMBER_VOICEMAIL})


async def probe_arrived(world: World, env: DevEnv) -> None:
    """A line probe coming back on the hotline with the one-time nonce pbx-bridge set just before."""
    async with connect_pbx_admin(env) as pbx:
        await pbx.set_global("PROBE_NONCE", PROBE_NONCE)
    await world.call(HOTLINE, str(env.sandbox["probe_caller"]), PROBE_NONCE)


async def site_queue_answered(world: World, env: DevEnv) -> None:
    """Queue() rings both members; agent102 answers after 3 s."""
    await world.set_phone("13800000041", "agent101", IGNORE)
    await world.set_phone("13800000041", "agent102", answer(3, 2))
    await world.call(SITE_QUEUE, "13800000041", "排队来电")


async def site_ringgroup_answered(world: World, env: DevEnv) -> None:
    """A ring group of Local/ channel pairs; agent101 answers after 4 s."""
    await world.set_phone("13800000042", "agent101", answer(4, 2))
    await world.set_phone("13800000042", "agent102", IGNORE)
    await world.call(SITE_RINGGROUP, "13800000042", "振铃组来电")


async def site_answer_voicemail(world: World, env: DevEnv) -> None:
    """Nobody answers the ring group in 5 s; the PBX answers the caller, who leaves a message."""
    await world.set_phone("13800000043", "agent101", IGNORE)
    await world.set_phone("13800000043", "agent102", IGNORE)
    await world.call(SITE_ANSWER_VOICEMAIL, "13800000043", "先接听后留言", talk=4)


async def site_member_voicemail(world: World, env: DevEnv) -> None:
    """agent101 does not answer in 5 s; its Local/ half answers and takes a message."""
    await world.set_phone("13800000044", "agent101", IGNORE)
    await world.call(SITE_MEMBER_VOICEMAIL, "13800000044", "分机留言", talk=3)


# Scenarios whose recording starts this many seconds after the call was placed: the pbx-bridge
# user logs in then and lists the live channels (CoreShowChannels), as the daemon does.
LATE_LOGIN = {"adopted_mid_call": 3.0}

def refer_to(env: DevEnv, extension: str) -> str:
    """The SIP URI a phone REFERs the call to: an extension on the pbx."""
    return f"sip:{extension}@{env.sandbox['pbx_ip']}:{env.sandbox['sip_port']}"


async def transfer_blind(world: World, env: DevEnv) -> None:
    """agent101 answers after 4 s, talks 3 s, blind-transfers to 103; agent103 answers after 6 s, talks 5 s."""
    await world.set_phone("13800000041", "agent101", answer(4, 120))
    await world.set_phone("13800000041", "agent102", IGNORE)
    await world.set_phone("13800000041", "agent103", answer(6, 5))
    await world.call(HOTLINE, "13800000041", "转接客户")
    await asyncio.sleep(7.5)
    await world.transfer("agent101", "13800000041", refer_to(env, "103"))


async def transfer_unanswered(world: World, env: DevEnv) -> None:
    """agent101 transfers to 102, who never answers: back to agent101 after 20 s, who answers after 2 s."""
    await world.set_phone("13800000042", "agent101", answer(2, 120))
    await world.set_phone("13800000042", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000042", "转接未接")
    await asyncio.sleep(4)
    await world.set_phone("13800000042", "agent101", answer(2, 2))
    await world.transfer("agent101", "13800000042", refer_to(env, "102"))


async def transfer_outside(world: World, env: DevEnv) -> None:
    """agent101 transfers to an outside number: refused, back to agent101 (answers after 1 s)."""
    await world.set_phone("13800000043", "agent101", answer(2, 120))
    await world.set_phone("13800000043", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000043", "转外线")
    await asyncio.sleep(4)
    await world.set_phone("13800000043", "agent101", answer(1, 2))
    await world.transfer("agent101", "13800000043", refer_to(env, "13800138000"))


async def transfer_attended(world: World, env: DevEnv) -> None:
    """agent101 answers after 3 s, consults 102 (answers after 2 s), hands the caller over; the caller
    talks 3 s with agent102 and hangs up."""
    await world.set_phone("13800000044", "agent101", answer(3, 120))
    await world.set_phone("13800000044", "agent102", IGNORE)
    await world.set_phone("agent101", "agent102", answer(2, 120))  # the consultation comes from agent101
    await world.call(HOTLINE, "13800000044", "咨询转接")
    await asyncio.sleep(4)
    await world.dial_out("agent101", "102")
    await asyncio.sleep(4)
    pbx = f"{env.sandbox['pbx_ip']}:{env.sandbox['sip_port']}"
    await world.attended_transfer("agent101", "13800000044", "102", pbx)
    await asyncio.sleep(3)
    await world.hang_up_caller("13800000044")


async def presence_codes(world: World, env: DevEnv) -> None:
    """agent102 dials *21 (sign out), then *23 (state), then *22 (sign in); no pbx-bridge answers,
    so each waits its 3 s and hears "unavailable" (the events are what the tracker reads)."""
    for code in ("*21", "*23", "*22"):
        await world.dial_out("agent102", code)
        await asyncio.sleep(4.5)


async def phone_unregistered(world: World, env: DevEnv) -> None:
    """agent103's phone leaves the network (unregisters) and comes back (world re-registers ~5 s later)."""
    await world.action({"Action": "PJSIPUnregister", "Registration": "reg-agent103"})
    await asyncio.sleep(2)
    await world.action({"Action": "PJSIPRegister", "Registration": "reg-agent103"})


async def off_hook_busy(world: World, env: DevEnv) -> None:
    """agent102 answers two calls BUSY (a handset left off the hook); agent101 takes them."""
    for number in ("13800000061", "13800000062"):
        await world.set_phone(number, "agent101", answer(1, 1))
        await world.set_phone(number, "agent102", BUSY)
        await world.call(HOTLINE, number, "占线")
        await asyncio.sleep(3)


async def mobile_progress_only(world: World, env: DevEnv) -> None:
    """After hours; the carrier sends 183 (early media, no 180); the mobile answers after 3 s."""
    await world.set_phone("13800000051", env.duty_mobile, answer_after_progress(3, 2))
    await world.call(HOTLINE, "13800000051", "183")


async def mobile_late_ringing(world: World, env: DevEnv) -> None:
    """After hours; 180 only after 2 s of silence; the mobile answers 3 s later."""
    await world.set_phone("13800000052", env.duty_mobile, answer_after_silence(2, 3, 2))
    await world.call(HOTLINE, "13800000052", "迟振铃")


async def mobile_17s(world: World, env: DevEnv) -> None:
    """After hours; the mobile answers after 17 s: past the three-ring limit."""
    await world.set_phone("13800000053", env.duty_mobile, answer(17, 1))
    await world.call(HOTLINE, "13800000053", "手机超时")


SCENARIOS: dict[str, tuple[Scenario, float]] = {
    "transfer_blind": (transfer_blind, 14),
    "transfer_unanswered": (transfer_unanswered, 28),
    "transfer_outside": (transfer_outside, 6),
    "transfer_attended": (transfer_attended, 3),
    "presence_codes": (presence_codes, 1),
    "phone_unregistered": (phone_unregistered, 12),
    "off_hook_busy": (off_hook_busy, 1),
    "mobile_progress_only": (mobile_progress_only, 8),
    "mobile_late_ringing": (mobile_late_ringing, 10),
    "mobile_17s": (mobile_17s, 21),
    "adopted_mid_call": (adopted_mid_call, 12),
    "attack_callerid_injection": (attack_callerid_injection, 2),
    "answered_7s_talk_4s": (answered_7s_talk_4s, 14),
    "answered_17s": (answered_17s, 22),
    "abandoned_6s": (abandoned_6s, 9),
    "all_busy_voicemail": (all_busy_voicemail, 6),
    "other_did": (other_did, 5),
    "concurrent_3": (concurrent_3, 9),
    "after_hours_forwarded": (after_hours_forwarded, 7),
    "after_hours_voicemail": (after_hours_voicemail, 32),
    "outbound_refused": (outbound_refused, 4),
    "outbound_leaked": (outbound_leaked, 5),
    "probe_arrived": (probe_arrived, 4),
    "site_queue_answered": (site_queue_answered, 8),
    "site_ringgroup_answered": (site_ringgroup_answered, 9),
    "site_answer_voicemail": (site_answer_voicemail, 11),
    "site_member_voicemail": (site_member_voicemail, 11),
}
# captured with the routing state "closed"
CLOSED = {"after_hours_forwarded", "after_hours_voicemail", "mobile_progress_only", "mobile_late_ringing", "mobile_17s"}


async def set_routing_state(env: DevEnv, open_: bool) -> None:
    """What pbx-bridge would publish: open or closed, the duty mobile and holder, a fresh heartbeat."""
    async with connect_pbx_admin(env) as pbx:
        for key, value in (("open", "1" if open_ else "0"), ("mobile", env.duty_mobile),
                           ("holder_b64", b64(env.duty_holder)), ("updated", str(int(time.time()) + 600))):
            await pbx.set_routing_state(**{key: value})


async def capture(env: DevEnv, name: str, out: Path) -> None:
    """Record everything the pbx-bridge AMI user receives while one scenario runs."""
    scenario, seconds = SCENARIOS[name]
    chunks: list[bytes] = []

    async def login() -> tuple[asyncio.StreamWriter, asyncio.Task[None]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(str(env.sandbox["pbx_ami_port"])))
        secret = str(env.sandbox["pbx_ami_secret"])
        writer.write(f"Action: Login\r\nUsername: {env.sandbox['pbx_ami_user']}\r\nSecret: {secret}\r\n"
                     "ActionID: capture-login\r\n\r\n".encode())
        if name in LATE_LOGIN:  # as the daemon does after every login: list the live channels
            writer.write(b"Action: CoreShowChannels\r\nActionID: capture-snapshot\r\n\r\n")
        await writer.drain()

        async def record() -> None:
            while data := await reader.read(65536):
                chunks.append(data)

        return writer, asyncio.create_task(record())

    await set_routing_state(env, open_=name not in CLOSED)
    first_cel = await _last_cel_id(env)
    if name not in LATE_LOGIN:
        writer, recorder = await login()
    async with connect_world(env) as world:
        await asyncio.sleep(0.5)
        await scenario(world, env)
        if name in LATE_LOGIN:
            await asyncio.sleep(LATE_LOGIN[name])
            writer, recorder = await login()
        await asyncio.sleep(seconds)
    recorder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recorder
    writer.close()
    key = event_key(str(env.sandbox["pbx_ami_secret"])).encode()
    stream = b"".join(chunks).replace(key, FIXTURE_EVENT_KEY.encode())
    (out / f"{name}.ami").write_bytes(stream)
    print(f"captured {name}: {len(stream)} bytes, {stream.count(b'Event: ')} events")
    await asyncio.sleep(1)  # cel_pgsql writes the last rows of the calls
    linkedids = {m.get("Linkedid") for m in parse_stream(stream)} - {""}
    rows = await _cel_rows(env, first_cel, linkedids)
    text = json.dumps([row.to_json() for row in rows], ensure_ascii=False, indent=1)
    assert key.decode() not in text, "the dialplan's event key must never reach CEL"
    cel = out.parent / "cel"
    cel.mkdir(exist_ok=True)
    (cel / f"{name}.json").write_text(text + "\n", encoding="utf-8")
    print(f"captured {name}: {len(rows)} CEL rows of {len({r.linkedid for r in rows})} calls")


async def _last_cel_id(env: DevEnv) -> int:
    conn = await asyncpg.connect(env.dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM cel"))
    finally:
        await conn.close()


async def _cel_rows(env: DevEnv, after_id: int, linkedids: set[str]) -> list[CelRow]:
    """The CEL rows of these calls written since `after_id`, in the order Asterisk wrote them."""
    conn = await asyncpg.connect(env.dsn)
    try:
        rows = await conn.fetch("SELECT * FROM cel WHERE id > $1 AND linkedid = ANY($2::text[]) ORDER BY id",
                                after_id, sorted(linkedids))
    finally:
        await conn.close()
    return [CelRow.from_mapping(row) for row in rows]


async def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    out.mkdir(parents=True, exist_ok=True)
    env = load_devenv()
    for name in names:
        await capture(env, name, out)


if __name__ == "__main__":
    asyncio.run(main())
