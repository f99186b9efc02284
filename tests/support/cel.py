"""Load the CEL rows captured from the sandbox (tests/fixtures/cel, written by capture.py)."""

from __future__ import annotations

import json
from pathlib import Path

from pbx_bridge.cel.builder import CelRow, attended_target

CEL_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cel"


def cel_rows(name: str) -> list[CelRow]:
    """The CEL rows of one captured scenario, in the order Asterisk wrote them."""
    return [CelRow.from_mapping(row) for row in json.loads((CEL_FIXTURES / f"{name}.json").read_text("utf-8"))]


def cel_calls(name: str) -> dict[str, list[CelRow]]:
    """The scenario's rows by linkedid, as the reconcile reads them: with a call's rows, those of
    the colleague its attended transfer handed the caller to (under the consultation's linkedid)."""
    rows = cel_rows(name)
    calls: dict[str, list[CelRow]] = {}
    for row in rows:
        calls.setdefault(row.linkedid, []).append(row)
    for linkedid, own in list(calls.items()):
        targets = {t for r in own if (t := attended_target(r))}
        calls[linkedid] = own + [r for r in rows if r.uniqueid in targets and r.linkedid != linkedid]
    return calls


def cel_fixture_names() -> list[str]:
    return sorted(p.stem for p in CEL_FIXTURES.glob("*.json"))
