"""The real daemon (`pbx-bridge run`) for the benchmark: a scratch database that reports each
commit, a config pointing at the stand-in AMI, a webhook receiver, and the process itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiohttp import web

from pbx_bridge.storage.migrations import migrate, sql_dir
from tests.support.env import REPO

PG_PORT = os.environ.get("PBX_BRIDGE_PG_PORT", "15432")
ADMIN_DSN = f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres"
# Fired at commit: NOTIFY is delivered only when the writing transaction commits.
COMMIT_TRIGGER = """
CREATE FUNCTION bench_committed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.ended_at IS NOT NULL THEN PERFORM pg_notify('bench_committed', NEW.linkedid); END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER bench_committed AFTER INSERT OR UPDATE ON calls
  FOR EACH ROW EXECUTE FUNCTION bench_committed();
"""


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A freshly migrated database on the private cluster, with the commit trigger; dropped after."""
    name = f"pbx_bridge_bench_{secrets.token_hex(4)}"
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, sql_dir())
            await conn.execute(COMMIT_TRIGGER)
        finally:
            await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass
class Commits:
    """Final call rows as PostgreSQL commits them: linkedid -> this host's monotonic time."""

    at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _notified(self, _conn: object, _pid: int, _channel: str, linkedid: str) -> None:
        self.at.setdefault(linkedid, time.monotonic())
        self.changed.set()

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Until `count` final rows were committed; False if not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.at) < count:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()
        return True


@contextlib.asynccontextmanager
async def listen_commits(dsn: str) -> AsyncIterator[Commits]:
    """Collect the commit notifications of the scratch database."""
    commits = Commits()
    conn = await asyncpg.connect(dsn)
    await conn.add_listener("bench_committed", commits._notified)
    try:
        yield commits
    finally:
        await conn.close()


@dataclass
class Webhooks:
    """Alerts the daemon posted: (wall-clock time received, payload)."""

    received: list[tuple[float, dict[str, object]]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, Webhooks]]:
    """A local HTTP endpoint for the daemon's alert webhook; yields its URL and what it got."""
    hooks = Webhooks()

    async def alert(request: web.Request) -> web.Response:
        hooks.received.append((time.time(), await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alert", alert)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/alert", hooks
    finally:
        await runner.cleanup()


def free_port() -> int:
    """A free TCP port on the loopback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """`pbx-bridge run` as a child process; its log goes to a file in its own directory."""

    process: subprocess.Popen[bytes]
    directory: Path
    api_port: int

    def rss_bytes(self) -> int:
        """Its resident set size now."""
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cpu_seconds(self) -> float:
        """User + system CPU time it has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_events(self, name: str) -> list[dict[str, object]]:
        """Its log entries named `name`."""
        out = []
        for line in (self.directory / "daemon.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out


@contextlib.asynccontextmanager
async def daemon(dsn: str, ami_port: int, secret: str, webhook: str) -> AsyncIterator[Daemon]:
    """Run the real daemon against the stand-in AMI and the scratch database; SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="pbx-bridge-bench-") as tmp:
        directory = Path(tmp)
        (directory / "ami.secret").write_text(secret + "\n")
        (directory / "ami.secret").chmod(0o600)
        api_port = free_port()
        config = directory / "pbx-bridge.toml"
        config.write_text(f"""timezone = "Asia/Shanghai"
[ami]
host = "127.0.0.1"
port = {ami_port}
username = "bench"
secret_file = "{directory / "ami.secret"}"
ping_interval_seconds = 5.0
[database]
dsn = "{dsn}"
spool_path = "{directory / "spool.jsonl"}"
[hotline]
numbers = ["4008001234", "4008005678"]
trunk = "carrier"
[alerts]
webhook_url = "{webhook}"
[api]
listen = "127.0.0.1:{api_port}"
[pbx]
name = "bench"
[reconcile]
enabled = false
""")
        log = (directory / "daemon.log").open("wb")
        command = [str(REPO / ".venv" / "bin" / "pbx-bridge"), "run", "--config", str(config)]
        if trace := os.environ.get("PBX_BRIDGE_BENCH_WRAPPER"):  # a script that wraps the daemon (diagnosis)
            command = [sys.executable, trace, *command[1:]]
        if profile := os.environ.get("PBX_BRIDGE_BENCH_PROFILE"):  # cProfile the daemon into this file
            command = [sys.executable, "-m", "cProfile", "-o", profile, *command]
        process = subprocess.Popen(command,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   env={**os.environ, "PBX_BRIDGE_FAKE_NOW": "2026-11-24T10:00:00+08:00"})
        try:
            yield Daemon(process, directory, api_port)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


async def scrape(port: int) -> str:
    """The daemon's /metrics text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.partition(b"\r\n\r\n")[2].decode()


def metric(text: str, name: str) -> float | None:
    """One sample's value from Prometheus text (the first line starting with `name`)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None
