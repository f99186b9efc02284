"""End-to-end fixtures: the real `pbx-bridge run` process against the sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import BridgeProcess
from tests.support.env import DevEnv


@pytest.fixture(scope="module")
def bridge(devenv: DevEnv) -> Iterator[BridgeProcess]:
    """pbx-bridge running for the module's tests; it must stop cleanly (exit 0) afterwards."""
    process = BridgeProcess(devenv.config_path)
    process.start()
    yield process
    assert process.stop() == 0
    assert process.events("pbx_bridge_stopped")
