"""Fuzz: mutated captured AMI streams through the framer and the tracker never raise and stay bounded."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import resource
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, partial

from pbx_bridge.ami.integrity import StreamIntegrity
from pbx_bridge.ami.wire import MAX_MESSAGE_BYTES, AmiFramer, AmiMessage, FramingError
from pbx_bridge.tracker import ChannelSnapshot, Tick, TrackerSettings, TrackerState, apply
from pbx_bridge.tracker.tracker import (
    MAX_CHANNELS_PER_CALL,
    MAX_FORWARD_MARKS,
    MAX_STAGES_PER_CALL,
    CallState,
    live_calls,
)
from tests.support.capture import FIXTURE_EVENT_KEY
from tests.support.fixtures import fixture_bytes, fixture_names

# PBX_BRIDGE_FUZZ_MESSAGES / _SEED / _WORKERS override these (`make fuzz` asks for a million).
DEFAULT_MESSAGES = 50_000
DEFAULT_SEED = 20261123
HOTLINES = ("4008001234", "4008005678")
# The tracker's own bounds, with fewer calls than production (10,000) so a run reaches the cap.
MAX_CALLS = 1_000
SETTINGS = TrackerSettings(hotline_numbers=frozenset(HOTLINES), trunk="carrier", probe_caller="02584009999",
                           event_key=FIXTURE_EVENT_KEY, max_calls=MAX_CALLS)
FLOOD = 1_200  # forged events in one caller ID: more than MAX_CALLS or MAX_FORWARD_MARKS at once
MAX_RSS_GROWTH = 32 << 20  # per process, from the end of the warm-up (first 10 %) to the end

MESSAGE_END = b"\r\n\r\n"
BIG_HEADER = 100_000
_ID = re.compile(rb"pbx-\d+\.\d+")
_TIMESTAMP = re.compile(rb"Timestamp: (\d+(?:\.\d+)?)")
_LINKEDID = re.compile(rb"\r\nLinkedid: ([^\r\n]*)")
_VALUE = re.compile(rb": [^\r\n]")
STAGES = ("group", "escalation", "after_hours", "mobile", "voicemail", "probe", "bogus")
TARGET_HEADERS = (b"Timestamp", b"Cause", b"Linkedid", b"Uniqueid", b"DestUniqueid", b"ChannelState", b"Exten",
                  b"Channel", b"DialStatus", b"Stage", b"UserEvent", b"HolderB64", b"Mobile", b"Nonce",
                  b"CallerIDName", b"CallerIDNum", b"Event", b"Cause-txt")
INTERESTING = tuple(v.encode() for v in (
    "", " ", "253402300799.999999", "253402300800", "-62135596800", "-62135596801", "-1", "0", "nan", "inf",
    "-inf", "1e18", "-1e18", "1e400", "1_795_432_783.5", "١٧٩٥٤٣٢٧٨٣", "２", "²", "١٢", "9" * 5000, "99999",
    "4", "5", "<unknown>", "\\", '"', '\\"', "\\\\\\", "\x00", "\ufeff", "\u202e", "4008001234", "4008005678",
    "carrier", "PJSIP/carrier", "PJSIP/carrier-", "PJSIP/", "Local/", "PJSIP/carrier-00000001", "ANSWER",
    "RINGING", "PROGRESS", "HotlineStage", "HotlineProbe", "OutboundAttempt", "Newchannel", "Hangup",
    "DialEnd", "mobile", "voicemail", "probe", "====", "5byg5LiJ", "%%%", "pbx-bridge-x", "张三" * 40,
))
INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3", b"\xe5\xbc", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                b"\x80\x80", b"\xf4\x90\x80\x80")


@dataclass
class WorkerResult:
    """What one fuzzing process did (picklable, summed by the test)."""

    worker: int
    seed: str
    inputs: int = 0
    messages: int = 0
    ticks: int = 0
    snapshots: int = 0
    decisions: int = 0
    framing_errors: int = 0
    suspects: int = 0  # messages the integrity checks would drop
    max_calls: int = 0
    max_forward_marks: int = 0
    max_buffer: int = 0
    rss_after_warmup: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    seconds: float = 0.0
    mutations: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Template:
    """One capture: its banner line, its messages (without the blank line), its first timestamp."""

    banner: bytes
    body: bytes
    first_timestamp: float


@cache
def templates() -> tuple[Template, ...]:
    """The committed captures, parsed once per process."""
    out = []
    for name in fixture_names():
        raw = fixture_bytes(name)
        banner, _, body = raw.partition(b"\r\n")
        stamps = [float(m.group(1)) for m in _TIMESTAMP.finditer(body)]
        out.append(Template(banner + b"\r\n", body, min(stamps)))
    return tuple(out)


def _moved(match: re.Match[bytes], shift: float) -> bytes:
    return b"Timestamp: %.6f" % (float(match.group(1)) + shift)


def rss_bytes() -> int:
    """This process's resident set size now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shorten(data: bytes, limit: int = 700) -> str:
    """`data` for a failure message: its head and tail, with the length."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[: limit * 2 // 3]!r} ... {data[-limit // 3:]!r} ({len(data)} bytes)"


def check_call(call: CallState) -> None:
    """One call's state is bounded however many events name it."""
    name = repr(call.linkedid[:80])
    assert len(call.legs) <= MAX_CHANNELS_PER_CALL, f"call {name} holds {len(call.legs)} legs"
    assert len(call.live_channels) <= MAX_CHANNELS_PER_CALL, f"call {name} holds {len(call.live_channels)} channels"
    assert len(call.stages) <= MAX_STAGES_PER_CALL, f"call {name} holds {len(call.stages)} stages"


