"""Which PBX this pbx-bridge speaks for: the name on its rows and the CEL rows that are its own.

Several PBXs (sites) may write into one database. Every row that belongs to a PBX carries
`pbx`: `[pbx] name`, else Asterisk's `systemname`, else "default". Each of pbx-bridge's database
connections is opened for its PBX (the session setting `pbx_bridge.pbx`, see `pbx_dsn`): the
tables take `pbx` from it by default and the daemon's own queries filter on `session_pbx()`, so
no statement passes the name around and none can write for another PBX.

Linkedids stay unique across PBXs because each Asterisk has its own `systemname`, which Asterisk
puts before every uniqueid and linkedid (`pbx-1795466707.80`); an Asterisk without one writes
bare `1795466707.80`. That prefix is also how the CEL rows of one PBX are told from another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from pbx_bridge.ami.client import AmiClient, AmiError
from pbx_bridge.config import Settings

log = structlog.get_logger("pbx_bridge.pbx")

SESSION_SETTING = "pbx_bridge.pbx"
DEFAULT_NAME = "default"  # no [pbx] name and no systemname: what the migration backfills too
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:@/-]{1,64}")  # the same as [pbx] name and the tables' CHECK
CEL_SCOPE = ("(CASE WHEN {param} = '' THEN strpos({column}, '-') = 0 "
             "ELSE starts_with({column}, {param} || '-') END)")


class PbxNameError(Exception):
    """The PBX's name cannot be known or used (its message is the one line to print)."""


@dataclass(frozen=True, slots=True)
class PbxName:
    """This PBX's name on the rows, and Asterisk's systemname ('' when Asterisk has none)."""

    name: str
    system_name: str | None  # None: not read yet (a configured name needs no AMI at start)


class PbxNotNamedError(OSError):
    """The PBX's name is not known yet: it comes with the first AMI login (Asterisk's systemname).
    An OSError, so that every database user retries it as it retries an unreachable database."""


class PbxNaming:
    """The daemon's PBX name: `[pbx] name` from the start, else Asterisk's systemname once the
    first AMI login read it (until then no session can be opened: nothing is written unnamed)."""

    def __init__(self, dsn: str, configured: str | None) -> None:
        self._dsn = dsn
        self.name = configured
        self.system_name: str | None = None  # None until the first login

    def learn(self, system_name: str) -> None:
        """Asterisk's systemname, read after a login. The name never changes while running."""
        if self.system_name is None:
            self.name = self.name or name_for(None, system_name)
            log.info("pbx_named", pbx=self.name, system_name=system_name)
            if not system_name:
                log.warning("pbx_without_systemname", pbx=self.name,
                            effect="bare linkedids: a second PBX in this database without one could reuse them",
                            fix="set systemname in asterisk.conf")
        elif system_name != self.system_name:
            log.error("pbx_systemname_changed", pbx=self.name, was=self.system_name, now=system_name,
                      effect="its new calls' CEL rows are read under the new systemname; rows keep the name "
                      "until pbx-bridge restarts")
        self.system_name = system_name

    def require(self) -> str:
        """The name (PbxNotNamedError while it is not known)."""
        if self.name is None:
            raise PbxNotNamedError("the PBX's name is not known yet: it is Asterisk's systemname, read at the "
                                   "first AMI login ([pbx] name sets it at start)")
        return self.name

    def dsn(self) -> str:
        """The database DSN whose sessions write for this PBX (PbxNotNamedError before it is named)."""
        return pbx_dsn(self._dsn, self.require())


def name_for(configured: str | None, system_name: str) -> str:
    """The name on the rows: `[pbx] name`, else the systemname, else "default"."""
    if configured:
        return configured
    if not system_name:
        return DEFAULT_NAME
    if NAME_PATTERN.fullmatch(system_name) is None:
        raise PbxNameError(f"Asterisk's systemname {system_name!r} cannot name this PBX's rows "
                           "(letters, digits and _.:@/- only, at most 64): set [pbx] name")
    return system_name


def pbx_dsn(dsn: str, name: str) -> str:
    """`dsn` whose sessions write for the PBX `name` (asyncpg passes unknown URL parameters to
    the server as session settings)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != SESSION_SETTING]
    return urlunsplit(parts._replace(query=urlencode([*query, (SESSION_SETTING, name)])))


def cel_scope(column: str, param: str) -> str:
    """SQL that is true for the CEL linkedids of the PBX whose systemname is the parameter
    `param`: `<systemname>-...`, or no prefix at all when the systemname is ''."""
    return CEL_SCOPE.format(column=column, param=param)


async def read_system_name(ami: AmiClient) -> str:
    """Asterisk's systemname (CoreSettings; '' when asterisk.conf sets none)."""
    response = await ami.send_action({"Action": "CoreSettings"})
    if response.get("Response") != "Success":
        raise AmiError(f"CoreSettings refused: {response.get('Message')}")
    return str(response.get("SystemName") or "")


async def ask_system_name(settings: Settings, give_up_after: float) -> str:
    """Log into AMI once to read the systemname (the command line's way), retrying with the AMI
    client's backoff for at most `give_up_after` seconds (then PbxNameError)."""
    learnt: list[str] = []
    failure: list[str] = []

    async def on_session(client: AmiClient) -> None:
        try:
            learnt.append(await read_system_name(client))
        except AmiError as exc:
            failure.append(str(exc))
        client.stop()

    client = AmiClient(
        host=settings.ami.host, port=settings.ami.port, username=settings.ami.username,
        secret=settings.ami.resolved_secret().get_secret_value(), on_event=lambda _: None,
        connect_timeout=settings.ami.connect_timeout_seconds, reconnect_max=settings.ami.reconnect_max_seconds,
        on_session=on_session)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(give_up_after):
            await client.run()  # returns once on_session stopped it
    client.stop()
    if learnt:
        return learnt[0]
    reason = failure[0] if failure else f"AMI at {settings.ami.host}:{settings.ami.port} did not answer"
    raise PbxNameError(f"cannot read Asterisk's systemname ({reason}) within {give_up_after:g} s")


async def learn_pbx(settings: Settings, give_up_after: float = 10.0) -> PbxName:
    """This PBX's name and systemname, from the configuration and one AMI session."""
    system_name = await ask_system_name(settings, give_up_after)
    return PbxName(name_for(settings.pbx.name, system_name), system_name)
