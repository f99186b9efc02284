"""A call writer in a process of its own, for crash tests: submits records and says so, until killed.

    python -m tests.support.writer_process JOURNAL DSN COUNT PREFIX [INTERVAL]

Prints `submitted <linkedid>` after each `submit` returned (the record is in the journal from
then on), `all submitted` at the end, then keeps running (writing, if the database answers)
until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pbx_bridge.storage.journal import Journal
from pbx_bridge.storage.writer import CallWriter, connect_writer
from pbx_bridge.tracker import CallEnded, CallRecord, Disposition

T0 = datetime(2026, 11, 23, 1, 30, tzinfo=UTC)


def ended_call(linkedid: str) -> CallEnded:
    """A finished, answered call record."""
    return CallEnded(CallRecord(
        linkedid=linkedid, did="4008001234", trunk="carrier", caller_number="13800000001", caller_name="张三客户",
        started_at=T0, ring_started_at=T0, answered_at=T0 + timedelta(seconds=7), ended_at=T0 + timedelta(seconds=11),
        ring_seconds=7.0, rings=2, within_ring_limit=True, answered_by="agent101", disposition=Disposition.ANSWERED,
        talk_seconds=4.0, hangup_cause=16, hangup_cause_text="Normal Clearing"), ())


async def main(journal_path: Path, dsn: str, count: int, prefix: str, interval: float) -> None:
    """Run a writer and submit `count` records, one every `interval` seconds."""
    writer = CallWriter(connect_writer(dsn, statement_timeout=1.0, connect_timeout=1.0),
                        journal=Journal.open(journal_path), flush_interval=0.05, max_backoff=0.5)
    writer.recover()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(writer.run())
        for n in range(count):
            linkedid = f"{prefix}-{n}"
            writer.submit(ended_call(linkedid))
            print(f"submitted {linkedid}", flush=True)
            await asyncio.sleep(interval)
        print("all submitted", flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    interval = float(sys.argv[5]) if len(sys.argv) > 5 else 0.002
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], interval))
