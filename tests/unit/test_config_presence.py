"""[presence]: the agent group and the feature codes, validated at start and generated into the dialplan."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx_bridge.config import ConfigError, load_settings
from pbx_bridge.dialplan import render
from tests.unit.test_config import MINIMAL, write


def presence(tmp_path: Path, body: str) -> str:
    return str(load_settings(write(tmp_path, MINIMAL + "\n[presence]\n" + body), environ={}).presence)


@pytest.mark.parametrize(("body", "key"), [
    ('agents = ["agent101", "agent 102"]', "presence.agents"),
    ('agents = ["agent101", "agent101"]', "presence.agents"),
    ('sign_out_code = "21"', "presence.sign_out_code"),
    ('sign_in_code = "*2;1"', "presence.sign_in_code"),
    ('status_code = "*21"', "presence"),  # the same as sign_out_code
])
def test_bad_presence_settings_are_refused_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        presence(tmp_path, body)
    assert f"{key}" in str(refused.value)


def test_the_feature_codes_are_generated_only_with_agents(tmp_path: Path) -> None:
    off = load_settings(write(tmp_path, MINIMAL), environ={})
    assert "exten => *21" not in render(off)
    on = load_settings(write(tmp_path, MINIMAL + '\n[presence]\nagents = ["agent101", "agent102"]\n'
                                                  'sign_out_code = "#31"\n'), environ={})
    text = render(on)
    assert "[hotline-feature-codes]" in text
    assert "exten => #31,1,Goto(hotline-presence,out,1)" in text
    assert "exten => *22,1,Goto(hotline-presence,in,1)" in text
    assert "exten => *23,1,Goto(hotline-presence,status,1)" in text
