"""The write-ahead journal on its own: format, recovery, torn and corrupt lines, limits, locking."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from pbx_bridge.storage.journal import (
    Journal,
    JournalInUseError,
    ack_line,
    decode_line,
    encode_line,
    record_line,
)


def rec(n: int) -> str:
    return json.dumps({"kind": "CallStarted", "record": {"linkedid": f"l-{n}", "caller_name": "张三客户\n"}},
                      ensure_ascii=False)


def test_a_line_carries_a_checksum_and_one_json_object() -> None:
    line = record_line(7, rec(7))
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # a newline in a value is escaped
    body = decode_line(line[:-1])
    assert body == {"seq": 7, "rec": json.loads(rec(7))}
    assert decode_line(ack_line(7)[:-1]) == {"ack": 7}
    flipped = bytearray(line[:-1])
    flipped[20] ^= 0x01
    assert decode_line(bytes(flipped)) is None  # one flipped bit
    assert decode_line(encode_line("[1, 2]")[:-1]) is None  # not an entry
    assert decode_line(b"zzzzzzzz {}") is None and decode_line(b"") is None


def test_records_survive_a_reopen_and_acknowledged_ones_do_not_come_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal.open(path)
    for n in range(1, 6):
        assert journal.append(n, rec(n))
    journal.ack(2)
    journal.close()
    journal = Journal.open(path)
    found = journal.recover(limit=100)
    assert [e.seq for e in found.entries] == [3, 4, 5] and found.acked == 2
    assert found.entries[0].record["record"]["caller_name"] == "张三客户\n"
    assert journal.last_seq == 5
    journal.ack(5)  # everything in the file is committed: it is emptied
    assert journal.size == 0 and path.stat().st_size == 0
    journal.close()


def test_a_torn_last_line_is_skipped_counted_kept_aside_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with path.open("wb") as out:
        out.write(record_line(1, rec(1)) + record_line(2, rec(2)) + record_line(3, rec(3))[:25])
    journal = Journal.open(path)
    found = journal.recover(limit=100)
    assert [e.seq for e in found.entries] == [1, 2]
    assert (found.bad.torn, found.bad.corrupt) == (1, 0) and journal.bad.torn == 1
    assert journal.corrupt_path.read_bytes() == record_line(3, rec(3))[:25] + b"\n"
    assert stat.S_IMODE(journal.corrupt_path.stat().st_mode) == 0o600
    assert path.read_bytes().endswith(b"\n")  # the next record starts on a line of its own
    assert journal.append(4, rec(4))
    journal.close()
    again = Journal.open(path)
    assert [e.seq for e in again.recover(limit=100).entries] == [1, 2, 4]
    again.close()


def test_a_corrupt_line_in_the_middle_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    bad = bytearray(record_line(2, rec(2)))
    bad[30] ^= 0x20
    path.write_bytes(record_line(1, rec(1)) + bytes(bad) + b"garbage\n" + record_line(3, rec(3)))
    journal = Journal.open(path)
    found = journal.recover(limit=100)
    assert [e.seq for e in found.entries] == [1, 3]
    assert (found.bad.torn, found.bad.corrupt) == (0, 2)
    journal.close()


def test_more_records_than_memory_holds_are_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal.open(path)
    for n in range(1, 26):
        journal.append(n, rec(n))
    journal.ack(3)
    journal.close()
    journal = Journal.open(path)
    found = journal.recover(limit=10)
    assert [e.seq for e in found.entries] == list(range(4, 14))
    assert found.rest_offset is not None and found.rest_count == 12
    rest, offset, bad = journal.read_from(found.rest_offset, 100, after_seq=13)
    assert [e.seq for e in rest] == list(range(14, 26)) and offset == journal.size and not bad
    journal.close()


def test_a_repeated_sequence_number_is_read_once(tmp_path: Path) -> None:
    """After a failed fsync the writer journals records again: same number, same content."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(record_line(n, rec(n)) for n in (1, 2, 3, 2, 3, 4)))
    journal = Journal.open(path)
    assert [e.seq for e in journal.recover(limit=100).entries] == [1, 2, 3, 4]
    journal.close()


def test_the_journal_is_private_and_locked_against_a_second_process(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.jsonl"
    old = os.umask(0o022)
    try:
        journal = Journal.open(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(JournalInUseError, match="in use by another pbx-bridge"):
        Journal.open(path)
    journal.close()
    wide = tmp_path / "wide.jsonl"
    wide.write_text("")
    wide.chmod(0o644)
    Journal.open(wide).close()
    assert stat.S_IMODE(wide.stat().st_mode) == 0o600
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(OSError):
        Journal.open(link)


def test_the_size_limit_refuses_appends_until_resumed(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "journal.jsonl", max_bytes=600)
    seq = 0
    while journal.append(seq + 1, rec(seq + 1)):
        seq += 1
    assert seq >= 1 and journal.failure is not None and journal.failure_errno == errno.EFBIG
    assert not journal.append(seq + 2, rec(seq + 2))  # refused while failing
    journal.ack(seq)  # all committed: emptied, so there is room again
    assert journal.size == 0 and journal.write_many([(seq + 1, rec(seq + 1))])
    journal.resume()
    assert journal.writable and journal.append(seq + 2, rec(seq + 2))
    journal.close()


async def test_a_failed_fsync_is_reported_and_does_not_move_the_safe_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal.open(tmp_path / "journal.jsonl")
    journal.append(1, rec(1))
    assert await journal.sync() and journal.synced_seq == 1
    journal.append(2, rec(2))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    assert not await journal.sync()
    assert journal.synced_seq == 1 and journal.failure is not None and "EIO" in journal.failure
    monkeypatch.undo()
    journal.close()
