"""The development environment works from a checkout that other users cannot enter (e.g. under /root)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import REPO

pytestmark = pytest.mark.integration

# A second sandbox beside the suite's own: other loopback addresses, ports and RTP ranges.
OTHER_PBX_AMI, OTHER_WORLD_AMI = 15058, 15059
OTHER_SANDBOX: dict[str, object] = {
                 "pbx_ip": "127.0.12.1", "world_carrier_ip": "127.0.12.2", "world_phones_ip": "127.0.12.3",
                 "pbx_ami_port": OTHER_PBX_AMI, "world_ami_port": OTHER_WORLD_AMI,
                 "pbx_rtp": [32000, 32199], "world_rtp": [32200, 32399]}
OTHER_PG_PORT = "15452"


def copy_worktree(target: Path) -> None:
    """The files git tracks, as they are in this working tree (uncommitted changes included)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def private_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the checkout inside a fresh 0700 directory, like a clone in root's home."""
    home = Path(subprocess.run(["mktemp", "-d"], check=True, capture_output=True, text=True).stdout.strip())
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    checkout = home / "pbx-bridge"
    copy_worktree(checkout)
    (checkout / ".state" / "sandbox").mkdir(parents=True)
    (checkout / ".state" / "sandbox" / "sandbox.json").write_text(json.dumps(OTHER_SANDBOX))
    try:
        yield checkout
    finally:
        devenv(checkout, "clean")
        shutil.rmtree(home, ignore_errors=True)


def devenv(checkout: Path, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(checkout / "scripts" / "devenv.py"), command],
                          cwd=checkout, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PBX_BRIDGE_PG_PORT": OTHER_PG_PORT,
                               "PBX_BRIDGE_STATE": str(checkout / ".state"), **env})


def psql(sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", "-h", "127.0.0.1", "-p", OTHER_PG_PORT, "-U", "postgres", "-d", "pbx_bridge",
                           "-tAc", sql], capture_output=True, text=True, timeout=30)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_and_down_from_a_checkout_under_a_0700_directory(private_checkout: Path) -> None:
    up = devenv(private_checkout, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    # PostgreSQL's data lives outside the checkout, where the postgres user can reach it.
    data = (private_checkout / ".state" / "pg").resolve()
    assert data.is_relative_to("/var/lib/pbx-bridge-dev") and (data / "data" / "PG_VERSION").exists()
    assert psql("SELECT count(*) FROM schema_migrations").stdout.strip().isdigit()
    # Both Asterisk instances of this checkout's sandbox are up, on their own ports.
    assert port_open(OTHER_PBX_AMI) and port_open(OTHER_WORLD_AMI)
    uptime = subprocess.run([sys.executable, str(private_checkout / "docker" / "asterisk" / "sandbox.py"), "cli",
                             "--state", str(private_checkout / ".state" / "sandbox"), "pbx", "core show uptime"],
                            capture_output=True, text=True, timeout=30)
    assert "System uptime" in uptime.stdout, uptime.stdout + uptime.stderr

    down = devenv(private_checkout, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert psql("SELECT 1").returncode != 0
    assert not port_open(OTHER_PBX_AMI)

    clean = devenv(private_checkout, "clean")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert not data.exists() and not (private_checkout / ".state").exists()


def test_a_server_state_nobody_can_reach_is_refused_in_one_line_before_any_work(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "devenv.py", checkout / "scripts" / "devenv.py")
    result = devenv(checkout, "up", PBX_BRIDGE_SERVER_STATE=str(locked / "server"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "unreachable for the postgres user" in line and str(locked) in line and "0700" in line
    assert not (locked / "server").exists() and not (checkout / ".state").exists()
