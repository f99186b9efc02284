"""Replay N calls through framing and the tracker (210 live at a time); print `calls rss` ten times."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pbx_bridge.ami.wire import AmiFramer
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from tests.bench.workload import interleaved
from tests.support.capture import FIXTURE_EVENT_KEY

SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier", event_key=FIXTURE_EVENT_KEY)
COPIES = 70  # x 3 calls = 210 live at a time
CHUNK = 4096


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def main() -> None:
    """Replay, and report the RSS after each tenth of the calls."""
    total = int(sys.argv[1])
    one, _ = interleaved("concurrent_3", COPIES)
    body = one.partition(b"\r\n")[2].replace(b"pbx-", b"pbx-R@-")
    framer = AmiFramer()
    list(framer.feed(b"Asterisk Call Manager/11.0.0\r\n"))
    state = TrackerState()
    per_round = 3 * COPIES
    rounds = max(1, total // per_round)
    report_every = max(1, rounds // 10)
    for r in range(rounds):
        data = body.replace(b"R@", b"%d" % r)  # fresh Uniqueids and Linkedids for every round
        for start in range(0, len(data), CHUNK):
            for message in framer.feed(data[start:start + CHUNK]):
                state, _ = apply(state, message, SETTINGS)
        if (r + 1) % report_every == 0 or r == 0:
            print((r + 1) * per_round, rss_bytes(), flush=True)
    assert not state.calls, "every call must end"


if __name__ == "__main__":
    main()
