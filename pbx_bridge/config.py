"""Configuration: TOML validated with pydantic, secrets from files or the environment."""

from __future__ import annotations

import os
import re
import tomllib
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pbx_bridge.schedule import (
    WEEKDAYS,
    ChinaCalendar,
    HolidayCalendar,
    NoHolidays,
    Override,
    Schedule,
    parse_hours,
)

DEFAULT_PATH = Path("/etc/pbx-bridge/pbx-bridge.toml")
CONFIG_ENV = "PBX_BRIDGE_CONFIG"
# Secrets may come from the environment instead of the file (e.g. a systemd credential).
SECRET_ENV = {
    ("ami", "secret"): "PBX_BRIDGE_AMI_SECRET",
    ("database", "dsn"): "PBX_BRIDGE_DATABASE_DSN",
    ("api", "token"): "PBX_BRIDGE_API_TOKEN",
    ("smtp", "password"): "PBX_BRIDGE_SMTP_PASSWORD",
}
# Whole strings only: \A...\Z and fullmatch (Python's `$` also matches before a final newline).
PHONE_NUMBER = re.compile(r"\A[0-9]{3,20}\Z")
ENDPOINT_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(path: Path, key: str) -> SecretStr:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{key}: {path} is empty")
    return SecretStr(value)


class AmiSettings(Section):
    """[ami]: the Asterisk Manager Interface account pbx-bridge logs in with."""

    host: str = "127.0.0.1"
    port: int = Field(default=5038, ge=1, le=65535)
    username: str = Field(min_length=1)
    secret: SecretStr | None = None
    secret_file: Path | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    ping_interval_seconds: float = Field(default=10.0, gt=0)
    ping_timeout_seconds: float = Field(default=5.0, gt=0)
    # Loopback reconnects are cheap: at most this long after AMI is reachable again (2 s goal).
    reconnect_max_seconds: float = Field(default=1.5, gt=0)

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if self.secret is None and self.secret_file is None:
            raise ValueError("set secret or secret_file (or PBX_BRIDGE_AMI_SECRET)")
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set only one of secret and secret_file")
        return self

    def resolved_secret(self) -> SecretStr:
        """The AMI secret, read from `secret_file` when that is how it is given."""
        if self.secret is not None:
            return self.secret
        assert self.secret_file is not None
        return _read_secret_file(self.secret_file, "ami.secret_file")


class DatabaseSettings(Section):
    """[database]: where call records go."""

    dsn: SecretStr
    batch_size: int = Field(default=200, ge=1, le=10_000)
    flush_interval_seconds: float = Field(default=0.2, gt=0, le=10)
    queue_limit: int = Field(default=100_000, ge=100)  # records held in memory; beyond: in the journal only
    # Every decided record is journaled here until PostgreSQL committed it (default: journal.jsonl
    # beside spool_path). spool_path itself is only read once at start (earlier versions' spool).
    journal_path: Path | None = None
    journal_max_bytes: int = Field(default=256 << 20, ge=64 << 10)
    spool_path: Path = Path("/var/lib/pbx-bridge/spool.jsonl")
    statement_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    @property
    def journal_file(self) -> Path:
        """Where the journal is: journal_path, else journal.jsonl beside spool_path."""
        return self.journal_path or self.spool_path.with_name("journal.jsonl")

    @property
    def rejected_file(self) -> Path:
        """Where records PostgreSQL refuses as bad data are kept (<spool_path>.rejected.jsonl, as before)."""
        return self.spool_path.with_suffix(".rejected.jsonl")

    @field_validator("dsn")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value


class PbxSettings(Section):
    """[pbx]: which PBX this is. One pbx-bridge acts per PBX and database (a PostgreSQL advisory lock
    on this name; unset: the AMI address, with this machine's host name when AMI is on loopback).

    `standby = true` on both of a pair: the second one started waits as a hot standby (it tracks
    the calls, acts for nothing) and leads within seconds of the leader's death or cut-off; a
    leader that loses its lock's connection stops acting and exits. `false`: a second one is
    refused, and a single one keeps acting while the database is down (records are journaled)."""

    # pydantic's (Rust) regex: `$` is the very end, a final newline does not match.
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@/-]+$")
    standby: bool = False


