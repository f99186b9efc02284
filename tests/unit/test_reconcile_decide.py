"""The reconcile's decision per call (pure), and the `reconcile` command's time arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from pbx_bridge.cel.builder import build_call
from pbx_bridge.cel.reconcile import Candidate, LiveChannels, decide
from pbx_bridge.cli import _parse_moment
from tests.support.cel import cel_rows
from tests.unit.test_cel_builder import SETTINGS


def candidate(**changes: object) -> Candidate:
    rows = cel_rows("answered_7s_talk_4s")
    values: dict[str, object] = {"linkedid": rows[0].linkedid, "started": rows[0].eventtime,
                                 "ended": rows[-1].eventtime, "source": None, "final": False, "recorded": False}
    values.update(changes)
    return Candidate(**values)  # type: ignore[arg-type]


FINISHED = build_call(cel_rows("answered_7s_talk_4s"), SETTINGS)


def test_a_call_without_a_record_is_created_and_one_without_an_end_completed() -> None:
    assert decide(candidate(), FINISHED)[0] == "created"
    assert decide(candidate(recorded=True, source="ami"), FINISHED)[0] == "completed"


def test_a_final_record_is_left_alone_unless_forced() -> None:
    assert decide(candidate(recorded=True, final=True, source="ami"), FINISHED) == (
        "left alone", "it has a final record from AMI")
    assert decide(candidate(recorded=True, final=True, source="ami"), FINISHED, forced=True)[0] == "replaced"


def test_a_final_record_is_never_replaced_by_a_call_cel_did_not_see_end() -> None:
    unfinished = build_call(cel_rows("answered_7s_talk_4s")[:-3], SETTINGS, close_at_last_event=True)
    assert unfinished is not None
    later = LiveChannels(frozenset(), unfinished.last_event_at + timedelta(seconds=5))
    assert decide(candidate(recorded=True, final=True, source="ami", ended=None), unfinished, forced=True,
                  live=later)[0] == "left alone"


def test_not_a_hotline_call() -> None:
    assert decide(candidate(), None)[0] == "left alone"


def test_a_call_that_ended_moments_ago_waits_for_its_ami_record() -> None:
    end = candidate().ended
    assert end is not None
    assert decide(candidate(), FINISHED, settled_before=end - timedelta(seconds=1))[0] == "left alone"
    assert decide(candidate(), FINISHED, settled_before=end + timedelta(seconds=1))[0] == "created"


def test_a_call_without_an_end_is_closed_only_once_asterisk_no_longer_lists_it() -> None:
    rows = cel_rows("answered_7s_talk_4s")[:-3]  # no HANGUP of the caller, no LINKEDID_END
    call = build_call(rows, SETTINGS, close_at_last_event=True)
    assert call is not None and not call.finished
    later = rows[-1].eventtime + timedelta(seconds=5)
    assert decide(candidate(ended=None), call)[0] == "left alone"  # no channel list (the command)
    assert decide(candidate(ended=None), call, live=LiveChannels(frozenset({rows[0].uniqueid}), later))[0] == (
        "left alone")
    assert decide(candidate(ended=None), call, live=LiveChannels(frozenset(), rows[-1].eventtime))[0] == (
        "left alone")
    assert decide(candidate(ended=None), call, live=LiveChannels(frozenset({"other"}), later))[0] == "created"


def test_reconcile_times() -> None:
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    shanghai = ZoneInfo("Asia/Shanghai")
    assert _parse_moment("90m", shanghai, now) == now - timedelta(minutes=90)
    assert _parse_moment("2d", shanghai, now) == now - timedelta(days=2)
    assert _parse_moment("2026-11-24T09:00", shanghai, now) == datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    assert _parse_moment("2026-11-24", shanghai, now) == datetime(2026, 11, 23, 16, 0, tzinfo=UTC)
    assert _parse_moment("2026-11-24T09:00+00:00", shanghai, now) == datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    for bad in ("yesterday", "5x", "h", ""):
        assert _parse_moment(bad, shanghai, now) is None


@pytest.mark.parametrize("argv", [["reconcile"], ["reconcile", "--since", "soon"]])
def test_the_command_refuses_a_missing_or_bad_since(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pbx_bridge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--since" in capsys.readouterr().err
