"""[probe] trunk: line probes dial out through an ordinary line, never the 400 trunk unless opted in."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import structlog

from pbx_bridge.alerts import Alerter
from pbx_bridge.api import LiveState
from pbx_bridge.cli import main
from pbx_bridge.config import ConfigError, Settings, load_settings
from pbx_bridge.daemon import _probes, health_checks
from pbx_bridge.metrics import Metrics
from pbx_bridge.probes import CHANNEL_PREFIX
from pbx_bridge.routing import Clock
from tests.unit.test_config import MINIMAL, write

PROBES_ON = MINIMAL + '[probe]\ncaller_id = "02566660000"\n'
FIX = "Name another outbound line (PJSIP endpoint), or set [probe] allow_hotline_trunk = true"


def settings_of(tmp_path: Path, text: str) -> Settings:
    return load_settings(write(tmp_path, text), environ={})


@pytest.mark.parametrize(("text", "message"), [
    (PROBES_ON, "probe.trunk: not set, and line probes are on ([probe] caller_id); the default would be the "
                f"hotline trunk 'carrier', but the 400 line never dials out. {FIX}"),
    (PROBES_ON + 'trunk = "carrier"\n',
     f"probe.trunk: 'carrier' is the hotline trunk ([hotline] trunk); the 400 line never dials out. {FIX}"),
    (PROBES_ON.replace("[hotline]\n", '[hotline]\ntrunk = "sbc-400"\n') + 'trunk = "sbc-400"\n',
     f"probe.trunk: 'sbc-400' is the hotline trunk ([hotline] trunk); the 400 line never dials out. {FIX}"),
    (PROBES_ON + "allow_hotline_trunk = false\n", "probe.trunk: not set"),
])
def test_probes_through_the_hotline_trunk_are_refused_naming_the_key(tmp_path: Path, text: str,
                                                                     message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_of(tmp_path, text)
    assert str(raised.value).startswith(f"{tmp_path / 'pbx-bridge.toml'}: {message}")
    assert "(top level)" not in str(raised.value)


def test_the_refusal_stops_the_daemon_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(write(tmp_path, PROBES_ON + 'trunk = "carrier"\n'))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "configuration error" in err and "probe.trunk: 'carrier' is the hotline trunk" in err
    assert "[probe] allow_hotline_trunk = true" in err


def test_another_outbound_line_is_used_as_configured(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, PROBES_ON + 'trunk = "pstn"\nnumber = "4008005678"\n')
    assert (settings.probe_trunk, settings.probe_number) == ("pstn", "4008005678")
    assert settings.probe_uses_hotline_trunk is False


@pytest.mark.parametrize("trunk", ['', 'trunk = "carrier"\n'])
def test_the_hotline_trunk_only_with_the_explicit_opt_in(tmp_path: Path, trunk: str) -> None:
    settings = settings_of(tmp_path, PROBES_ON + "allow_hotline_trunk = true\n" + trunk)
    assert settings.probe_trunk == "carrier" and settings.probe_uses_hotline_trunk is True


@pytest.mark.parametrize("probe", ["", "[probe]\n", '[probe]\ntrunk = "carrier"\n', '[probe]\ndaily_at = "07:30"\n'])
def test_probes_off_need_no_trunk(tmp_path: Path, probe: str) -> None:
    settings = settings_of(tmp_path, MINIMAL + probe)
    assert settings.probe_trunk is None and settings.probe_uses_hotline_trunk is False


def check_config(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    main(["check-config", "--config", str(write(tmp_path, text))])
    return capsys.readouterr().out


def test_check_config_says_which_line_probes_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = check_config(tmp_path, PROBES_ON + 'trunk = "pstn"\n', capsys)
    assert ("  line probes     via PJSIP endpoint 'pstn' to 4008001234 (caller 02566660000); "
            "daily 08:00, when quiet 60 min\n") in out
    assert "WARNING" not in out
    assert "  line probes     off ([probe] caller_id not set)\n" in check_config(tmp_path, MINIMAL, capsys)
    out = check_config(tmp_path, PROBES_ON + "allow_hotline_trunk = true\nquiet_minutes = 90\n", capsys)
    assert "line probes     via PJSIP endpoint 'carrier' to 4008001234 (caller 02566660000); " \
           "daily 08:00, when quiet 90 min" in out
    assert "WARNING         line probes dial out through the hotline trunk 'carrier', allowed by " \
           "[probe] allow_hotline_trunk" in out
    assert "the 400 line never dials out" in out


async def probes_health(settings: Settings) -> tuple[bool, dict[str, Any]]:
    """The /healthz `probes` component (it reads the configuration only)."""
    none = cast(Any, None)
    checks = health_checks(settings, none, none, none, none, none, none, none, none, none)
    return await checks["probes"]()


async def test_healthz_shows_the_probes_line_and_the_opt_in(tmp_path: Path) -> None:
    assert await probes_health(settings_of(tmp_path, MINIMAL)) == (True, {"enabled": False})
    assert await probes_health(settings_of(tmp_path, PROBES_ON + 'trunk = "pstn"\n')) == (
        True, {"enabled": True, "trunk": "pstn", "hotline_trunk": False})
    ok, detail = await probes_health(settings_of(tmp_path, PROBES_ON + "allow_hotline_trunk = true\n"))
    assert ok is True  # an explicit opt-in: shown, never a failure
    assert detail["trunk"] == "carrier" and detail["hotline_trunk"] is True
    assert detail["allowed_by"] == "[probe] allow_hotline_trunk"
    assert "the 400 line never dials out" in detail["warning"]


class RecordingAmi:
    """Answers every action: Setvar succeeds, the Originate is refused (so the probe ends at once)."""

    def __init__(self) -> None:
        self.actions: list[dict[str, str]] = []

    async def send_action(self, action: dict[str, str], response_timeout: float = 5) -> dict[str, str]:
        self.actions.append(action)
        if action["Action"] == "Originate":
            return {"Response": "Error", "Message": "Originate failed"}
        return {"Response": "Success"}


async def no_database() -> asyncpg.Connection:
    raise OSError("no database in unit tests")


async def run_probe(settings: Settings) -> tuple[RecordingAmi, list[MutableMapping[str, Any]]]:
    ami = RecordingAmi()
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        runner, scheduler = _probes(settings, cast(Any, ami), no_database, Alerter(None, metrics), metrics,
                                    LiveState(), Clock(), cast(Any, None))
        assert runner is not None and scheduler is not None
        task = asyncio.create_task(runner.run())
        runner.request("manual")
        while runner.busy:
            await asyncio.sleep(0.01)
        runner.stop()
        await task
    return ami, logs


async def test_the_probe_is_originated_on_the_probe_trunk_never_the_hotline_trunk(tmp_path: Path) -> None:
    ami, logs = await run_probe(settings_of(tmp_path, PROBES_ON + 'trunk = "pstn"\n'))
    originates = [a for a in ami.actions if a["Action"] == "Originate"]
    assert len(originates) == 2  # refused: retried once
    for originate in originates:
        assert originate["Channel"] == "PJSIP/4008001234@pstn"
        assert originate["ChannelId"].startswith(CHANNEL_PREFIX)
    assert not [e for e in logs if e["event"] == "probe_uses_hotline_trunk"]
    [on] = [e for e in logs if e["event"] == "line_probes_on"]
    assert on["trunk"] == "pstn"
    [requested] = [e for e in logs if e["event"] == "line_probe_requested"]
    assert requested["trunk"] == "pstn"


async def test_probing_through_the_hotline_trunk_is_logged_loudly(tmp_path: Path) -> None:
    ami, logs = await run_probe(settings_of(tmp_path, PROBES_ON + "allow_hotline_trunk = true\n"))
    assert {a["Channel"] for a in ami.actions if a["Action"] == "Originate"} == {"PJSIP/4008001234@carrier"}
    [warning] = [e for e in logs if e["event"] == "probe_uses_hotline_trunk"]
    assert warning["log_level"] == "warning" and warning["trunk"] == "carrier"
    assert warning["allowed_by"] == "[probe] allow_hotline_trunk"
    assert "the 400 line never dials out" in warning["rule"]
