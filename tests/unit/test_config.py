"""Configuration: required keys, one clear message naming the bad key, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx_bridge.cli import main
from pbx_bridge.config import ConfigError, config_path, load_settings

MINIMAL = """
[ami]
username = "pbx-bridge"
secret = "s3cret-ami"
[database]
dsn = "postgresql://bridge:s3cret-db@127.0.0.1/pbx_bridge"
[hotline]
numbers = ["4008001234"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pbx-bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_file_runs_with_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), environ={})
    assert settings.timezone == "Asia/Shanghai"
    assert settings.ami.host == "127.0.0.1" and settings.ami.port == 5038
    assert settings.hotline.trunk == "carrier"
    assert settings.ring.period_seconds == 5.0 and settings.ring.max_rings == 3
    assert settings.api.listen == "127.0.0.1:8400"


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), environ={})
    text = repr(settings) + str(settings)
    assert "s3cret-ami" not in text and "s3cret-db" not in text


@pytest.mark.parametrize(("text", "key"), [
    (MINIMAL.replace('username = "pbx-bridge"\n', ""), "ami.username: Field required"),
    (MINIMAL.replace('secret = "s3cret-ami"\n', ""), "ami: set secret or secret_file"),
    (MINIMAL.replace('numbers = ["4008001234"]', 'numbers = ["400-800"]'), "hotline.numbers"),
    (MINIMAL.replace('numbers = ["4008001234"]', "numbers = []"), "hotline.numbers"),
    (MINIMAL + "[ring]\nperiod_seconds = -1\n", "ring.period_seconds"),
    (MINIMAL + "[ring]\nmax_ringz = 4\n", "ring.max_ringz: unknown key"),
    ('timezone = "Mars/Olympus"\n' + MINIMAL, "timezone: unknown time zone 'Mars/Olympus'"),
    (MINIMAL.replace("postgresql://", "mysql://"), "database.dsn: must be a postgresql:// URL"),
    (MINIMAL + '[api]\nlisten = "8400"\n', "api.listen"),
    (MINIMAL + "[call_sheet]\ncomplaint_reply_minutes = 0\n", "call_sheet.complaint_reply_minutes"),
    (MINIMAL + '[report]\nrecipients = ["boss@example.com"]\n', "report.recipients: set \\[smtp\\] host"),
    (MINIMAL + '[report]\nrecipients = ["boss@example.com>, x"]\n[smtp]\nhost = "m"\n', "report.recipients"),
    (MINIMAL + '[report]\ndaily_at = "8:10"\n', "report.daily_at: must be HH:MM"),
    (MINIMAL + '[smtp]\nhost = "m"\npassword = "pw"\n', "smtp: a password needs a username"),
    (MINIMAL + '[smtp]\nsecurity = "ssl"\n', "smtp.security"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        load_settings(write(tmp_path, text), environ={})


def test_smtp_password_from_file_or_environment_stays_secret(tmp_path: Path) -> None:
    secret = tmp_path / "smtp.password"
    secret.write_text("m4il-s3cret\n")
    text = MINIMAL + f'[smtp]\nhost = "mail.example.com"\nusername = "bridge"\npassword_file = "{secret}"\n'
    settings = load_settings(write(tmp_path, text), environ={})
    password = settings.smtp.resolved_password()
    assert password is not None and password.get_secret_value() == "m4il-s3cret"
    assert "m4il-s3cret" not in repr(settings)
    from_env = load_settings(write(tmp_path, MINIMAL + '[smtp]\nhost = "m"\nusername = "u"\n'),
                             environ={"PBX_BRIDGE_SMTP_PASSWORD": "env-s3cret"})
    password = from_env.smtp.resolved_password()
    assert password is not None and password.get_secret_value() == "env-s3cret"


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[ami"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_secret_file_and_environment_overrides(tmp_path: Path) -> None:
    secret = tmp_path / "ami.secret"
    secret.write_text("from-file\n")
    text = MINIMAL.replace('secret = "s3cret-ami"', f'secret_file = "{secret}"')
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.ami.resolved_secret().get_secret_value() == "from-file"
    env = {"PBX_BRIDGE_AMI_SECRET": "from-env", "PBX_BRIDGE_DATABASE_DSN": "postgresql://x@h/db"}
    settings = load_settings(write(tmp_path, text), environ=env)
    assert settings.ami.resolved_secret().get_secret_value() == "from-env"
    assert settings.database.dsn.get_secret_value() == "postgresql://x@h/db"


def test_unreadable_secret_file_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('secret = "s3cret-ami"', f'secret_file = "{tmp_path / "missing"}"')
    with pytest.raises(ConfigError, match=r"ami\.secret_file: cannot read"):
        load_settings(write(tmp_path, text), environ={})


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_BRIDGE_CONFIG", "/from/env.toml")
    assert config_path("/from/cli.toml") == Path("/from/cli.toml")
    assert config_path(None) == Path("/from/env.toml")
    monkeypatch.delenv("PBX_BRIDGE_CONFIG")
    assert config_path(None) == Path("/etc/pbx-bridge/pbx-bridge.toml")


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["check-config", "--config", str(write(tmp_path, MINIMAL))])
    out = capsys.readouterr().out
    assert "configuration OK" in out and "4008001234" in out and "s3cret" not in out


def test_bad_config_exits_2_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL.replace('username = "pbx-bridge"\n', ""))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ami.username" in err
