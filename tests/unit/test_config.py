"""Configuration: required keys, one clear message naming the bad key, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx_bridge.cli import main
from pbx_bridge.config import ConfigError, config_path, load_settings, mobile_allowed

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
    (MINIMAL + '[smtp]\nhost = "m"\nsecurity = "none"\nusername = "u"\npassword = "pw"\n',
     'smtp.password: not with security = "none"'),
    (MINIMAL + '[probe]\ntrunk = "carrier/x"\n', "probe.trunk: 'carrier/x' is not a PJSIP endpoint name"),
    (MINIMAL + '[probe]\ntrunk = "carrier\\n"\n', "probe.trunk"),
    (MINIMAL + '[probe]\ncaller_id = "+8602566660000"\n', "probe.caller_id"),
    (MINIMAL + '[probe]\ncaller_id = "02566660000\\n"\n', "probe.caller_id"),
    (MINIMAL.replace('numbers = ["4008001234"]', 'numbers = ["4008001234\\n"]'), "hotline.numbers"),
    (MINIMAL + '[hotline.x]\n', "hotline.x: unknown key"),
    (MINIMAL + '[duty]\nmobile = "13900139000\\n"\n', "duty.mobile"),
    (MINIMAL + '[duty]\nmobile_pattern = "^1[0-9]{10}"\n', "duty.mobile_pattern: must be anchored"),
    (MINIMAL + '[duty]\nmobile_pattern = "^.*$"\n', "duty.mobile_pattern"),
    (MINIMAL + '[duty]\nmobile_pattern = "^1[0-9\\\\n]{1,11}$"\n', "duty.mobile_pattern"),  # lets "1\n" in
    (MINIMAL + '[report]\ndaily_at = "08:10\\n"\n', "report.daily_at"),
    (MINIMAL + '[smtp]\nsender = "a@b.cn\\nBcc: x@y.cn"\n', "smtp.sender"),
    (MINIMAL + '[api]\ntoken = "too-short"\n', "api: token: use at least 16 characters"),
    (MINIMAL + '[[api.tokens]]\nname = "desk"\nrole = "admin"\ntoken = "0123456789abcdef"\n', "api.tokens.0.role"),
    (MINIMAL + '[[api.tokens]]\nname = "desk one"\nrole = "agent"\ntoken = "0123456789abcdef"\n',
     "api.tokens.0.name"),
    (MINIMAL + '[[api.tokens]]\nname = "desk"\nrole = "agent"\n',
     "api.tokens.0: desk: set token_file or \\$PBX_BRIDGE_API_TOKEN_DESK"),
    (MINIMAL + '[[api.tokens]]\nname = "desk"\nrole = "agent"\ntoken = "0123456789abcdef"\ntoken_file = "/x"\n',
     "api.tokens.0: desk: set only one of token_file and token"),
    (MINIMAL + '[[api.tokens]]\nname = "desk"\nrole = "agent"\ntoken = "0123456789abcde"\n',
     "api.tokens.0.token: use at least 16 characters"),
    (MINIMAL + '[[api.tokens]]\nname = "desk"\nrole = "agent"\ntoken = "0123456789abcdef"\n'
               '[[api.tokens]]\nname = "desk"\nrole = "viewer"\ntoken = "0123456789abcdeX"\n',
     "api: two tokens are named 'desk'"),
    (MINIMAL + '[api]\ntoken = "0123456789abcdef"\n'
               '[[api.tokens]]\nname = "ops"\nrole = "ops"\ntoken = "0123456789abcdeX"\n',
     "tokens\\]\\]; \\[api\\] token or token_file is the token named ops"),
    (MINIMAL + '[[api.tokens]]\nname = "desk-1"\nrole = "agent"\ntoken = "0123456789abcdef"\n'
               '[[api.tokens]]\nname = "desk_1"\nrole = "viewer"\ntoken = "0123456789abcdeX"\n',
     "api: two \\[\\[api.tokens\\]\\] names share the environment variable \\$PBX_BRIDGE_API_TOKEN_DESK_1"),
    (MINIMAL + '[[api.tokens]]\nname = "a"\nrole = "agent"\ntoken = "0123456789abcdef"\n'
               '[[api.tokens]]\nname = "b"\nrole = "viewer"\ntoken = "0123456789abcdef"\n',
     "api.tokens: a and b have the same token"),
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


def test_named_tokens_from_files_and_the_environment_keep_their_roles_and_stay_secret(tmp_path: Path) -> None:
    ops_file, agent_file = tmp_path / "ops.token", tmp_path / "agent.token"
    ops_file.write_text("ops-file-s3cret-0123456789\n")
    agent_file.write_text("agent-file-s3cret-012345\n")
    text = MINIMAL + (f'[[api.tokens]]\nname = "ops"\nrole = "ops"\ntoken_file = "{ops_file}"\n'
                      f'[[api.tokens]]\nname = "desk-1"\nrole = "agent"\ntoken_file = "{agent_file}"\n'
                      '[[api.tokens]]\nname = "wall.board"\nrole = "viewer"\n')
    env = {"PBX_BRIDGE_API_TOKEN_WALL_BOARD": "env-s3cret-0123456789"}
    settings = load_settings(write(tmp_path, text), environ=env)
    tokens = settings.api.resolved_tokens()
    assert [(t.name, t.role, t.secret.get_secret_value()) for t in tokens] == [
        ("ops", "ops", "ops-file-s3cret-0123456789"), ("desk-1", "agent", "agent-file-s3cret-012345"),
        ("wall.board", "viewer", "env-s3cret-0123456789")]
    token = settings.api.resolved_token("agent")
    assert token is not None and token.get_secret_value() == "agent-file-s3cret-012345"
    assert "s3cret" not in repr(settings) + str(tokens)
    both = text.replace('role = "viewer"\n', f'role = "viewer"\ntoken_file = "{ops_file}"\n')
    with pytest.raises(ConfigError, match=r"api\.tokens\.2: wall\.board: set only one of "
                                          r"\$PBX_BRIDGE_API_TOKEN_WALL_BOARD and token_file"):
        load_settings(write(tmp_path, both), environ=env)
    with pytest.raises(ConfigError, match=r"wall\.board: \$PBX_BRIDGE_API_TOKEN_WALL_BOARD: use at least 16"):
        load_settings(write(tmp_path, text), environ={"PBX_BRIDGE_API_TOKEN_WALL_BOARD": "short"})


def test_every_token_file_needs_16_characters_and_tokens_must_differ(tmp_path: Path) -> None:
    short, other = tmp_path / "short.token", tmp_path / "other.token"
    short.write_text("fifteen-chars-x\n")
    other.write_text("ops-file-s3cret-0123456789\n")
    with pytest.raises(ConfigError, match=r"api\.token_file: the token in .* is shorter than 16 characters"):
        load_settings(write(tmp_path, MINIMAL + f'[api]\ntoken_file = "{short}"\n'), environ={})
    with pytest.raises(ConfigError, match=r"api\.tokens\.0\.token_file \(desk\): the token in .* is shorter"):
        load_settings(write(tmp_path, MINIMAL + f'[[api.tokens]]\nname = "desk"\nrole = "agent"\n'
                                                 f'token_file = "{short}"\n'), environ={})
    with pytest.raises(ConfigError, match=r"api\.tokens: ops and desk have the same token") as raised:
        load_settings(write(tmp_path, MINIMAL + f'[api]\ntoken_file = "{other}"\n[[api.tokens]]\nname = "desk"\n'
                                                 f'role = "agent"\ntoken_file = "{other}"\n'), environ={})
    assert "s3cret" not in str(raised.value)


def test_the_legacy_token_is_named_ops_with_the_role_ops(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), environ={"PBX_BRIDGE_API_TOKEN": "legacy-env-0123456789"})
    [token] = settings.api.resolved_tokens()
    assert (token.name, token.role, token.secret.get_secret_value()) == ("ops", "ops", "legacy-env-0123456789")
    assert load_settings(write(tmp_path, MINIMAL), environ={}).api.resolved_tokens() == []


@pytest.mark.parametrize(("number", "allowed"), [
    ("13800138000", True), ("13800138000\n", False), ("1380013800", False), ("12800138000", False),
    ("１３８００１３８０００", False),  # fullwidth digits: \d would take them, the roster must not
])
def test_duty_numbers_must_match_the_whole_pattern(number: str, allowed: bool) -> None:
    assert mobile_allowed(r"^1[3-9][0-9]{9}$", number) is allowed
    assert mobile_allowed(r"^1\d{10}$", number) is (allowed or number == "12800138000")
