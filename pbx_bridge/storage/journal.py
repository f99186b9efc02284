"""The write-ahead journal: every decided record stays on local disk until PostgreSQL has committed it.

Format (one file, append-only, mode 0600): one line per entry, ``<crc32 as 8 hex digits> <json>\\n``,
where the CRC-32 covers the JSON's UTF-8 bytes and the JSON is either a record,
``{"seq": 17, "rec": {...}}`` (``rec`` as `decision_to_json` writes it), or an acknowledgement,
``{"ack": 17}``: every record with ``seq`` <= 17 is committed. Sequence numbers rise in file order
(a record re-appended after a failed fsync may repeat an earlier one: same number, same content).
When every record in the file is acknowledged the file is truncated to nothing.

A line that is cut short (no final newline: a crash or a full disk mid-write) is *torn*; any
other line whose CRC or JSON does not check out is *corrupt*. Both are skipped, counted, logged
and their bytes kept in ``<journal>.corrupt`` (0600); they are never fatal.

All methods run on the event loop's thread except the fsync, which `sync` runs in a worker
thread. The journal never raises for a failed write: it reports the failure (`failure`) and
refuses further appends until `resume`; the writer keeps those records in memory meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pbx_bridge.storage.leader import AlreadyRunningError

log = structlog.get_logger("pbx_bridge.journal")

READ_CHUNK = 1 << 20


class JournalInUseError(AlreadyRunningError):
    """Another process holds the journal (a second pbx-bridge on this machine)."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled record: its sequence number and its body (`decision_to_json`'s object)."""

    seq: int
    record: dict[str, Any]


@dataclass(slots=True)
class BadLines:
    """Lines skipped while reading the journal."""

    torn: int = 0
    corrupt: int = 0

    def __bool__(self) -> bool:
        return bool(self.torn or self.corrupt)


@dataclass(slots=True)
class Recovered:
    """What `Journal.recover` found: the unacknowledged records (at most `limit` of them), and
    where in the file the ones that did not fit begin."""

    entries: list[JournalEntry] = field(default_factory=list)
    rest_offset: int | None = None  # the first unacknowledged record not loaded (None: all loaded)
    rest_count: int = 0
    acked: int = 0
    bad: BadLines = field(default_factory=BadLines)


def encode_line(body: str) -> bytes:
    """One journal line: the CRC-32 of `body` (JSON), a space, `body`, a newline."""
    data = body.encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(data), data)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one journal line (without its newline); None if it does not check out."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    data = line[9:]
    if zlib.crc32(data) != crc:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("ack"), int):
        return body
    if isinstance(body.get("seq"), int) and isinstance(body.get("rec"), dict):
        return body
    return None


def record_line(seq: int, record_json: str) -> bytes:
    """The journal line of a record whose body is the JSON text `record_json`."""
    return encode_line(f'{{"seq":{seq},"rec":{record_json}}}')


def ack_line(seq: int) -> bytes:
    """The journal line acknowledging every record up to `seq`."""
    return encode_line(f'{{"ack":{seq}}}')


