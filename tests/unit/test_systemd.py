"""The sd_notify messages and the progress watchdog (pbx_bridge/systemd.py), over a socket the test owns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pbx_bridge.config import load_settings
from pbx_bridge.systemd import DaemonStatus, HeartbeatQueue, Notifier, Watchdog
from tests.support.notify import NotifySocket, listening


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET of the test's own."""
    with listening() as receiver:
        yield receiver


def test_environment_is_read_as_sd_notify_and_sd_watchdog_enabled_do() -> None:
    assert not Notifier.from_environment({}).enabled
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000"}).watchdog_seconds is None  # no socket
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"})
    assert notifier.address == "/run/systemd/notify" and notifier.watchdog_seconds == 30.0
    assert Notifier.from_environment({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1"}).address is None  # not supported: off
    mine = {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}
    assert Notifier.from_environment(mine, pid=4242).watchdog_seconds == 2.0
    assert Notifier.from_environment(mine, pid=4243).watchdog_seconds is None  # meant for another process
    assert Notifier.from_environment({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}).watchdog_seconds is None


def test_nothing_is_sent_outside_systemd_and_a_lost_socket_never_raises(tmp_path: Path) -> None:
    assert Notifier(None).send(READY="1") is False
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.send(STATUS="x") is False
    gone.ready()  # logged, dropped
    gone.stopping()


def test_ready_is_sent_once(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.path)
    notifier.ready()
    notifier.ready()
    assert [m for _, m in notify_socket.drain()] == [{"READY": "1", "STATUS": "running"}]
    Watchdog(notifier, HeartbeatQueue(), DaemonStatus(lambda: 3, lambda: 0, lambda: True))
    notifier.ready_sent = False
    notifier.ready()  # with the daemon's status line once the Watchdog exists
    assert notify_socket.drain()[-1][1]["STATUS"] == "leader; AMI connected; 3 calls live; 0 records pending"


async def test_heartbeats_never_reach_the_consumer() -> None:
    queue: HeartbeatQueue[str | None] = HeartbeatQueue()
    queue.put_nowait("a")
    queue.beat(1.0)
    queue.beat(2.0)  # one at a time: the first is still waiting
    queue.put_nowait(None)
    assert queue.waiting_since() == 1.0
    assert await queue.get() == "a"
    assert queue.waiting_since() == 1.0  # not taken until the consumer reaches it
    assert await queue.get() is None
    assert queue.waiting_since() is None and queue.beats == 1 and queue.empty()


def test_status_line_names_role_ami_calls_and_pending_records() -> None:
    status = DaemonStatus(lambda: 2, lambda: 17, lambda: True)
    assert status.line() == "leader; AMI connected; 2 calls live; 17 records pending"
    standby = DaemonStatus(lambda: 0, lambda: 0, lambda: False, role=lambda: "standby")
    assert standby.line() == "standby; AMI disconnected (reconnecting); 0 calls live; 0 records pending"


class Consumer:
    """The tracker consumer's part: takes inputs from the queue; `stall()` stops it taking any."""

    def __init__(self, queue: HeartbeatQueue[str]) -> None:
        self.queue = queue
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.taken: list[str] = []

    async def run(self) -> None:
        while True:
            await self.flowing.wait()
            self.taken.append(await self.queue.get())

    def stall(self) -> None:
        self.flowing.clear()


@contextlib.asynccontextmanager
async def watched(notify_socket: NotifySocket, watchdog_usec: int) -> AsyncIterator[tuple[Watchdog, Consumer]]:
    """A Watchdog over a running consumer, stopped afterwards."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": str(watchdog_usec)})
    queue: HeartbeatQueue[str] = HeartbeatQueue()
    consumer = Consumer(queue)
    watchdog = Watchdog(notifier, queue, DaemonStatus(lambda: 1, lambda: 0, lambda: False))
    async with asyncio.TaskGroup() as group:
        consuming = group.create_task(consumer.run())
        running = group.create_task(watchdog.run())
        try:
            yield watchdog, consumer
        finally:
            watchdog.stop()
            await running
            consuming.cancel()


async def test_pings_at_a_quarter_of_the_interval_while_the_consumer_is_idle(notify_socket: NotifySocket) -> None:
    """No input at all (AMI down): the consumer is idle but alive, so the pings go on."""
    async with watched(notify_socket, 400_000) as (watchdog, consumer):
        assert watchdog.period == pytest.approx(0.1) and watchdog.bound == pytest.approx(0.2)
        await asyncio.sleep(1.05)
    pings = [at for at, _ in notify_socket.with_key("WATCHDOG")]
    assert 8 <= len(pings) <= 12, pings
    assert max(b - a for a, b in itertools.pairwise(pings)) < 0.2
    assert consumer.taken == []  # heartbeats never reached it
    first_status = notify_socket.with_key("STATUS")[0][1]["STATUS"]
    assert first_status == "starting: waiting for the first AMI login; leader; AMI disconnected (reconnecting); " \
                           "1 calls live; 0 records pending"


async def test_pings_stop_while_the_consumer_is_stalled_and_resume_with_it(notify_socket: NotifySocket) -> None:
    async with watched(notify_socket, 400_000) as (watchdog, consumer):
        consumer.queue.put_nowait("event")
        await asyncio.sleep(0.3)
        consumer.stall()
        stalled_at = time.monotonic()
        consumer.queue.put_nowait("while stalled")
        await asyncio.sleep(1.0)
        assert watchdog.withheld
        silent = [at for at, _ in notify_socket.with_key("WATCHDOG") if at > stalled_at + 0.35]
        assert silent == []  # a heartbeat waits longer than the bound: no more pings
        assert any("tracker stalled" in m["STATUS"] for _, m in notify_socket.with_key("STATUS"))
        consumer.flowing.set()
        resumed_at = time.monotonic()
        await asyncio.sleep(0.4)
        assert [at for at, _ in notify_socket.with_key("WATCHDOG") if at > resumed_at]
        assert consumer.taken == ["event", "while stalled"]


async def test_a_blocked_event_loop_sends_no_ping(notify_socket: NotifySocket) -> None:
    async with watched(notify_socket, 400_000):
        await asyncio.sleep(0.25)
        time.sleep(0.6)  # the loop itself stalls
        blocked_until = time.monotonic()
        await asyncio.sleep(0.25)
    pings = [at for at, _ in notify_socket.with_key("WATCHDOG")]
    assert max(b - a for a, b in itertools.pairwise(pings)) >= 0.6
    assert any(at > blocked_until for at in pings)


async def test_stopping_is_sent_when_stopped(notify_socket: NotifySocket) -> None:
    async with watched(notify_socket, 400_000):
        await asyncio.sleep(0.15)
    last = notify_socket.drain()[-1][1]
    assert last["STOPPING"] == "1" and last["STATUS"].startswith("stopping")


MINIMAL = """
[ami]
username = "pbx-bridge"
secret_file = "ami.secret"
[database]
dsn = "postgresql://bridge@db/pbx"
[hotline]
numbers = ["4008001234"]
[api]
token_file = "/abs/legacy.token"
[[api.tokens]]
name = "desk"
role = "agent"
token_file = "desk.token"
"""


def test_relative_secret_files_are_systemd_credentials_else_beside_the_configuration(tmp_path: Path) -> None:
    etc, credentials = tmp_path / "etc", tmp_path / "credentials"
    for folder, secret in ((etc, "from-etc"), (credentials, "from-credentials")):
        folder.mkdir()
        (folder / "ami.secret").write_text(secret + "\n")
        (folder / "desk.token").write_text(f"{secret}-token-0123456789\n")
    config = etc / "pbx-bridge.toml"
    config.write_text(MINIMAL.replace('token_file = "/abs/legacy.token"\n', ""))
    under_systemd = load_settings(config, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert under_systemd.ami.resolved_secret().get_secret_value() == "from-credentials"
    assert under_systemd.api.tokens[0].token_file == credentials / "desk.token"
    by_hand = load_settings(config, environ={})
    assert by_hand.ami.resolved_secret().get_secret_value() == "from-etc"
    assert by_hand.api.resolved_tokens()[0].secret.get_secret_value() == "from-etc-token-0123456789"


def test_absolute_secret_files_stay_where_they_are(tmp_path: Path) -> None:
    (tmp_path / "legacy.token").write_text("legacy-token-0123456789\n")
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "desk.token").write_text("desk-token-0123456789\n")
    secret = tmp_path / "elsewhere.secret"
    secret.write_text("abs\n")
    config = tmp_path / "pbx-bridge.toml"
    config.write_text(MINIMAL.replace("/abs/legacy.token", str(tmp_path / "legacy.token"))
                      .replace('secret_file = "ami.secret"', f'secret_file = "{secret}"'))
    settings = load_settings(config, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")})
    assert settings.ami.secret_file == secret
    assert settings.api.token_file == tmp_path / "legacy.token"
