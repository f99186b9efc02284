"""The sandbox's configuration renderer refuses placeholder passwords from site.example."""

from __future__ import annotations

import pytest

from tests.support.env import REPO
from tests.support.env import sandbox_module as sandbox


def test_a_change_me_password_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "docker" / "asterisk" / "site.example" / "pjsip_site.conf").read_text()
    with pytest.raises(SystemExit):
        sandbox().refuse_placeholder_secrets("pjsip_site.conf", text)
    assert "CHANGE_ME placeholder password" in capsys.readouterr().err


def test_the_sandbox_files_hold_no_placeholder() -> None:
    module = sandbox()
    for folder in ("common", "pbx-site", "world"):
        for path in (REPO / "docker" / "asterisk" / folder).iterdir():
            module.refuse_placeholder_secrets(path.name, path.read_text())
    for path in (REPO / "dialplan").iterdir():
        module.refuse_placeholder_secrets(path.name, path.read_text())
