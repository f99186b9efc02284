"""Benchmark workloads made from the captured AMI streams: renamed copies, interleaved or replayed in time."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.support.capture import FIXTURE_EVENT_KEY
from tests.support.fixtures import fixture_bytes

ID = re.compile(rb"(pbx-\d+\.\d+)")
# A channel name: technology/resource-sequence (Local channels add ;1 or ;2 after it).
CHANNEL = re.compile(rb"((?:PJSIP|Local)/[^\r\n;/]+?-[0-9a-f]{8})(?=[;\r\n]|$)")
TIMESTAMP = re.compile(rb"\r\nTimestamp: ([0-9.]+)")
SEQUENCE = re.compile(rb"\r\nSequenceNumber: \d+")
LINKEDID = re.compile(rb"\r\nLinkedid: ([^\r\n]*)")
CHANNEL_HEADER = re.compile(rb"\r\nChannel: ([^\r\n]*)")
END = b"\r\n\r\n"


@dataclass(frozen=True)
class Template:
    """One captured stream's events (without the blank line), each with its offset from the first."""

    name: str
    banner: bytes
    events: tuple[bytes, ...]
    offsets: tuple[float, ...]


def template(name: str) -> Template:
    """The events of capture `name` (the login reply and FullyBooted left out)."""
    raw = fixture_bytes(name)
    banner, _, body = raw.partition(b"\r\n")
    events = [m for m in body.split(END) if m.startswith(b"Event: ") and not m.startswith(b"Event: FullyBooted")]
    stamps = [float(found.group(1)) if (found := TIMESTAMP.search(m)) else None for m in events]
    first = min(s for s in stamps if s is not None)
    offsets, last = [], 0.0
    for stamp in stamps:
        last = stamp - first if stamp is not None else last
        offsets.append(last)
    return Template(name, banner + b"\r\n", tuple(events), tuple(offsets))


def renamed(event: bytes, tag: bytes) -> bytes:
    """`event` with its Uniqueids/Linkedids and channel names made unique to copy `tag`."""
    return CHANNEL.sub(rb"\1x" + tag, ID.sub(rb"\1-" + tag, event))


def keyed(event: bytes, key: str) -> bytes:
    """`event` carrying `key` instead of the captures' dialplan key."""
    return event.replace(FIXTURE_EVENT_KEY.encode(), key.encode())


def interleaved(name: str, copies: int, key: str | None = None) -> tuple[bytes, int]:
    """The banner and `copies` renamed copies of capture `name`, their events interleaved
    round-robin (so `copies` x its calls are live at once), SequenceNumbers renumbered in stream
    order as Asterisk numbers them; and the number of events."""
    base = template(name)
    out = [base.banner]
    seq = 1000
    count = 0
    tags = [str(c).encode() for c in range(copies)]
    for event in base.events:
        for tag in tags:
            seq += 1
            body = SEQUENCE.sub(b"\r\nSequenceNumber: %d" % seq, renamed(event, tag))
            out.append((keyed(body, key) if key else body) + END)
            count += 1
    return b"".join(out), count


@dataclass(frozen=True)
class Scheduled:
    """One event of a replay: when it is due (seconds from the replay's start) and its bytes."""

    due: float
    kind: str  # the template it comes from
    instance: int
    index: int  # its index in the template
    data: bytes


def timeline(plan: list[tuple[float, Template]], key: str) -> list[Scheduled]:
    """The events of every call in `plan` (start second, template), in due order."""
    out = []
    for instance, (start, base) in enumerate(plan):
        tag = b"%d" % instance
        for index, (event, offset) in enumerate(zip(base.events, base.offsets, strict=True)):
            out.append(Scheduled(start + offset, base.name, instance, index, keyed(renamed(event, tag), key)))
    out.sort(key=lambda s: (s.due, s.instance, s.index))
    return out


def stamped(event: bytes, wall: float, seq: int) -> bytes:
    """`event` with Timestamp `wall` and SequenceNumber `seq` (as Asterisk stamps them on sending)."""
    body = TIMESTAMP.sub(b"\r\nTimestamp: %.6f" % wall, event, count=1)
    return SEQUENCE.sub(b"\r\nSequenceNumber: %d" % seq, body, count=1) + END


def header(event: bytes, pattern: re.Pattern[bytes]) -> str:
    """One header's value (by a pattern above), '' if absent."""
    found = pattern.search(event)
    return found.group(1).decode() if found else ""

