"""AMI wire format: frame the byte stream into messages, decode, and unescape values.

Pure code, no I/O. Asterisk sends UTF-8; panoramisk 1.4 decodes each TCP chunk as ASCII
with errors ignored, which loses Chinese caller names and characters split between
reads. Here the byte stream is framed first and each complete message decoded once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

MESSAGE_END = b"\r\n\r\n"
BANNER_PREFIX = b"Asterisk Call Manager/"
MAX_MESSAGE_BYTES = 1 << 20

# Asterisk C-escapes these channel-snapshot headers (ast_escape_c) when it builds
# channel events, so a quote or backslash in a caller name arrives doubled.
C_ESCAPED_HEADERS = frozenset(
    name.lower()
    for base in ("CallerIDName", "ConnectedLineName")
    for name in (base, f"Dest{base}")
)
_C_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
              "\\": "\\", "'": "'", '"': '"', "?": "?"}
_BACKSLASH_PAIR = re.compile(r"\\(.)", re.DOTALL)


def unescape_c(value: str) -> str:
    """Undo Asterisk's ast_escape_c (backslash escapes of quotes, backslashes, controls)."""
    if "\\" not in value:
        return value
    return _BACKSLASH_PAIR.sub(lambda m: _C_ESCAPES.get(m.group(1), m.group(0)), value)


def unescape_sip_quoted(value: str) -> str:
    """Undo SIP quoted-pair escaping (RFC 3261 25.1: backslash + any char) left in a display name.

    Asterisk's PJSIP copies a quoted From display-name into the channel's caller name
    without removing the quoted-pairs, so `"A \\"B\\""` becomes the name `A \\"B\\"`.
    """
    if "\\" not in value:
        return value
    return _BACKSLASH_PAIR.sub(lambda m: m.group(1), value)


class FramingError(Exception):
    """The peer sent something that is not AMI (e.g. a message larger than the limit)."""


@dataclass(frozen=True)
class AmiMessage:
    """One AMI message: an event, a response, or a list item. Header names are case-insensitive.

    Its timestamp is computed on first use and kept: the clock and the tracker both read it."""

    headers: Mapping[str, str]
    decode_errors: bool = False
    # Header names (lower case) that appeared more than once: the first value is kept. Asterisk
    # never repeats a header in the events pbx-bridge reads; a repeat means a forged block.
    duplicates: frozenset[str] = frozenset()

    def get(self, name: str, default: str = "") -> str:
        """The value of header `name` (any case), or `default`."""
        key = _LOWER.get(name)
        if key is None:
            key = _lower(name)
        return self.headers.get(key, default)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.headers:  # already a lookup key (lower case): most callers
            return True
        key = _LOWER.get(name)
        return (key if key is not None else _lower(name)) in self.headers

    @property
    def event(self) -> str:
        """The event name, '' when this is not an event."""
        return self.headers.get("event", "")

    @property
    def longest_value(self) -> int:
        """The length of its longest header value (0 if it has none)."""
        return max(map(len, self.headers.values()), default=0)

    @property
    def timestamp(self) -> datetime | None:
        """The event's `Timestamp` (manager.conf timestampevents=yes) as an aware UTC datetime."""
        kept: datetime | bool | None = self.__dict__.get("_timestamp", False)
        if kept is not False:
            return kept  # type: ignore[return-value]
        at = _timestamp(self.headers.get("timestamp", ""))
        self.__dict__["_timestamp"] = at  # a cache, not a field: frozen, compared and copied without it
        return at


def _timestamp(raw: str) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.fromtimestamp(float(raw), tz=UTC)
    except (ValueError, OverflowError, OSError):  # OSError: e.g. 1e18 (EOVERFLOW from the C library)
        return None


# Header names as they arrive -> their lookup key (stripped, lower case). Asterisk uses a few
# hundred names; the cache is bounded (count and length) so that made-up names cannot grow it.
# A name with a colon is never cached: `parse_message` relies on that.
_LOWER: dict[str, str] = {}
_LOWER_MAX = 4096
_LOWER_MAX_CHARS = 64
_NO_DUPLICATES: frozenset[str] = frozenset()


def _lower(name: str) -> str:
    key = name.strip().lower()
    if len(_LOWER) < _LOWER_MAX and len(name) <= _LOWER_MAX_CHARS and ":" not in name:
        _LOWER[name] = key
    return key


