"""The `pbx-bridge` command line: run, migrate, check-config, probe, dialplan, report, reconcile."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path

import asyncpg
import structlog

from pbx_bridge import __version__
from pbx_bridge.config import ConfigError, Settings, config_path, load_settings
from pbx_bridge.logs import configure_logging
from pbx_bridge.pbx import NAME_PATTERN, PbxName, PbxNameError, learn_pbx, name_for, pbx_dsn
from pbx_bridge.storage.migrations import MigrationError, migrate, sql_dir
from pbx_bridge.storage.settings import publish_settings

EXIT_CONFIG = 2
EXIT_ALREADY_RUNNING = 2  # another pbx-bridge holds this PBX's lock (or this journal)
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $PBX_BRIDGE_CONFIG or /etc/pbx-bridge/pbx-bridge.toml)")
    parser = argparse.ArgumentParser(prog="pbx-bridge", parents=[common],
                                     description="400 hotline rules on Asterisk, every call recorded in PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"pbx-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the daemon in the foreground")
    commands.add_parser("migrate", parents=[common], help="apply the SQL migrations (idempotent)")
    commands.add_parser("check-config", parents=[common], help="validate the configuration and print it")
    commands.add_parser("probe", parents=[common],
                        help="ask the running daemon for a line probe, wait, exit 0 only if the line is healthy")
    dialplan = commands.add_parser("dialplan", parents=[common],
                                   help="write extensions_generated.conf (the dialplan's static fallback)")
    dialplan.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    report = commands.add_parser("report", parents=[common],
                                 help="the daily management report of one local day (default: yesterday)")
    report.add_argument("--date", type=_iso_day, metavar="YYYY-MM-DD",
                        help="the local day to report (default: yesterday in the configured time zone)")
    report.add_argument("--format", choices=["text", "csv", "html"],
                        help="what to print (default: text); a CSV file is written with a BOM for Excel")
    report.add_argument("--email", action="store_true",
                        help="mail it to [report] recipients instead ([report] format, the CSV attached)")
    report.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    report.add_argument("--pbx", metavar="NAME", type=_pbx_name,
                        help="the report of this PBX of the database (default: this configuration's, "
                             "[pbx] name or else Asterisk's systemname, asked over AMI)")
    reconcile = commands.add_parser(
        "reconcile", parents=[common],
        help="build or complete, from the cel table, the records of hotline calls in a range that lack a final one")
    reconcile.add_argument("--since", required=True, type=_moment, metavar="T",
                           help="calls that started at or after T: ISO 8601 (local time of the configured "
                                "zone without an offset), or a time ago such as 90m, 6h, 2d")
    reconcile.add_argument("--until", type=_moment, metavar="T", help="and before T (default: now)")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would be done, write nothing")
    reconcile.add_argument("--system-name", metavar="NAME",
                           help="Asterisk's systemname ('' for none), when AMI cannot be asked: the CEL rows "
                                "of this PBX are those whose linkedid starts with it")
    return parser


def _moment(text: str) -> str:
    """argparse type: checked here, resolved against the configured time zone later."""
    if _parse_moment(text, UTC, datetime.now(UTC)) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO 8601 time nor a time ago like 6h")
    return text


def _parse_moment(text: str, zone: tzinfo, now: datetime) -> datetime | None:
    """An ISO 8601 date or time (in `zone` without an offset), or `<n>m|h|d` before `now`."""
    unit = {"m": 60, "h": 3600, "d": 86400}.get(text[-1:])
    if unit is not None and text[:-1].isascii() and text[:-1].isdigit():
        return now - timedelta(seconds=int(text[:-1]) * unit)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=zone) if when.tzinfo is None else when


def _pbx_name(text: str) -> str:
    """argparse type: a PBX's name as the tables allow it."""
    if NAME_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a PBX name (1 to 64 of A-Z a-z 0-9 _ . : @ / -)")
    return text