class HotlineSettings(Section):
    """[hotline]: which calls are hotline calls."""

    numbers: Annotated[list[str], Field(min_length=1)]
    trunk: str = "carrier"
    # The dialplan trusts pbx-bridge's routing state in AstDB for this long, then falls back
    # to the static schedule; pbx-bridge refreshes it every state_refresh_seconds.
    state_max_age_seconds: int = Field(default=180, ge=30, le=3600)
    state_refresh_seconds: int = Field(default=60, ge=5, le=1800)

    @field_validator("numbers")
    @classmethod
    def _digits(cls, numbers: list[str]) -> list[str]:
        for number in numbers:
            if not PHONE_NUMBER.fullmatch(number):
                raise ValueError(f"{number!r} is not a phone number (3 to 20 digits)")
        return numbers

    @field_validator("trunk")
    @classmethod
    def _endpoint(cls, trunk: str) -> str:
        if not ENDPOINT_NAME.fullmatch(trunk):
            raise ValueError(f"{trunk!r} is not a PJSIP endpoint name")
        return trunk


class RingSettings(Section):
    """[ring]: the ring cadence, the limit (China: 1 s on, 4 s off; three rings), and escalation."""

    period_seconds: float = Field(default=5.0, gt=0, le=60)
    max_rings: int = Field(default=3, ge=1, le=50)
    escalation_seconds: float = Field(default=20.0, gt=0, le=600)  # every hotline phone rings this long
    escalate_to_mobile: bool = True  # then the duty mobile, then voicemail
    # The three-ring limit applies to the duty mobile too (seed 004: every phone): a mobile that
    # rings past it is a `ring_limit` breach (stage mobile), raised live while it rings.
    mobile_limit: bool = True
    # all: every available agent's phone rings at once. fair: the available agent who answered the
    # fewest calls today (ties: idle longest) rings alone for the first ring period, then every
    # available phone rings for the rest of the window (seed 000 话务分配: balanced workload).
    strategy: Literal["all", "fair"] = "all"

    @property
    def limit_seconds(self) -> float:
        """Ringing this long means the limit has passed (max_rings x period)."""
        return self.max_rings * self.period_seconds


class DutySettings(Section):
    """[duty]: the duty mobile (客服手机) that takes after-hours calls; the roster table overrides it."""

    mobile: str | None = None
    holder: str = Field(default="", max_length=100)
    ring_seconds: float = Field(default=25.0, gt=0, le=300)
    # Numbers the roster (PUT /duty) may name: China mobile numbers by default.
    mobile_pattern: str = r"^1[3-9][0-9]{9}$"

    @field_validator("mobile_pattern")
    @classmethod
    def _regex(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if any(compiled.fullmatch(s) for s in ("", "1;DROP", "1\n")) or not (
                pattern.startswith("^") and pattern.endswith("$")):
            raise ValueError("must be anchored (^...$) and match digits only")
        return pattern

    def mobile_allowed(self, number: str) -> bool:
        """Whether the roster may name `number` (see `mobile_allowed`)."""
        return mobile_allowed(self.mobile_pattern, number)

    @field_validator("mobile")
    @classmethod
    def _mobile(cls, mobile: str | None) -> str | None:
        if mobile is not None and not PHONE_NUMBER.fullmatch(mobile):
            raise ValueError(f"{mobile!r} is not a phone number (3 to 20 digits)")
        return mobile


def mobile_allowed(pattern: str, number: str) -> bool:
    """`number` is all digits and the whole of it matches `pattern` ([duty] mobile_pattern).

    Always fullmatch: with re.match, `^...$` also accepts the number followed by a newline.
    """
    return bool(PHONE_NUMBER.fullmatch(number) and re.fullmatch(pattern, number))


DEFAULT_DAY = ["09:00-12:00", "13:00-17:30"]


def _clock_time(value: str) -> str:
    if not re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]", value):
        raise ValueError("must be HH:MM")
    return value


def _hours(value: list[str]) -> list[str]:
    parse_hours(value)  # raises ValueError naming the bad entry
    return value


class OverrideSettings(Section):
    """One [[hours.overrides]] entry: other hours on one date (empty list = closed)."""

    date: date
    hours: list[str] = []
    reason: str = Field(default="local override", max_length=200)

    _check = field_validator("hours")(_hours)


class WeeklyHours(Section):
    """[hours.weekly]: opening hours per weekday (default Mon-Fri 09:00-12:00 and 13:00-17:30)."""

    mon: list[str] = DEFAULT_DAY
    tue: list[str] = DEFAULT_DAY
    wed: list[str] = DEFAULT_DAY
    thu: list[str] = DEFAULT_DAY
    fri: list[str] = DEFAULT_DAY
    sat: list[str] = []
    sun: list[str] = []

    _check = field_validator(*WEEKDAYS)(_hours)


