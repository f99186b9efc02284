"""One pbx-bridge per PBX: a PostgreSQL session advisory lock keyed by the PBX's identity.

The lock lives on a dedicated connection kept for the daemon's life (session-level: it goes
when the session goes, so a killed daemon never leaves it behind; the server notices a vanished
client within about 25 s thanks to the TCP keepalives set on that connection). A daemon that
finds the lock held refuses to start, naming the holder from `pg_locks` and `pg_stat_activity`.
Shaped for leader election later: `acquire` (try once), `held`, `keep` (hold it, re-take it
after a lost connection), `release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from pbx_bridge.aio import wait_set, within
from pbx_bridge.backoff import Backoff

log = structlog.get_logger("pbx_bridge.leader")

LockConnect = Callable[[str], Awaitable[asyncpg.Connection]]
Alert = Callable[[dict[str, Any]], None]
UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
LOOPBACK = ("localhost", "::1")

HOLDER_QUERY = """
SELECT l.pid, a.application_name, host(a.client_addr) AS client, a.backend_start, a.usename
  FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid
 LIMIT 1"""


class AlreadyRunningError(Exception):
    """Another pbx-bridge already runs for this PBX (its message is the one line to print)."""


def pbx_identity(ami_host: str, ami_port: int, name: str | None = None) -> str:
    """What identifies the PBX: `[pbx] name` if set, else its AMI address (with this machine's
    host name when AMI is on loopback, since every site's local Asterisk is 127.0.0.1)."""
    if name:
        return name
    if ami_host in LOOPBACK or ami_host.startswith("127."):
        return f"{socket.gethostname()}/{ami_host}:{ami_port}"
    return f"{ami_host}:{ami_port}"


def lock_key(identity: str) -> int:
    """The advisory lock's bigint key for a PBX identity."""
    digest = hashlib.sha256(b"pbx-bridge pbx lock\0" + identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def session_name() -> str:
    """The application_name of the lock's session: who holds it, for the other daemon's message."""
    return f"pbx-bridge {socket.gethostname()[:32]} pid {os.getpid()}"[:63]


SINGLE_KEEPALIVE = (10, 5, 3)  # idle, interval, count: a vanished daemon's lock is freed in about 25 s
PAIR_KEEPALIVE = (1, 1, 2)  # a standby pair: freed in about 3 s, after the cut-off leader fenced itself


def lock_connect(dsn: str, timeout: float = 5.0, keepalive: tuple[int, int, int] = SINGLE_KEEPALIVE) -> LockConnect:
    """Connections for the lock: bounded, named, with server-side TCP keepalives so the server
    drops the session (and the lock) of a vanished daemon quickly."""
    idle, interval, count = keepalive

    async def connect(application_name: str) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, timeout=timeout, command_timeout=timeout,
            server_settings={"application_name": application_name, "tcp_keepalives_idle": str(idle),
                             "tcp_keepalives_interval": str(interval), "tcp_keepalives_count": str(count)})
        return conn
    return connect


class PbxLock:
    """The advisory lock of one PBX, on a connection of its own."""

    def __init__(self, connect: LockConnect, identity: str, *, check_interval: float = 5.0,
                 timeout: float = 5.0) -> None:
        self.identity = identity
        self.key = lock_key(identity)
        self.name = session_name()
        self.holder: str | None = None  # who holds it, when another session does
        self.ever_held = False
        self._connect = connect
        self._check_interval = check_interval
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (as far as its connection is alive)."""
        return self._conn is not None and not self._conn.is_closed()

    async def acquire(self) -> bool:
        """Try once to take the lock: True if this process holds it, False if another session does
        (`holder` then describes it). Database errors propagate (the caller decides)."""
        if self.held:
            return True
        conn = await within(self._connect(self.name), self._timeout)
        try:
            if await within(conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key), self._timeout):
                self._conn, conn = conn, None
                self.ever_held = True
                self.holder = None
                log.info("pbx_lock_acquired", pbx=self.identity)
                return True
            self.holder = await self._describe_holder(conn)
            return False
        finally:
            if conn is not None:
                await _close(conn)

    async def _describe_holder(self, conn: asyncpg.Connection) -> str | None:
        """Who holds the lock: application_name, server pid, client address, since when."""
        try:
            row = await within(conn.fetchrow(HOLDER_QUERY, (self.key >> 32) & 0xFFFFFFFF,
                                             self.key & 0xFFFFFFFF), self._timeout)
        except UNREACHABLE as exc:
            log.warning("pbx_lock_holder_unknown", error=str(exc) or type(exc).__name__)
            return None
        if row is None:
            return None
        since = f", since {row['backend_start']:%Y-%m-%d %H:%M:%S %Z}" if row["backend_start"] else ""
        client = row["client"] or "a local socket"
        user = f" as {row['usename']}" if row["usename"] else ""
        return f"{row['application_name'] or 'a session'!r} (server pid {row['pid']}, from {client}{user}{since})"

    def refusal(self) -> str:
        """The one line a refused second daemon prints."""
        holder = self.holder or "a session whose details this database user cannot see"
        return (f"another pbx-bridge already runs for the PBX {self.identity!r} against this database: "
                f"{holder} holds its lock; refusing to start a second one (stop the other first, "
                f"or give each PBX its own [pbx] name)")

    async def alive(self) -> bool:
        """Ping the lock's connection; False (and the connection dropped) if it is gone."""
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            return False
        try:
            await within(conn.fetchval("SELECT 1"), self._timeout)
            return True
        except UNREACHABLE as exc:
            log.error("pbx_lock_connection_lost", pbx=self.identity, error=str(exc) or type(exc).__name__)
            self._conn = None
            conn.terminate()
            return False

    async def keep(self, stop: asyncio.Event, alert: Alert | None = None) -> None:
        """Hold the lock until `stop`: check its connection every few seconds and take it again
        when lost. A process that never held it (it started while the database was unreachable)
        and finds another holder raises AlreadyRunningError: it is the second daemon."""
        backoff = Backoff(1.0, 30.0)
        lost_alerted = False
        while not stop.is_set():
            if self.held and await self.alive():
                backoff.reset()
                await wait_set(stop, self._check_interval)
                continue
            try:
                got = await self.acquire()
            except UNREACHABLE as exc:
                log.warning("pbx_lock_unavailable", pbx=self.identity, error=str(exc) or type(exc).__name__)
                got = None
            if got:
                if lost_alerted and alert is not None:
                    alert({"service": "pbx-bridge", "kind": "pbx_lock_recovered", "pbx": self.identity})
                lost_alerted = False
                continue
            if got is False:
                if not self.ever_held:
                    raise AlreadyRunningError(self.refusal())
                if self.holder is not None and repr(self.name) in self.holder:
                    await self._end_stale_session()
                    continue
                log.error("pbx_lock_held_by_other", pbx=self.identity, holder=self.holder,
                          effect="two pbx-bridge instances may be running for this PBX")
                if not lost_alerted and alert is not None:
                    alert({"service": "pbx-bridge", "kind": "pbx_lock_lost", "pbx": self.identity,
                           "holder": self.holder})
                    lost_alerted = True
            await wait_set(stop, backoff.next_delay())

    async def _end_stale_session(self) -> None:
        """Our own earlier session still holds the lock (its connection broke one-sidedly): end it."""
        with contextlib.suppress(*UNREACHABLE):
            conn = await within(self._connect(self.name + " cleanup"), self._timeout)
            try:
                await within(conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND pid <> pg_backend_pid()", self.name), self._timeout)
                log.warning("pbx_lock_stale_session_ended", pbx=self.identity)
            finally:
                await _close(conn)

    async def release(self) -> None:
        """Give the lock up (closing its session; bounded, also with the database hung)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)
            log.info("pbx_lock_released", pbx=self.identity)


async def _close(conn: asyncpg.Connection) -> None:
    """Close within a second, else drop the socket (the server then ends the session)."""
    if conn.is_closed():
        return
    try:
        await within(conn.close(), 1.0)
    except UNREACHABLE:
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise


async def hold_pbx_lock(dsn: str, identity: str) -> PbxLock:
    """Take the PBX lock at start. Raise AlreadyRunningError if another pbx-bridge holds it; if the
    database does not answer, start anyway (records are journaled) and let `keep` take it later."""
    lock = PbxLock(lock_connect(dsn), identity)
    try:
        if not await lock.acquire():
            raise AlreadyRunningError(lock.refusal())
    except UNREACHABLE as exc:
        log.warning("pbx_lock_deferred", pbx=identity, error=str(exc) or type(exc).__name__,
                    effect="started without the single-instance check; it is made once the database answers")
    return lock
