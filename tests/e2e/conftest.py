"""End-to-end fixtures: the real `pbx-bridge run` process against the sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv

# A Tuesday morning in Shanghai: business hours, whatever the real time is.
OPEN_HOURS = "2026-11-24T10:00:00+08:00"


@pytest.fixture(scope="module")
def bridge(devenv: DevEnv) -> Iterator[BridgeProcess]:
    """pbx-bridge running for the module's tests, its business clock in open hours; it must
    stop cleanly (exit 0) afterwards."""
    process = BridgeProcess(devenv.config_path, business_time=OPEN_HOURS)
    process.start()
    yield process
    assert process.stop() == 0
    assert process.events("pbx_bridge_stopped")
