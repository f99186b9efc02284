"""`make bench`: throughput, latency under load and memory of the AMI -> record pipeline.

Every figure is measured in one run, beside its baseline measured in the same run: panoramisk
1.4's own parse of the same bytes (decoding and `Message.from_line` per message). The workload
is real: captured AMI streams (tests/fixtures/ami), renamed per copy. The full pipeline and the
latencies are measured on the real daemon (`pbx-bridge run`) reading a stand-in AMI server and
writing to a scratch database on the private PostgreSQL; a row counts once it is committed
(a trigger NOTIFYs at commit). The result is written to docs/performance.md.

Environment: PBX_BRIDGE_BENCH_LOAD_SECONDS (default 60), PBX_BRIDGE_BENCH_MEMORY_CALLS
(default 1,000,000), PBX_BRIDGE_BENCH_QUICK=1 (a short smoke run that does not write the doc).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from panoramisk.ami_protocol import AMIProtocol

from pbx_bridge.ami.wire import AmiFramer, AmiMessage
from pbx_bridge.dialplan import event_key, event_key_id
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from tests.bench import harness
from tests.bench.fake_ami import FakeAmi
from tests.bench.workload import (
    CHANNEL_HEADER,
    LINKEDID,
    Scheduled,
    interleaved,
    stamped,
    template,
    timeline,
)
from tests.support.capture import FIXTURE_EVENT_KEY
from tests.support.env import REPO

SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier", event_key=FIXTURE_EVENT_KEY)
DOC = REPO / "docs" / "performance.md"
SECRET = "bench-secret"
CHUNK = 4096
QUICK = os.environ.get("PBX_BRIDGE_BENCH_QUICK") == "1"
# live calls -> (copies interleaved, rounds): about 52,000 events per measurement (a steady state:
# the last batch's flush is a small part of it).
SIZES = {3: (1, 700), 210: (70, 10), 2100: (700, 1)} if not QUICK else {3: (1, 10), 210: (70, 1)}
LOAD_SECONDS = float(os.environ.get("PBX_BRIDGE_BENCH_LOAD_SECONDS", "5" if QUICK else "60"))
MEMORY_CALLS = int(os.environ.get("PBX_BRIDGE_BENCH_MEMORY_CALLS", "20000" if QUICK else "1000000"))
CALLS_PER_SECOND = 100
# Of every 50 calls: 44 answered in 7 s, 5 ringing 17 s (the ring limit passes while they ring),
# 1 leaked outbound channel on the hotline trunk (the guard hangs it up).
MIX = (("answered_7s_talk_4s", 44), ("answered_17s", 5), ("outbound_leaked", 1))


# --- throughput -------------------------------------------------------------------------------

def stream(copies: int, rounds: int, key: str = FIXTURE_EVENT_KEY, seq: int = 1000,
           tag: str = "") -> tuple[bytes, int, int]:
    """`rounds` rounds of `copies` interleaved copies of the 3-call capture: (bytes, events, calls)."""
    one, count = interleaved("concurrent_3", copies, key)
    banner, _, body = one.partition(b"\r\n")
    parts, seq_re = [], re.compile(rb"\r\nSequenceNumber: (\d+)")
    for r in range(rounds):
        shift = seq - 1000 + r * count

        def renumber(found: re.Match[bytes], shift: int = shift) -> bytes:
            return b"\r\nSequenceNumber: %d" % (int(found.group(1)) + shift)

        parts.append(seq_re.sub(renumber, body.replace(b"pbx-", f"pbx-{tag}r{r}-".encode())))
    return banner + b"\r\n" + b"".join(parts), count * rounds, 3 * copies * rounds


class _NullTransport:
    def write(self, data: bytes) -> None:
        return None


def panoramisk_parse(data: bytes) -> int:
    """panoramisk 1.4's AMIProtocol.data_received (decoding, framing, Message.from_line per
    message) over the bytes in 4 KiB reads, its dispatch left out."""
    protocol = AMIProtocol()
    protocol.connection_made(_NullTransport())
    messages = 0

    def handle(message: Any) -> None:
        nonlocal messages
        messages += 1

    protocol.handle_message = handle
    for start in range(0, len(data), CHUNK):
        protocol.data_received(data[start:start + CHUNK])
    return messages


def frame(data: bytes) -> list[AmiMessage]:
    """pbx-bridge's framing (bytes -> messages) over 4 KiB reads."""
    framer = AmiFramer()
    return [m for start in range(0, len(data), CHUNK) for m in framer.feed(data[start:start + CHUNK])]


def frame_and_track(data: bytes) -> int:
    """Framing, then every message through the pure tracker; the number of decisions."""
    framer = AmiFramer()
    state, decisions = TrackerState(), 0
    for start in range(0, len(data), CHUNK):
        for message in framer.feed(data[start:start + CHUNK]):
            state, out = apply(state, message, SETTINGS)
            decisions += len(out)
    assert not state.calls, "every call must end"
    return decisions


