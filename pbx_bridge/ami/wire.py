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
    """One AMI message: an event, a response, or a list item. Header names are case-insensitive."""

    headers: Mapping[str, str]
    decode_errors: bool = False
    # Header names (lower case) that appeared more than once: the first value is kept. Asterisk
    # never repeats a header in the events pbx-bridge reads; a repeat means a forged block.
    duplicates: frozenset[str] = frozenset()

    def get(self, name: str, default: str = "") -> str:
        """The value of header `name` (any case), or `default`."""
        return self.headers.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.headers

    @property
    def event(self) -> str:
        """The event name, '' when this is not an event."""
        return self.get("Event")

    @property
    def timestamp(self) -> datetime | None:
        """The event's `Timestamp` (manager.conf timestampevents=yes) as an aware UTC datetime."""
        raw = self.get("Timestamp")
        if not raw:
            return None
        try:
            return datetime.fromtimestamp(float(raw), tz=UTC)
        except (ValueError, OverflowError, OSError):  # OSError: e.g. 1e18 (EOVERFLOW from the C library)
            return None


def parse_message(text: str, decode_errors: bool = False) -> AmiMessage:
    """Parse one decoded AMI message (header lines without the final blank line)."""
    headers: dict[str, str] = {}
    duplicates: set[str] = set()
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.removeprefix(" ")
        key = name.strip().lower()
        if not key:
            continue
        if key in headers:  # repeated headers: keep the first, remember the repeat
            duplicates.add(key)
            continue
        if key in C_ESCAPED_HEADERS:
            value = unescape_c(value)
        headers[key] = value
    return AmiMessage(headers=headers, decode_errors=decode_errors, duplicates=frozenset(duplicates))


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
