"""The writer under faults, against real PostgreSQL: SIGKILL, torn journal, full disk, PostgreSQL
stopped (fast, immediate) or hung, bad data. Nothing decided is lost.

Tests that stop or freeze PostgreSQL use a throwaway cluster of their own (scripts/pg.sh on a
free port), never the shared one; the rest use a scratch database on the shared cluster.
Each test prints its figures (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import generate_latest

from pbx_bridge.metrics import Metrics
from pbx_bridge.storage.journal import Journal, decode_line, record_line
from pbx_bridge.storage.migrations import migrate, sql_dir
from pbx_bridge.storage.writer import CallWriter, connect_writer, decision_from_dict, decision_to_json
from pbx_bridge.tracker import CallEnded
from tests.conftest import scratch_database
from tests.support.disk import fill, tiny_tmpfs
from tests.support.env import REPO, DevEnv
from tests.support.writer_process import ended_call

pytestmark = pytest.mark.integration

PG_SH = str(REPO / "scripts" / "pg.sh")


@dataclass(frozen=True)
class Cluster:
    """A throwaway PostgreSQL cluster that tests may stop, kill or freeze."""

    directory: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/pbx_bridge_faults?pbx_bridge.pbx=pbx"  # one PBX

    def start(self) -> None:
        subprocess.run([PG_SH, "start", str(self.directory), str(self.port)], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([PG_SH, "stop", str(self.directory), mode], check=True, capture_output=True)

    def processes(self) -> list[int]:
        """The postmaster and all its children."""
        postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == postmaster:
                        children.append(int(entry.name))
        return [postmaster, *children]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A cluster of the module's own, migrated; removed afterwards."""
    base = Path("/var/lib/pbx-bridge-dev")
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    made = Cluster(base / f"faults-{secrets.token_hex(4)}", free_port())
    made.start()
    try:
        async def create() -> None:
            admin = await asyncpg.connect(made.dsn.rsplit("/", 1)[0] + "/postgres")
            await admin.execute("CREATE DATABASE pbx_bridge_faults")
            await admin.close()
            conn = await asyncpg.connect(made.dsn)
            await migrate(conn, sql_dir())
            await conn.close()

        asyncio.run(create())
        yield made
    finally:
        made.stop("immediate")
        shutil.rmtree(made.directory, ignore_errors=True)


@pytest.fixture
def shared_dsn(devenv: DevEnv) -> Iterator[str]:
    """A scratch database of the test's own on the shared cluster (never stopped)."""
    with scratch_database(devenv, "faults") as dsn:
        yield dsn


