"""`make load`: real calls through the sandbox PBX under load, with the real daemon recording them.

Phase 1: N calls placed at once (default 200), each answered by a scripted phone after a scripted
ring time. Phase 2: a sustained rate (default 10 calls/s) for a while (default 120 s). Then every
call must have exactly one final record whose ring time matches the script. Reported: calls placed
vs records (lost, duplicated), ring-time error against the script, hangup -> commit (the row's
`updated_at`, the time of its writing transaction, minus its `ended_at`, Asterisk's hangup time),
the daemon's CPU share and peak RSS, and the AMI events/s its AMI user was sent. The table goes to
docs/performance.md. tests/e2e/test_load.py runs a short version (50 calls at once).

Run it only while holding the sandbox: `flock /tmp/pbx-sandbox.lock make load`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg

from pbx_bridge.ami.client import AmiClient
from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.config import load_settings
from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv, load_devenv
from tests.support.world import IGNORE, World, answer, connect_world, new_caller_number

AGENTS = ("agent101", "agent102")
OPEN_HOURS = "2026-11-24T10:00:00+08:00"  # a Tuesday morning in Shanghai: the group rings


@dataclass(frozen=True)
class Scripted:
    """One call: who answers, after how many seconds of ringing, and how long they talk."""

    number: str
    phone: str
    ring: float
    talk: float


@dataclass
class LoadResult:
    """What one load run measured."""

    placed: int = 0
    recorded: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    ring_errors: list[float] = field(default_factory=list)  # |record's ring_seconds - script|
    commit_delays: list[float] = field(default_factory=list)  # updated_at - ended_at
    wrong: list[str] = field(default_factory=list)  # records that do not say what was scripted
    cpu_share: float = 0.0
    peak_rss: int = 0
    events: int = 0
    seconds: float = 0.0
    polls: int = 0  # this benchmark's own SELECTs on the database (subtracted from the transactions)
    database: dict[str, float] = field(default_factory=dict)  # counter -> increase over the run


# PostgreSQL's own counters (cluster-private: only the sandbox, the daemon and this run use it).
# WAL and the database's transactions include Asterisk's CEL inserts: the load a PBX puts on it.
DB_COUNTERS = """
SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS transactions,
       (SELECT wal_bytes FROM pg_stat_wal) AS wal_bytes,
       pg_database_size(current_database()) AS database_bytes,
       (SELECT sum(n_tup_ins) FROM pg_stat_user_tables WHERE relname = 'cel') AS cel_rows,
       (SELECT sum(n_tup_ins + n_tup_upd) FROM pg_stat_user_tables
         WHERE relname IN ('calls', 'call_legs', 'policy_violations')) AS record_writes
"""


async def database_counters(dsn: str) -> dict[str, float]:
    """The counters of DB_COUNTERS now (after the statistics of finished sessions are flushed)."""
    await asyncio.sleep(2)  # backends flush their statistics within a second of going idle
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(DB_COUNTERS)
    finally:
        await conn.close()
    assert row is not None
    return {k: float(v or 0) for k, v in dict(row).items()}


def scripts(count: int, first: int = 0) -> list[Scripted]:
    """`count` calls answered alternately by each agent after 2..6 s of ringing, talking 2 s."""
    return [Scripted(new_caller_number(), AGENTS[(first + i) % 2], 2.0 + (first + i) % 5, 2.0) for i in range(count)]


async def prepare(world: World, calls: list[Scripted]) -> None:
    """Tell the world's phones how to react to each caller."""
    for call in calls:
        for phone in AGENTS:
            await world.set_phone(call.number, phone, answer(call.ring, call.talk) if phone == call.phone else IGNORE)


async def place(world: World, devenv: DevEnv, calls: list[Scripted], rate: float | None) -> None:
    """Place the calls: all at once (`rate` None), or `rate` a second."""
    start = time.monotonic()
    for n, call in enumerate(calls):
        if rate is not None:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await world.call(devenv.hotline_numbers[n % 2], call.number, f"负载{n}")


async def check(dsn: str, calls: list[Scripted], timeout: float, result: LoadResult) -> None:
    """Wait until every call has a final row (or `timeout`), then compare them with the script."""
    numbers = [c.number for c in calls]
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT caller_number, answered_by, ring_seconds, disposition, ended_at, updated_at FROM calls "
                "WHERE caller_number = ANY($1::text[])", numbers)
            result.polls += 1
            finished = {r["caller_number"] for r in rows if r["ended_at"] is not None}
            if len(finished) == len(numbers) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    by_number: dict[str, list[asyncpg.Record]] = {n: [] for n in numbers}
    for row in rows:
        by_number[row["caller_number"]].append(row)
    result.placed += len(calls)
    for call in calls:
        found = by_number[call.number]
        result.recorded += len(found)
        if not found or found[0]["ended_at"] is None:
            result.lost.append(call.number)
            continue
        if len(found) > 1:
            result.duplicated.append(call.number)
        row = found[0]
        if row["answered_by"] != call.phone or row["disposition"] != "answered" or row["ring_seconds"] is None:
            result.wrong.append(f"{call.number}: {row['answered_by']} {row['disposition']} {row['ring_seconds']}")
            continue
        result.ring_errors.append(abs(float(row["ring_seconds"]) - call.ring))
        result.commit_delays.append((row["updated_at"] - row["ended_at"]).total_seconds())