def _header(line: str) -> tuple[str, str]:
    """The general rule for one header line: the name is what precedes the first colon
    (surrounding whitespace stripped, lower-cased), the value follows it (one leading space
    removed). ('', '') for a line that is no header."""
    name, sep, value = line.partition(":")
    if not sep:
        return "", ""
    return _lower(name), value.removeprefix(" ")


def parse_message(text: str, decode_errors: bool = False) -> AmiMessage:
    """Parse one decoded AMI message (header lines without the final blank line).

    The first value of a repeated header is kept (the repeat is listed in `duplicates`).
    """
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    keep_first = headers.setdefault
    known = _LOWER.get
    skipped = 0
    for line in lines:
        # Fast path, exact for every line whose name (text before the first colon) is one seen
        # before: a cached name holds no colon, so the first ": " ends it.
        name, sep, value = line.partition(": ")
        key = known(name) if sep else None
        if key is None:
            key, value = _header(line)
        if key:
            keep_first(key, value)
        else:
            skipped += 1
    duplicates = _NO_DUPLICATES
    if len(headers) + skipped != len(lines):  # some name repeated: say which (rare: a forged block)
        seen: set[str] = set()
        repeated = set()
        for line in lines:
            key = _header(line)[0]
            if key and key in seen:
                repeated.add(key)
            seen.add(key)
        duplicates = frozenset(repeated)
    for key in C_ESCAPED_HEADERS:  # four names, most often without a backslash
        escaped = headers.get(key)
        if escaped is not None and "\\" in escaped:
            headers[key] = unescape_c(escaped)
    return AmiMessage(headers=headers, decode_errors=decode_errors, duplicates=duplicates)


class AmiFramer:
    """Incremental framer: feed raw bytes as they arrive, get complete messages out."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes
        self._scanned = 0  # no terminator starts before this offset: small reads cost O(n), not O(n^2)
        self.banner: str | None = None

    def feed(self, data: bytes) -> Iterator[AmiMessage]:
        """Add bytes; yield every message now complete, in order.

        FramingError once more than the limit is buffered without a terminator (banner line
        included): the stream is not AMI, the connection must be dropped.
        """
        self._buffer += data
        if self.banner is None:
            if len(self._buffer) < len(BANNER_PREFIX) and BANNER_PREFIX.startswith(bytes(self._buffer)):
                return
            if self._buffer.startswith(BANNER_PREFIX):
                end = self._buffer.find(b"\r\n", self._scanned)
                if end < 0:
                    self._incomplete(2)
                    return
                self.banner = self._buffer[:end].decode("utf-8", "replace")
                del self._buffer[: end + 2]
                self._scanned = 0
            else:
                self.banner = ""
        while True:
            end = self._buffer.find(MESSAGE_END, self._scanned)
            if end < 0:
                self._incomplete(len(MESSAGE_END))
                return
            self._scanned = 0
            chunk = bytes(self._buffer[:end])
            del self._buffer[: end + len(MESSAGE_END)]
            chunk = chunk.lstrip(b"\r\n")
            if not chunk:
                continue
            try:
                text, errors = chunk.decode("utf-8"), False
            except UnicodeDecodeError:
                text, errors = chunk.decode("utf-8", "replace"), True
            yield parse_message(text, decode_errors=errors)

    def _incomplete(self, terminator: int) -> None:
        """No terminator in the buffer: refuse it beyond the limit, else scan only new bytes next time."""
        if len(self._buffer) > self._max:
            raise FramingError(f"AMI message larger than {self._max} bytes")
        self._scanned = max(len(self._buffer) - terminator + 1, 0)


def parse_stream(data: bytes) -> list[AmiMessage]:
    """Frame a whole captured byte stream (e.g. a test fixture) into messages."""
    return list(AmiFramer().feed(data))


def format_action(fields: Mapping[str, str | list[str]]) -> bytes:
    """Encode an action as UTF-8 AMI bytes, refusing values that would break the framing.

    A CR or LF inside a value would let the value inject extra headers or a whole
    extra action, so it is rejected rather than sent.
    """
    lines: list[str] = []
    for name, value in fields.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"invalid AMI header name {name!r}")
        for item in value if isinstance(value, list) else [value]:
            if "\r" in item or "\n" in item:
                raise ValueError(f"AMI header {name} holds a line break")
            lines.append(f"{name}: {item}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