def _iso_day(text: str) -> date:
    """argparse type: a YYYY-MM-DD date."""
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _check_config(settings: Settings) -> None:
    now = datetime.now(settings.zone)
    print("configuration OK")
    print(f"  time zone       {settings.timezone} (local time now {now:%Y-%m-%d %H:%M %a})")
    print(f"  AMI             {settings.ami.username}@{settings.ami.host}:{settings.ami.port}")
    print(f"  hotline numbers {', '.join(settings.hotline.numbers)} on trunk {settings.hotline.trunk}")
    limit = settings.ring.max_rings * settings.ring.period_seconds
    print(f"  ring limit      {settings.ring.max_rings} rings x {settings.ring.period_seconds:g} s "
          f"(answered within {limit:g} s)")
    schedule = settings.hours.schedule(settings.zone)
    print(f"  today           {schedule.day(now.date()).describe()}")
    state = "OPEN (agents ring)" if schedule.is_open(now) else "CLOSED (after hours)"
    boundary = schedule.next_boundary(now)
    until = f", until {boundary:%Y-%m-%d %H:%M %a}" if boundary else ""
    print(f"  now             {state}{until}")
    print("  next days       " + "\n                  ".join(
        schedule.day(now.date() + timedelta(days=d)).describe() for d in range(1, 4)))
    if not schedule.day(now.date()).calendar_known:
        print(f"  WARNING         the holiday calendar has no data for {now.year}: weekly hours only "
              "(upgrade the chinesecalendar package)")
    print(f"  line probes     {_probe_line(settings)}")
    if settings.probe_uses_hotline_trunk:
        print(f"  WARNING         line probes dial out through the hotline trunk {settings.probe_trunk!r}, "
              "allowed by [probe] allow_hotline_trunk;\n                  the 400 line never dials out: "
              "name another outbound line in [probe] trunk")
    print(f"  ops API         {settings.api.listen}")
    print(f"  journal         {settings.database.journal_file} (rejected records: {settings.database.rejected_file})")


def _probe_line(settings: Settings) -> str:
    """Which line probes use, e.g. "via PJSIP endpoint 'pstn' to 4008001234 (caller ...); daily 08:00, ..."."""
    if settings.probe_trunk is None:
        return "off ([probe] caller_id not set)"
    probe = settings.probe
    return (f"via PJSIP endpoint {settings.probe_trunk!r} to {settings.probe_number} (caller {probe.caller_id}); "
            f"daily {probe.daily_at}, when quiet {probe.quiet_minutes:g} min")


EXIT_PROBE_FAILED = 1
EXIT_DAEMON_UNREACHABLE = 3


async def _probe(settings: Settings) -> int:
    """POST /probes to the running daemon, poll until it finishes, print each attempt."""
    import aiohttp

    token = settings.api.resolved_token("ops")
    if token is None:
        print("pbx-bridge probe: no [api] token with the role ops is configured, so the daemon refuses "
              "probe requests", file=sys.stderr)
        return EXIT_CONFIG
    host, port = settings.api.host_port
    base = f"http://{host}:{port}"
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    deadline = time.monotonic() + 4 * settings.probe.timeout_seconds + 30
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=headers) as http:
            async with http.post(f"{base}/probes") as response:
                body = await response.json()
                if response.status != 202:
                    print(f"pbx-bridge probe: refused ({response.status}): {body.get('error')}", file=sys.stderr)
                    return EXIT_PROBE_FAILED
            print(f"probe {body['id']} {'started' if body['started'] else 'already running'} "
                  f"({body['trigger']}); waiting", flush=True)
            while body["status"] == "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                async with http.get(f"{base}/probes/{body['id']}") as response:
                    body = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"pbx-bridge probe: the daemon's API at {base} is unreachable: {exc}", file=sys.stderr)
        return EXIT_DAEMON_UNREACHABLE
    for attempt in body["attempts"]:
        delay = f", {attempt['delay_ms']} ms dial to arrival" if attempt["delay_ms"] is not None else ""
        reason = f" ({attempt['reason']})" if attempt["reason"] else ""
        print(f"  attempt {attempt['attempt']}: {attempt['outcome']}{delay}{reason}")
    print(f"line {'healthy' if body['status'] == 'ok' else 'NOT healthy'}: {body['status']}")
    return 0 if body["status"] == "ok" else EXIT_PROBE_FAILED


