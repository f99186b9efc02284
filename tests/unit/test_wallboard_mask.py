"""Masking callers' numbers for the wallboard, and the live payload that carries them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from pbx_bridge.web.board import live_payload
from pbx_bridge.web.mask import looks_like_number, mask_number
from tests.support.fixtures import fixture_messages


@pytest.mark.parametrize(("number", "shown"), [
    ("13812348000", "138****8000"),
    ("+8613812348000", "+861******8000"),
    ("02566660000", "025****0000"),
    ("66660000", "****0000"),
    ("1001", "****"),
    ("", ""),
    ("anonymous", "?"),
    ("138-1234-8000", "138****8000"),
    ("１３８１２３４８０００", "?"),  # fullwidth digits are not digits here
])
def test_numbers_are_masked(number: str, shown: str) -> None:
    assert mask_number(number) == shown


def test_who_answered_is_a_number_or_an_endpoint() -> None:
    assert looks_like_number("13900139000") and not looks_like_number("agent101") and not looks_like_number(None)


def test_the_live_payload_masks_and_keys_only_what_is_shown() -> None:
    settings = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier")
    state = TrackerState()
    for message in fixture_messages("answered_7s_talk_4s")[:12]:
        state, _ = apply(state, message, settings)
    [call] = state.calls.values()
    at = datetime(2030, 1, 1, tzinfo=UTC)
    key, payload = live_payload(state, at, routing=None, trunk=None, period=5.0, max_rings=3)
    later_key, later = live_payload(state, at.replace(second=9), routing=None, trunk=None, period=5.0, max_rings=3)
    assert key == later_key and later["calls"][0]["ring_seconds"] > payload["calls"][0]["ring_seconds"]
    assert call.caller_number not in str(payload) and call.caller_name not in str(payload)
    assert payload["calls"][0]["caller"] == mask_number(call.caller_number)