def best_of(runs: int, works: list[Callable[[], object]]) -> list[float]:
    """Seconds of each work, the best of `runs` runs, the works alternated (so that a noisy
    neighbour on the machine slows baseline and subject alike)."""
    best = [float("inf")] * len(works)
    for _ in range(runs):
        for i, work in enumerate(works):
            start = time.perf_counter()
            work()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@dataclass
class Throughput:
    live: int
    events: int
    panoramisk: float  # events per second
    framing: float
    tracker: float
    pipeline: float | None = None


async def full_pipeline(daemon: harness.Daemon, ami: FakeAmi, commits: harness.Commits, data: bytes,
                        events: int, calls: int) -> float:
    """Events per second from the first byte sent to the last final row committed."""
    before = len(commits.at)
    start = time.monotonic()
    ami.writer.write(data.partition(b"\r\n")[2])
    await ami.writer.drain()
    if not await commits.wait_for(before + calls, 120):
        raise AssertionError(f"only {len(commits.at) - before} of {calls} calls committed; "
                             f"see {daemon.directory / 'daemon.log'}")
    return events / (max(list(commits.at.values())[before:]) - start)


# --- latency ----------------------------------------------------------------------------------

@dataclass
class Latency:
    seconds: float
    calls: int
    events: int
    commit: list[float] = field(default_factory=list)  # final Hangup sent -> final row committed
    alert: list[float] = field(default_factory=list)  # ring limit passed -> webhook received
    hangup: list[float] = field(default_factory=list)  # leaked channel's Newchannel sent -> AMI Hangup received
    lag_max: float | None = None
    cpu_share: float = 0.0
    rss_start: int = 0
    rss_end: int = 0
    behind_max: float = 0.0  # how late the stand-in sent an event, at worst
    ring_alerts_expected: int = 0
    leaks_expected: int = 0


def load_plan(seconds: float) -> list[tuple[float, Any]]:
    """CALLS_PER_SECOND calls a second for `seconds`, spread evenly, in the MIX's proportions."""
    kinds = [template(name) for name, count in MIX for _ in range(count)]
    total = int(seconds * CALLS_PER_SECOND)
    return [(i / CALLS_PER_SECOND, kinds[i % len(kinds)]) for i in range(total)]


async def replay(ami: FakeAmi, events: list[Scheduled], channels: dict[str, str], wall0: float,
                 mono0: float, result: Latency) -> tuple[dict[int, float], dict[str, float]]:
    """Send every event when it is due, stamped as Asterisk would; return when each call's last
    event and each leaked channel's Newchannel went out."""
    last_of: dict[int, int] = {}
    for i, item in enumerate(events):
        last_of[item.instance] = i
    ended: dict[int, float] = {}
    leaked: dict[str, float] = {}
    seq = 10_000_000
    i = 0
    while i < len(events):
        now = time.monotonic()
        due = mono0 + events[i].due
        if due > now:
            await asyncio.sleep(due - now)
            continue
        result.behind_max = max(result.behind_max, now - due)
        batch = []
        while i < len(events) and mono0 + events[i].due <= now:
            item = events[i]
            seq += 1
            batch.append(stamped(item.data, wall0 + item.due, seq))
            if item.kind == "outbound_leaked" and item.data.startswith(b"Event: Newchannel") \
                    and b"\r\nChannelState: 0\r\n" in item.data:
                channel = CHANNEL_HEADER.search(item.data)
                linkedid = LINKEDID.search(item.data)
                if channel and linkedid:
                    channels[channel.group(1).decode()] = linkedid.group(1).decode()
                    leaked[channel.group(1).decode()] = -1.0
            if last_of[item.instance] == i:
                ended[item.instance] = -1.0
            i += 1
        ami.writer.write(b"".join(batch))
        sent = time.monotonic()
        for instance in [k for k, v in ended.items() if v < 0]:
            ended[instance] = sent
        for channel_name in [k for k, v in leaked.items() if v < 0]:
            leaked[channel_name] = sent
        await ami.writer.drain()
    return ended, leaked


