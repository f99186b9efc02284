"""One pbx-bridge per PBX: the advisory lock, and a second `pbx-bridge run` refused with exit 2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pbx_bridge.storage.journal import Journal
from pbx_bridge.storage.leader import (
    AlreadyRunningError,
    PbxLock,
    hold_pbx_lock,
    lock_connect,
    lock_key,
    pbx_identity,
    session_name,
)
from tests.conftest import scratch_database
from tests.support.env import REPO, DevEnv

pytestmark = pytest.mark.integration
PBX_BRIDGE = str(REPO / ".venv" / "bin" / "pbx-bridge")


@pytest.fixture(scope="module")
def lock_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "lock") as dsn:
        yield dsn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_identity_names_the_pbx() -> None:
    assert pbx_identity("10.0.0.5", 5038) == "10.0.0.5:5038"
    assert pbx_identity("127.0.0.1", 5038) == f"{socket.gethostname()}/127.0.0.1:5038"  # every site's is loopback
    assert pbx_identity("127.0.0.1", 5038, "site-a") == "site-a"
    assert lock_key("site-a") == lock_key("site-a") != lock_key("site-b")
    assert -(2**63) <= lock_key("site-a") < 2**63
    assert len(session_name()) <= 63


async def test_a_second_holder_is_refused_and_told_who_holds_it(lock_dsn: str) -> None:
    identity = f"site-{secrets.token_hex(4)}"
    first = PbxLock(lock_connect(lock_dsn), identity)
    assert await first.acquire() and first.held
    second = PbxLock(lock_connect(lock_dsn), identity)
    second.name = "pbx-bridge other-host pid 1"
    assert not await second.acquire() and not second.held
    assert second.holder is not None and repr(first.name) in second.holder and "server pid" in second.holder
    assert "refusing to start a second one" in second.refusal()
    other = PbxLock(lock_connect(lock_dsn), identity + "-b")  # another PBX: its own lock
    assert await other.acquire()
    await first.release()
    assert await second.acquire()  # released: the next one takes it
    await second.release()
    await other.release()


async def test_the_lock_is_taken_again_after_its_session_is_killed(lock_dsn: str) -> None:
    identity = f"site-{secrets.token_hex(4)}"
    lock = PbxLock(lock_connect(lock_dsn), identity, check_interval=0.1)
    assert await lock.acquire()
    stop = asyncio.Event()
    alerts: list[dict[str, Any]] = []
    keeper = asyncio.create_task(lock.keep(stop, alerts.append))
    admin = await asyncpg.connect(lock_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                            lock.name)
        started = time.monotonic()
        await asyncio.sleep(0.3)
        while time.monotonic() - started < 10:
            held = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                        "AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
                                        (lock.key >> 32) & 0xFFFFFFFF, lock.key & 0xFFFFFFFF)
            if held and lock.held:
                break
            await asyncio.sleep(0.05)
        retaken = time.monotonic() - started
    finally:
        await admin.close()
        stop.set()
        await keeper
        await lock.release()
    print(f"\nlock session killed: taken again in {retaken:.2f} s")
    assert retaken < 5


async def test_a_daemon_started_while_the_database_was_down_stops_when_it_finds_another(lock_dsn: str) -> None:
    identity = f"site-{secrets.token_hex(4)}"
    other = PbxLock(lock_connect(lock_dsn), identity)
    assert await other.acquire()
    up = False
    real = lock_connect(lock_dsn)

    async def connect(name: str) -> asyncpg.Connection:
        if not up:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real(name)

    late = PbxLock(connect, identity)
    with pytest.raises(OSError):
        await late.acquire()
    up = True
    try:
        with pytest.raises(AlreadyRunningError, match="another pbx-bridge already runs"):
            await asyncio.wait_for(late.keep(asyncio.Event()), 10)
    finally:
        await other.release()


async def test_an_unreachable_database_defers_the_check(tmp_path: Path) -> None:
    lock = await hold_pbx_lock(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "site-x")
    assert not lock.held and not lock.ever_held


def daemon_config(directory: Path, dsn: str, ami_port: int, api_port: int, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "pbx-bridge.toml"
    config.write_text(f"""timezone = "Asia/Shanghai"
[ami]
host = "127.0.0.1"
port = {ami_port}
username = "nobody"
secret = "not-a-real-secret"
[database]
dsn = "{dsn}"
spool_path = "{directory / "spool.jsonl"}"
[hotline]
numbers = ["4008001234"]
[api]
listen = "127.0.0.1:{api_port}"
[log]
format = "json"
{extra}""")
    return config


class Daemon:
    """`pbx-bridge run` in the background, its JSON log lines collected by a thread."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen([PBX_BRIDGE, "run", "--config", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.get("event") == event for line in list(self.lines)):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {event} within {timeout} s: {self.lines[-5:]}")
            time.sleep(0.05)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long stopping took."""
        started = time.monotonic()
        self.process.terminate()
        code = self.process.wait(15)
        return code, time.monotonic() - started


def test_a_second_daemon_for_the_same_pbx_refuses_to_start_with_one_clear_line(lock_dsn: str, tmp_path: Path) -> None:
    ami_port = free_port()  # nothing answers there: the daemons keep retrying AMI, that is fine
    first = Daemon(daemon_config(tmp_path / "a", lock_dsn, ami_port, free_port()))
    try:
        first.wait_for("pbx_lock_acquired", 20)
        started = time.monotonic()
        second = subprocess.run([PBX_BRIDGE, "run", "--config",
                                 str(daemon_config(tmp_path / "b", lock_dsn, ami_port, free_port()))],
                                capture_output=True, text=True, timeout=30)
        refused_in = time.monotonic() - started
        own = [line for line in second.stderr.splitlines() if line.startswith("pbx-bridge run:")]
        print(f"\nsecond daemon: exit {second.returncode} after {refused_in:.2f} s: {own}")
        assert second.returncode == 2 and len(own) == 1
        assert "another pbx-bridge already runs for the PBX" in own[0]
        assert f"pid {first.process.pid}'" in own[0] and "127.0.0.1" in own[0]  # names the holder
        # Another PBX (its own [pbx] name) against the same database is not refused.
        third = Daemon(daemon_config(tmp_path / "c", lock_dsn, ami_port, free_port(),
                                     '[pbx]\nname = "another-site"\n'))
        try:
            third.wait_for("pbx_lock_acquired", 20)
        finally:
            assert third.stop()[0] == 0
    finally:
        code, took = first.stop()
    print(f"first daemon stopped in {took:.2f} s")
    assert code == 0


def test_a_daemon_whose_journal_is_in_use_refuses_to_start(tmp_path: Path) -> None:
    """With the database unreachable the lock waits; the journal's own lock still refuses a second
    process on this machine."""
    directory = tmp_path / "d"
    config = daemon_config(directory, f"postgresql://postgres@127.0.0.1:{free_port()}/x", free_port(), free_port())
    held = Journal.open(directory / "journal.jsonl")
    try:
        result = subprocess.run([PBX_BRIDGE, "run", "--config", str(config)], capture_output=True, text=True,
                                timeout=30)
    finally:
        held.close()
    own = [line for line in result.stderr.splitlines() if line.startswith("pbx-bridge run:")]
    assert result.returncode == 2 and len(own) == 1 and "is in use by another pbx-bridge process" in own[0]
    assert "pbx_lock_deferred" in result.stderr