async def linkedids(dsn: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT linkedid FROM calls WHERE linkedid LIKE $1", prefix + "-%")
    finally:
        await conn.close()
    return [r["linkedid"] for r in rows]


async def wait_until(condition: Any, timeout: float, step: float = 0.02) -> float:
    """Poll `condition()` until true; return the seconds it took (fail after `timeout`)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(writer: CallWriter, shutdown_timeout: float = 7.0) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(writer.run(shutdown_timeout=shutdown_timeout))
    try:
        yield task
    finally:
        writer.stop()
        await task
        writer.close()


def journal_entries(path: Path) -> list[int]:
    """Sequence numbers of the records in a journal file, read without taking its lock."""
    seqs = []
    for line in path.read_bytes().split(b"\n"):
        body = decode_line(line)
        if body is not None and "seq" in body:
            seqs.append(body["seq"])
    return seqs


# --- SIGKILL while PostgreSQL is down -----------------------------------------------------------

async def test_sigkill_while_postgresql_is_down_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    cluster.stop("fast")
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.support.writer_process", str(journal), cluster.dsn, "400", "kill", "0.002"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdout is not None
        submitted: list[str] = []
        for line in child.stdout:  # its log lines are on stdout too
            if not line.startswith("submitted "):
                continue
            submitted.append(line.split()[1])
            if len(submitted) == 250:
                child.send_signal(signal.SIGKILL)  # mid-stream, with PostgreSQL down
                break
        child.wait(10)
        submitted += [line.split()[1] for line in child.stdout.read().splitlines() if line.startswith("submitted")]
        assert child.returncode == -signal.SIGKILL
    finally:
        cluster.start()
    metrics = Metrics()
    writer = CallWriter(connect_writer(cluster.dsn), journal=Journal.open(journal), flush_interval=0.01,
                        metrics=metrics)
    recovered = writer.recover()
    async with running(writer):
        await wait_until(lambda: writer.pending == 0, 30)
    rows = set(await linkedids(cluster.dsn, "kill"))
    print(f"\nSIGKILL: {len(submitted)} submits had returned; journal replayed {recovered}; "
          f"{len(rows)} rows; missing {len(set(submitted) - rows)}")
    assert set(submitted) <= rows and recovered >= len(submitted)
    assert journal.stat().st_size == 0


# --- a torn last line ------------------------------------------------------------------------------

async def test_a_torn_last_line_is_skipped_counted_and_the_rest_is_written(shared_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = [record_line(n, decision_to_json(ended_call(f"torn-{n}"))) for n in range(1, 21)]
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the crash cut the last one
    metrics = Metrics()
    writer = CallWriter(connect_writer(shared_dsn), journal=Journal.open(path), flush_interval=0.01, metrics=metrics)
    assert writer.recover() == 19
    async with running(writer):
        writer.submit(ended_call("torn-after"))
        await wait_until(lambda: writer.pending == 0, 10)
    rows = await linkedids(shared_dsn, "torn")
    assert sorted(rows) == sorted([f"torn-{n}" for n in range(1, 20)] + ["torn-after"])
    assert 'pbx_bridge_journal_bad_lines_total{reason="torn"} 1.0' in generate_latest(metrics.registry).decode()
    assert path.with_name("journal.jsonl.corrupt").read_bytes() == lines[-1][: len(lines[-1]) // 2] + b"\n"
    print(f"\ntorn line: 19 of 20 records written, 1 torn line skipped and counted, {len(rows)} rows")


# --- a full disk -----------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only), unmounted afterwards."""
    with tiny_tmpfs(tmp_path / "tiny") as mount:
        yield mount


async def test_a_full_disk_keeps_records_in_memory_alerts_and_catches_up(
        shared_dsn: str, tiny_disk: Path) -> None:
    database_up = False
    real = connect_writer(shared_dsn)

    async def connect() -> asyncpg.Connection:
        if not database_up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return await real()

    path = tiny_disk / "journal.jsonl"
    alerts: list[dict[str, Any]] = []
    metrics = Metrics()
    writer = CallWriter(connect, journal=Journal.open(path), flush_interval=0.05, max_backoff=0.1,
                        metrics=metrics, alert=alerts.append)
    record_size = len(record_line(1, decision_to_json(ended_call("disk-00"))))
    filler = fill(tiny_disk, leave=6 * record_size)
    async with running(writer, shutdown_timeout=2):
        for n in range(40):
            writer.submit(ended_call(f"disk-{n:02}"))
        held = writer.not_journaled
        journaled = len(journal_entries(path))
        assert journaled + held == 40 and 0 < journaled < 40
        assert any(a["kind"] == "journal_unwritable" and "ENOSPC" in a["error"] for a in alerts)
        assert "pbx_bridge_journal_writable 0.0" in generate_latest(metrics.registry).decode()
        shown = writer.status()["journal"]  # what the public /healthz shows: no path, no error text
        assert shown["writable"] is False and shown["error"] == "ENOSPC" and str(tiny_disk) not in str(shown)
        await asyncio.sleep(0.5)
        assert writer.not_journaled == held  # still full: still in memory, nothing lost or dropped

        filler.unlink()  # space returns
        caught_up = await wait_until(lambda: writer.not_journaled == 0, 10)
        assert sorted(journal_entries(path)) == list(range(1, 41))  # the journal caught up, in full
        assert alerts[-1]["kind"] == "journal_writable_again" and writer.healthy

        filler = fill(tiny_disk, leave=0)  # full again (but for the journal's last page), then the database is back
        for n in range(40, 50):
            writer.submit(ended_call(f"disk-{n:02}"))
        held_again = writer.not_journaled
        assert held_again > 0
        database_up = True
        drained = await wait_until(lambda: writer.pending == 0, 20)
        await wait_until(lambda: writer.not_journaled == 0, 10)
    rows = await linkedids(shared_dsn, "disk")
    assert len(rows) == 50 and writer.dropped == 0
    print(f"\nfull disk: {journaled} of 40 records journaled before ENOSPC, {held} held in memory; journal caught "
          f"up {caught_up:.2f} s after space returned; full again: {held_again} of 10 more held in memory; all 50 "
          f"rows {drained:.2f} s after the database came back (its commits emptied the journal)")


def test_a_full_journal_is_not_called_writable_again_until_there_is_room(tiny_disk: Path) -> None:
    journal = Journal.open(tiny_disk / "journal.jsonl")
    filler = fill(tiny_disk, leave=0)
    body = decision_to_json(ended_call("room-1"))
    assert not journal.append(1, body) and not journal.writable
    journal.ack(1)  # nothing left to journal (all committed), but still no room
    assert journal.resume() is False and not journal.writable
    filler.unlink()
    assert journal.resume() is True and journal.writable and journal.append(2, body)
    journal.close()


# --- PostgreSQL stopped (fast, immediate) during writes --------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgresql_stopped_during_writes_loses_nothing(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    prefix = f"stop{mode}"
    metrics = Metrics()
    writer = CallWriter(connect_writer(cluster.dsn, statement_timeout=2.0), journal=Journal.open(tmp_path / "j"),
                        flush_interval=0.02, max_backoff=0.5, metrics=metrics)
    count = 1500

    async def produce() -> None:
        for n in range(count):
            writer.submit(ended_call(f"{prefix}-{n}"))
            await asyncio.sleep(0.002)

    async with running(writer) as task:
        producer = asyncio.create_task(produce())
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.stop, mode)
        stopped_at = time.monotonic()
        await asyncio.sleep(1.5)
        assert not task.done()  # the writer lives on
        pending_while_down = writer.pending
        await asyncio.to_thread(cluster.start)
        restarted = time.monotonic()
        await producer
        await wait_until(lambda: writer.pending == 0, 30)
        drained = time.monotonic() - restarted
    rows = await linkedids(cluster.dsn, prefix)
    text = generate_latest(metrics.registry).decode()
    errors = [line for line in text.splitlines() if line.startswith("pbx_bridge_writer_errors_total")]
    print(f"\nPostgreSQL stopped ({mode}): {pending_while_down} records waited while it was down "
          f"({restarted - stopped_at:.1f} s), all {len(rows)} of {count} written {drained:.2f} s after the "
          f"restart; errors: {errors}; rejected {writer.rejected}")
    assert sorted(rows) == sorted(f"{prefix}-{n}" for n in range(count))
    assert writer.rejected == 0 and writer.dropped == 0 and pending_while_down > 0
    assert 'kind="transient"' in "".join(errors) and 'kind="data"' not in "".join(errors)