async def latency(dsn: str) -> Latency:
    """100 calls a second for LOAD_SECONDS through the real daemon."""
    plan = load_plan(LOAD_SECONDS)
    key = event_key(SECRET)
    events = timeline(plan, key)
    result = Latency(LOAD_SECONDS, len(plan), len(events))
    result.ring_alerts_expected = sum(1 for _, t in plan if t.name == "answered_17s")
    result.leaks_expected = sum(1 for _, t in plan if t.name == "outbound_leaked")
    linkedids = {i: _call_linkedid(item) for i, item in _first_newchannels(events).items()}
    channels: dict[str, str] = {}
    ami = FakeAmi(event_key_id(key), lambda channel: channels.get(channel, ""))
    port = await ami.start()
    async with harness.webhook_receiver() as (url, hooks), harness.listen_commits(dsn) as commits, \
            harness.daemon(dsn, port, SECRET, url) as bridge:
        await _ready(ami, bridge)
        await asyncio.sleep(1.0)
        result.rss_start = bridge.rss_bytes()
        cpu0, t0 = bridge.cpu_seconds(), time.monotonic()
        wall0, mono0 = time.time() + 0.5, time.monotonic() + 0.5
        ended, leaked = await replay(ami, events, channels, wall0, mono0, result)
        calls_with_rows = sum(1 for _, t in plan if t.name != "outbound_leaked")
        await commits.wait_for(calls_with_rows, 60)
        await asyncio.sleep(1.0)  # late webhooks
        result.cpu_share = (bridge.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        result.rss_end = bridge.rss_bytes()
        text = await harness.scrape(bridge.api_port)
        result.lag_max = harness.metric(text, "pbx_bridge_event_loop_lag_max_seconds")
    await ami.close()
    for instance, sent in ended.items():
        committed = commits.at.get(linkedids.get(instance, ""))
        if committed is not None:
            result.commit.append(committed - sent)
    for at, payload in hooks.received:
        if payload.get("kind") == "ring_limit":
            occurred = datetime.fromisoformat(str(payload["occurred_at"])).timestamp()
            result.alert.append(at - occurred)
    for channel, sent in leaked.items():
        if channel in ami.seen.hangups:
            result.hangup.append(ami.seen.hangups[channel] - sent)
    return result


def _first_newchannels(events: list[Scheduled]) -> dict[int, Scheduled]:
    """Each call's first inbound Newchannel on the trunk (its Uniqueid is the call's Linkedid)."""
    out: dict[int, Scheduled] = {}
    for item in events:
        if item.instance not in out and item.data.startswith(b"Event: Newchannel") \
                and b"\r\nChannel: PJSIP/carrier-" in item.data and b"\r\nChannelState: 4\r\n" in item.data:
            out[item.instance] = item
    return out


def _call_linkedid(item: Scheduled) -> str:
    found = LINKEDID.search(item.data)
    return found.group(1).decode() if found else ""


async def _ready(ami: FakeAmi, bridge: harness.Daemon) -> None:
    """Until the daemon has logged in and taken its channel snapshot (its events follow it)."""
    deadline = time.monotonic() + 30
    while not ami.ready.is_set():
        if bridge.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("the daemon did not log in: " + (bridge.directory / "daemon.log").read_text()[-3000:])
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the rest of the login's actions


# --- memory -------------------------------------------------------------------------------------

def memory() -> list[tuple[int, int]]:
    """RSS (bytes) after each tenth of MEMORY_CALLS calls replayed through framing and the
    tracker, in a process of its own."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("memory.py")), str(MEMORY_CALLS)],
                         check=True, capture_output=True, text=True).stdout
    return [(int(calls), int(rss)) for calls, rss in (line.split() for line in out.splitlines() if line.strip())]


# --- report -------------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def machine() -> str:
    """CPU model, cores, memory, Python and PostgreSQL versions."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    postgres = "?"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        postgres = subprocess.run(["psql", "-h", "127.0.0.1", "-p", harness.PG_PORT, "-U", "postgres", "-tAc",
                                   "SHOW server_version"], check=True, capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {memory_kb / 1024 / 1024:.0f} GiB; Linux {platform.release()}; "
            f"Python {platform.python_version()}; PostgreSQL {postgres}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report(rows: list[Throughput], load: Latency | None, curve: list[tuple[int, int]]) -> str:
    """The benchmark's section of docs/performance.md (Markdown)."""
    out = [f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.", "",
           "### Throughput (AMI events per second; × = ratio to panoramisk 1.4's bare parse of the same bytes, "
           "same run)", "",
           "| live calls | events | panoramisk parse | framing | framing + tracker | full pipeline (rows committed) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def cell(rate: float | None, base: float = r.panoramisk) -> str:
            return "n/a" if rate is None else f"{rate:,.0f} ({rate / base:.2f}×)"
        out.append(f"| {r.live:,} | {r.events:,} | {r.panoramisk:,.0f} (1.00×) | {cell(r.framing)} | "
                   f"{cell(r.tracker)} | {cell(r.pipeline)} |")
    out += ["", "Goals: full pipeline ≥ 1.0× at 210 live calls, ≥ 0.8× at 2,100."]
    if load is not None:
        out += ["", f"### Latency under load ({CALLS_PER_SECOND} calls/s for {load.seconds:.0f} s through the real "
                f"daemon: {load.calls:,} calls, {load.events:,} events, {load.events / load.seconds:,.0f} events/s)",
                "", "| path | count | p50 | p99 | max | goal |", "|---|---:|---:|---:|---:|---|"]
        for name, values, goal in (
                ("hangup → row committed", load.commit, "p99 ≤ 200 ms"),
                ("ring limit passing → alert webhook received", load.alert, "p99 ≤ 300 ms"),
                ("leaked outbound channel → AMI Hangup sent", load.hangup, "p99 ≤ 50 ms")):
            out.append(f"| {name} | {len(values):,} | {ms(percentile(values, 50))} | {ms(percentile(values, 99))} "
                       f"| {ms(max(values, default=float('nan')))} | {goal} |")
        lag = "n/a" if load.lag_max is None else ms(load.lag_max)
        out += [f"| event-loop stall (`pbx_bridge_event_loop_lag_max_seconds`) | | | | {lag} | max ≤ 20 ms |", "",
                f"Expected: {load.calls - load.leaks_expected:,} rows, "
                f"{load.ring_alerts_expected:,} ring-limit alerts, "
                f"{load.leaks_expected:,} guard hangups. Daemon CPU {load.cpu_share:.0%} of one core; RSS "
                f"{load.rss_start / 2**20:.1f} → {load.rss_end / 2**20:.1f} MiB. The stand-in AMI sent events at "
                f"most {ms(load.behind_max)} late."]
    if curve:
        base = curve[0][1]
        out += ["", f"### Memory: RSS over {curve[-1][0]:,} replayed calls (framing + tracker, 210 live at a time)", "",
                "| calls | RSS | growth since the first point |", "|---:|---:|---:|"]
        out += [f"| {calls:,} | {rss / 2**20:.1f} MiB | {(rss - base) / 2**20:+.1f} MiB |" for calls, rss in curve]
        out += ["", "Goal: growth ≤ 20 MB."]
    return "\n".join(out)


def write_section(marker: str, body: str, command: str) -> None:
    """Replace the part of docs/performance.md between this marker's comments."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n_Written by `{command}`; do not edit by hand._\n\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


async def measure_pipeline(rows: list[Throughput]) -> None:
    """The full-pipeline column: the real daemon, the stand-in AMI, a scratch database."""
    key = event_key(SECRET)
    ami = FakeAmi(event_key_id(key))
    port = await ami.start()
    seq = 1000
    async with harness.scratch_database() as dsn, harness.webhook_receiver() as (url, _), \
            harness.listen_commits(dsn) as commits, harness.daemon(dsn, port, SECRET, url) as bridge:
        await _ready(ami, bridge)
        warm, events, calls = stream(10, 2, key, seq, "warm")
        seq += events + 10
        await full_pipeline(bridge, ami, commits, warm, events, calls)
        for row in rows:
            copies, rounds = SIZES[row.live]
            rates = []
            for attempt in range(2):
                data, events, calls = stream(copies, rounds, key, seq, f"p{row.live}a{attempt}")
                seq += events + 10
                rates.append(await full_pipeline(bridge, ami, commits, data, events, calls))
            row.pipeline = max(rates)
            print(f"  full pipeline, {row.live} live calls: {max(rates):,.0f} events/s", flush=True)
    await ami.close()


async def main_async() -> None:
    """Run every measurement, print the tables, write docs/performance.md."""
    print("pbx-bridge benchmark" + (" (quick)" if QUICK else ""), flush=True)
    rows = []
    for live, (copies, rounds) in SIZES.items():
        data, events, calls = stream(copies, rounds)
        assert frame_and_track(data) == 2 * calls, "one start and one end per call"
        assert panoramisk_parse(data) == events
        works: list[Callable[[], object]] = [partial(panoramisk_parse, data), partial(frame, data),
                                             partial(frame_and_track, data)]
        pano, framing, tracking = best_of(5, works)
        rows.append(Throughput(live, events, events / pano, events / framing, events / tracking))
        print(f"  {live} live calls: panoramisk {events / pano:,.0f}, framing {events / framing:,.0f}, "
              f"framing+tracker {events / tracking:,.0f} events/s", flush=True)
    await measure_pipeline(rows)
    async with harness.scratch_database() as dsn:
        print(f"  latency: {CALLS_PER_SECOND} calls/s for {LOAD_SECONDS:.0f} s ...", flush=True)
        load = await latency(dsn)
    print(f"  memory: {MEMORY_CALLS:,} calls ...", flush=True)
    curve = memory()
    body = report(rows, load, curve)
    print()
    print(body)
    if not QUICK:
        write_section("bench", body, "make bench")
        print(f"\nwritten to {DOC.relative_to(REPO)}")


def main() -> None:
    """Entry point of `make bench`."""
    asyncio.run(main_async())


if __name__ == "__main__":
    main()
