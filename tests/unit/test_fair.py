"""[ring] strategy fair: who rings alone first (the fewest answered today, then idle longest)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pbx_bridge.routing import fairest

T = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
AGENTS = ("agent101", "agent102", "agent103")


def test_the_agent_with_the_fewest_answers_today_rings_first() -> None:
    answered = {"agent101": (3, T), "agent102": (1, T), "agent103": (2, T)}
    assert fairest(AGENTS, answered) == "agent102"


def test_ties_go_to_the_agent_idle_longest_and_never_answered_first() -> None:
    answered = {"agent101": (2, T + timedelta(minutes=5)), "agent102": (2, T), "agent103": (3, T)}
    assert fairest(AGENTS, answered) == "agent102"  # its last call ended 5 minutes earlier
    assert fairest(AGENTS, {"agent101": (0, T)}) == "agent102"  # agent102 and 103 never answered: order
    assert fairest(AGENTS, {}) == "agent101"


def test_only_available_agents_are_chosen() -> None:
    assert fairest(("agent101", "agent103"), {"agent101": (5, T)}) == "agent103"


def test_twelve_calls_answered_by_whoever_rings_first_stay_balanced() -> None:
    answered: dict[str, tuple[int, datetime]] = {}
    for n in range(12):
        first = fairest(AGENTS, answered)
        count, _ = answered.get(first, (0, T))
        answered[first] = (count + 1, T + timedelta(minutes=n))
    assert sorted(count for count, _ in answered.values()) == [4, 4, 4]