class HoursSettings(Section):
    """[hours]: the weekly schedule, the holiday calendar, and local overrides."""

    calendar: Literal["cn", "none"] = "cn"
    weekly: WeeklyHours = WeeklyHours()
    adjusted_workday: list[str] = DEFAULT_DAY  # hours on a weekend day the calendar makes a working day
    overrides: list[OverrideSettings] = []

    _check = field_validator("adjusted_workday")(_hours)

    @field_validator("overrides")
    @classmethod
    def _unique_dates(cls, overrides: list[OverrideSettings]) -> list[OverrideSettings]:
        days = [o.date for o in overrides]
        if len(set(days)) != len(days):
            raise ValueError("two overrides for the same date")
        return overrides

    def schedule(self, zone: ZoneInfo) -> Schedule:
        """The effective schedule these settings describe."""
        weekly = {day: parse_hours(getattr(self.weekly, day)) for day in WEEKDAYS}
        calendar: HolidayCalendar = ChinaCalendar() if self.calendar == "cn" else NoHolidays()
        overrides = [Override(o.date, parse_hours(o.hours), o.reason) for o in self.overrides]
        return Schedule(weekly, parse_hours(self.adjusted_workday), calendar, overrides, zone)


class ProbeSettings(Section):
    """[probe]: line health test calls. Numbers come only from here, never from a request."""

    # The outbound line (PJSIP endpoint) probes dial out through: NOT the hotline trunk, since the
    # 400 line never dials out. Required when probes are on, unless allow_hotline_trunk.
    trunk: str | None = None
    # Explicit, loudly logged opt-in to probe through the hotline trunk (the default trunk then).
    allow_hotline_trunk: bool = False
    number: str | None = None  # default: the first hotline number
    caller_id: str | None = None  # the probe's own caller number (never a 400 number); unset: probes off
    daily_at: str = "08:00"
    quiet_minutes: float = Field(default=60.0, gt=0, le=24 * 60)
    timeout_seconds: float = Field(default=20.0, ge=2, le=300)
    manual_min_interval_seconds: float = Field(default=60.0, ge=0, le=3600)

    @field_validator("number", "caller_id")
    @classmethod
    def _digits(cls, number: str | None) -> str | None:
        if number is not None and not PHONE_NUMBER.fullmatch(number):
            raise ValueError(f"{number!r} is not a phone number (3 to 20 digits)")
        return number

    @field_validator("trunk")
    @classmethod
    def _endpoint(cls, trunk: str | None) -> str | None:
        if trunk is not None and not ENDPOINT_NAME.fullmatch(trunk):
            raise ValueError(f"{trunk!r} is not a PJSIP endpoint name")
        return trunk

    _check_clock = field_validator("daily_at")(_clock_time)


class AlertSettings(Section):
    """[alerts]: where rule breaches are POSTed as JSON (besides the log and the metrics)."""

    webhook_url: str | None = None
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    webhook_attempts: int = Field(default=5, ge=1, le=20)

    @field_validator("webhook_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^\s/]+", url):
            raise ValueError("must be an http:// or https:// URL")
        return url


Role = Literal["ops", "agent", "viewer"]
ROLES: tuple[Role, ...] = ("ops", "agent", "viewer")
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_TOKEN_LENGTH = 16
LEGACY_NAME = "ops"  # [api] token / token_file / $PBX_BRIDGE_API_TOKEN: one token with the role ops


def token_env_var(name: str) -> str:
    """The environment variable that may hold the named token: PBX_BRIDGE_API_TOKEN_<NAME>."""
    return "PBX_BRIDGE_API_TOKEN_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


class ApiToken(NamedTuple):
    """A bearer token as the API checks it: whose it is (recorded as who acted), its role, the secret."""

    name: str
    role: Role
    secret: SecretStr