# --- a hung PostgreSQL, and a bounded stop ----------------------------------------------------------------

async def test_a_hung_postgresql_stops_within_the_bound_and_the_rest_waits_in_the_journal(
        cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    writer = CallWriter(connect_writer(cluster.dsn), journal=Journal.open(path), flush_interval=0.02,
                        batch_size=20)
    task = asyncio.create_task(writer.run())  # the daemon's default bound: 7 s
    frozen: list[int] = []
    try:
        for n in range(50):
            writer.submit(ended_call(f"hung-{n}"))
        await wait_until(lambda: writer.pending == 0, 10)
        frozen = cluster.processes()
        for pid in frozen:  # the postmaster and every backend: accepts TCP, answers nothing
            os.kill(pid, signal.SIGSTOP)
        for n in range(50, 120):
            writer.submit(ended_call(f"hung-{n}"))
        await asyncio.sleep(1.0)  # a batch is in flight, hanging
        started = time.monotonic()
        writer.stop()
        await task
        stopped_in = time.monotonic() - started
        writer.close()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if not task.done():
            task.cancel()
    left = len(journal_entries(path))
    replay = CallWriter(connect_writer(cluster.dsn), journal=Journal.open(path), flush_interval=0.02)
    recovered = replay.recover()
    async with running(replay):
        await wait_until(lambda: replay.pending == 0, 30)
    rows = await linkedids(cluster.dsn, "hung")
    print(f"\nhung PostgreSQL: stop took {stopped_in:.2f} s (bound 7 s, README 10 s); {left} records left in the "
          f"journal, {recovered} replayed after SIGCONT; {len(rows)} of 120 rows")
    assert stopped_in < 8.0 and recovered == 70
    assert sorted(rows) == sorted(f"hung-{n}" for n in range(120))


async def test_stop_is_bounded_when_postgresql_is_down_or_refusing(cluster: Cluster, tmp_path: Path) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/x"  # nothing listens: refused at once
    timings = {}
    for name, dsn in (("refusing", unreachable), ("unknown database", cluster.dsn.replace("faults", "nope"))):
        writer = CallWriter(connect_writer(dsn), journal=Journal.open(tmp_path / f"{name}.jsonl"),
                            flush_interval=0.02)
        task = asyncio.create_task(writer.run())
        writer.submit(ended_call(f"down-{name}"))
        await asyncio.sleep(2.5)
        started = time.monotonic()
        writer.stop()
        await task
        timings[name] = time.monotonic() - started
        writer.close()
        assert len(journal_entries(tmp_path / f"{name}.jsonl")) == 1
    print(f"\nstop with PostgreSQL unreachable: {', '.join(f'{k} {v:.2f} s' for k, v in timings.items())}")
    assert all(t < 8.0 for t in timings.values())


# --- bad data: rejected, the rest committed --------------------------------------------------------------

async def test_bad_records_go_to_the_rejected_file_while_good_ones_commit(shared_dsn: str, tmp_path: Path) -> None:
    metrics = Metrics()
    alerts: list[dict[str, Any]] = []
    rejected = tmp_path / "spool.rejected.jsonl"
    writer = CallWriter(connect_writer(shared_dsn), journal=Journal.open(tmp_path / "journal.jsonl"),
                        rejected_path=rejected, flush_interval=0.01, metrics=metrics, alert=alerts.append)
    bad = {"bad-check": CallEnded(replace(ended_call("x").record, linkedid="bad-check", rings=-1), ()),  # CHECK
           "bad-nul": CallEnded(replace(ended_call("x").record, linkedid="bad-nul", caller_name="张\x00三"), ())}
    async with running(writer):
        for n in range(300):
            writer.submit(ended_call(f"good-{n}"))
            if n == 100:
                writer.submit(bad["bad-check"])
            if n == 200:
                writer.submit(bad["bad-nul"])
        await wait_until(lambda: writer.pending == 0, 20)
    rows = await linkedids(shared_dsn, "good")
    kept = [line for line in rejected.read_text().splitlines() if line]
    states = {}
    for line in kept:
        body = json.loads(line)
        decision = decision_from_dict(body)
        assert isinstance(decision, CallEnded)
        states[decision.record.linkedid] = body["rejected"]["sqlstate"]
    print(f"\nbad data: {len(rows)} of 300 good records committed; rejected {states}; "
          f"alerts {[a['kind'] for a in alerts]}")
    assert len(rows) == 300 and not await linkedids(shared_dsn, "bad")
    assert states == {"bad-check": "23514", "bad-nul": "22021"}
    assert oct(rejected.stat().st_mode & 0o777) == "0o600"
    assert [a["kind"] for a in alerts] == ["record_rejected", "record_rejected"]
    assert "pbx_bridge_records_rejected_total 2.0" in generate_latest(metrics.registry).decode()
