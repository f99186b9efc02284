"""`pbx-bridge` with two proposed hot-path patches applied at start (the benchmark measures their gain).

P1 (pbx_bridge/ami/client.py, `SafeAmiProtocol._route`): build panoramisk's `Message` copy only
for a message that carries an ActionID or CommandID (a response or a list item); an event never
needs it. P2 (pbx_bridge/storage/writer.py, `_decision_body`): read the fields directly instead
of `dataclasses.asdict`, which deep-copies every value. Same output in both cases.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pbx_bridge import cli
from pbx_bridge.ami import client
from pbx_bridge.ami.integrity import Suspicion
from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.storage import writer
from pbx_bridge.tracker.model import CallEnded, RecordWrite, Violation

_original_route = client.SafeAmiProtocol._route


def _route(self: client.SafeAmiProtocol, message: AmiMessage) -> None:
    """P1: an event without ActionID/CommandID goes past the actions' bookkeeping at once."""
    if "actionid" in message.headers or "commandid" in message.headers:
        _original_route(self, message)
        return
    suspicion = self._integrity.check(message)
    if self._integrity.numbered is False and not self._warned_unnumbered:
        _original_route(self, message)  # the first unnumbered event: the original logs it
        return
    for forged in self._integrity.forged_after_the_fact:
        self._on_suspicion(Suspicion("sequence", "", "", "", f"an event numbered {forged} was accepted, "
                                            "then a real event came lower"))
    self._integrity.forged_after_the_fact.clear()
    if suspicion is not None:
        self._on_suspicion(suspicion)
        return
    self._on_event(message)


def _decision_body(decision: RecordWrite) -> dict[str, Any]:
    """P2: as writer._decision_body, without asdict's deep copies."""
    if isinstance(decision, Violation):
        return _original_body(decision)
    record = decision.record
    body: dict[str, Any] = {"kind": type(decision).__name__,
                            "record": {f.name: writer._encode(getattr(record, f.name)) for f in fields(record)}}
    if isinstance(decision, CallEnded):
        body["legs"] = [{f.name: writer._encode(getattr(leg, f.name)) for f in fields(leg)} for leg in decision.legs]
    return body


_original_body = writer._decision_body

if __name__ == "__main__":
    client.SafeAmiProtocol._route = _route  # type: ignore[method-assign]
    writer._decision_body = _decision_body
    cli.main()
