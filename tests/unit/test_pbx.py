"""The PBX's name on the rows, and the session setting that carries it to PostgreSQL."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pbx_bridge.cli import main
from pbx_bridge.config import load_settings
from pbx_bridge.pbx import (
    DEFAULT_NAME,
    PbxNameError,
    PbxNaming,
    PbxNotNamedError,
    learn_pbx,
    name_for,
    pbx_dsn,
)


def test_the_configured_name_wins_then_the_systemname_then_default() -> None:
    assert name_for("shanghai", "pbx") == "shanghai"
    assert name_for(None, "pbx") == "pbx"
    assert name_for(None, "") == DEFAULT_NAME == "default"


def test_a_systemname_that_cannot_name_rows_asks_for_a_configured_name() -> None:
    with pytest.raises(PbxNameError, match=r"set \[pbx\] name"):
        name_for(None, "site one")
    with pytest.raises(PbxNameError):
        name_for(None, "x" * 65)
    assert name_for("site-one", "site one") == "site-one"


@pytest.mark.parametrize(("dsn", "expected"), [
    ("postgresql://app@db:5432/pbx", "postgresql://app@db:5432/pbx?pbx_bridge.pbx=site-a"),
    ("postgresql://app@db/pbx?sslmode=require&application_name=x",
     "postgresql://app@db/pbx?sslmode=require&application_name=x&pbx_bridge.pbx=site-a"),
    # a setting already in the DSN is replaced, never doubled
    ("postgresql://app@db/pbx?pbx_bridge.pbx=old", "postgresql://app@db/pbx?pbx_bridge.pbx=site-a"),
])
def test_every_session_of_the_dsn_writes_for_the_pbx(dsn: str, expected: str) -> None:
    assert pbx_dsn(dsn, "site-a") == expected


def test_names_with_url_characters_are_quoted() -> None:
    assert pbx_dsn("postgresql://app:s%40cret@db/pbx", "hq:1@a/b") == (
        "postgresql://app:s%40cret@db/pbx?pbx_bridge.pbx=hq%3A1%40a%2Fb")


def test_without_a_configured_name_nothing_connects_until_the_first_login_names_the_pbx() -> None:
    naming = PbxNaming("postgresql://app@db/pbx", None)
    with pytest.raises(PbxNotNamedError, match="not known yet"):
        naming.dsn()
    assert isinstance(PbxNotNamedError(), OSError)  # retried like an unreachable database
    naming.learn("site-b")
    assert naming.dsn() == "postgresql://app@db/pbx?pbx_bridge.pbx=site-b"
    naming.learn("renamed")  # Asterisk restarted with another systemname: the rows keep their name
    assert (naming.require(), naming.system_name) == ("site-b", "renamed")


def test_a_configured_name_connects_at_once_and_the_login_adds_the_systemname() -> None:
    naming = PbxNaming("postgresql://app@db/pbx", "shanghai")
    assert naming.dsn().endswith("pbx_bridge.pbx=shanghai")  # no AMI needed to start writing
    naming.learn("")
    assert (naming.require(), naming.system_name) == ("shanghai", "")


async def test_the_command_line_gives_up_on_an_unreachable_ami_with_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "pbx-bridge.toml"
    config.write_text(f'[ami]\nport = {port}\nusername = "u"\nsecret = "s"\n[database]\n'
                      'dsn = "postgresql://x@127.0.0.1/x"\n[hotline]\nnumbers = ["4008001234"]\n')
    started = time.monotonic()
    with pytest.raises(PbxNameError, match=rf"cannot read Asterisk's systemname .*127.0.0.1:{port}.* within 1 s"):
        await learn_pbx(load_settings(config), give_up_after=1)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("name", ["site one", "", "x" * 65, "a'b", "站点"])
def test_report_refuses_a_pbx_name_the_tables_could_not_hold(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--pbx", name])
    assert exit_.value.code == 2
    assert "is not a PBX name" in capsys.readouterr().err