class ApiTokenSettings(Section):
    """One [[api.tokens]] entry: a named bearer token with a role, from `token_file` or from
    $PBX_BRIDGE_API_TOKEN_<NAME> (exactly one of them; an inline `token` works but is discouraged)."""

    name: str
    role: Role
    token_file: Path | None = None
    token: SecretStr | None = None  # discouraged: whoever reads the configuration file reads the token

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        environ = (info.context or {}).get("environ", {})
        var = token_env_var(data["name"])
        given = [f"${var}"] if environ.get(var) else []
        given += [key for key in ("token_file", "token") if data.get(key) is not None]
        if not given:
            raise ValueError(f"{data['name']}: set token_file or ${var}")
        if len(given) > 1:
            raise ValueError(f"{data['name']}: set only one of {' and '.join(given)}")
        if given[0] == f"${var}":
            if len(environ[var].strip()) < MIN_TOKEN_LENGTH:
                raise ValueError(f"{data['name']}: ${var}: use at least {MIN_TOKEN_LENGTH} characters")
            return {**data, "token": environ[var].strip()}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not TOKEN_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: 1 to 64 letters, digits and _ . @ - (it is recorded as who acted)")
        return name

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"use at least {MIN_TOKEN_LENGTH} characters")
        return token


class ApiSettings(Section):
    """[api]: the ops HTTP API and who may use it ([[api.tokens]], each with a role)."""

    listen: str = "127.0.0.1:8400"
    tokens: list[ApiTokenSettings] = []
    # The legacy form: one token, named "ops" with the role ops (also $PBX_BRIDGE_API_TOKEN).
    token: SecretStr | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set only one of token and token_file")
        if self.token is not None and len(self.token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token: use at least {MIN_TOKEN_LENGTH} characters")
        names = [t.name for t in self.tokens]
        if self.token is not None or self.token_file is not None:
            names.append(LEGACY_NAME)
        for name in sorted({n for n in names if names.count(n) > 1}):
            legacy = "; [api] token or token_file is the token named ops" if name == LEGACY_NAME else ""
            raise ValueError(f"two tokens are named {name!r} (in [[api.tokens]]{legacy})")
        variables = [token_env_var(n) for n in names]
        for var in sorted({v for v in variables if variables.count(v) > 1}):
            raise ValueError(f"two [[api.tokens]] names share the environment variable ${var}")
        return self

    def resolved_tokens(self) -> list[ApiToken]:
        """Every configured token, files read (raises ValueError naming the key)."""
        resolved: list[ApiToken] = []
        if self.token_file is not None:
            resolved.append(ApiToken(LEGACY_NAME, "ops", _read_token_file(self.token_file, "api.token_file")))
        elif self.token is not None:
            resolved.append(ApiToken(LEGACY_NAME, "ops", self.token))
        for index, entry in enumerate(self.tokens):
            if entry.token is not None:
                secret = entry.token
            else:
                assert entry.token_file is not None
                secret = _read_token_file(entry.token_file, f"api.tokens.{index}.token_file ({entry.name})")
            resolved.append(ApiToken(entry.name, entry.role, secret))
        seen: dict[str, str] = {}
        for item in resolved:
            other = seen.setdefault(item.secret.get_secret_value(), item.name)
            if other != item.name:
                raise ValueError(f"api.tokens: {other} and {item.name} have the same token; give each its own")
        return resolved

    def resolved_token(self, role: Role = "ops") -> SecretStr | None:
        """The first configured token with `role` (None if there is none)."""
        return next((t.secret for t in self.resolved_tokens() if t.role == role), None)

    @property
    def host_port(self) -> tuple[str, int]:
        """`listen` split into host and port."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8400")
        return listen


def _read_token_file(path: Path, key: str) -> SecretStr:
    secret = _read_secret_file(path, key)
    if len(secret.get_secret_value()) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{key}: the token in {path} is shorter than {MIN_TOKEN_LENGTH} characters")
    return secret


class CallSheetSettings(Section):
    """[call_sheet]: the call sheet (接听记录单) agents fill in for each call."""

    # seed 002: a complaint gets an answer within one hour (1小时内给客户一个答复); counted
    # from the end of the call, a complaint not 已完成 by then is a complaint_overdue violation.
    complaint_reply_minutes: float = Field(default=60.0, gt=0, le=7 * 24 * 60)
    sweep_interval_seconds: float = Field(default=60.0, gt=0, le=3600)


EMAIL = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+")


class SmtpSettings(Section):
    """[smtp]: the mail server the daily report is sent through."""

    host: str | None = None  # unset: no email
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    sender: str = "pbx-bridge@localhost"
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    @field_validator("sender")
    @classmethod
    def _address(cls, sender: str) -> str:
        if not EMAIL.fullmatch(sender):
            raise ValueError(f"{sender!r} is not an email address")
        return sender

    @field_validator("password", "password_file")
    @classmethod
    def _not_in_clear(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("security") == "none":
            raise ValueError('not with security = "none" (the password would cross the network unencrypted); '
                             'use "starttls" or "tls"')
        return value

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set only one of password and password_file")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        return self

    def resolved_password(self) -> SecretStr | None:
        """The SMTP password, read from `password_file` when that is how it is given."""
        if self.password_file is not None:
            return _read_secret_file(self.password_file, "smtp.password_file")
        return self.password


class ReportSettings(Section):
    """[report]: the daily management report (seed 001: generated by 8:15 every morning and mailed)."""

    recipients: list[str] = []  # empty: the daemon does not mail it
    daily_at: str = "08:10"  # local time the daemon mails the previous day's report
    format: Literal["html", "text"] = "html"  # the mail's main part; a CSV is always attached

    @field_validator("recipients")
    @classmethod
    def _addresses(cls, recipients: list[str]) -> list[str]:
        for address in recipients:
            if not EMAIL.fullmatch(address):
                raise ValueError(f"{address!r} is not an email address")
        return recipients

    _check_clock = field_validator("daily_at")(_clock_time)


FEATURE_CODE = re.compile(r"\A[*#][0-9]{1,6}\Z")


class PresenceSettings(Section):
    """[presence]: agents sign out for a break and back in from their phone (feature codes); the
    agent group rings only those signed in. No agents listed: presence is off (every phone rings)."""

    agents: list[str] = []  # the agent group's phones (PJSIP endpoints), in ring order
    sign_out_code: str = "*21"
    sign_in_code: str = "*22"
    status_code: str = "*23"
    break_minutes_per_day: float = Field(default=30.0, gt=0, le=24 * 60)
    # Lunch in rotation (seed 000: 11:30-12:30 / 12:30-13:30): time signed out inside these local
    # windows does not count towards break_minutes_per_day. Empty: every minute counts.
    lunch_windows: list[str] = []
    # During open hours: an agent's phone without a registered contact this long is an alert, and
    # one that answered every call BUSY this long (at least two calls) is off the hook.
    phone_unreachable_minutes: float = Field(default=2.0, gt=0, le=24 * 60)
    off_hook_minutes: float = Field(default=5.0, gt=0, le=24 * 60)

    @field_validator("lunch_windows")
    @classmethod
    def _windows(cls, windows: list[str]) -> list[str]:
        parse_hours(windows)  # HH:MM-HH:MM, not overlapping
        return windows

    @field_validator("agents")
    @classmethod
    def _endpoints(cls, agents: list[str]) -> list[str]:
        bad = [a for a in agents if not ENDPOINT_NAME.fullmatch(a)]
        if bad:
            raise ValueError(f"not PJSIP endpoint names: {bad}")
        if len(set(agents)) != len(agents):
            raise ValueError("an agent is listed twice")
        return agents

    @field_validator("sign_out_code", "sign_in_code", "status_code")
    @classmethod
    def _code(cls, code: str) -> str:
        if not FEATURE_CODE.fullmatch(code):
            raise ValueError(f"{code!r} is not a feature code: * or # and 1 to 6 digits, e.g. *21")
        return code

    @model_validator(mode="after")
    def _distinct(self) -> PresenceSettings:
        codes = [self.sign_out_code, self.sign_in_code, self.status_code]
        if len(set(codes)) != 3:
            raise ValueError(f"sign_out_code, sign_in_code and status_code must differ: {codes}")
        return self


class ReconcileSettings(Section):
    """[reconcile]: rebuilding from CEL the records of hotline calls AMI did not see end (at start,
    after every AMI login, and every interval; `pbx-bridge reconcile` does it for a range)."""

    enabled: bool = True
    interval_seconds: float = Field(default=60.0, ge=1, le=3600)
    lookback_hours: float = Field(default=24.0, gt=0, le=24 * 31)  # how far back each pass looks
    # A call that ended less than this ago is left to its AMI record, which is on its way.
    settle_seconds: float = Field(default=10.0, ge=0, le=600)


class LogSettings(Section):
    """[log]: log level and format (JSON when not on a terminal, unless set)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(Section):
    """The whole pbx-bridge configuration."""

    timezone: str = "Asia/Shanghai"
    ami: AmiSettings
    database: DatabaseSettings
    hotline: HotlineSettings
    pbx: PbxSettings = PbxSettings()
    ring: RingSettings = RingSettings()
    hours: HoursSettings = HoursSettings()
    duty: DutySettings = DutySettings()
    alerts: AlertSettings = AlertSettings()
    probe: ProbeSettings = ProbeSettings()
    api: ApiSettings = ApiSettings()
    call_sheet: CallSheetSettings = CallSheetSettings()
    smtp: SmtpSettings = SmtpSettings()
    report: ReportSettings = ReportSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    presence: PresenceSettings = PresenceSettings()
    log: LogSettings = LogSettings()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}") from None
        return name

    @property
    def zone(self) -> ZoneInfo:
        """The configured local time zone."""
        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _report_needs_smtp(self) -> Settings:
        if self.report.recipients and self.smtp.host is None:
            raise ValueError("report.recipients: set [smtp] host to mail the report")
        return self

    @model_validator(mode="after")
    def _probe_caller_is_not_the_hotline(self) -> Settings:
        if self.probe.caller_id is not None and self.probe.caller_id in self.hotline.numbers:
            raise ValueError("probe.caller_id: must not be a hotline number (the 400 line never dials out)")
        return self

    @model_validator(mode="after")
    def _probe_trunk_is_not_the_hotline_trunk(self) -> Settings:
        probe, hotline_trunk = self.probe, self.hotline.trunk
        if probe.caller_id is None or probe.allow_hotline_trunk:
            return self  # probes off, or the explicit opt-in
        fix = "Name another outbound line (PJSIP endpoint), or set [probe] allow_hotline_trunk = true"
        if probe.trunk is None:
            raise ValueError(f"probe.trunk: not set, and line probes are on ([probe] caller_id); the default "
                             f"would be the hotline trunk {hotline_trunk!r}, but the 400 line never dials out. {fix}")
        if probe.trunk == hotline_trunk:
            raise ValueError(f"probe.trunk: {hotline_trunk!r} is the hotline trunk ([hotline] trunk); "
                             f"the 400 line never dials out. {fix}")
        return self

    @property
    def probe_trunk(self) -> str | None:
        """The outbound line that line probes dial out through (None: probes are off)."""
        if self.probe.caller_id is None:
            return None
        return self.probe.trunk or self.hotline.trunk  # the hotline trunk only when allowed (validated)

    @property
    def probe_number(self) -> str:
        """The number line probes dial: [probe] number, else the first hotline number."""
        return self.probe.number or self.hotline.numbers[0]

    @property
    def probe_uses_hotline_trunk(self) -> bool:
        """Line probes dial out through the hotline trunk ([probe] allow_hotline_trunk opted in)."""
        return self.probe_trunk is not None and self.probe_trunk == self.hotline.trunk


