"""How an Originate's outcome is read for a probe."""

from __future__ import annotations

import asyncio
from typing import Any

from panoramisk.message import Message

from pbx_bridge.ami.client import AmiError
from pbx_bridge.probes import _originate_failure


async def finished(result: Any = None, error: Exception | None = None) -> asyncio.Task[Any]:
    async def work() -> Any:
        if error is not None:
            raise error
        return result

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    return task


async def test_answered_by_the_carrier_is_not_a_failure() -> None:
    queued = Message({"Response": "Success", "Message": "Originate successfully queued"})
    answered = Message({"Event": "OriginateResponse", "Response": "Success", "Reason": "4"})
    assert _originate_failure(await finished([queued, answered])) is None


async def test_refusals_keep_asterisks_reason_code() -> None:
    queued = Message({"Response": "Success", "Message": "Originate successfully queued"})
    busy = Message({"Event": "OriginateResponse", "Response": "Failure", "Reason": "5"})
    assert _originate_failure(await finished([queued, busy])) == "Failure: Asterisk reason 5 (busy)"
    refused = Message({"Response": "Error", "Message": "Originate failed"})
    assert _originate_failure(await finished(refused)) == "Error: Asterisk reason ? (Originate failed)"
    assert _originate_failure(await finished(error=AmiError("AMI connection lost"))) == "AMI connection lost"
