"""The systemd unit in systemd/: `systemd-analyze verify` finds nothing, and scripts/install-service.sh installs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.env import REPO

UNIT = REPO / "systemd" / "pbx-bridge.service"
INSTALL = REPO / "scripts" / "install-service.sh"
VENV_BIN = REPO / ".venv" / "bin"


def systemd_analyze() -> str:
    """The systemd-analyze binary (Debian package systemd); an error, never a skip, without it."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (the unit is verified by `make test`)")
    return found


def local_unit(folder: Path) -> Path:
    """The unit with ExecStart at this checkout's pbx-bridge (verify checks that the command exists)."""
    unit = folder / "pbx-bridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/pbx-bridge/bin/", f"{VENV_BIN}/"))
    return unit


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(local_unit(tmp_path))],
                            capture_output=True, text=True, check=False)
    # Unknown keys and unparsable values are only warnings (exit 0): any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_says_what_issue_12_asks() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=30", "User=pbx-bridge", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "StateDirectory=pbx-bridge", "PrivateTmp=yes", "ProtectHome=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "LoadCredential=ami.secret:"):
        assert re.search(rf"(?m)^{re.escape(line)}", text), line


def test_exposure_rated_ok_by_systemd_analyze_security(tmp_path: Path) -> None:
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                             str(local_unit(tmp_path))], capture_output=True, text=True, check=False)
    level = re.search(r"Overall exposure level for pbx-bridge.service: ([0-9.]+)", result.stdout + result.stderr)
    assert level is not None, result.stdout + result.stderr
    assert float(level.group(1)) <= 2.0  # 0 (locked down) .. 10 (exposed); 1.4 when written


@pytest.mark.skipif(os.geteuid() != 0, reason="installs a user: root only (CI and the sandbox run as root)")
def test_install_service_into_a_root_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("root:x:0:0:root:/root:/bin/sh\n" if name == "passwd" else
                                         "root:x:0:\n" if name == "group" else "root:*::\n")
    result = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--prefix", "/srv/bridge"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    unit = (root / "etc/systemd/system/pbx-bridge.service").read_text()
    assert "ExecStart=/srv/bridge/bin/pbx-bridge run --config /etc/pbx-bridge/pbx-bridge.toml" in unit
    assert re.search(r"(?m)^pbx-bridge:x:\d+:\d+:", (root / "etc/passwd").read_text())
    token = root / "etc/pbx-bridge/api-ops.token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 48
    assert "write the AMI secret" in result.stdout and "systemctl enable --now pbx-bridge" in result.stdout
    again = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--prefix", "/srv/bridge"],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "generated" not in again.stdout  # idempotent: the token is kept
