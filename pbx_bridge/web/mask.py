"""Masking of telephone numbers for screens: 13812348000 -> 138****8000."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]")


def mask_number(number: str | None) -> str:
    """A caller's number as a wall screen may show it: the first 3 and last 4 digits of a mobile-
    length number, only the last 4 of a shorter one, nothing of a very short one; any character
    but a digit or a leading + is dropped (a caller ID may carry anything)."""
    if not number:
        return ""
    plus = "+" if number.startswith("+") else ""
    digits = "".join(_DIGITS.findall(number))[:32]
    if len(digits) >= 11:
        return f"{plus}{digits[:3]}{'*' * (len(digits) - 7)}{digits[-4:]}"
    if len(digits) >= 7:
        return f"{plus}{'*' * (len(digits) - 4)}{digits[-4:]}"
    return "*" * len(digits) if digits else "?"


def looks_like_number(text: str | None) -> bool:
    """Whether `text` (who answered) is a telephone number rather than an endpoint's name."""
    return bool(text) and sum(c in "0123456789" for c in text or "") >= 7
