"""Load the AMI streams captured from the sandbox (tests/fixtures/ami, made by capture.py)."""

from __future__ import annotations

from pathlib import Path

from pbx_bridge.ami.wire import AmiMessage, parse_stream

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ami"


def fixture_bytes(name: str) -> bytes:
    """The raw bytes of one captured stream."""
    return (FIXTURES / f"{name}.ami").read_bytes()


def fixture_messages(name: str) -> list[AmiMessage]:
    """One captured stream, framed into messages."""
    return parse_stream(fixture_bytes(name))


def fixture_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.ami"))