def config_path(cli_value: str | None) -> Path:
    """--config, else $PBX_BRIDGE_CONFIG, else /etc/pbx-bridge/pbx-bridge.toml."""
    if cli_value:
        return Path(cli_value)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH)


def _apply_secret_env(raw: dict[str, Any], environ: dict[str, str]) -> None:
    for (section, key), var in SECRET_ENV.items():
        value = environ.get(var)
        if value:
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
                table.pop(f"{key}_file", None)  # the environment beats a file named in the config


CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential= (systemd/pbx-bridge.service)


def _resolve_secret_files(raw: dict[str, Any], config: Path, environ: dict[str, str]) -> None:
    """A relative secret file path (ami.secret_file, api.token_file, api.tokens.N.token_file,
    smtp.password_file) names a file in $CREDENTIALS_DIRECTORY when systemd set it, else beside
    the configuration file: `secret_file = "ami.secret"` works in the unit and on the command line."""
    base = Path(environ[CREDENTIALS_ENV]) if environ.get(CREDENTIALS_ENV) else config.absolute().parent
    tables: list[tuple[object, str]] = [(raw.get("ami"), "secret_file"), (raw.get("api"), "token_file"),
                                        (raw.get("smtp"), "password_file")]
    api = raw.get("api")
    if isinstance(api, dict) and isinstance(api.get("tokens"), list):
        tables += [(entry, "token_file") for entry in api["tokens"]]
    for table, key in tables:
        if isinstance(table, dict) and isinstance(value := table.get(key), str) and value \
                and not Path(value).is_absolute():
            table[key] = str(base / value)


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # A check across sections (a Settings model validator) names its key in its message.
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)


def load_settings(path: Path, environ: dict[str, str] | None = None) -> Settings:
    """Read and validate the configuration file; raise ConfigError naming the bad key."""
    environ = dict(os.environ) if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    _apply_secret_env(raw, environ)
    _resolve_secret_files(raw, path, environ)
    try:
        settings = Settings.model_validate(raw, context={"environ": environ})
        settings.ami.resolved_secret()
        settings.api.resolved_tokens()
        settings.smtp.resolved_password()
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return settings
