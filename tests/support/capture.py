"""Capture real AMI byte streams from the sandbox PBX as test fixtures.

    python tests/support/capture.py tests/fixtures/ami [SCENARIO ...]

Logs in to the pbx instance as the pbx-bridge AMI user (same privileges and event
filters as production), drives one scenario through the world instance, and writes the
exact bytes received to DIR/SCENARIO.ami. The tracker's unit tests replay these files.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.env import DevEnv, load_devenv
from tests.support.world import BUSY, IGNORE, World, answer, connect_world

HOTLINE = "4008001234"

Scenario = Callable[[World, DevEnv], Awaitable[None]]


async def answered_7s_talk_4s(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000001", "agent101", answer(7, 4))
    await world.set_phone("13800000001", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000001", "张三客户")


async def answered_17s(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000002", "agent101", IGNORE)
    await world.set_phone("13800000002", "agent102", answer(17, 2))
    await world.call(HOTLINE, "13800000002", "李四")


async def abandoned_6s(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000003", "agent101", IGNORE)
    await world.set_phone("13800000003", "agent102", IGNORE)
    await world.call(HOTLINE, "13800000003", 'Robert "Bob" ;-- \\ O\'Brien', patience=6)


async def missed_all_busy(world: World, env: DevEnv) -> None:
    await world.set_phone("13800000004", "agent101", BUSY)
    await world.set_phone("13800000004", "agent102", BUSY)
    await world.call(HOTLINE, "13800000004", "")


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


SCENARIOS: dict[str, tuple[Scenario, float]] = {
    "answered_7s_talk_4s": (answered_7s_talk_4s, 14),
    "answered_17s": (answered_17s, 22),
    "abandoned_6s": (abandoned_6s, 9),
    "missed_all_busy": (missed_all_busy, 4),
    "other_did": (other_did, 5),
    "concurrent_3": (concurrent_3, 9),
}


async def capture(env: DevEnv, name: str, out: Path) -> None:
    """Record everything the pbx-bridge AMI user receives while one scenario runs."""
    scenario, seconds = SCENARIOS[name]
    reader, writer = await asyncio.open_connection("127.0.0.1", int(str(env.sandbox["pbx_ami_port"])))
    secret = str(env.sandbox["pbx_ami_secret"])
    writer.write(f"Action: Login\r\nUsername: {env.sandbox['pbx_ami_user']}\r\nSecret: {secret}\r\n"
                 "ActionID: capture-login\r\n\r\n".encode())
    await writer.drain()
    chunks: list[bytes] = []

    async def record() -> None:
        while data := await reader.read(65536):
            chunks.append(data)

    recorder = asyncio.create_task(record())
    async with connect_world(env) as world:
        await asyncio.sleep(0.5)
        await scenario(world, env)
        await asyncio.sleep(seconds)
    recorder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recorder
    writer.close()
    stream = b"".join(chunks)
    (out / f"{name}.ami").write_bytes(stream)
    print(f"captured {name}: {len(stream)} bytes, {stream.count(b'Event: ')} events")


async def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    out.mkdir(parents=True, exist_ok=True)
    env = load_devenv()
    for name in names:
        await capture(env, name, out)


if __name__ == "__main__":
    asyncio.run(main())
