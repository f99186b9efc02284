"""`make bench`: how fast AMI events go through framing and the pure tracker.

The workload is real: the captured `concurrent_3` stream, copied N times with renamed
Uniqueids/Linkedids and interleaved, so N x 3 calls are live at once (N = 1 and 70, i.e.
3 and 210 concurrent calls; Asterisk here produced about 3.6k events/s with 200).
The baseline, in the same run, is framing alone (bytes -> messages), which any AMI client
has to do; the figure that matters is the tracker's cost relative to it and its absolute
events per second against Asterisk's peak rate.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pbx_bridge.ami.wire import AmiFramer, AmiMessage
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from tests.support.fixtures import fixture_bytes

SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier")
ASTERISK_PEAK_EVENTS_PER_SECOND = 3600  # measured: 200 concurrent calls, all event classes
ID = re.compile(rb"(pbx-\d+\.\d+)")


def interleaved_stream(copies: int) -> bytes:
    """`copies` renamed copies of the capture, their messages interleaved round-robin."""
    raw = fixture_bytes("concurrent_3")
    head, _, body = raw.partition(b"\r\n")  # banner
    messages = [m for m in body.split(b"\r\n\r\n") if b"Event: " in m]
    renamed = [[ID.sub(rb"\1-" + str(c).encode(), m) for m in messages] for c in range(copies)]
    out = [head + b"\r\n"]
    for i in range(len(messages)):
        out.extend(copy[i] + b"\r\n\r\n" for copy in renamed)
    return b"".join(out)


def frame(data: bytes) -> list[AmiMessage]:
    framer = AmiFramer()
    return [m for start in range(0, len(data), 4096) for m in framer.feed(data[start:start + 4096])]


def frame_and_track(data: bytes) -> int:
    state, decisions = TrackerState(), 0
    for message in frame(data):
        state, out = apply(state, message, SETTINGS)
        decisions += len(out)
    assert not state.calls, "every call must end"
    return decisions


def best_of(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print("pbx-bridge pipeline benchmark (median of 7 runs each)")
    print(f"{'live calls':>10} {'events':>7} {'framing ev/s':>13} {'framing+tracker ev/s':>21} "
          f"{'tracker cost':>13} {'x Asterisk peak':>16}")
    for copies in (1, 70):
        data = interleaved_stream(copies)
        events = len(frame(data))
        decisions = frame_and_track(data)
        assert decisions == 2 * 3 * copies, "one start and one end per call"
        baseline = best_of(7, partial(frame, data))
        measured = best_of(7, partial(frame_and_track, data))
        rate = events / measured
        print(f"{3 * copies:>10} {events:>7} {events / baseline:>13,.0f} {rate:>21,.0f} "
              f"{measured / baseline:>12.2f}x {rate / ASTERISK_PEAK_EVENTS_PER_SECOND:>15.1f}x")


if __name__ == "__main__":
    main()
