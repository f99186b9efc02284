"""Where the local environment (make env) put things: sandbox settings, config, database."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PBX_BRIDGE_STATE", REPO / ".state")).resolve()


class EnvironmentMissing(Exception):
    """The sandbox or database is not set up: run `make test` (or `make env`)."""


@dataclass(frozen=True)
class DevEnv:
    """The running sandbox and database, as scripts/devenv.py set them up."""

    sandbox: dict[str, object]
    config_path: Path
    dsn: str

    @property
    def hotline_numbers(self) -> list[str]:
        numbers = self.sandbox["hotline_numbers"]
        assert isinstance(numbers, list)
        return [str(n) for n in numbers]

    @property
    def other_number(self) -> str:
        return str(self.sandbox["other_number"])

    @property
    def duty_mobile(self) -> str:
        return str(self.sandbox["duty_mobile"])

    @property
    def duty_holder(self) -> str:
        return str(self.sandbox["duty_holder"])


def load_devenv() -> DevEnv:
    """Read the environment `make env` created; fail loudly (never skip) if it is absent."""
    sandbox_json = STATE / "sandbox" / "sandbox.json"
    config = STATE / "pbx-bridge.toml"
    if not sandbox_json.exists() or not config.exists():
        raise EnvironmentMissing(f"no sandbox under {STATE}: run `make test` or `make env` first")
    port = os.environ.get("PBX_BRIDGE_PG_PORT", "15432")
    return DevEnv(sandbox=json.loads(sandbox_json.read_text()), config_path=config,
                  dsn=f"postgresql://postgres@127.0.0.1:{port}/pbx_bridge")


def sandbox_module() -> ModuleType:
    """docker/asterisk/sandbox.py (a script, not a package), imported for its path helpers."""
    spec = importlib.util.spec_from_file_location("pbx_sandbox", REPO / "docker" / "asterisk" / "sandbox.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pbx_log_dir() -> Path:
    """The pbx instance's Asterisk log folder, inside the sandbox's root filesystem."""
    sandbox = sandbox_module()
    root = Path(sandbox.rootfs_path())
    return root / str(sandbox.instance_root(STATE / "sandbox")).lstrip("/") / "pbx" / "log"
