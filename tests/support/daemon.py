"""Run the real `pbx-bridge run` process for end-to-end tests and watch its JSON log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.env import REPO


class BridgeProcess:
    """`pbx-bridge run --config PATH` as a child process; its stderr log lines are collected."""

    def __init__(self, config: Path, business_time: str | None = None) -> None:
        """`business_time`: start pbx-bridge's business clock there (PBX_BRIDGE_FAKE_NOW)."""
        self.config = config
        self.env = {**os.environ, **({"PBX_BRIDGE_FAKE_NOW": business_time} if business_time else {})}
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0, ready: str = "routing_state_published") -> None:
        """Start the daemon and wait until it has logged in to AMI and logged `ready` (a restart
        forgets the log of the process before, so waits see the new one). A standby: "standby"."""
        with self._lock:
            self.lines, self.raw = [], []
        self._process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "pbx-bridge"), "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("ami_connected", timeout)
        self.wait_for(ready, timeout)

    @property
    def pbx(self) -> str:
        """The PBX name on the rows this daemon writes (from its log's `pbx_named`)."""
        named = self.events("pbx_named")
        assert named, "the daemon has not named its PBX yet"
        return str(named[-1]["pbx"])

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def _read(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            with self._lock:
                self.raw.append(line)
                with contextlib.suppress(json.JSONDecodeError):
                    self.lines.append(json.loads(line))

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log entries whose event is `name`."""
        with self._lock:
            return [line for line in self.lines if line.get("event") == name]

    def wait_for(self, name: str, timeout: float, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        """Wait until `count` log entries named `name` (with these field values) exist; fail
        with the log if not. Returns the matching entries."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found
            if self._process is not None and self._process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"pbx-bridge never logged {name!r} x{count}; log:\n" + "".join(self.raw[-40:]))

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for the bounded graceful shutdown, return the exit code."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise AssertionError("pbx-bridge did not stop within its shutdown bound") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (what the journal and the reconcile must make good)."""
        assert self._process is not None
        self._process.kill()
        self._process.wait(10)
        if self._reader is not None:
            self._reader.join(5)


def derived_config(base: Path, target: Path, api_port: int, extra: str = "") -> Path:
    """A copy of `base` whose ops API listens on `api_port`, with `extra` TOML appended (new
    tables only). So that it can run beside the module's daemon, it has its own journal (beside
    `target`) and its own [pbx] name: pbx-bridge refuses a second daemon for the same PBX."""
    text = base.read_text().replace('listen = "127.0.0.1:18400"', f'listen = "127.0.0.1:{api_port}"')
    text = re.sub(r'(?m)^spool_path = ".*"$', f'spool_path = "{target.parent / "spool.jsonl"}"', text)
    text += f'\n[pbx]\nname = "sandbox-beside-{api_port}"\n'
    target.write_text(text + ("\n" + extra if extra else ""))
    return target
