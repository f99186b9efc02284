"""What the real daemon tells systemd, over a NOTIFY_SOCKET the test owns: READY, STATUS, watchdog, STOPPING."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import BridgeProcess, derived_config
from tests.support.env import REPO, DevEnv
from tests.support.notify import NotifySocket, listening

WATCHDOG_USEC = 1_000_000  # pings every 0.25 s; withheld once a heartbeat waits 0.5 s


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET of the test's own."""
    with listening() as receiver:
        yield receiver


class StallableBridge(BridgeProcess):
    """The daemon through tests/support/stall_consumer.py: SIGUSR1 stalls its tracker consumer."""

    def start_stallable(self, timeout: float = 20.0) -> None:
        """As BridgeProcess.start, through the test entry point."""
        self._process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "python"), "-m", "tests.support.stall_consumer",
             "run", "--config", str(self.config)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("ami_connected", timeout)

    def signal(self, number: int) -> None:
        """Send a signal to the daemon."""
        assert self._process is not None
        self._process.send_signal(number)


def under_systemd(process: BridgeProcess, notify: NotifySocket) -> BridgeProcess:
    """As systemd starts it (WATCHDOG_PID is left out: the test cannot know the pid beforehand)."""
    process.env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    return process


def wait_for_message(notify: NotifySocket, key: str, timeout: float) -> tuple[float, dict[str, str]]:
    """The first message carrying `key`; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := notify.with_key(key):
            return found[0]
    raise AssertionError(f"no {key}= within {timeout} s; got {notify.drain()}")


def test_ready_after_the_first_login_pings_at_the_interval_and_stopping_on_sigterm(
        devenv: DevEnv, tmp_path: Path, notify_socket: NotifySocket) -> None:
    bridge = under_systemd(BridgeProcess(derived_config(devenv.config_path, tmp_path / "systemd.toml", 18441)),
                           notify_socket)
    bridge.start()
    try:
        ready_at, ready = wait_for_message(notify_socket, "READY", 10)
        assert ready["READY"] == "1"
        assert bridge.events("channels_snapshot"), "READY before the first AMI login's channel snapshot"
        starting = [m["STATUS"] for at, m in notify_socket.with_key("STATUS") if at < ready_at]
        assert all(status.startswith("starting: waiting for the first AMI login") for status in starting)
        time.sleep(3.0)
        pings = [at for at, _ in notify_socket.with_key("WATCHDOG") if at > ready_at]
        assert 9 <= len(pings) <= 14, pings  # every 0.25 s
        assert max(b - a for a, b in itertools.pairwise(pings)) < 0.5  # never as late as the bound
        status = notify_socket.with_key("STATUS")[-1][1]["STATUS"]
        assert status == "leader; AMI connected; 0 calls live; 0 records pending"
    finally:
        code = bridge.stop()
    assert code == 0
    messages = [m for _, m in notify_socket.drain()]
    stopping = [i for i, m in enumerate(messages) if m.get("STOPPING") == "1"]
    assert len(stopping) == 1 and messages[stopping[0]]["STATUS"].startswith("stopping")
    assert not any("WATCHDOG" in m for m in messages[stopping[0]:])  # no ping once stopping
    assert bridge.events("pbx_bridge_stopped")


def test_pings_stop_while_the_tracker_consumer_is_stalled(
        devenv: DevEnv, tmp_path: Path, notify_socket: NotifySocket) -> None:
    bridge = StallableBridge(derived_config(devenv.config_path, tmp_path / "stall.toml", 18442))
    under_systemd(bridge, notify_socket)
    bridge.start_stallable()
    try:
        wait_for_message(notify_socket, "READY", 10)
        time.sleep(1.0)
        assert notify_socket.with_key("WATCHDOG")
        bridge.signal(signal.SIGUSR1)  # the consumer's next get() never returns; the loop runs on
        stalled_at = time.monotonic()
        bridge.wait_for("systemd_watchdog_withheld", 5)
        time.sleep(2.0)
        late = [at for at, _ in notify_socket.with_key("WATCHDOG") if at > stalled_at + 1.0]
        assert late == []  # the loop still runs (STATUS below), but no ping for the stalled consumer
        status = notify_socket.with_key("STATUS")[-1][1]["STATUS"]
        assert status.startswith("tracker stalled") and "watchdog pings withheld" in status
    finally:
        bridge.kill()  # a stalled consumer never drains: only SIGKILL (systemd: the watchdog's SIGABRT)