def _dialplan(settings: Settings, output: str | None, source: str) -> None:
    from pbx_bridge.dialplan import render

    text = render(settings, source)
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    # 0640: the file holds the dialplan's event key; give it Asterisk's group (chgrp) when installing.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    partial.replace(target)  # Asterisk never reads a half-written file
    print(f"wrote {target}")


async def _pbx(settings: Settings, system_name: str | None = None, *, need_system_name: bool = False) -> PbxName:
    """This PBX's name (and systemname): from the configuration and the command line, else from
    one AMI session (PbxNameError when AMI does not answer within 10 s)."""
    if settings.pbx.name is not None and (system_name is not None or not need_system_name):
        return PbxName(settings.pbx.name, system_name)
    if system_name is not None:
        return PbxName(name_for(settings.pbx.name, system_name), system_name)
    return await learn_pbx(settings, give_up_after=10)


async def _connect(settings: Settings, pbx: str | None) -> asyncpg.Connection:
    """A database session, writing for the PBX `pbx` if given."""
    dsn = settings.database.dsn.get_secret_value()
    conn: asyncpg.Connection = await asyncpg.connect(dsn if pbx is None else pbx_dsn(dsn, pbx), timeout=10)
    return conn


async def _migrate(settings: Settings) -> None:
    # Rows older than the `pbx` column are named after [pbx] name if set (else, by the migration,
    # after the systemname in their linkedids).
    conn = await _connect(settings, settings.pbx.name)
    try:
        applied = await migrate(conn, sql_dir())
        await publish_settings(conn, settings)
    finally:
        await conn.close()
    print("migrations applied: " + ", ".join(applied) if applied else "database schema is up to date")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `pbx-bridge` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report" and args.email and (args.format or args.output):
        parser.error("report --email mails the configured [report] format; it takes no --format or --output")
    try:
        settings = load_settings(config_path(args.config))
    except ConfigError as exc:
        print(f"pbx-bridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    configure_logging(settings.log.level, settings.log.format)
    log = structlog.get_logger("pbx_bridge")
    try:
        if args.command == "check-config":
            _check_config(settings)
        elif args.command == "probe":
            raise SystemExit(asyncio.run(_probe(settings)))
        elif args.command == "dialplan":
            _dialplan(settings, args.output, str(config_path(args.config)))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "run":
            _run(settings, log)
        elif args.command == "report":
            raise SystemExit(asyncio.run(_report(settings, args.date, args.format or "text", args.email,
                                                 args.output, args.pbx)))
        elif args.command == "reconcile":
            raise SystemExit(asyncio.run(_reconcile(settings, args.since, args.until, args.dry_run, args.system_name)))
    except (MigrationError, PbxNameError, OSError, asyncpg.PostgresError) as exc:
        print(f"pbx-bridge {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


async def _report(settings: Settings, day: date | None, fmt: str, email: bool, output: str | None,
                  pbx_name: str | None = None) -> int:
    """Build the report of `day` from the views; print it, write it to `output`, or mail it."""
    from pbx_bridge.report import (
        ReportError,
        build_report,
        compose_email,
        default_day,
        render_csv,
        render_html,
        render_text,
        send_email,
    )
    from pbx_bridge.routing import Clock

    recipients = settings.report.recipients
    if email and (not recipients or settings.smtp.host is None):
        missing = "no [report] recipients are configured" if not recipients else "no [smtp] host is configured"
        print(f"pbx-bridge report: cannot mail the report: {missing}", file=sys.stderr)
        return EXIT_CONFIG
    now = Clock.from_environment().now()
    day = day or default_day(now, settings.zone)
    conn = await _connect(settings, pbx_name or (await _pbx(settings)).name)
    try:
        report = await build_report(conn, day, generated_at=now,
                                    ring_limit_seconds=settings.ring.period_seconds * settings.ring.max_rings)
    finally:
        await conn.close()
    if report.timezone != settings.timezone:
        print(f"pbx-bridge report: warning: the database's views use the time zone {report.timezone}, the "
              f"configuration says {settings.timezone} (run `pbx-bridge migrate` to align them)", file=sys.stderr)
    if email:
        try:
            await send_email(settings.smtp, compose_email(report, settings.smtp, recipients, settings.report.format))
        except ReportError as exc:
            print(f"pbx-bridge report: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"mailed the report of {day.isoformat()} to {', '.join(recipients)}")
        return 0
    text = {"text": render_text, "csv": render_csv, "html": render_html}[fmt](report)
    if output is None:
        sys.stdout.write(text)
    else:
        _write_atomically(Path(output), text, "utf-8-sig" if fmt == "csv" else "utf-8")
        print(f"wrote {output}", file=sys.stderr)
    return 0


async def _reconcile(settings: Settings, since_text: str, until_text: str | None, dry_run: bool,
                     system_name: str | None) -> int:
    """Rebuild from CEL the hotline calls of a range that lack a final record; print each call's fate."""
    from pbx_bridge.cel.reconcile import reconcile, tracker_settings_for

    now = datetime.now(UTC)
    since = _parse_moment(since_text, settings.zone, now)
    until = _parse_moment(until_text, settings.zone, now) if until_text else now
    assert since is not None and until is not None  # checked by argparse
    if until <= since:
        print("pbx-bridge reconcile: --until must be after --since", file=sys.stderr)
        return EXIT_CONFIG
    pbx = await _pbx(settings, system_name, need_system_name=True)
    assert pbx.system_name is not None
    conn = await _connect(settings, pbx.name)
    try:
        outcomes = await reconcile(conn, tracker_settings_for(settings), since, until, system_name=pbx.system_name,
                                   dry_run=dry_run)
    finally:
        await conn.close()
    zone = settings.zone
    span = f"{since.astimezone(zone):%Y-%m-%d %H:%M:%S} .. {until.astimezone(zone):%Y-%m-%d %H:%M:%S}"
    print(f"hotline calls of the PBX {pbx.name} started {span} ({settings.timezone}): {len(outcomes)} in CEL"
          f"{' (dry run: nothing written)' if dry_run else ''}")
    would = {"created": "would create", "completed": "would complete", "replaced": "would replace"}
    counts: dict[str, int] = {}
    for outcome in outcomes:
        action = would.get(outcome.action, outcome.action) if dry_run else outcome.action
        counts[action] = counts.get(action, 0) + 1
        record = outcome.call.record if outcome.call is not None else None
        what = ""
        if record is not None:
            what = (f"{record.started_at.astimezone(zone):%Y-%m-%d %H:%M:%S}  {record.caller_number or '-':<14} "
                    f"{record.disposition or 'in progress'}  ")
        print(f"  {action:<14} {outcome.linkedid:<28} {what}({outcome.reason})")
    print("summary: " + (", ".join(f"{action} {n}" for action, n in counts.items()) or "nothing to do"))
    return 0


def _write_atomically(target: Path, text: str, encoding: str) -> None:
    """Write `text` next to `target`, then rename it over `target` (readers never see half a file; mode 0600)."""
    import os
    import tempfile

    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as handle:
            handle.write(text)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _run(settings: Settings, log: structlog.typing.FilteringBoundLogger) -> None:
    from pbx_bridge.daemon import run_daemon
    from pbx_bridge.standby import LeadershipLostError
    from pbx_bridge.storage.leader import AlreadyRunningError

    refused: str | None = None
    try:
        asyncio.run(run_daemon(settings))
    except* AlreadyRunningError as group:  # a second pbx-bridge for this PBX: one line, exit 2
        refused = str(group.exceptions[0])
    except* LeadershipLostError:  # fenced (logged as leadership_lost): exit, the supervisor restarts it as standby
        raise SystemExit(EXIT_FAILURE) from None
    except* Exception as group:  # a daemon task failed: log every failure, exit non-zero
        for exc in group.exceptions:
            log.error("pbx_bridge_failed", error=repr(exc), exc_info=exc)
        raise SystemExit(EXIT_FAILURE) from None
    if refused is not None:
        print(f"pbx-bridge run: {refused}", file=sys.stderr)
        raise SystemExit(EXIT_ALREADY_RUNNING)