def _lines(fd: int, start: int, end: int) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, line without newline, complete) for each line in [start, end) of the file."""
    offset = start
    carry = b""
    position = start
    while position < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - position), position)
        if not chunk:
            break
        position += len(chunk)
        data = carry + chunk
        begin = 0
        while (newline := data.find(b"\n", begin)) >= 0:
            yield offset, data[begin:newline], True
            offset += newline + 1 - begin
            begin = newline + 1
        carry = data[begin:]
    if carry:
        yield offset, carry, False


class Journal:
    """The journal file, opened for appending and locked against a second process."""

    def __init__(self, path: Path, fd: int, *, max_bytes: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._max_bytes = max_bytes
        self._size = os.fstat(fd).st_size
        self._known_end = self._size  # bad lines before this offset were already counted
        self._dirty = False
        self._syncing = False
        self._last_seq = 0  # highest sequence number written to the file
        self._acked = 0  # every record up to this one is committed
        self._acked_in_file = 0  # the highest acknowledgement written to the file
        self._appended_since_sync: list[int] = []
        self.synced_seq = 0  # every record up to this one was in the file at the last good fsync
        self.failure: str | None = None  # why appends are refused (None: the journal is writable)
        self.failure_errno: int | None = None
        self.bad = BadLines()

    # --- opening and recovery ------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, max_bytes: int = 256 << 20) -> Journal:
        """Open (creating, 0600) and lock the journal at `path`; raise JournalInUseError if another
        process has it, OSError if it cannot be opened."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalInUseError(f"the journal {path} is in use by another pbx-bridge process on this "
                                   "machine") from None
            os.fchmod(fd, 0o600)
            if created:
                _fsync_directory(path.parent)
            return cls(path, fd, max_bytes=max_bytes)
        except BaseException:
            os.close(fd)
            raise

    def recover(self, limit: int) -> Recovered:
        """Read the file: the acknowledgement, the unacknowledged records (the first `limit` of
        them loaded), bad lines counted and kept aside. A torn last line is cut off the file."""
        fd = self._require_fd()
        found = Recovered()
        seen = 0
        for offset, line, complete in _lines(fd, 0, self._size):
            body = decode_line(line) if complete else None
            if body is None:
                self._bad_line(offset, line, complete, found.bad)
                continue
            if "ack" in body:
                found.acked = max(found.acked, body["ack"])
            else:
                seen = max(seen, body["seq"])
        self._acked = self._acked_in_file = found.acked
        self._last_seq = self.synced_seq = max(seen, found.acked)
        loaded = found.acked
        for offset, line, complete in _lines(fd, 0, self._size):
            body = decode_line(line) if complete else None
            if body is None or "ack" in body or body["seq"] <= loaded:
                continue
            if len(found.entries) >= limit:
                if found.rest_offset is None:
                    found.rest_offset = offset
                found.rest_count += 1
                loaded = body["seq"]
                continue
            found.entries.append(JournalEntry(body["seq"], body["rec"]))
            loaded = body["seq"]
        self.bad.torn += found.bad.torn
        self.bad.corrupt += found.bad.corrupt
        if self._acked >= self._last_seq and self._size:
            self._reset()
        return found

    def read_from(self, offset: int, limit: int, after_seq: int) -> tuple[list[JournalEntry], int, BadLines]:
        """Up to `limit` records with a sequence number above `after_seq`, from `offset` on; the
        offset after the last one read; the bad lines met on the way (not yet counted ones)."""
        fd = self._require_fd()
        entries: list[JournalEntry] = []
        bad = BadLines()
        next_offset = offset
        for line_offset, line, complete in _lines(fd, offset, self._size):
            if len(entries) >= limit:
                return entries, line_offset, bad
            next_offset = line_offset + len(line) + 1
            body = decode_line(line) if complete else None
            if body is None:
                if line_offset >= self._known_end:
                    self._bad_line(line_offset, line, complete, bad)
                continue
            if "ack" in body or body["seq"] <= after_seq:
                continue
            entries.append(JournalEntry(body["seq"], body["rec"]))
            after_seq = body["seq"]
        self.bad.torn += bad.torn
        self.bad.corrupt += bad.corrupt
        return entries, min(next_offset, self._size), bad

    def _bad_line(self, offset: int, line: bytes, complete: bool, bad: BadLines) -> None:
        if complete:
            bad.corrupt += 1
        else:
            bad.torn += 1
        log.error("journal_bad_line", path=str(self.path), offset=offset, length=len(line),
                  reason="corrupt" if complete else "torn", effect="skipped; its bytes are kept in the .corrupt file")
        self.keep_aside(line)
        if not complete:
            # A torn last line: cut it off, so the next record starts on a line of its own.
            try:
                os.ftruncate(self._require_fd(), offset)
                self._size = self._known_end = offset
            except OSError as exc:
                self._fail(exc, "cutting off a torn line")

    def keep_aside(self, data: bytes) -> None:
        """Keep bytes that could not be used (a bad line, an unreadable record) in the .corrupt file (0600)."""
        try:
            keep = os.open(self.corrupt_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                           | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.fchmod(keep, 0o600)
                os.write(keep, data + b"\n")
            finally:
                os.close(keep)
        except OSError as exc:
            log.error("journal_bad_line_not_kept", path=str(self.corrupt_path), error=str(exc))

    @property
    def corrupt_path(self) -> Path:
        """Where the bytes of bad lines are kept."""
        return self.path.with_name(self.path.name + ".corrupt")

    # --- appending -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The file's length in bytes, as this process wrote it."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether appends are accepted (no unresolved failure)."""
        return self.failure is None and self._fd is not None

    @property
    def last_seq(self) -> int:
        """The highest sequence number written to the file (or recovered from it)."""
        return self._last_seq

    def append(self, seq: int, record_json: str) -> bool:
        """Append one record; False (and `failure` set) if it could not be written."""
        if not self.writable:
            return False
        return self._write([(seq, record_line(seq, record_json))])

    def write_many(self, entries: Sequence[tuple[int, str]]) -> bool:
        """Append several records at once, also while failing (catching up); False if that failed."""
        if self._fd is None:
            return False
        return self._write([(seq, record_line(seq, body)) for seq, body in entries])

    def _write(self, lines: Sequence[tuple[int, bytes]]) -> bool:
        fd = self._require_fd()
        data = b"".join(line for _, line in lines)
        if self._size + len(data) > self._max_bytes:
            self._fail(OSError(errno.EFBIG, f"the journal reached its limit of {self._max_bytes} bytes"),
                       "appending")
            return False
        start = self._size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as exc:
            # Never leave half a line: the next record would be glued to it.
            try:
                os.ftruncate(fd, start)
            except OSError as cut:
                log.error("journal_partial_line_left", path=str(self.path), error=str(cut))
            self._fail(exc, "appending")
            return False
        self._size = start + len(data)
        self._dirty = True
        for seq, _ in lines:
            self._appended_since_sync.append(seq)
            self._last_seq = max(self._last_seq, seq)
        return True

    def resume(self) -> bool:
        """Accept appends again (the writer has caught up what the failure held back), if the
        file system has room again; False (still failing) if not."""
        if self.failure is not None and not self._has_room():
            return False
        if self.failure is not None:
            log.info("journal_writable_again", path=str(self.path), size=self._size)
        self.failure = None
        self.failure_errno = None
        if self._acked >= self._last_seq:
            if self._size:
                self._reset()
        else:
            self._write_ack()  # what was committed while failing
        return True

    def _has_room(self, nbytes: int = 4096) -> bool:
        """Whether `nbytes` more can be written: reserve them past the end, then give them back."""
        fd = self._require_fd()
        try:
            os.posix_fallocate(fd, self._size, nbytes)
        except OSError as exc:
            # A file system that cannot tell (no fallocate): the next write will.
            return exc.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
        return True

    def _fail(self, exc: OSError, doing: str) -> None:
        reason = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror or exc}"
        if self.failure is None:
            log.error("journal_unwritable", path=str(self.path), error=reason, doing=doing,
                      effect="records are kept in memory until the journal takes them again")
        self.failure = reason
        self.failure_errno = exc.errno

    # --- acknowledging and syncing --------------------------------------------------------------

    def ack(self, seq: int) -> None:
        """Every record up to `seq` is committed: truncate the file if nothing in it is needed any
        more, else append an acknowledgement line (it needs no fsync: a lost one only means a
        harmless, idempotent replay)."""
        if seq <= self._acked:
            return
        self._acked = seq
        if self._fd is None:
            return
        if self._acked >= self._last_seq:
            self._reset()
        elif self.writable:
            self._write_ack()

    def _write_ack(self) -> None:
        line = ack_line(self._acked)
        if self._fd is None or self._acked <= self._acked_in_file or self._size + len(line) > self._max_bytes:
            return
        try:
            os.write(self._fd, line)
        except OSError as exc:
            self._fail(exc, "acknowledging")
            return
        self._size += len(line)
        self._acked_in_file = self._acked
        self._dirty = True

    def _reset(self) -> None:
        fd = self._require_fd()
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.warning("journal_truncate_failed", path=str(self.path), error=str(exc))
            return
        self._size = self._known_end = 0
        self._acked_in_file = 0
        self._dirty = True

    @property
    def needs_sync(self) -> bool:
        """Whether something was written since the last fsync."""
        return self._dirty

    async def sync(self) -> bool:
        """fsync what was written (in a worker thread); False if the fsync failed. After a
        failed fsync the kernel may have dropped the data: `synced_seq` tells what is safe."""
        if not self._dirty or self._fd is None or self._syncing:
            return True
        self._dirty = False
        covered = self._appended_since_sync
        self._appended_since_sync = []
        self._syncing = True
        try:
            await asyncio.to_thread(os.fsync, self._fd)
        except BaseException as exc:  # failed, or cancelled: it still needs an fsync
            self._appended_since_sync = covered + self._appended_since_sync
            self._dirty = True
            if not isinstance(exc, OSError):
                raise
            self._fail(exc, "fsync")
            return False
        finally:
            self._syncing = False
        if covered:
            self.synced_seq = max(self.synced_seq, max(covered))
        return True

    def sync_now(self) -> bool:
        """fsync on this thread (at start and at the very end); False if it failed."""
        if self._fd is None or not self._dirty:
            return True
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc, "fsync")
            return False
        self._dirty = False
        if self._appended_since_sync:
            self.synced_seq = max(self.synced_seq, max(self._appended_since_sync))
        self._appended_since_sync = []
        return True

    def close(self) -> None:
        """fsync and close the file (releasing the lock)."""
        if self._fd is None:
            return
        self.sync_now()
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError("the journal is closed")
        return self._fd


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("journal_directory_fsync_failed", path=str(directory), error=str(exc))
    finally:
        os.close(fd)