class Fuzzer:
    """One seeded run: mutate captures, feed them in random chunks, apply every message."""

    def __init__(self, seed: str, worker: int) -> None:
        self.rng = random.Random(seed)
        self.result = WorkerResult(worker=worker, seed=seed)
        self.state = TrackerState()
        self.framer = AmiFramer()
        self.integrity = StreamIntegrity()
        self.clock = templates()[0].first_timestamp
        self.fresh = 0
        self.data = b""
        self.applied: list[str] = []

    # --- building one input -----------------------------------------------------------------

    def next_id(self) -> str:
        """A Uniqueid/Linkedid never used before in this process."""
        self.fresh += 1
        return f"evil-{self.result.worker}-{self.fresh}"

    def base(self) -> list[bytes]:
        """1-3 captures with fresh Uniqueids/Linkedids and moved in time, interleaved."""
        rng = self.rng
        streams = []
        for copy in range(rng.choice((1, 1, 1, 2, 3))):
            template = rng.choice(templates())
            suffix = f"-{self.result.worker}-{self.result.inputs}-{copy}".encode()
            shift = self.clock - template.first_timestamp + rng.uniform(0, 5)
            body = _ID.sub(rb"\g<0>" + suffix, template.body)
            body = _TIMESTAMP.sub(partial(_moved, shift=shift), body)
            streams.append([m for m in body.split(MESSAGE_END) if m.strip(b"\r\n")])
        blocks: list[bytes] = []
        while streams:
            stream = rng.choice(streams)
            blocks.append(stream.pop(0))
            if not stream:
                streams.remove(stream)
        return blocks

    def forged(self, kind: str, linkedids: list[bytes]) -> bytes:
        """One event a stranger could inject: a fake call start, forward mark, leg, stage, hangup."""
        rng = self.rng
        at = self.clock + rng.uniform(-5, 60)
        if kind == "mark" and rng.random() < 0.3:
            at = self.clock + 10 ** rng.randint(3, 9)  # far in the future: must still expire or be capped
        own = self.next_id()
        target = rng.choice(linkedids).decode("utf-8", "replace") if linkedids else own
        fields: dict[str, str]
        if kind == "start":
            fields = {"Event": "Newchannel", "Channel": f"PJSIP/carrier-{self.fresh:08x}", "ChannelState": "4",
                      "CallerIDNum": f"1390000{self.fresh % 10000:04d}", "CallerIDName": "伪造",
                      "Exten": rng.choice(HOTLINES), "Uniqueid": own, "Linkedid": own}
        elif kind == "mark":
            fields = {"Event": "UserEvent", "UserEvent": "HotlineStage", "Stage": "mobile",
                      "Channel": f"PJSIP/carrier-{self.fresh:08x}", "Uniqueid": own, "Linkedid": own}
        elif kind == "leg":
            fields = {"Event": "Newchannel", "Channel": f"PJSIP/agent10{self.fresh % 9}-{self.fresh:08x}",
                      "ChannelState": "0", "Uniqueid": own, "Linkedid": target}
        elif kind == "stage":
            fields = {"Event": "UserEvent", "UserEvent": "HotlineStage", "Stage": rng.choice(STAGES),
                      "Mobile": "13900139000", "HolderB64": "5byg5LiJ", "Uniqueid": target, "Linkedid": target}
        else:
            fields = {"Event": "Hangup", "Cause": "16", "Uniqueid": target, "Linkedid": target}
        if kind in ("mark", "stage") and rng.random() < 0.5:
            fields["Key"] = FIXTURE_EVENT_KEY  # as if the key leaked: the paths behind it stay bounded too
        fields = {"Timestamp": f"{at:.6f}", **fields}
        return "\r\n".join(f"{k}: {v}" for k, v in fields.items()).encode()

    def mutate_messages(self, blocks: list[bytes], name: str) -> None:
        """Message-level mutations: duplicate, reorder, drop, inject forged events, boundary values."""
        rng = self.rng
        if len(blocks) < 2:
            return
        i, j = rng.randrange(len(blocks)), rng.randrange(len(blocks))
        if name == "duplicate":
            for _ in range(rng.choice((1, 1, 2, 5))):
                blocks.insert(rng.randrange(len(blocks) + 1), blocks[rng.randrange(len(blocks))])
        elif name == "reorder":
            if rng.random() < 0.5:
                blocks[i], blocks[j] = blocks[j], blocks[i]
            else:
                lo, hi = min(i, j), max(i, j) + 1
                window = blocks[lo:hi]
                rng.shuffle(window)
                blocks[lo:hi] = window
        elif name == "drop":
            del blocks[i]
        elif name == "inject":  # the real attack: CRLF CRLF and whole events inside a header value
            host = blocks[i]
            spots = [m.start() + 2 for m in _VALUE.finditer(host)]
            if not spots:
                return
            at = rng.choice(spots) + rng.randint(0, 3)
            linkedids = _LINKEDID.findall(b"\r\n".join(blocks))
            kind = rng.choice(("start", "start", "mark", "leg", "stage", "hangup", "replay"))
            count = rng.choice((1, 1, 2, 5, 20, 60, 150))
            if kind in ("start", "mark") and rng.random() < 0.02:
                count = FLOOD  # beyond the bounds in one go
            events = [blocks[j] if kind == "replay" else self.forged(kind, linkedids) for _ in range(count)]
            tail = MESSAGE_END if rng.random() < 0.5 else b"\r\n"  # "\r\n": the host's rest joins the last one
            blocks[i] = host[:at] + MESSAGE_END + MESSAGE_END.join(events) + tail + host[at:]
        elif name == "interesting":
            lines = blocks[i].split(b"\r\n")
            targets = [n for n, line in enumerate(lines) if line.split(b":", 1)[0] in TARGET_HEADERS]
            n = rng.choice(targets) if targets and rng.random() < 0.8 else rng.randrange(len(lines))
            header = lines[n].split(b":", 1)[0]
            lines[n] = header + b": " + rng.choice(INTERESTING)
            blocks[i] = b"\r\n".join(lines)

    def mutate_bytes(self, data: bytearray, name: str) -> None:
        """Byte-level mutations: bit flips, truncation, CR/LF/colon, 100 kB headers, invalid UTF-8."""
        rng = self.rng
        if not data:
            return
        spot = rng.randrange(len(data))
        if name == "bitflip":
            for _ in range(rng.choice((1, 1, 2, 4, 16))):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif name == "truncate":
            del data[spot:]
        elif name == "cut":
            del data[spot:spot + rng.randint(1, 400)]
        elif name == "crlf_colon":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data) + 1):0] = rng.choice((b"\r", b"\n", b"\r\n", b":", b": ", b"\n\n"))
        elif name == "split_value":  # CRLF CRLF inside a value: the event is cut in two
            values = [m.start() + 2 for m in _VALUE.finditer(data)]
            if values:
                data[rng.choice(values) + rng.randint(0, 4):0] = rng.choice((MESSAGE_END, b"\r\n", b"\r\n\r\n\r\n"))
        elif name == "big_header":
            size = BIG_HEADER + rng.randint(0, 20_000)
            filler = rng.choice((b"A", b"9", b"\xe5\xbc\xa0", b"\xff", b"16", b"1795432783.", b"\\"))
            value = (filler * (size // len(filler) + 1))[:size]
            line_start = data.find(b"\r\n", spot)
            if line_start < 0:
                line_start = len(data)
            header = rng.choice((b"CallerIDName", b"X-Big", b"Timestamp", b"Cause", b"Linkedid", b"Channel"))
            if rng.random() < 0.5:  # a new header line
                data[line_start:line_start] = b"\r\n" + header + b": " + value
            else:  # an existing value made 100 kB long
                data[line_start:line_start] = value
        elif name == "invalid_utf8":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data) + 1):0] = rng.choice(INVALID_UTF8)
        elif name == "oversize":  # larger than the framer's limit before any blank line
            data[spot:spot] = b"\r\nCallerIDName: " + b"Z" * (MAX_MESSAGE_BYTES + rng.randint(70_000, 200_000))

    def make_input(self) -> bytes:
        """The next mutated input; its mutations are recorded in `self.applied`."""
        rng = self.rng
        connect = rng.random() < 0.15
        if connect:
            self.framer = AmiFramer()  # a new connection: a fresh framer, the stream starts with the banner
            self.integrity = StreamIntegrity()
        blocks = self.base()
        names = rng.choices(("duplicate", "reorder", "drop", "inject", "interesting", "bitflip", "truncate", "cut",
                             "crlf_colon", "split_value", "big_header", "invalid_utf8"),
                            weights=(6, 6, 5, 8, 8, 8, 4, 3, 6, 6, 2, 5), k=rng.choice((0, 1, 1, 2, 2, 3, 4)))
        if rng.random() < 0.002:
            names.append("oversize")
        self.applied = names
        for name in names:
            if name in ("duplicate", "reorder", "drop", "inject", "interesting"):
                self.mutate_messages(blocks, name)
        data = bytearray((templates()[0].banner if connect else b"") + MESSAGE_END.join(blocks) + MESSAGE_END)
        for name in names:
            if name not in ("duplicate", "reorder", "drop", "inject", "interesting"):
                self.mutate_bytes(data, name)
        self.result.mutations.update(names)
        return bytes(data)

    # --- driving the framer and the tracker -------------------------------------------------

    def chunk_size(self, bytewise: bool) -> int:
        """How many bytes the next read brings: 1, a few, a TCP segment, up to 64 kB."""
        rng = self.rng
        if bytewise:
            return 1
        roll = rng.random()
        if roll < 0.15:
            return 1
        if roll < 0.35:
            return rng.randint(2, 16)
        if roll < 0.75:
            return rng.randint(17, 1500)
        return rng.randint(1501, 65536)

    def apply(self, event: AmiMessage | Tick | ChannelSnapshot) -> None:
        """One tracker input; the call it touched must stay bounded."""
        self.state, decisions = apply(self.state, event, SETTINGS)
        self.result.decisions += len(decisions)
        if isinstance(event, AmiMessage) and (call := self.state.calls.get(event.get("Linkedid"))) is not None:
            check_call(call)

    def tick_near(self, message: AmiMessage | None) -> Tick:
        """A clock tick near the event's time (before or after it), now and then minutes later."""
        at = self.clock
        stamp = message.timestamp if message is not None else None
        if stamp is not None and abs(stamp.timestamp() - self.clock) < 3600:
            at = stamp.timestamp()
        at += self.rng.uniform(-3, 30) if self.rng.random() < 0.97 else self.rng.uniform(300, 900)
        self.result.ticks += 1
        return Tick(datetime.fromtimestamp(at, tz=UTC))

    def snapshot(self) -> ChannelSnapshot:
        """The channels Asterisk reports after a login: most of those tracked, some unknown ones."""
        rng = self.rng
        ids = {u for call in self.state.calls.values() for u in (call.inbound_uniqueid, *call.live_channels)
               if rng.random() < 0.9}
        ids.update(self.next_id() for _ in range(rng.randint(0, 3)))
        self.result.snapshots += 1
        return ChannelSnapshot(frozenset(ids))

    def feed(self, data: bytes) -> None:
        """Feed `data` in random chunks (sometimes byte by byte); apply every message, with ticks."""
        rng = self.rng
        bytewise = len(data) <= 64_000 and rng.random() < 0.03
        pos = 0
        while pos < len(data):
            size = self.chunk_size(bytewise)
            try:
                messages = list(self.framer.feed(data[pos:pos + size]))  # as SafeAmiProtocol.data_received
            except FramingError:
                # The documented signal for an oversize message: the client logs it, aborts the
                # connection and logs in again with a fresh framer; after_login sends a snapshot.
                assert len(self.framer._buffer) > MAX_MESSAGE_BYTES, "FramingError below the size limit"
                self.result.framing_errors += 1
                self.framer = AmiFramer()
                self.integrity = StreamIntegrity()  # a new connection, a new stream
                self.apply(self.snapshot())
                return  # the rest of this connection's bytes are gone
            pos += size
            self.result.max_buffer = max(self.result.max_buffer, len(self.framer._buffer))
            assert len(self.framer._buffer) <= MAX_MESSAGE_BYTES, "framer buffer beyond its limit"
            for message in messages:
                # The integrity checks see every message (as in the client) and must never raise;
                # the tracker gets every message too, dropped or not, so it is fuzzed on its own.
                if self.integrity.check(message) is not None:
                    self.result.suspects += 1
                self.apply(message)
                self.result.messages += 1
                if rng.random() < 0.03:
                    self.apply(self.tick_near(message))

    def check_bounds(self, every_call: bool) -> None:
        """The number of calls and forward marks (and, if asked, every call's size) within the bounds."""
        calls, marks = len(self.state.calls), len(self.state.forward_marks)
        self.result.max_calls = max(self.result.max_calls, calls)
        self.result.max_forward_marks = max(self.result.max_forward_marks, marks)
        assert calls <= MAX_CALLS, f"{calls} calls in progress: fake call starts are never forgotten"
        assert marks <= MAX_FORWARD_MARKS, f"{marks} forward marks kept"
        if every_call:
            for call in self.state.calls.values():
                check_call(call)

    def run(self, messages: int) -> WorkerResult:
        """Fuzz until `messages` messages went through the tracker."""
        rng = self.rng
        started = time.perf_counter()
        warmup = messages // 10
        while self.result.messages < messages:
            self.data = b""
            self.applied = []
            try:
                self.data = self.make_input()
                self.feed(self.data)
                self.apply(self.tick_near(None))
                if rng.random() < 0.01:
                    self.apply(self.snapshot())
                self.check_bounds(every_call=self.result.inputs % 20 == 0)
                if self.result.inputs % 200 == 0:
                    live_calls(self.state, datetime.fromtimestamp(self.clock, tz=UTC))
            except Exception as exc:  # not swallowed: raised again with what reproduces it
                where = traceback.extract_tb(exc.__traceback__)[-1]
                raise AssertionError(
                    f"fuzz failure: seed={self.result.seed!r} input #{self.result.inputs} "
                    f"(after {self.result.messages} messages) mutations={self.applied}\n"
                    f"{type(exc).__name__}: {exc} (at {os.path.basename(where.filename)}:{where.lineno} "
                    f"in {where.name})\nmutated input: {shorten(self.data)}"
                ) from exc
            self.result.inputs += 1
            self.clock += rng.uniform(5, 90)
            if not self.result.rss_after_warmup and self.result.messages >= warmup:
                self.result.rss_after_warmup = rss_bytes()
        self.check_bounds(every_call=True)
        self.result.rss_end = rss_bytes()
        self.result.rss_peak = peak_rss_bytes()
        self.result.seconds = time.perf_counter() - started
        return self.result