class Sampler:
    """The daemon's CPU time and peak RSS, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_cpu = self.cpu()
        self.start = time.monotonic()

    def cpu(self) -> float:
        """User + system CPU seconds so far."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self) -> int:
        """VmHWM: the peak resident set size."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def share(self) -> float:
        """CPU share of one core since the start."""
        return (self.cpu() - self.start_cpu) / (time.monotonic() - self.start)


async def count_events(devenv: DevEnv, counter: list[int]) -> AmiClient:
    """A second AMI session as the daemon's own AMI user: it is sent the same events."""
    settings = load_settings(devenv.config_path)

    def seen(_: AmiMessage) -> None:
        counter[0] += 1

    client = AmiClient(host=settings.ami.host, port=settings.ami.port, username=settings.ami.username,
                       secret=settings.ami.resolved_secret().get_secret_value(), on_event=seen,
                       on_suspicion=lambda _: None)
    return client


async def run_load(devenv: DevEnv, pid: int, burst: int, rate: float, seconds: float,
                   progress: Callable[[str], None] = print) -> LoadResult:
    """The whole load run against a daemon already running as process `pid`."""
    result = LoadResult()
    counter = [0]
    client = await count_events(devenv, counter)
    listener = asyncio.create_task(client.run(), name="load-event-counter")
    try:
        async with asyncio.timeout(10):
            await client.connected.wait()
        before = await database_counters(devenv.dsn)
        sampler = Sampler(pid)
        async with connect_world(devenv) as world:
            first = scripts(burst)
            await prepare(world, first)
            progress(f"load: {burst} calls at once")
            await place(world, devenv, first, None)
            await check(devenv.dsn, first, 60 + burst / 5, result)
            if seconds > 0 and rate > 0:
                sustained = scripts(int(rate * seconds), burst)
                await prepare(world, sustained)
                progress(f"load: {rate:g} calls/s for {seconds:g} s ({len(sustained)} calls)")
                await place(world, devenv, sustained, rate)
                await check(devenv.dsn, sustained, 60, result)
        result.cpu_share = sampler.share()
        result.peak_rss = sampler.peak_rss()
        result.seconds = time.monotonic() - sampler.start
        result.events = counter[0]
        after = await database_counters(devenv.dsn)
        result.database = {k: after[k] - before[k] for k in after}
        result.database["transactions"] -= result.polls + 2  # the counters' own two reads
    finally:
        client.stop()
        await listener
    return result


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN if empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def table(result: LoadResult, burst: int, rate: float, seconds: float) -> str:
    """The load section of docs/performance.md."""
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    return "\n".join([
        f"{burst} calls at once, then {rate:g} calls/s for {seconds:g} s, through the sandbox PBX (Asterisk 22) "
        f"and the real daemon; phones answer after a scripted 2–6 s of ringing and talk 2 s.", "",
        "| figure | measured | goal |", "|---|---:|---|",
        f"| calls placed / final records | {result.placed:,} / {result.recorded - len(result.lost):,} | equal |",
        f"| lost / duplicated / not as scripted | {len(result.lost)} / {len(result.duplicated)} / "
        f"{len(result.wrong)} | 0 / 0 / 0 |",
        f"| ring-time error against the script, p50 / p99 | {ms(percentile(result.ring_errors, 50))} / "
        f"{ms(percentile(result.ring_errors, 99))} | p99 ≤ 100 ms |",
        f"| hangup → commit, p50 / p99 | {ms(percentile(result.commit_delays, 50))} / "
        f"{ms(percentile(result.commit_delays, 99))} | |",
        f"| daemon CPU (share of one core) / peak RSS | {result.cpu_share:.1%} / "
        f"{result.peak_rss / 2**20:.1f} MiB | |",
        f"| AMI events/s sent to the daemon's user | {result.events / max(result.seconds, 1e-9):,.0f} "
        f"({result.events:,} in {result.seconds:.0f} s) | |",
        "", *database_load(result),
    ])


def database_load(result: LoadResult) -> list[str]:
    """The database's load per 1,000 calls (what sizing a shared database for many PBXs needs)."""
    per = 1000 / max(result.placed, 1)
    db = result.database
    return [
        f"PostgreSQL's load per 1,000 calls, from its own counters over the run (pg_stat_database, "
        f"pg_stat_wal, pg_stat_user_tables; the benchmark's {result.polls} polls subtracted). WAL and "
        "transactions include Asterisk's CEL inserts (cel_pgsql: one transaction per CEL event).", "",
        "| per 1,000 calls | measured |", "|---|---:|",
        f"| transactions committed (pbx-bridge and Asterisk's CEL) | {db.get('transactions', 0) * per:,.0f} |",
        f"| CEL rows inserted by Asterisk | {db.get('cel_rows', 0) * per:,.0f} |",
        f"| rows written by pbx-bridge (calls, legs, violations; inserts + updates) | "
        f"{db.get('record_writes', 0) * per:,.0f} |",
        f"| WAL written | {db.get('wal_bytes', 0) * per / 2**20:,.1f} MiB |",
        f"| database growth | {db.get('database_bytes', 0) * per / 2**20:,.1f} MiB |",
    ]


def main() -> None:
    """Entry point of `make load`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    devenv = load_devenv()
    bridge = BridgeProcess(devenv.config_path, business_time=OPEN_HOURS)
    bridge.start()
    try:
        assert bridge._process is not None
        result = asyncio.run(run_load(devenv, bridge._process.pid, args.burst, args.rate, args.seconds))
    finally:
        code = bridge.stop()
    body = table(result, args.burst, args.rate, args.seconds)
    print(body)
    if not args.no_doc:
        from tests.bench.bench_pipeline import write_section

        write_section("load", body + "\n\nCommand: `flock /tmp/pbx-sandbox.lock make load` "
                      f"(`--burst {args.burst} --rate {args.rate:g} --seconds {args.seconds:g}`).", "make load")
    if code != 0 or result.lost or result.duplicated or result.wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