def fuzz_worker(job: tuple[int, int, int]) -> WorkerResult:
    """Run one process's share: (seed, worker number, messages)."""
    seed, worker, messages = job
    return Fuzzer(f"{seed}/{worker}", worker).run(messages)


def run_fuzz(seed: int, messages: int, workers: int) -> list[WorkerResult]:
    """Split `messages` over `workers` processes (each with its own seed); one process runs inline."""
    jobs = [(seed, w, messages // workers + (w < messages % workers)) for w in range(workers)]
    if workers == 1:
        return [fuzz_worker(jobs[0])]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(fuzz_worker, jobs)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _total(results: Iterable[WorkerResult], value: Callable[[WorkerResult], int]) -> int:
    return sum(value(r) for r in results)


def test_mutated_ami_streams_never_raise_and_stay_bounded() -> None:
    messages = _env_int("PBX_BRIDGE_FUZZ_MESSAGES", DEFAULT_MESSAGES)
    seed = _env_int("PBX_BRIDGE_FUZZ_SEED", DEFAULT_SEED)
    workers = _env_int("PBX_BRIDGE_FUZZ_WORKERS", min(2, os.cpu_count() or 1) if messages > 200_000 else 1)
    print(f"\nfuzz: PBX_BRIDGE_FUZZ_SEED={seed} PBX_BRIDGE_FUZZ_MESSAGES={messages} PBX_BRIDGE_FUZZ_WORKERS={workers}")
    started = time.perf_counter()
    results = run_fuzz(seed, messages, workers)
    elapsed = time.perf_counter() - started
    mutations = sum((r.mutations for r in results), Counter[str]())
    print(f"fuzz: {_total(results, lambda r: r.messages)} messages in {_total(results, lambda r: r.inputs)} inputs, "
          f"{_total(results, lambda r: r.ticks)} ticks, {_total(results, lambda r: r.snapshots)} snapshots, "
          f"{_total(results, lambda r: r.decisions)} decisions, "
          f"{_total(results, lambda r: r.framing_errors)} framing errors (reconnects), "
          f"{_total(results, lambda r: r.suspects)} dropped by the integrity checks, 0 exceptions, "
          f"{elapsed:.1f} s")
    print(f"fuzz: mutations {dict(sorted(mutations.items()))}")
    for r in results:
        print(f"fuzz: worker {r.worker} seed={r.seed!r}: max {r.max_calls} calls, {r.max_forward_marks} forward "
              f"marks, framer buffer {r.max_buffer} B; RSS {r.rss_after_warmup >> 20} MiB after warm-up -> "
              f"{r.rss_end >> 20} MiB at the end (peak {r.rss_peak >> 20} MiB), {r.seconds:.1f} s")
    assert _total(results, lambda r: r.messages) >= messages
    for r in results:
        growth = r.rss_end - r.rss_after_warmup
        assert growth <= MAX_RSS_GROWTH, (
            f"seed {r.seed!r}: RSS grew {growth >> 20} MiB after the warm-up (limit {MAX_RSS_GROWTH >> 20} MiB)")
